"""TLS-RPT (RFC 8460): the result store, the aggregate report and its JSON Schema, the
report message, the _smtp._tls record, and reading received reports."""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hato.message import Envelope
from hato.testing import FakeClock
from hato.tlsrpt import (
    ReportConfig,
    TLSReportError,
    TLSReportStore,
    TLSResult,
    build_report,
    gzip_report,
    parse_incoming,
    parse_tlsrpt_record,
    report_filename,
    report_message,
    seconds_until_next_run,
    select_tlsrpt_record,
    send_report,
    summarize,
    tlsrpt_record,
)

# 2023-11-14 22:13:20 UTC
DAY = datetime.date(2023, 11, 14)
STS = ("version: STSv1", "mode: enforce", "mx: *.mail.example.net", "max_age: 86400")
CONFIG = ReportConfig(
    organization="Hato at relay.example.org",
    contact="mailto:postmaster@example.org",
    submitter="relay.example.org",
    sender="tlsrpt-noreply@relay.example.org",
)


def schema() -> dict[str, Any]:
    text = resources.files("hato").joinpath("schemas/tlsrpt.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def validate(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(report)


T0 = 1_700_000_000.0


def ok(domain: str = "example.net", mx: str = "a.mail.example.net", at: float = T0) -> TLSResult:
    return TLSResult(
        domain,
        "sts",
        mx,
        "success",
        at,
        policy_strings=STS,
        sending_ip="203.0.113.7",
        receiving_ip="198.51.100.2",
    )


def fail(result_type: str, mx: str = "b.mail.example.net") -> TLSResult:
    return TLSResult(
        "example.net",
        "sts",
        mx,
        result_type,
        T0,
        policy_strings=STS,
        sending_ip="203.0.113.7",
        receiving_ip="198.51.100.3",
        receiving_mx_helo="b.mail.example.net",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TLSReportStore]:
    s = TLSReportStore.in_data_dir(tmp_path, clock=FakeClock())
    yield s
    s.close()


def test_store_counts_per_day_and_domain_and_survives_reopening(tmp_path: Path) -> None:
    clock = FakeClock()
    store = TLSReportStore.in_data_dir(tmp_path, clock=clock)
    for _ in range(3):
        store.record(ok())
    store.record(fail("certificate-host-mismatch"))
    store.record(fail("certificate-host-mismatch"))
    store.record(TLSResult("other.test", "no-policy-found", "mx.other.test", "success", T0))
    store.record(ok(at=T0 + 86400))
    store.close()

    store = TLSReportStore.in_data_dir(tmp_path, clock=clock)
    assert store.domains(DAY) == ["example.net", "other.test"]
    rows = store.rows(DAY, "example.net")
    assert sum(r.count for r in rows if not r.result_type) == 3
    assert sum(r.count for r in rows if r.result_type) == 2
    assert store.days_pending(DAY + datetime.timedelta(days=1)) == [DAY]
    assert store.days_pending(DAY + datetime.timedelta(days=2)) == [
        DAY,
        DAY + datetime.timedelta(days=1),
    ]
    store.close()


def test_result_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="result type"):
        TLSResult("a.test", "sts", "mx", "it-broke", T0)
    with pytest.raises(ValueError, match="policy_type"):
        TLSResult("a.test", "dane", "mx", "success", T0)  # type: ignore[arg-type]


def test_report_follows_rfc8460_and_validates_against_the_schema(store: TLSReportStore) -> None:
    for _ in range(5):
        store.record(ok())
    store.record(fail("certificate-host-mismatch"))
    store.record(fail("certificate-host-mismatch"))
    store.record(fail("starttls-not-supported", mx="c.mail.example.net"))
    tlsa = ("3 1 1 " + "ab" * 32,)
    store.record(
        TLSResult("example.net", "tlsa", "d.mail.example.net", "success", T0, policy_strings=tlsa)
    )
    report = build_report(
        domain="example.net",
        day=DAY,
        rows=store.rows(DAY, "example.net"),
        organization=CONFIG.organization,
        contact=CONFIG.contact,
        report_id="r1",
    )
    validate(report)
    assert report["date-range"] == {
        "start-datetime": "2023-11-14T00:00:00Z",
        "end-datetime": "2023-11-14T23:59:59Z",
    }
    assert [p["policy"]["policy-type"] for p in report["policies"]] == ["sts", "tlsa"]
    sts = report["policies"][0]
    assert sts["policy"] == {
        "policy-type": "sts",
        "policy-domain": "example.net",
        "policy-string": list(STS),
        "mx-host": ["*.mail.example.net"],
    }
    assert sts["summary"] == {
        "total-successful-session-count": 5,
        "total-failure-session-count": 3,
    }
    assert {
        "result-type": "certificate-host-mismatch",
        "sending-mta-ip": "203.0.113.7",
        "receiving-ip": "198.51.100.3",
        "receiving-mx-hostname": "b.mail.example.net",
        "receiving-mx-helo": "b.mail.example.net",
        "failed-session-count": 2,
    } in sts["failure-details"]
    tlsa_policy = report["policies"][1]
    assert tlsa_policy["policy"]["mx-host"] == ["d.mail.example.net"]
    assert "failure-details" not in tlsa_policy


