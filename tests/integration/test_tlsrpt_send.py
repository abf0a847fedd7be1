"""TLS-RPT reports sent for real: the rua from the test DNS, the report message into a
real SQLite queue, the HTTPS POST to a loopback server with a test-CA certificate; and
``hato tls report`` / ``hato tls reports`` as a user runs them."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import gzip
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import pytest
import trustme

from hato.app import build_tlsrpt_store, send_tls_reports
from hato.config import load_settings
from hato.queue import open_queue
from hato.tlsrpt import TLSReportStore, TLSResult, parse_incoming
from peers.dns import TestDNS

SRC = str(Path(__file__).resolve().parents[2] / "src")
STS = ("version: STSv1", "mode: enforce", "mx: mx.example.net", "max_age: 86400")


def validate(report: dict[str, Any]) -> None:
    schema = json.loads(resources.files("hato").joinpath("schemas/tlsrpt.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)


class _Collector(http.server.BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.posts.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def https_collector() -> Iterator[tuple[str, ssl.SSLContext, list[tuple[str, str, bytes]]]]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    posts: list[tuple[str, str, bytes]] = []
    handler = type("Collector", (_Collector,), {"posts": posts})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/tlsrpt", client_ctx, posts
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def record_yesterday(data_dir: Path) -> datetime.date:
    day = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    # What the courier recorded yesterday.
    store = TLSReportStore.in_data_dir(data_dir, clock=time.time)
    at = time.time() - 86400
    for _ in range(4):
        store.record(
            TLSResult(
                "example.net",
                "sts",
                "mx.example.net",
                "success",
                at,
                policy_strings=STS,
                mx_host_patterns=("mx.example.net",),
            )
        )
    store.record(
        TLSResult(
            "example.net",
            "sts",
            "mx.example.net",
            "certificate-not-trusted",
            at,
            policy_strings=STS,
            mx_host_patterns=("mx.example.net",),
            sending_ip="127.0.0.1",
            receiving_ip="127.0.0.9",
        )
    )
    store.close()
    return day


async def test_report_mailed_into_the_queue_and_posted_over_https(
    tmp_path: Path,
    https_collector: tuple[str, ssl.SSLContext, list[tuple[str, str, bytes]]],
) -> None:
    url, client_ctx, posts = https_collector
    data_dir = tmp_path / "data"
    day = record_yesterday(data_dir)
    with TestDNS() as dns:
        dns.txt("_smtp._tls.example.net", f"v=TLSRPTv1; rua=mailto:tls@example.net,{url}")
        settings = load_settings(
            data_dir=data_dir, hostname="relay.example.org", dns_servers=[dns.server]
        )
        queue = open_queue(settings.effective_queue_url)
        await queue.open()
        store = build_tlsrpt_store(settings)
        try:
            [outcome] = await send_tls_reports(settings, queue, store, verify=client_ctx)
            assert outcome.status == "sent", outcome
            assert outcome.day == day
            [queued] = await queue.list()
            message = await queue.get(queued.id)
            assert message.sender == "noreply-smtp-tls-reporting@relay.example.org"
            assert [r.address for r in message.recipients] == ["tls@example.net"]
            # Sent once: a second run finds nothing due.
            assert await send_tls_reports(settings, queue, store, verify=client_ctx) == []
        finally:
            store.close()
            await queue.close()
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    assert parsed["TLS-Report-Domain"] == "example.net"
    assert parsed["Subject"].startswith("Report Domain: example.net Submitter: relay.example.org")
    report = parse_incoming(message.data)
    validate(report)
    assert report["policies"][0]["summary"] == {
        "total-successful-session-count": 4,
        "total-failure-session-count": 1,
    }
    [(path, ctype, body)] = posts
    assert (path, ctype) == ("/tlsrpt", "application/tlsrpt+gzip")
    assert json.loads(gzip.decompress(body)) == report


def hato(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_cli_report_send_and_received_reports(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    day = record_yesterday(data_dir)
    with TestDNS() as dns:
        dns.txt("_smtp._tls.example.net", "v=TLSRPTv1; rua=mailto:tls@example.net")
        env = {
            "HATO_DATA_DIR": str(data_dir),
            "HATO_HOSTNAME": "relay.example.org",
            "HATO_DNS_SERVERS": dns.server,
            "HATO_DOMAINS": "example.org",
            "HATO_TLSRPT_RUA": "tlsrpt@example.org",
        }
        shown = hato("tls", "report", "--date", day.isoformat(), env=env)
        assert shown.returncode == 0, shown.stderr
        [preview] = json.loads(shown.stdout)
        assert preview["policies"][0]["summary"]["total-failure-session-count"] == 1
        sent = hato("tls", "report", "--send", "--date", day.isoformat(), env=env)
        assert sent.returncode == 0, sent.stderr
        assert f"example.net {day.isoformat()}: sent mailto:tls@example.net: queued as" in (
            sent.stdout
        )
        listed = hato("queue", "list", env=env)
        assert "tls@example.net" in listed.stdout, listed

    # The report we sent, as if it came back to our own rua address: delivered into
    # the Maildir of tlsrpt@example.org, read by hato tls reports.
    settings = load_settings(data_dir=data_dir)

    async def first_message() -> bytes:
        queue = open_queue(settings.effective_queue_url)
        await queue.open()
        try:
            [item] = await queue.list()
            return (await queue.get(item.id)).data
        finally:
            await queue.close()

    data = asyncio.run(first_message())
    maildir = data_dir / "mail" / "example.org" / "tlsrpt"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.relay").write_bytes(data)
    (maildir / "new" / "1700000001.M2P1.relay").write_bytes(b"Subject: not a report\r\n\r\nhi\r\n")
    listed = hato("tls", "reports", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "relay.example.org" in listed.stdout
    assert "sts example.net: 4 successful, 1 failed" in listed.stdout
    assert "1 x certificate-not-trusted at mx.example.net from 127.0.0.1" in listed.stdout
    assert "skipped" in listed.stderr and "1700000001" in listed.stderr
    as_json = hato("tls", "reports", "--json", env=env)
    [entry] = json.loads(as_json.stdout)
    assert entry["organization-name"] == "relay.example.org"
    assert entry["total-successful-session-count"] == 4
    # A file given by hand: the same report again is not kept twice.
    copy = tmp_path / "again.eml"
    shutil.copy(maildir / "new" / "1700000000.M1P1.relay", copy)
    again = hato("tls", "reports", "--json", "--import", str(copy), env=env)
    assert len(json.loads(again.stdout)) == 1
    bad = hato("tls", "report", "--date", "yesterday", env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("hato: --date 'yesterday' is not a date")
