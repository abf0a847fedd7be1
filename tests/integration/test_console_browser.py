"""The web console in a real browser: headless Chromium from Debian, driven by Playwright.

Against a running ``hato serve`` (a subprocess, mail sent to it with ``hato send`` and
smtplib): new mail appears in the list without a reload; a message opens with its text
and HTML; an HTML message's ``<script>`` and ``onerror=`` sentinels never run and its
remote image loads only on request; releasing a held message reaches a recording sink;
a bulk retry shows the right count before it acts. Screenshots of the list and the
message view are kept in the test's temp dir (CI keeps them as artifacts).
"""

from __future__ import annotations

import http.server
import smtplib
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from peers import free_port
from peers.browser import ConsoleServer, chromium
from peers.hato import HatoFactory, HatoServe, run_hato
from peers.sinks import RecordingSink

TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    p = context.new_page()
    p.dialogs = []  # type: ignore[attr-defined]
    p.on("dialog", lambda d: (p.dialogs.append(d.message), d.accept()))
    try:
        yield p
    finally:
        context.close()


class _Own:
    """The console of ``hato serve`` itself, on its HTTP listener."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> _Own:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def console_of(serve: HatoServe) -> _Own | ConsoleServer:
    """``hato serve``'s own console (``HatoServe.http_url``, its HTTP listener on a free
    loopback port); where a ``hato serve`` has none, the same routes over its queue."""
    url = getattr(serve, "http_url", "")
    return _Own(url) if url else ConsoleServer(serve.data_dir)


def hato_send(serve: HatoServe, subject: str, body: str, *headers: str) -> None:
    args = ["send", "--server", f"{serve.host}:{serve.port}", "--from", "app@example.org"]
    args += ["--to", "dev@example.net", "--header", f"Subject: {subject}", "--body", body]
    for header in headers:
        args += ["--header", header]
    run_hato(args, data_dir=serve.data_dir)


def smtp_send(serve: HatoServe, message: EmailMessage) -> None:
    with smtplib.SMTP(serve.host, serve.port, timeout=30) as client:
        client.send_message(message)


def html_mail(subject: str, html: str, text: str = "") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "app@example.org"
    m["To"] = "dev@example.net"
    m["Subject"] = subject
    m.set_content(text or "plain version")
    m.add_alternative(html, subtype="html")
    return m


def row(page: Any, subject: str) -> Any:
    return page.locator("#message-rows tr", has_text=subject)


def test_sent_mail_appears_live_and_opens_with_text_and_html(
    hato_serve: HatoFactory, page: Any, tmp_path: Path
) -> None:
    serve = hato_serve()
    with console_of(serve) as console:
        page.goto(console.url + "/")
        page.locator("#message-rows td.empty").wait_for()
        page.evaluate("window.__notReloaded = true")

        hato_send(serve, "Live one", "sent while the list was open")
        row(page, "Live one").wait_for()
        assert page.evaluate("window.__notReloaded") is True  # no reload happened
        assert "held" in row(page, "Live one").inner_text()

        smtp_send(serve, html_mail("Two faces", "<h1>Hello in HTML</h1>", "Hello in text"))
        row(page, "Two faces").wait_for()
        assert page.evaluate("window.__notReloaded") is True
        page.screenshot(path=str(tmp_path / "console-list.png"), full_page=True)

        row(page, "Two faces").get_by_role("link").click()
        page.wait_for_url("**/messages/*")
        assert page.locator("#subject").inner_text() == "Two faces"
        assert "Hello in text" in page.locator("#text-body").inner_text()
        frame = page.frame_locator("#html-body")
        assert frame.locator("h1").inner_text() == "Hello in HTML"
        page.locator("#raw summary").click()
        page.locator("#raw-source", has_text="Subject: Two faces").wait_for()
        # Frames below the viewport are not painted into a full-page shot: make it tall.
        height = page.evaluate("document.documentElement.scrollHeight")
        page.set_viewport_size({"width": 1200, "height": height})
        page.screenshot(path=str(tmp_path / "console-message.png"))

        # Usable on a phone: neither page scrolls sideways at 375 px.
        page.set_viewport_size({"width": 375, "height": 800})
        overflow = "document.documentElement.scrollWidth - window.innerWidth"
        assert page.evaluate(overflow) <= 0
        page.goto(console.url + "/")
        row(page, "Two faces").wait_for()
        assert page.evaluate(overflow) <= 0


class ImageServer:
    """A loopback HTTP server that records each path asked of it (the remote image)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.cond:
                    outer.paths.append(self.path)
                    outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
                self.send_header("Content-Length", str(len(gif)))
                self.end_headers()
                self.wfile.write(gif)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, path: str, timeout: float = 20.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: path in self.paths, timeout):
                raise AssertionError(f"{path} was never asked for; got {self.paths}")

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_html_message_scripts_never_run(hato_serve: HatoFactory, page: Any) -> None:
    serve = hato_serve()
    with ImageServer() as images, console_of(serve) as console:
        hostile = (
            "<p id='visible'>Quarterly report</p>"
            "<script>parent.postMessage('script ran', '*'); alert('script');"
            "document.title = 'HACKED'</script>"
            "<img src='x' onerror=\"parent.postMessage('onerror ran', '*'); alert('onerror')\">"
            "<svg onload=\"parent.postMessage('onload ran', '*')\"></svg>"
            f"<img id='remote' src='{images.url}/pixel.gif'>"
        )
        smtp_send(serve, html_mail("Hostile", hostile))
        page.goto(console.url + "/")
        page.evaluate(
            "window.__ran = []; window.addEventListener('message', e => window.__ran.push(e.data))"
        )
        row(page, "Hostile").get_by_role("link").click()
        page.wait_for_url("**/messages/*")
        page.evaluate(
            "window.__ran = []; window.addEventListener('message', e => window.__ran.push(e.data))"
        )
        frame = page.frame_locator("#html-body")
        assert frame.locator("#visible").inner_text() == "Quarterly report"
        assert images.paths == []  # no remote image before the user asks

        page.get_by_role("button", name="Load remote images").click()
        images.wait_for("/pixel.gif")  # the frame reloaded with images allowed
        frame.locator("#visible").wait_for()
        # A message posted by a sentinel would be queued before this round trip returns.
        page.evaluate(
            "new Promise(r => { window.addEventListener('message', r, {once: true}); window.postMessage('probe', '*') })"
        )
        assert page.evaluate("window.__ran") == ["probe"]
        assert page.dialogs == []  # type: ignore[attr-defined]
        assert page.title() != "HACKED"


