"""Test doubles for code that uses Hato: a clock moved by hand, a scripted courier, a capturing mailer.

Hato's own tests use them, and so can an application's::

    from hato.testing import CaptureMailer

    def test_sign_up_sends_a_welcome_mail():
        mailer = CaptureMailer(default_from="noreply@app.example")
        sign_up("ann@example.net", mailer=mailer)     # the app's code, given the mailer
        [mail] = mailer.outbox
        assert mail.envelope.recipients == ["ann@example.net"]
        assert mail.message["Subject"] == "Welcome"

* :class:`FakeClock`: a :data:`hato.clock.Clock` (``clock()`` is ``clock.now``) that moves
  only when told (``clock.advance(60)``), for anything that takes ``clock=``.
* :class:`ScriptedCourier`: a :class:`hato.delivery.base.Courier` that answers each
  recipient from a function and records every call, for a :class:`hato.worker.Worker`
  under test.
* :class:`CaptureMailer`: a :class:`hato.Mailer` without a queue, like Django's ``locmem``
  email backend: every message is composed exactly as ``Mailer.send`` composes it (so it
  refuses what ``Mailer`` refuses) and kept in :attr:`CaptureMailer.outbox`, parsed back;
  its status is ``sent`` at once.
"""

from __future__ import annotations

import email.parser
import email.policy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage

from hato.clock import Clock
from hato.delivery.base import DeliveryResult, Result
from hato.dsn_params import DsnRequest
from hato.errors import MessageNotFound
from hato.mailer import Composed, MailerBase, MessageId, RecipientPhase, RecipientReport, Status
from hato.mailer.async_mailer import TemplateSource
from hato.message import Envelope
from hato.queue.base import new_message_id
from hato.reply import Reply

__all__ = ["CAPTURED_REPLY", "CaptureMailer", "CapturedMail", "FakeClock", "ScriptedCourier"]


class FakeClock:
    """A clock tests move by hand: ``clock()`` reads ``clock.now``, ``advance`` moves it.

    ``now`` is seconds since the epoch (default 2023-11-14 22:13:20 UTC) and may be set
    directly too.
    """

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward (or back, if negative); the new time."""
        self.now += seconds
        return self.now

    def __repr__(self) -> str:
        return f"FakeClock({self.now!r})"


class ScriptedCourier:
    """A courier answering each recipient with ``answer(recipient)``; records its calls.

    ``calls`` holds ``(sender, recipients)`` of every delivery, ``messages`` the bytes.
    Results carry ``relay`` (default ``NAME[192.0.2.1]:25``, as a Postfix log shows a
    relay). Subclass and override :meth:`deliver` for a courier that raises or hangs.
    """

    def __init__(
        self,
        name: str,
        answer: Callable[[str], tuple[Result, Reply]],
        *,
        relay: str | None = None,
    ) -> None:
        self.name = name
        self.answer = answer
        self.relay = f"{name}[192.0.2.1]:25" if relay is None else relay
        self.calls: list[tuple[str, list[str]]] = []
        self.messages: list[bytes] = []
        self.closed = False

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: DsnRequest | None = None,
        require_tls: bool = False,
    ) -> list[DeliveryResult]:
        self.calls.append((sender, list(recipients)))
        self.messages.append(data)
        return [DeliveryResult(r, *self.answer(r), relay=self.relay) for r in recipients]

    async def close(self) -> None:
        self.closed = True


CAPTURED_REPLY = "250 2.0.0 Ok: captured by hato.testing.CaptureMailer"
_PARSER = email.parser.BytesParser(policy=email.policy.default)


@dataclass(frozen=True, slots=True)
class CapturedMail:
    """One message a :class:`CaptureMailer` kept: what a queue would have stored.

    ``message`` is ``data`` parsed back with the email package (``message["Subject"]``,
    ``message.get_body(("plain",)).get_content()``, ...); Bcc recipients are only in
    ``envelope.recipients``, as in a real queue.
    """

    id: MessageId
    envelope: Envelope
    message: EmailMessage
    data: bytes
    created_at: float
    not_before: float | None = None
    idempotency_key: str | None = None


class CaptureMailer(MailerBase):
    """A :class:`hato.Mailer` that keeps every message in :attr:`outbox` instead of a queue.

    ``send``, ``send_many``, ``send_template``, ``compose``, ``enqueue``, ``status`` and
    ``wait`` take what ``Mailer``'s take and compose the same bytes; ``connection=`` is
    accepted and ignored (the message is kept at once, whatever the transaction does).
    An ``idempotency_key`` sent twice keeps one message and returns its id, as a queue
    does. Reads no environment: pass ``default_from`` (and ``templates`` for
    ``send_template``). Thread-safe; ``outbox.clear()`` empties it.
    """

    def __init__(
        self,
        *,
        default_from: str | None = None,
        templates: TemplateSource = None,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(default_from=default_from, templates=templates, clock=clock)
        self.outbox: list[CapturedMail] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CaptureMailer({len(self.outbox)} messages)"

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to release; the outbox is kept."""

    def enqueue(self, composed: Composed, *, connection: object | None = None) -> MessageId:
        """Keep a message built by :meth:`compose`; its id."""
        with self._lock:
            key = composed.idempotency_key
            if key is not None:
                for kept in self.outbox:
                    if kept.idempotency_key == key:
                        return kept.id
            message = _PARSER.parsebytes(composed.data)
            assert isinstance(message, EmailMessage)  # policy.default makes EmailMessage
            mail = CapturedMail(
                id=new_message_id(self._clock),
                envelope=composed.envelope,
                message=message,
                data=composed.data,
                created_at=self._clock(),
                not_before=composed.not_before,
                idempotency_key=key,
            )
            self.outbox.append(mail)
            return mail.id

    def enqueue_many(
        self, composed: Sequence[Composed], *, connection: object | None = None
    ) -> list[MessageId]:
        """Keep messages built by :meth:`compose`; their ids in order."""
        return [self.enqueue(c) for c in composed]

    def status(self, message_id: MessageId) -> Status:
        """``sent``, with :data:`CAPTURED_REPLY` for every recipient;
        :class:`~hato.errors.MessageNotFound` for an id this mailer did not give out."""
        for mail in self.outbox:
            if mail.id == message_id:
                return Status(
                    id=mail.id,
                    state="sent",
                    reply=CAPTURED_REPLY,
                    attempts=1,
                    created_at=mail.created_at,
                    next_attempt_at=None,
                    recipients=tuple(
                        RecipientReport(r, RecipientPhase.SENT, CAPTURED_REPLY, "capture", 1)
                        for r in mail.envelope.recipients
                    ),
                    queue_state="sent",
                )
        raise MessageNotFound(message_id)
