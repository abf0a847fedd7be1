"""The received TLS-RPT reports over HTTP (``hato.web.tls_reports``)."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.testclient import TestClient

from hato.config import load_settings
from hato.maillog import MailLog
from hato.queue.memory import MemoryQueue
from hato.testing import FakeClock
from hato.tlsrpt import TLSReportStore
from hato.web import tls_reports
from hato.web.context import WebContext


def report(org: str, domain: str, ok: int) -> dict[str, object]:
    return {
        "organization-name": org,
        "date-range": {
            "start-datetime": "2026-12-01T00:00:00Z",
            "end-datetime": "2026-12-01T23:59:59Z",
        },
        "contact-info": "c",
        "report-id": f"{org}-1",
        "policies": [
            {
                "policy": {"policy-type": "sts", "policy-domain": domain},
                "summary": {
                    "total-successful-session-count": ok,
                    "total-failure-session-count": 0,
                },
            }
        ],
    }


def test_received_reports_as_json(tmp_path: Path) -> None:
    store = TLSReportStore.in_data_dir(tmp_path, clock=FakeClock())
    assert store.add_received(report("Company-X", "example.org", 5))
    assert store.add_received(report("Company-Y", "example.net", 7))
    assert not store.add_received(report("Company-Y", "example.net", 7))  # resent
    store.close()
    settings = load_settings(data_dir=tmp_path)
    ctx = WebContext(settings, MemoryQueue(), MailLog(enabled=False), FakeClock(), "serve", "n")
    with TestClient(Starlette(routes=tls_reports.routes(ctx))) as client:
        everything = client.get("/api/v1/tls/reports").json()["reports"]
        one = client.get("/api/v1/tls/reports", params={"domain": "Example.NET"}).json()
        bad = client.get("/api/v1/tls/reports", params={"limit": "0"})
    assert sorted(e["organization-name"] for e in everything) == ["Company-X", "Company-Y"]
    assert [
        (e["organization-name"], e["total-successful-session-count"]) for e in one["reports"]
    ] == [("Company-Y", 7)]
    assert bad.status_code == 400 and "limit" in bad.json()["error"]