def test_schema_rejects_what_the_rfc_does_not_allow() -> None:
    good = {
        "organization-name": "o",
        "date-range": {"start-datetime": "2023-11-14T00:00:00Z", "end-datetime": "x"},
        "contact-info": "c",
        "report-id": "r",
        "policies": [],
    }
    with pytest.raises(jsonschema.ValidationError):
        validate(good)  # end-datetime is not a date-time
    good["date-range"]["end-datetime"] = "2023-11-14T23:59:59Z"  # type: ignore[index]
    validate(good)
    bad_type = dict(good, policies=[{"policy": {"policy-type": "dane", "policy-domain": "d"}}])
    with pytest.raises(jsonschema.ValidationError):
        validate(bad_type)
    no_summary = dict(good, policies=[{"policy": {"policy-type": "sts", "policy-domain": "d"}}])
    with pytest.raises(jsonschema.ValidationError):
        validate(no_summary)


@pytest.mark.parametrize(
    ("txt", "uris"),
    [
        ("v=TLSRPTv1; rua=mailto:tls@example.net", ["mailto:tls@example.net"]),
        (
            "v=TLSRPTv1;rua=mailto:a@example.net,https://r.example.net/tlsrpt",
            ["mailto:a@example.net", "https://r.example.net/tlsrpt"],
        ),
        ("v=TLSRPTv1; rua=ftp://x, mailto:b@x.test", ["mailto:b@x.test"]),
    ],
)
def test_tlsrpt_record_parsed(txt: str, uris: list[str]) -> None:
    assert parse_tlsrpt_record(txt) == uris


@pytest.mark.parametrize("txt", ["v=spf1 -all", "v=TLSRPTv1;", "v=TLSRPTv1; rua=http://x.test/"])
def test_not_a_usable_tlsrpt_record(txt: str) -> None:
    with pytest.raises(TLSReportError):
        parse_tlsrpt_record(txt)


def test_tlsrpt_record_built_and_selected() -> None:
    assert tlsrpt_record(["tls@example.org"]) == "v=TLSRPTv1; rua=mailto:tls@example.org"
    assert select_tlsrpt_record(["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@b.c"]) is not None
    assert select_tlsrpt_record(["v=TLSRPTv1; rua=mailto:a@b.c"] * 2) is None


def test_report_message_has_the_rfc8460_form_and_reads_back(store: TLSReportStore) -> None:
    store.record(ok())
    report = build_report(
        domain="example.net",
        day=DAY,
        rows=store.rows(DAY, "example.net"),
        organization=CONFIG.organization,
        contact=CONFIG.contact,
        report_id="2023-11-14.abc.example.net@relay.example.org",
    )
    gz = gzip_report(report)
    data = report_message(
        report=report,
        gzipped=gz,
        domain="example.net",
        submitter="relay.example.org",
        sender=CONFIG.sender,
        recipient="tls@example.net",
        day=DAY,
        now=1_700_000_000.0,
    )
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == (
        "Report Domain: example.net Submitter: relay.example.org "
        "Report-ID: <2023-11-14.abc.example.net@relay.example.org>"
    )
    assert msg["TLS-Report-Domain"] == "example.net"
    assert msg["TLS-Report-Submitter"] == "relay.example.org"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    assert parts[1].get_filename() == report_filename("relay.example.org", "example.net", DAY)
    assert parts[1].get_filename() == "relay.example.org!example.net!1699920000!1700006399.json.gz"
    assert json.loads(gzip.decompress(parts[1].get_payload(decode=True))) == report
    assert parse_incoming(data) == report
    assert parse_incoming(gz) == report
    assert parse_incoming(json.dumps(report).encode()) == report


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: hi\r\n\r\nno report\r\n",
        b"\x1f\x8bnot gzip",
        b'{"organization-name": "x"}',
        b"[1, 2]",
    ],
)
def test_bad_incoming_reports_are_refused(data: bytes) -> None:
    with pytest.raises(TLSReportError):
        parse_incoming(data)


