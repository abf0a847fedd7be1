"""The web console's pages (hato.web.console) over a real queue, in-process over ASGI:
what each page says, the headers that keep a message's HTML inert, attachments as
downloads. The browser tests (test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from hato.app import build_release_courier
from hato.config import load_settings
from hato.events import DeliveryEvent, new_event_id
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue import open_queue
from hato.queue.base import Outcome, Queue, RecipientState
from hato.testing import FakeClock
from hato.web import api, console
from hato.web.context import WebContext

MAIL = (
    b"From: App <app@example.org>\r\n"
    b"To: x@example.net\r\n"
    b"Subject: Your <receipt>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b'<p>Paid</p><script>parent.hacked=1</script><img src="https://tracker.example/p.gif">\r\n'
    b"--b1\r\n"
    b"Content-Type: text/html\r\n"
    b'Content-Disposition: attachment; filename="../../evil name.html"\r\n'
    b"\r\n"
    b"<script>alert(1)</script>\r\n"
    b"--b1--\r\n"
)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Queue, dict[str, str]]]:
    clock = FakeClock()
    queue = open_queue(f"sqlite:///{tmp_path}/queue.db")
    await queue.open()
    settings = load_settings(data_dir=tmp_path)
    ctx = WebContext(
        settings=settings,
        queue=queue,
        log=MailLog(io.StringIO()),
        clock=clock,
        role="serve",
        node="console.test",
        listeners=[("smtp", "127.0.0.1", 2525)],
        release_courier=build_release_courier(settings),
    )
    app = Starlette(routes=[*api.routes(ctx), *console.routes(ctx)])
    ids = {
        "held": await queue.enqueue(
            Envelope("app@example.org", ["x@example.net"]), MAIL, held=True
        ),
        "deferred": await queue.enqueue(
            Envelope("app@example.org", ["y@example.com"]), b"Subject: later\r\n\r\nhi\r\n"
        ),
    }
    (claimed,) = [m for m in await queue.claim(owner="w", limit=10, lease_seconds=60)]
    event = DeliveryEvent(
        event_id=new_event_id(),
        event="deferred",
        time=clock(),
        node="console.test",
        queue_id=ids["deferred"],
        recipient="y@example.com",
        route="relay",
        relay_host="smtp.example.com",
        relay_ip="127.0.0.7",
        reply_code=421,
        reply_enhanced="4.7.0",
        reply_text="too busy",
        tls_version="TLSv1.3",
        tls_verified=True,
    )
    await queue.record(
        claimed.id,
        [Outcome("y@example.com", RecipientState.PENDING, "421 4.7.0 too busy")],
        owner="w",
        retry_at=clock() + 600,
        events=[event],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        try:
            yield client, queue, ids
        finally:
            await queue.close()


async def test_list_page_is_the_shell_the_script_fills(
    site: tuple[httpx.AsyncClient, Queue, dict[str, str]],
) -> None:
    client, _, _ = site
    r = await client.get("/?state=held&q=%3Cx%3E")
    assert r.status_code == 200
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert 'data-state="held"' in r.text and 'data-q="&lt;x&gt;"' in r.text  # escaped
    assert '<label for="q">' in r.text and '<label for="bulk-action">' in r.text
    assert 'aria-current="page">Held' in r.text
    js = await client.get("/static/console.js")
    assert js.status_code == 200 and "EventSource" in js.text and "dry_run: true" in js.text
    assert (await client.get("/static/console.css")).status_code == 200


async def test_message_page_shows_parts_timeline_and_release(
    site: tuple[httpx.AsyncClient, Queue, dict[str, str]],
) -> None:
    client, _, ids = site
    r = await client.get(f"/messages/{ids['held']}")
    assert r.status_code == 200
    page = r.text
    assert "Your &lt;receipt&gt;" in page  # the subject, escaped
    assert '<iframe id="html-body"' in page and 'sandbox=""' in page
    assert "<script>parent.hacked" not in page  # the HTML only ever goes to the iframe
    assert 'id="release-form"' in page and 'id="release-relay"' in page
    assert 'href="/messages/' + ids["held"] + '/parts/1"' in page

    deferred = (await client.get(f"/messages/{ids['deferred']}")).text
    assert "421 4.7.0 too busy" in deferred and "smtp.example.com [127.0.0.7]" in deferred
    assert "TLSv1.3, verified" in deferred
    assert 'id="retry"' in deferred and 'id="release-form"' not in deferred


async def test_message_html_is_served_inert(
    site: tuple[httpx.AsyncClient, Queue, dict[str, str]],
) -> None:
    client, _, ids = site
    r = await client.get(f"/messages/{ids['held']}/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "img-src" not in csp
    assert "script-src" not in csp and r.headers["x-content-type-options"] == "nosniff"
    assert "<p>Paid</p>" in r.text
    images = (await client.get(f"/messages/{ids['held']}/html?images=1")).headers
    assert "img-src https: http: data:" in images["content-security-policy"]
    assert "script-src" not in images["content-security-policy"]


async def test_attachments_are_downloads(
    site: tuple[httpx.AsyncClient, Queue, dict[str, str]],
) -> None:
    client, _, ids = site
    r = await client.get(f"/messages/{ids['held']}/parts/1")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename=".._.._evil name.html"'
    assert r.content.startswith(b"<script>alert(1)</script>")
    assert (await client.get(f"/messages/{ids['held']}/parts/7")).status_code == 404
    assert (await client.get("/messages/NOSUCH/parts/1")).status_code == 404
    missing = await client.get("/messages/NOSUCH")
    assert missing.status_code == 404 and "No such message" in missing.text


async def test_status_page(site: tuple[httpx.AsyncClient, Queue, dict[str, str]]) -> None:
    client, _, ids = site
    r = await client.get("/status")
    assert r.status_code == 200
    page = r.text
    assert "127.0.0.1:2525" in page and "capture" in page
    assert 'data-state="held">1<' in page and 'data-state="deferred">1<' in page
    assert "421 4.7.0 too busy" in page  # the deferral reason, grouped
    assert f'href="/messages/{ids["held"]}"' in page  # the oldest one waiting
