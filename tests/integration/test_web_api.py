"""The JSON API under /api/v1/ (hato.web.api) over a real queue, in-process over ASGI.

Every endpoint: list filters and pages, one message with its timeline, the raw bytes,
release (to the configured route, and a copy to a one-off relay that is a real aiosmtpd
sink), retry, delete, bulk dry run and act, and the problem bodies of bad input.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from hato.app import build_release_courier
from hato.config import load_settings
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue import open_queue
from hato.queue.base import MessageState, Outcome, Queue, RecipientState
from hato.testing import FakeClock
from hato.web import api
from hato.web.context import WebContext
from peers.asyncsinks import Sink

HTML_MAIL = (
    b"From: App <app@example.org>\r\n"
    b"To: x@example.net\r\n"
    b"Subject: Welcome aboard\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b'Content-Type: multipart/alternative; boundary="b2"\r\n'
    b"\r\n"
    b"--b2\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello in text\r\n"
    b"--b2\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Hello in <b>HTML</b></p>\r\n"
    b"--b2--\r\n"
    b"--b1\r\n"
    b"Content-Type: text/csv\r\n"
    b'Content-Disposition: attachment; filename="report.csv"\r\n'
    b"\r\n"
    b"a,b\r\n1,2\r\n"
    b"--b1--\r\n"
)


def plain(subject: str) -> bytes:
    return f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


class Desk:
    """A queue with known mail, the API over it, and an HTTP client."""

    def __init__(self, queue: Queue, client: httpx.AsyncClient, clock: FakeClock) -> None:
        self.queue = queue
        self.client = client
        self.clock = clock
        self.ids: dict[str, str] = {}


@pytest.fixture(params=["memory", "sqlite"])
async def desk(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Desk]:
    clock = FakeClock()
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/queue.db"
    queue = open_queue(url)
    await queue.open()
    settings = load_settings(data_dir=tmp_path, hostname="desk.test")
    ctx = WebContext(
        settings=settings,
        queue=queue,
        log=MailLog(io.StringIO()),
        clock=clock,
        role="serve",
        node="desk.test",
        release_courier=build_release_courier(settings),
    )
    app = Starlette(routes=api.routes(ctx))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        d = Desk(queue, client, clock)
        ids = d.ids
        ids["held"] = await queue.enqueue(
            Envelope("app@example.org", ["x@example.net"]), HTML_MAIL, held=True
        )
        ids["queued"] = await queue.enqueue(
            Envelope("app@example.org", ["y@example.com", "z@example.com"]), plain("two")
        )
        ids["other"] = await queue.enqueue(
            Envelope("news@example.org", ["w@example.net"]), plain("three")
        )
        try:
            yield d
        finally:
            await queue.close()


def assert_problem(response: httpx.Response, status: int, fragment: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert fragment in body.get("detail", ""), body
    assert "Traceback" not in response.text
    return body


async def test_list_is_newest_first_with_the_fields_of_queue_list_json(desk: Desk) -> None:
    r = await desk.client.get("/api/v1/messages")
    assert r.status_code == 200
    body = r.json()
    ids = [i["id"] for i in body["items"]]
    assert ids == [desk.ids["other"], desk.ids["queued"], desk.ids["held"]]
    item = body["items"][1]
    for key in (
        "id",
        "sender",
        "recipients",
        "state",
        "size",
        "created_at",
        "next_attempt_at",
        "attempts",
        "last_reply",
        "recipient_status",
    ):
        assert key in item
    assert item["recipients"] == ["y@example.com", "z@example.com"]
    assert item["state"] == "queued" and item["subject"] == "two"
    assert body["next_cursor"] == ""
    assert body["counts"]["held"] == 1 and body["counts"]["queued"] == 2


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("state=held", ["held"]),
        ("state=queued,held", ["other", "queued", "held"]),
        ("sender=NEWS@example.org", ["other"]),
        ("recipient=z@example.com", ["queued"]),
        ("domain=example.net", ["other", "held"]),
        ("q=example.com", ["queued"]),
        ("state=sent", []),
    ],
)
async def test_list_filters(desk: Desk, query: str, expected: list[str]) -> None:
    r = await desk.client.get(f"/api/v1/messages?{query}")
    assert r.status_code == 200, r.text
    assert [i["id"] for i in r.json()["items"]] == [desk.ids[name] for name in expected]


async def test_list_older_than_uses_the_age_of_each_message(desk: Desk) -> None:
    desk.clock.now = (await desk.queue.get(desk.ids["other"])).created_at + 3600
    r = await desk.client.get("/api/v1/messages?older_than=1800")
    assert len(r.json()["items"]) == 3
    r = await desk.client.get("/api/v1/messages?older_than=7200")
    assert r.json()["items"] == []


async def test_list_pages_with_a_cursor(desk: Desk) -> None:
    seen: list[str] = []
    cursor = ""
    for _ in range(5):
        r = await desk.client.get("/api/v1/messages", params={"limit": 2, "cursor": cursor})
        body = r.json()
        seen += [i["id"] for i in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == [desk.ids["other"], desk.ids["queued"], desk.ids["held"]]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("state=lost", "unknown state"),
        ("limit=0", "limit must be between"),
        ("limit=many", "limit must be a whole number"),
        ("older_than=yesterday", "older_than"),
        ("cursor=nonsense", "cursor"),
        ("colour=red", "unknown filter key"),
    ],
)
async def test_list_refuses_bad_queries_with_a_problem(
    desk: Desk, query: str, fragment: str
) -> None:
    assert_problem(await desk.client.get(f"/api/v1/messages?{query}"), 400, fragment)


async def test_one_message_with_parts_and_timeline(desk: Desk) -> None:
    mid = desk.ids["held"]
    r = await desk.client.get(f"/api/v1/messages/{mid}")
    assert r.status_code == 200
    body = r.json()
    assert body["envelope"] == {"sender": "app@example.org", "recipients": ["x@example.net"]}
    assert body["state"] == "held" and body["subject"] == "Welcome aboard"
    assert "Hello in text" in body["text"] and "<b>HTML</b>" in body["html"]
    assert ["Subject", "Welcome aboard"] in body["headers"]
    assert body["attachments"] == [
        {"index": 2, "filename": "report.csv", "content_type": "text/csv", "size": 8}
    ]
    assert body["recipient_status"][0]["address"] == "x@example.net"
    assert body["recipient_status"][0]["state"] == "pending"
    assert body["timeline"] == []  # nothing happened to it yet (enqueued without events)


async def test_timeline_carries_the_attempt_record(desk: Desk) -> None:
    mid = desk.ids["queued"]
    claimed = await desk.queue.claim(owner="w", limit=10, lease_seconds=60)
    assert any(m.id == mid for m in claimed)
    from hato.events import Attempt, DeliveryEvent, new_event_id

    attempt = Attempt(
        time=desk.clock(),
        route="relay",
        relay_host="smtp.example.com",
        relay_ip="127.0.0.9",
        reply_code=451,
        reply_enhanced="4.3.0",
        reply_text="try later",
        tls_version="TLSv1.3",
        tls_verified=True,
    )
    event = DeliveryEvent(
        event_id=new_event_id(),
        event="deferred",
        time=desk.clock(),
        node="desk.test",
        queue_id=mid,
        recipient="y@example.com",
        attempt=1,
    ).with_attempt(attempt)
    await desk.queue.record(
        mid,
        [Outcome("y@example.com", RecipientState.PENDING, "451 4.3.0 try later")],
        owner="w",
        retry_at=desk.clock() + 600,
        events=[event],
    )
    for m in claimed:
        if m.id != mid:
            await desk.queue.release(m.id, owner="w")
    body = (await desk.client.get(f"/api/v1/messages/{mid}")).json()
    assert body["state"] == "deferred" and body["attempts"] == 1
    (entry,) = body["timeline"]
    for key, value in attempt.to_json().items():
        assert entry[key] == value
    y, z = body["recipient_status"]
    assert y["timeline"] == [entry] and z["timeline"] == []


async def test_raw_is_the_stored_bytes(desk: Desk) -> None:
    r = await desk.client.get(f"/api/v1/messages/{desk.ids['held']}/raw")
    assert r.status_code == 200
    assert r.headers["content-type"] == "message/rfc822"
    assert r.content == HTML_MAIL


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/messages/NOSUCH"),
        ("GET", "/api/v1/messages/NOSUCH/raw"),
        ("POST", "/api/v1/messages/NOSUCH/release"),
        ("POST", "/api/v1/messages/NOSUCH/retry"),
        ("DELETE", "/api/v1/messages/NOSUCH"),
    ],
)
async def test_unknown_ids_are_404_problems(desk: Desk, method: str, path: str) -> None:
    assert_problem(await desk.client.request(method, path), 404, "NOSUCH")


async def test_retry_and_delete(desk: Desk) -> None:
    mid = desk.ids["queued"]
    r = await desk.client.post(f"/api/v1/messages/{mid}/retry")
    assert r.status_code == 200 and r.json() == {"id": mid, "state": "queued"}
    assert_problem(
        await desk.client.post(f"/api/v1/messages/{desk.ids['held']}/retry"), 409, "held"
    )
    r = await desk.client.delete(f"/api/v1/messages/{mid}")
    assert r.status_code == 200 and r.json() == {"id": mid, "deleted": True}
    assert_problem(await desk.client.get(f"/api/v1/messages/{mid}"), 404)
    events = (await desk.queue.events(queue_id=mid)).events
    assert sorted((e.event, e.recipient) for e in events) == [
        ("deleted", "y@example.com"),
        ("deleted", "z@example.com"),
    ]


async def test_release_without_a_relay_on_the_hold_route_says_what_to_do(desk: Desk) -> None:
    r = await desk.client.post(f"/api/v1/messages/{desk.ids['held']}/release")
    assert_problem(r, 409, "no relay is configured")
    assert (await desk.queue.get(desk.ids["held"])).state is MessageState.HELD
    assert_problem(
        await desk.client.post(f"/api/v1/messages/{desk.ids['queued']}/release"),
        409,
        "not held",
    )


async def test_release_a_copy_to_a_one_off_relay(desk: Desk) -> None:
    mid = desk.ids["held"]
    async with Sink() as sink:
        r = await desk.client.post(
            f"/api/v1/messages/{mid}/release", json={"relay": f"127.0.0.1:{sink.port}"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["recipient"] for x in body["results"]] == ["x@example.net"]
        assert body["results"][0]["result"] == "ok" and body["results"][0]["reply_code"] == 250
        (got,) = sink.handler.messages
        assert got.mail_from == "app@example.org" and got.rcpt_tos == ["x@example.net"]
        assert b"Subject: Welcome aboard" in got.data

        r = await desk.client.post(
            f"/api/v1/messages/{mid}/release",
            json={"relay": f"127.0.0.1:{sink.port}", "recipient": "qa@example.com"},
        )
        assert r.status_code == 200, r.text
        assert sink.handler.messages[-1].rcpt_tos == ["qa@example.com"]
    # The message stays held (a copy went out); the release is on its timeline.
    assert (await desk.queue.get(mid)).state is MessageState.HELD
    events = (await desk.queue.events(queue_id=mid)).events
    assert [(e.event, e.recipient, e.reply_code) for e in events] == [
        ("released", "x@example.net", 250),
        ("released", "qa@example.com", 250),
    ]
    assert events[0].relay_ip == "127.0.0.1"


async def test_release_to_a_relay_that_refuses_is_a_502_problem(desk: Desk) -> None:
    async with Sink() as sink:
        sink.handler.rcpt_replies["x@example.net"] = "550 5.1.1 no such user"
        r = await desk.client.post(
            f"/api/v1/messages/{desk.ids['held']}/release",
            json={"relay": f"127.0.0.1:{sink.port}"},
        )
    body = assert_problem(r, 502, "550")
    assert body["results"][0]["result"] == "permanent"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not json", 400, "not JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"relay": ""}', 400, "relay must be"),
        (b'{"relay": "[127.0.0.1"}', 400, "missing ']'"),
        (b'{"relay": "127.0.0.1:99999"}', 400, "bad port"),
        (b'{"recipient": "nobody"}', 400, "one address"),
        (b'{"recipient": "a@b\\r\\nRCPT TO:<c@d>"}', 400, "one address"),
        (b'{"colour": "red"}', 400, "unknown key"),
    ],
)
async def test_release_refuses_bad_bodies(
    desk: Desk, body: bytes, status: int, fragment: str
) -> None:
    r = await desk.client.post(
        f"/api/v1/messages/{desk.ids['held']}/release",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert_problem(r, status, fragment)


async def test_bulk_dry_run_then_act(desk: Desk) -> None:
    request = {"action": "retry", "filter": {"sender": "app@example.org"}, "dry_run": True}
    r = await desk.client.post("/api/v1/messages/bulk", json=request)
    assert r.status_code == 200 and r.json() == {"matched": 1}  # the held one is not retried
    r = await desk.client.post(
        "/api/v1/messages/bulk", json={"action": "delete", "filter": {"domain": "example.net"}}
    )
    assert r.json() == {"matched": 2, "done": 2}
    left = [i["id"] for i in (await desk.client.get("/api/v1/messages")).json()["items"]]
    assert left == [desk.ids["queued"]]
    r = await desk.client.post(
        "/api/v1/messages/bulk", json={"action": "delete", "filter": {}, "dry_run": True}
    )
    assert r.json() == {"matched": 1}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"action": "bounce"}, "action must be one of"),
        ({"action": "retry", "filter": []}, "filter must be"),
        ({"action": "retry", "filter": {"state": "lost"}}, "unknown state"),
        ({"action": "retry", "filter": {"older_than": "old"}}, "older_than"),
        ({"action": "retry", "dry_run": "yes"}, "dry_run"),
        ({"action": "retry", "filters": {}}, "unknown key"),
    ],
)
async def test_bulk_refuses_bad_requests(desk: Desk, body: dict[str, Any], fragment: str) -> None:
    assert_problem(await desk.client.post("/api/v1/messages/bulk", json=body), 400, fragment)
    assert_problem(await desk.client.post("/api/v1/messages/bulk", content=b""), 400, "JSON")


async def test_release_with_a_configured_relay(tmp_path: Path) -> None:
    """With RELAYHOST set, a release without a body hands the message to the worker's
    route, and a one-off recipient goes through the configured relay."""
    async with Sink() as sink:
        queue = open_queue("memory://")
        await queue.open()
        settings = load_settings(
            data_dir=tmp_path, hostname="desk.test", relay_host=f"[127.0.0.1]:{sink.port}"
        )
        ctx = WebContext(
            settings=settings,
            queue=queue,
            log=MailLog(io.StringIO()),
            clock=FakeClock(),
            role="serve",
            node="desk.test",
            release_courier=build_release_courier(settings),
        )
        transport = httpx.ASGITransport(app=Starlette(routes=api.routes(ctx)))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            held = await queue.enqueue(
                Envelope("app@example.org", ["x@example.net"]), plain("kept"), held=True
            )
            r = await client.post(
                f"/api/v1/messages/{held}/release", json={"recipient": "qa@example.com"}
            )
            assert r.status_code == 200, r.text
            (got,) = sink.handler.messages
            assert got.rcpt_tos == ["qa@example.com"]
            assert (await queue.get(held)).state is MessageState.HELD

            r = await client.post(f"/api/v1/messages/{held}/release")
            assert r.status_code == 200 and r.json() == {"id": held, "state": "queued"}
            assert (await queue.get(held)).state is MessageState.QUEUED
            events = [e.event for e in (await queue.events(queue_id=held)).events]
            assert events == ["released", "released"]
        await queue.close()
