"""hato.testing: the fakes Hato's tests use and an application's tests can use too."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest

from hato import AddressError, ConfigError, Email, Mailer, MessageNotFound
from hato.delivery.base import Courier, Result
from hato.mailer import MailerBase
from hato.queue.base import RecipientState
from hato.reply import Reply
from hato.testing import CAPTURED_REPLY, CaptureMailer, FakeClock, ScriptedCourier

FROM = "App <noreply@app.example>"


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == clock.now == 1_700_000_000.0
    assert clock.advance(60) == 1_700_000_060.0 == clock()
    clock.now = 5.0
    assert clock() == 5.0
    assert FakeClock(1000.0).advance(-1) == 999.0


async def test_scripted_courier_answers_per_recipient_and_records() -> None:
    ok = (Result.OK, Reply(250, "2.0.0", "Ok"))
    unknown = (Result.PERMANENT, Reply(550, "5.1.1", "User unknown"))
    courier: Courier = ScriptedCourier(
        "relay.test", lambda rcpt: unknown if rcpt.startswith("nobody") else ok
    )
    results = await courier.deliver("a@x.org", ["b@x.org", "nobody@x.org"], b"data")
    assert [(r.recipient, r.result, r.reply.code) for r in results] == [
        ("b@x.org", Result.OK, 250),
        ("nobody@x.org", Result.PERMANENT, 550),
    ]
    assert {r.relay for r in results} == {"relay.test[192.0.2.1]:25"}
    assert isinstance(courier, ScriptedCourier)
    assert courier.calls == [("a@x.org", ["b@x.org", "nobody@x.org"])]
    assert courier.messages == [b"data"]
    assert not courier.closed
    await courier.close()
    assert courier.closed
    named = ScriptedCourier("mx", lambda r: ok, relay="mx.example[203.0.113.5]:25")
    assert (await named.deliver("", ["c@x.org"], b""))[0].relay == "mx.example[203.0.113.5]:25"


def test_capture_mailer_keeps_what_mailer_would_store() -> None:
    clock = FakeClock()
    mailer = CaptureMailer(default_from=FROM, clock=clock)
    message_id = mailer.send(
        "Ann <ann@example.net>",
        "Welcome",
        text="Hello Ann",
        html="<p>Hello Ann</p>",
        bcc="audit@app.example",
        attachments=[("terms.txt", b"terms")],
    )
    [mail] = mailer.outbox
    assert mail.id == message_id
    assert mail.envelope.sender == "noreply@app.example"
    assert mail.envelope.recipients == ["ann@example.net", "audit@app.example"]
    assert mail.message["Subject"] == "Welcome"
    assert mail.message["To"] == "Ann <ann@example.net>"
    assert mail.message["Bcc"] is None and b"audit@" not in mail.data
    body = mail.message.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "Hello Ann"
    assert [a.get_filename() for a in mail.message.iter_attachments()] == ["terms.txt"]
    assert mail.created_at == clock.now

    status = mailer.status(message_id)
    assert (status.id, status.state, status.reply, status.done) == (
        message_id,
        "sent",
        CAPTURED_REPLY,
        True,
    )
    assert [(r.address, r.state) for r in status.recipients] == [
        ("ann@example.net", RecipientState.SENT),
        ("audit@app.example", RecipientState.SENT),
    ]
    assert mailer.wait(message_id).state == "sent"
    with pytest.raises(MessageNotFound):
        mailer.status("0000000000000000000")
    mailer.outbox.clear()
    assert mailer.outbox == []


def test_capture_mailer_refuses_what_mailer_refuses() -> None:
    mailer = CaptureMailer(default_from=FROM)
    with pytest.raises(AddressError):
        mailer.send("alice@good.example <bob@evil.example> <c@x.example>", "s")
    with pytest.raises(AddressError):
        mailer.send("u@example.net", "hi\r\nBcc: victim@evil.example")
    with pytest.raises(AddressError):  # one bad message: none of the batch is kept
        mailer.send_many([Email("ok@example.net", "fine"), Email("bad@", "bad")])
    assert mailer.outbox == []
    with pytest.raises(ConfigError):
        CaptureMailer().send("u@example.net", "no sender")


def test_capture_mailer_idempotency_many_and_connection() -> None:
    mailer = CaptureMailer(default_from=FROM)
    first = mailer.send("u@example.net", "Reset", idempotency_key="reset:7")
    assert mailer.send("u@example.net", "Reset", idempotency_key="reset:7") == first
    ids = mailer.send_many(
        [Email("a@example.net", "one"), {"to": "b@example.net", "subject": "two"}],
        connection=object(),  # accepted and ignored: nothing to join
    )
    assert [m.id for m in mailer.outbox] == [first, *ids]
    assert [m.message["Subject"] for m in mailer.outbox] == ["Reset", "one", "two"]
    assert mailer.outbox[0].idempotency_key == "reset:7"


def test_capture_mailer_send_template(tmp_path: Path) -> None:
    (tmp_path / "hello.subject.txt").write_text("Hello {{ name }}")
    (tmp_path / "hello.txt").write_text("Hi {{ name }}!")
    with CaptureMailer(default_from=FROM, templates=tmp_path) as mailer:
        mailer.send_template("hello", to="u@example.net", context={"name": "Ann"})
    [mail] = mailer.outbox
    assert mail.message["Subject"] == "Hello Ann"
    assert mail.message.get_content().strip() == "Hi Ann!"


def test_capture_mailer_is_thread_safe() -> None:
    mailer = CaptureMailer(default_from=FROM)

    def send(n: int) -> None:
        for i in range(25):
            mailer.send(f"t{n}-{i}@example.net", "hi")

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({m.id for m in mailer.outbox}) == 100


@pytest.mark.parametrize(
    "name", ["send", "send_many", "send_template", "status", "compose", "enqueue", "wait"]
)
def test_capture_mailer_takes_what_mailer_takes(name: str) -> None:
    """A drop-in for hato.Mailer: same methods, same parameters (one base class)."""
    assert issubclass(CaptureMailer, MailerBase) and issubclass(Mailer, MailerBase)
    assert inspect.signature(getattr(CaptureMailer, name)) == inspect.signature(
        getattr(Mailer, name)
    )