def test_release_of_a_held_message_reaches_the_sink(
    hato_serve: HatoFactory, page: Any, recording_sink: RecordingSink
) -> None:
    serve = hato_serve()
    hato_send(serve, "Release me", "from the capture to the sink")
    with console_of(serve) as console:
        page.goto(console.url + "/?state=held")
        row(page, "Release me").get_by_role("link").click()
        page.wait_for_url("**/messages/*")
        page.get_by_label("To address").fill("qa@example.com")
        host, port = recording_sink.address
        page.get_by_label("Through relay (host:port)").fill(f"{host}:{port}")
        page.get_by_role("button", name="Release", exact=True).click()
        page.locator("#action-result", has_text="Released to").wait_for()
        (got,) = recording_sink.wait_for_count(1)
        assert list(got.rcpt_tos) == ["qa@example.com"] and b"Subject: Release me" in got.data
        page.reload()  # the release is on the message's timeline
        assert "released to qa@example.com" in page.locator("#released-copies").inner_text()
        assert page.locator(".state").first.inner_text() == "held"  # a copy went out


def test_bulk_retry_shows_the_count_first(hato_serve: HatoFactory, page: Any) -> None:
    dead = free_port()  # nothing listens: every attempt is deferred
    serve = hato_serve(
        {
            "RELAYHOST": f"[127.0.0.1]:{dead}",
            "HATO_RETRY_MIN_DELAY": "3600",
            "HATO_RETRY_MAX_DELAY": "3600",
        }
    )
    for n in range(3):
        hato_send(serve, f"Deferred {n}", "the relay is down")
    serve.wait_for_queue(
        lambda items: len(items) == 3 and all(i["state"] == "deferred" for i in items)
    )
    with console_of(serve) as console:
        page.goto(console.url + "/?state=deferred")
        row(page, "Deferred 2").wait_for()
        page.get_by_label("With every message shown").select_option("retry")
        # By keyboard: Tab to Apply, Enter; the dialog shows the count; Escape cancels.
        page.get_by_label("With every message shown").focus()
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "bulk-go"
        page.keyboard.press("Enter")
        question = page.locator("#bulk-question")
        question.wait_for()
        assert question.inner_text() == "Retry 3 messages?"
        page.keyboard.press("Escape")
        question.wait_for(state="hidden")
        assert page.locator("#live").inner_text() == ""  # nothing was done
        assert all(i["state"] == "deferred" for i in serve.queue_list())

        page.get_by_role("button", name="Apply…").click()
        question.wait_for()
        assert question.inner_text() == "Retry 3 messages?"
        page.get_by_role("button", name="Confirm").click()
        page.locator("#live", has_text="retry: 3 of 3 message(s) done.").wait_for()