def test_summaries_of_a_received_report() -> None:
    report = json.loads(
        """{
        "organization-name": "Company-X", "contact-info": "sts-reporting@company-x.example",
        "date-range": {"start-datetime": "2016-04-01T00:00:00Z",
                       "end-datetime": "2016-04-01T23:59:59Z"},
        "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
        "policies": [{
          "policy": {"policy-type": "sts", "policy-string": ["version: STSv1"],
                     "policy-domain": "company-y.example", "mx-host": ["*.mail.company-y.example"]},
          "summary": {"total-successful-session-count": 5326,
                      "total-failure-session-count": 303},
          "failure-details": [{"result-type": "certificate-expired",
                               "sending-mta-ip": "2001:db8:abcd:0012::1",
                               "receiving-mx-hostname": "mx1.mail.company-y.example",
                               "failed-session-count": 100}]}]}"""
    )
    validate(report)  # RFC 8460's own example, with the mx-host list of its errata
    [summary] = summarize(report)
    assert (summary.organization, summary.policy_domain, summary.successful, summary.failed) == (
        "Company-X",
        "company-y.example",
        5326,
        303,
    )
    assert summary.failure_details[0]["result-type"] == "certificate-expired"


async def test_send_report_queues_one_message_per_mailto_once(store: TLSReportStore) -> None:
    store.record(ok())
    store.record(fail("certificate-expired"))
    queued: list[tuple[Envelope, bytes, str]] = []

    async def txt(name: str) -> list[str]:
        assert name == "_smtp._tls.example.net"
        return ["v=TLSRPTv1; rua=mailto:tls@example.net,mailto:copy@example.net"]

    async def enqueue(envelope: Envelope, data: bytes, key: str) -> str:
        queued.append((envelope, data, key))
        return f"q{len(queued)}"

    outcome = await send_report(
        store, CONFIG, "example.net", DAY, txt=txt, enqueue=enqueue, now=1_700_100_000.0
    )
    assert outcome.status == "sent", outcome
    assert [e.recipients for e, _, _ in queued] == [["tls@example.net"], ["copy@example.net"]]
    assert all(e.sender == CONFIG.sender for e, _, _ in queued)
    report = parse_incoming(queued[0][1])
    validate(report)
    assert report["report-id"] == outcome.report_id
    assert store.sent_status(DAY, "example.net") == ("sent", outcome.detail)
    # The report-id is kept: asking again gives the same one.
    assert store.report_id(DAY, "example.net", "relay.example.org") == outcome.report_id


async def test_send_report_without_a_record_is_noted(store: TLSReportStore) -> None:
    store.record(ok())

    async def txt(name: str) -> list[str]:
        return ["v=spf1 -all"]

    async def enqueue(envelope: Envelope, data: bytes, key: str) -> str:
        raise AssertionError("nothing to send")

    outcome = await send_report(
        store, CONFIG, "example.net", DAY, txt=txt, enqueue=enqueue, now=1_700_100_000.0
    )
    assert outcome.status == "no-record"
    assert store.sent_status(DAY, "example.net") is not None


def test_next_run_is_shortly_after_midnight_utc() -> None:
    assert seconds_until_next_run(1_700_000_000.0) == (86400 - 22 * 3600 - 13 * 60 - 20) + 900


def test_store_takes_the_couriers_own_result_type_and_never_raises(tmp_path: Path) -> None:
    from dataclasses import dataclass as plain

    @plain(frozen=True)
    class CourierResult:  # the MX courier's dataclass: no receiving_mx_helo
        policy_domain: str
        policy_type: str
        mx_host: str
        result_type: str
        time: float
        policy_strings: tuple[str, ...] = ()
        mx_host_patterns: tuple[str, ...] = ()
        sending_ip: str = ""
        receiving_ip: str = ""
        failure_reason: str = ""
        tls_policy: str = ""

    store = TLSReportStore.in_data_dir(tmp_path, clock=FakeClock())
    store.record(CourierResult("example.net", "tlsa", "mx.example.net", "success", T0))
    store.record(
        CourierResult(
            "example.net", "tlsa", "mx.example.net", "tlsa-invalid", T0, failure_reason="no match"
        )
    )
    report = build_report(
        domain="example.net",
        day=DAY,
        rows=store.rows(DAY, "example.net"),
        organization="o",
        contact="c",
        report_id="r",
    )
    validate(report)
    [policy] = report["policies"]
    assert policy["failure-details"] == [
        {
            "result-type": "tlsa-invalid",
            "receiving-mx-hostname": "mx.example.net",
            "failed-session-count": 1,
            "failure-reason-code": "no match",
        }
    ]
    store.close()
    store.record(CourierResult("example.net", "tlsa", "mx.example.net", "success", T0))
    assert store.errors == 1 and store.last_error
