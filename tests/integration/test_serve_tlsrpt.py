"""TLS-RPT in ``hato serve``: the reports due are queued at start (the daily task), and a
report another server mails to our rua address is delivered to its Maildir and shown by
``hato tls reports``."""

from __future__ import annotations

import datetime
import json
import smtplib
import time
from pathlib import Path

from hato.tlsrpt import TLSReportStore, TLSResult, gzip_report, report_message
from peers.dns import TestDNS
from peers.hato import HatoFactory, operator_setup

STS = ("version: STSv1", "mode: testing", "mx: mx.example.net", "max_age: 86400")


def test_serve_sends_due_reports_and_receives_ours(tmp_path: Path, hato_serve: HatoFactory) -> None:
    data_dir = tmp_path / "data"
    env = operator_setup(data_dir, {"tlsrpt@example.org": "a long password 1"})
    yesterday = time.time() - 86400
    store = TLSReportStore.in_data_dir(data_dir, clock=time.time)
    for result_type in ("success", "success", "starttls-not-supported"):
        store.record(
            TLSResult(
                "example.net", "sts", "mx.example.net", result_type, yesterday, policy_strings=STS
            )
        )
    store.close()

    with TestDNS() as dns:
        dns.txt("_smtp._tls.example.net", "v=TLSRPTv1; rua=mailto:tls@example.net")
        env.update(
            HATO_DOMAINS="example.org",
            HATO_HOSTNAME="relay.example.org",
            HATO_DNS_SERVERS=dns.server,
            HATO_TLSRPT_RUA="tlsrpt@example.org",
            HATO_FSYNC="false",
        )
        serve = hato_serve(env, data_dir=data_dir)
        serve.wait_for_log(r"tlsrpt.*domain=example\.net.*status=sent")
        [queued] = serve.wait_for_queue(
            lambda items: any("tls@example.net" in json.dumps(i) for i in items),
            what="the TLS-RPT report to tls@example.net",
        )
        assert queued["sender"] == "noreply-smtp-tls-reporting@relay.example.org"

        # Another server's report about example.org, mailed to our rua address.
        day = datetime.date.today() - datetime.timedelta(days=1)
        report = {
            "organization-name": "Company-X",
            "date-range": {
                "start-datetime": f"{day.isoformat()}T00:00:00Z",
                "end-datetime": f"{day.isoformat()}T23:59:59Z",
            },
            "contact-info": "sts-reporting@company-x.example",
            "report-id": "5065427c-23d3",
            "policies": [
                {
                    "policy": {"policy-type": "sts", "policy-domain": "example.org"},
                    "summary": {
                        "total-successful-session-count": 41,
                        "total-failure-session-count": 2,
                    },
                    "failure-details": [
                        {
                            "result-type": "certificate-expired",
                            "receiving-mx-hostname": "relay.example.org",
                            "failed-session-count": 2,
                        }
                    ],
                }
            ],
        }
        data = report_message(
            report=report,
            gzipped=gzip_report(report),
            domain="example.org",
            submitter="mail.company-x.example",
            sender="tlsrpt@company-x.example",
            recipient="tlsrpt@example.org",
            day=day,
            now=time.time(),
        )
        with smtplib.SMTP(serve.host, serve.port, timeout=10) as client:
            client.sendmail("tlsrpt@company-x.example", ["tlsrpt@example.org"], data)

        deadline = time.monotonic() + 30
        while True:
            listed = serve.cli("tls", "reports", "--json")
            entries = json.loads(listed.stdout)
            if entries or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert entries == [
        {
            "organization-name": "Company-X",
            "report-id": "5065427c-23d3",
            "start-datetime": f"{day.isoformat()}T00:00:00Z",
            "end-datetime": f"{day.isoformat()}T23:59:59Z",
            "policy-type": "sts",
            "policy-domain": "example.org",
            "total-successful-session-count": 41,
            "total-failure-session-count": 2,
            "failure-details": report["policies"][0]["failure-details"],  # type: ignore[index]
        }
    ]
    text = serve.cli("tls", "reports").stdout
    assert "Company-X" in text and "41 successful, 2 failed" in text
    assert "2 x certificate-expired at relay.example.org" in text
