"""The Django email backend in a real minimal Django project (tests/django_project).

In-process: Django's ``send_mail``, ``EmailMultiAlternatives`` and a view called through
Django's test client enqueue into a SQLite outbox, and the stored bytes are parsed back.
As a user runs it: ``manage.py send_signup_mail`` in a subprocess, then ``hato worker``'s
composition delivers the outbox to an aiosmtpd sink, and the delivered bytes are checked.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from peers.asyncsinks import HOST, Sink, wait_until

PROJECT = Path(__file__).resolve().parents[1] / "django_project"
SRC = Path(__file__).resolve().parents[2] / "src"

if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signup.settings")

import django  # noqa: E402
from django.core import mail  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from hato import AddressError, Mailer  # noqa: E402
from hato.app import work  # noqa: E402
from hato.config import load_settings  # noqa: E402
from hato.contrib.django import EmailBackend, close_mailers  # noqa: E402
from hato.queue import StoredMessage, open_queue  # noqa: E402

django.setup()


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def stored(url: str) -> list[StoredMessage]:
    async def read() -> list[StoredMessage]:
        q = open_queue(url, fsync=False)
        await q.open()
        try:
            listed = await q.list(limit=100)
            return [await q.get(m.id) for m in reversed(listed)]
        finally:
            await q.close()

    return asyncio.run(read())


@pytest.fixture
def outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)
    # The environment says something else: the Django setting must win.
    monkeypatch.setenv("HATO_QUEUE_URL", f"sqlite:///{tmp_path / 'not-this.db'}")
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    with override_settings(HATO_QUEUE_URL=url):
        try:
            yield url
        finally:
            close_mailers()
    assert not (tmp_path / "not-this.db").exists()


def test_backend_is_configured() -> None:
    assert isinstance(mail.get_connection(), EmailBackend)


def test_send_mail(outbox: str) -> None:
    assert mail.send_mail("Hello", "Body text", None, ["ann@example.net"]) == 1
    [message] = stored(outbox)
    assert message.sender == "noreply@signup.example"  # DEFAULT_FROM_EMAIL
    assert [r.address for r in message.recipients] == ["ann@example.net"]
    msg = parse(message.data)
    assert msg["Subject"] == "Hello"
    assert msg["From"] == "Sign-up Team <noreply@signup.example>"
    assert msg["Message-ID"].startswith("<hato.")
    assert msg["Date"] is not None
    assert msg.get_content().strip() == "Body text"
    assert b"\r\n" in message.data and b"\n" not in message.data.replace(b"\r\n", b"")


def test_multi_alternatives_attachments_headers_and_bcc(outbox: str, tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    message = mail.EmailMultiAlternatives(
        subject="Ünïcödé report",
        body="Text: café",
        from_email="Équipe <team@signup.example>",
        to=["Ann Example <ann@example.net>"],
        cc=["cc@example.org"],
        bcc=["secret@example.org"],
        reply_to=["help@signup.example"],
        headers={"X-Campaign": "spring", "Bcc": "leak@example.org"},
    )
    message.attach_alternative("<p>HTML: café</p>", "text/html")
    message.attach("report.pdf", b"%PDF-1.4 \x00\xff", "application/pdf")
    message.attach_file(str(path))
    assert message.send() == 1
    [stored_message] = stored(outbox)
    assert stored_message.sender == "team@signup.example"
    assert [r.address for r in stored_message.recipients] == [
        "ann@example.net",
        "cc@example.org",
        "secret@example.org",
    ]
    msg = parse(stored_message.data)
    assert msg["Bcc"] is None
    assert b"secret@" not in stored_message.data and b"leak@" not in stored_message.data
    assert msg["Subject"] == "Ünïcödé report"
    assert msg["From"].addresses[0].display_name == "Équipe"
    assert msg["X-Campaign"] == "spring"
    assert msg["Reply-To"] == "help@signup.example"
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(preferencelist=("html",))
    assert body is not None and "HTML: café" in body.get_content()
    files = {p.get_filename(): p for p in msg.iter_attachments()}
    assert files["report.pdf"].get_payload(decode=True) == b"%PDF-1.4 \x00\xff"
    assert files["report.pdf"].get_content_type() == "application/pdf"
    assert files["chart.png"].get_content_type() == "image/png"
    assert files["chart.png"].get_payload(decode=True) == path.read_bytes()


def test_idempotency_key_header_enqueues_once(outbox: str) -> None:
    for _ in range(3):
        mail.EmailMessage(
            "Once", "x", to=["ann@example.net"], headers={"Hato-Idempotency-Key": "once:1"}
        ).send()
    assert len(stored(outbox)) == 1


def test_header_injection_is_refused(outbox: str) -> None:
    with pytest.raises(AddressError):
        mail.send_mail("Hi\r\nBcc: victim@evil.example", "x", None, ["ann@example.net"])
    with pytest.raises(AddressError):
        mail.send_mail("Hi", "x", None, ["ann@example.net\r\nBcc: victim@evil.example"])
    assert mail.send_mail("Hi\nX: y", "x", None, ["ann@example.net"], fail_silently=True) == 0
    assert stored(outbox) == []


def test_the_view_enqueues_within_the_request(outbox: str) -> None:
    response = Client().post("/signup/", {"email": "new@example.net"})
    assert response.status_code == 200 and response.content == b"sent 1"
    Client().post("/signup/", {"email": "new@example.net"})  # a retried request
    [message] = stored(outbox)
    assert [r.address for r in message.recipients] == ["new@example.net", "audit@signup.example"]
    msg = parse(message.data)
    assert msg["Subject"] == "Welcome to Sign-up ✓"
    assert msg.get_content_type() == "multipart/alternative"


def test_backend_keyword_arguments_win(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'explicit.db'}"
    try:
        connection = mail.get_connection(queue_url=url)
        assert isinstance(connection, EmailBackend)
        assert mail.EmailMessage("s", "b", to=["a@example.net"], connection=connection).send() == 1
    finally:
        close_mailers()
    assert len(stored(url)) == 1


def test_shared_mailer_per_url(outbox: str) -> None:
    first, second = EmailBackend().mailer, EmailBackend().mailer
    assert first is second and isinstance(first, Mailer)


async def test_manage_py_then_hato_worker_delivers(tmp_path: Path) -> None:
    """As a user runs it: the project's management command, then the worker, then a sink."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(SRC), str(PROJECT)]),
        "SIGNUP_OUTBOX_URL": url,
        "HOME": str(tmp_path),
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(PROJECT / "manage.py"), "send_signup_mail", "ann@example.net"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "sent 2"
    async with Sink() as sink:
        settings = load_settings(
            queue_url=url, smtp_host=HOST, smtp_port=sink.port, smtp_tls="none", fsync=False
        )
        stop = asyncio.Event()
        task = asyncio.create_task(work(settings, stop=stop, say=lambda _line: None))
        try:
            await wait_until(lambda: len(sink.handler.messages) == 2, 20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    plain, rich = sorted(sink.handler.messages, key=lambda m: len(m.data))
    assert plain.rcpt_tos == ["ann@example.net"]
    assert parse(plain.data)["Subject"] == "Plain hello"
    assert rich.mail_from == "team@signup.example"
    assert rich.rcpt_tos == ["ann@example.net", "cc@signup.example", "secret@signup.example"]
    msg = parse(rich.data)
    assert b"secret@" not in rich.data and msg["Bcc"] is None
    assert msg["Subject"] == "Ünïcödé welcome"
    assert msg["To"].addresses[0].display_name == "Ann Example"
    assert msg["X-Campaign"] == "spring"
    attachments = {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()}
    assert attachments == {
        "report.pdf": b"%PDF-1.4 binary \x00\xff",
        "notes.txt": b"plain attachment",
    }
    html = msg.get_body(preferencelist=("html",))
    assert html is not None and "café" in html.get_content()
