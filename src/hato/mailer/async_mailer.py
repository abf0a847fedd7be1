"""``AsyncMailer``, the application API for asyncio, and the ``Status`` it reads back.

:meth:`AsyncMailer.send` composes the message (:mod:`hato.mailer.composition`) and
enqueues it; it returns only once the message is durable in the queue (the backend's
``enqueue`` contract). With ``connection=`` (PostgreSQL) the message is instead part of
the caller's open transaction and exists exactly when the caller commits
(:mod:`hato.mailer.transaction`). :meth:`AsyncMailer.status` reads a message back as a
:class:`Status`.

Status states are the seven of :data:`STATES`: ``sent`` is accepted by the first relay;
``delivered`` and ``bounced`` come from the events of further hops (pulled by
``hato worker`` with ``HATO_SMTP_EVENTS_URL``, or pushed to :mod:`hato.webhooks`). The queue's ``held`` (kept by a hold route
until ``hato queue release``) reads as ``queued``: it has not been sent and will be once
released. ``quarantined`` (the stored record could not be read back) reads as ``failed``
with the reason.

What is not passed to the constructor comes from the environment, read once there through
:func:`hato.config.mailer_environment` (``HATO_QUEUE_URL``, else an SQLite file in
``HATO_DATA_DIR``; ``HATO_DEFAULT_FROM``; ``HATO_TEMPLATE_DIR``); no settings file is read.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from hato.clock import Clock
from hato.errors import ConfigError, QueueError
from hato.event_reader import message_events
from hato.events import BOUNCED, DELIVERED, EXPIRED, DeliveryEvent, reply_of
from hato.mailer.addresses import AddressLike
from hato.mailer.composition import Composed, Composer, Email, EmailOptions
from hato.message import META_ENVID
from hato.queue import open_queue, redact_url
from hato.queue.base import MessageState, Queue, RecipientState, StoredMessage

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from hato.mailer.transaction import CallerTransaction
    from hato.templates import Templates

__all__ = [
    "DONE_STATES",
    "FINAL_STATES",
    "STATES",
    "AsyncMailer",
    "MessageId",
    "RecipientReport",
    "State",
    "Status",
    "TemplateSource",
    "caller_transaction",
    "status_of",
    "templates_of",
]

MessageId: TypeAlias = str
"""A queue id as ``send`` returns it (19 upper-case hex digits)."""

State = Literal["queued", "sending", "deferred", "sent", "delivered", "bounced", "failed"]
STATES: tuple[State, ...] = (
    "queued",
    "sending",
    "deferred",
    "sent",
    "delivered",
    "bounced",
    "failed",
)
FINAL_STATES: frozenset[State] = frozenset({"delivered", "bounced", "failed"})
"""States nothing changes any more (short of a late bounce turning ``delivered`` into
``bounced``)."""
DONE_STATES: frozenset[State] = frozenset({"sent", *FINAL_STATES})
"""States in which the outbox has nothing left to do: ``sent`` and the final ones."""

TemplateSource: TypeAlias = "str | os.PathLike[str] | Templates | None"
"""A template folder, a :class:`hato.templates.Templates`, or ``None`` for ``./templates``."""


class RecipientPhase(StrEnum):
    """A recipient's state: one of :data:`State`, as a string enum."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """One recipient's state as :class:`Status` reports it (the same seven states).

    ``state`` is a :class:`RecipientPhase`: a ``str`` (``report.state == "sent"``) that
    also keeps the enum's ``.value`` of earlier releases (``report.state.value``).

    ``reply`` is the reply that decided it (the MX's for ``delivered``/``bounced``),
    ``relay`` the first hop, ``attempts`` the outbox's attempts for it.
    """

    address: str
    state: RecipientPhase
    reply: str = ""
    relay: str = ""
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """What became of a message.

    ``reply`` is the last reply that matters: the MX's when ``delivered`` or ``bounced``,
    the first relay's ``250`` when ``sent``, the reason when ``failed``, the last
    temporary failure when ``deferred``. ``events`` are the delivery events of every hop
    (:class:`hato.events.DeliveryEvent`), oldest first; ``recipients`` each recipient's
    state (``state`` is the least advanced of them).
    """

    id: MessageId
    state: State
    reply: str
    attempts: int
    created_at: float
    next_attempt_at: float | None
    recipients: tuple[RecipientReport, ...] = field(default=())
    queue_state: str = ""  # the queue's own state (held, quarantined, ...), for operators
    events: tuple[DeliveryEvent, ...] = field(default=())

    @property
    def reason(self) -> str:
        """Why the message failed or bounced (empty otherwise)."""
        return self.reply if self.state in ("failed", "bounced") else ""

    @property
    def done(self) -> bool:
        """True once the outbox has nothing left to do: ``sent`` (accepted by the first
        relay), ``delivered``, ``bounced`` or ``failed``. A ``sent`` message may still
        become ``delivered`` or ``bounced`` as events arrive from further hops."""
        return self.state in DONE_STATES

    @property
    def final(self) -> bool:
        """True once the state is ``delivered``, ``bounced`` or ``failed``."""
        return self.state in FINAL_STATES


_STATE_OF: dict[MessageState, State] = {
    MessageState.QUEUED: "queued",
    MessageState.HELD: "queued",
    MessageState.SENDING: "sending",
    MessageState.DEFERRED: "deferred",
    MessageState.SENT: "sent",
    MessageState.FAILED: "failed",
    MessageState.QUARANTINED: "failed",
}
# How far each state has come; with several recipients the message reports the least
# advanced, and among final ones the worst (bounced before delivered).
_PROGRESS: dict[str, int] = {
    "queued": 0,
    "deferred": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "bounced": 5,
    "failed": 6,
}


def _after_first_hop(address: str, events: Sequence[DeliveryEvent]) -> tuple[State, str] | None:
    """What further hops said of a recipient the first relay accepted: ``bounced`` (a
    refusal or expiry anywhere, a late bounce included) wins over ``delivered``; ``None``
    when no hop has told yet."""
    wanted = address.lower()
    mine = [e for e in events if e.recipient.lower() == wanted]
    refused = [e for e in mine if e.event in (BOUNCED, EXPIRED)]
    if refused:
        return "bounced", reply_of(refused[-1])
    delivered = [e for e in mine if e.event == DELIVERED]
    if delivered:
        return "delivered", reply_of(delivered[-1])
    return None


def status_of(msg: StoredMessage, events: Sequence[DeliveryEvent] = ()) -> Status:
    """The application's view of a stored message and the events of every hop."""
    state = _STATE_OF[msg.state]
    reply = msg.last_reply
    if msg.state is MessageState.QUARANTINED:
        detail = reply.removeprefix("quarantined: ") or "the stored record is unreadable"
        reply = f"quarantined: {detail}"
    elif msg.state is MessageState.FAILED:
        failed = [r.reply for r in msg.recipients if r.state is RecipientState.FAILED and r.reply]
        reply = failed[-1] if failed else reply
    elif msg.state is MessageState.HELD and not reply:
        reply = "held: waiting for hato queue release"
    reports = []
    for r in msg.recipients:
        rstate: State
        rreply = r.reply
        if r.state is RecipientState.FAILED:
            rstate = "failed"
        elif r.state is RecipientState.SENT:
            rstate = "sent"
            further = _after_first_hop(r.address, events)
            if further is not None:
                rstate, rreply = further[0], further[1] or rreply
        else:
            rstate = state
        reports.append(
            RecipientReport(r.address, RecipientPhase(rstate), rreply, r.relay, r.attempts)
        )
    # A refusal at the first hop keeps the message ``failed`` (as before further hops
    # reported anything); a message every recipient of which the first relay took is as
    # far as its least advanced recipient.
    if msg.state is MessageState.SENT and reports:
        least = min(reports, key=lambda x: _PROGRESS[x.state])
        if _PROGRESS[least.state] >= _PROGRESS["delivered"]:
            least = max(reports, key=lambda x: _PROGRESS[x.state])
        if least.state != state:
            state, reply = least.state.value, least.reply or reply
        elif state in ("delivered", "bounced"):
            reply = least.reply or reply
    waiting = state in ("queued", "deferred", "sending")
    return Status(
        id=msg.id,
        state=state,
        reply=reply,
        attempts=msg.attempts,
        created_at=msg.created_at,
        next_attempt_at=msg.next_attempt_at if waiting else None,
        recipients=tuple(reports),
        queue_state=msg.state.value,
        events=tuple(events),
    )


def templates_of(source: TemplateSource) -> Templates:
    """The template set ``send_template`` renders from (Jinja2 is loaded on first render)."""
    from hato.templates import Templates

    return source if isinstance(source, Templates) else Templates(source or "templates")


def caller_transaction(queue_url: str, clock: Clock) -> CallerTransaction:
    """The ``connection=`` path for ``queue_url``: PostgreSQL only, with the postgres extra."""
    if queue_url.split(":", 1)[0].lower() not in ("postgres", "postgresql"):
        raise ConfigError(
            f"connection= needs a postgresql:// queue (this mailer uses {redact_url(queue_url)})"
        )
    try:
        from hato.mailer.transaction import CallerTransaction
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ConfigError(f"connection= needs: pip install 'hato[postgres]' ({exc})") from exc
    return CallerTransaction(queue_url, clock)


class AsyncMailer(Composer):
    """:class:`~hato.Mailer` for asyncio: the same methods, as coroutines.

    One instance belongs to the event loop it is first used in (the queue's connections
    do); make one per loop. ``async with AsyncMailer(...) as mailer:`` opens and closes it,
    or it opens on first use and :meth:`aclose` closes it.
    """

    def __init__(
        self,
        queue_url: str | None = None,
        *,
        default_from: str | None = None,
        templates: TemplateSource = None,
        clock: Clock = time.time,
        fsync: bool = True,
    ) -> None:
        if queue_url is None or default_from is None or templates is None:
            from hato.config import mailer_environment

            env = mailer_environment()
            queue_url = queue_url or env.queue_url
            default_from = default_from if default_from is not None else env.default_from
            templates = templates if templates is not None else env.template_dir
        self.queue_url: str = queue_url
        self.default_from = default_from
        self._templates_arg = templates
        self._templates: Templates | None = None
        self._clock = clock
        self._fsync = fsync
        self._queue: Queue | None = None
        self._transaction: CallerTransaction | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncMailer({redact_url(self.queue_url)!r})"

    # Lifecycle.

    async def open(self) -> None:
        """Connect to the queue (and create its schema if needed). Idempotent."""
        await self._open_queue()

    async def _open_queue(self) -> Queue:
        if self._closed:
            raise QueueError("this mailer is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop, self._opening = loop, asyncio.Lock()
        elif self._loop is not loop:
            raise RuntimeError(
                "AsyncMailer is bound to the event loop it was first used in; make one per loop"
            )
        if self._queue is not None:
            return self._queue
        assert self._opening is not None
        async with self._opening:
            if self._queue is None:
                queue = open_queue(self.queue_url, clock=self._clock, fsync=self._fsync)
                await queue.open()
                self._queue = queue
        return self._queue

    async def aclose(self) -> None:
        """Close the queue connections; the mailer cannot be used afterwards."""
        self._closed = True
        queue, self._queue = self._queue, None
        if queue is not None:
            await queue.close()

    async def __aenter__(self) -> AsyncMailer:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # Sending.

    async def send(
        self,
        to: AddressLike | Iterable[AddressLike],
        subject: str,
        text: str | None = None,
        html: str | None = None,
        *,
        connection: object | None = None,
        **options: Unpack[EmailOptions],
    ) -> MessageId:
        """Enqueue one message; its id once it is durable (see the module docstring).

        ``connection``: a psycopg ``AsyncConnection`` (or ``Connection``) with an open
        transaction, PostgreSQL queues only; the message exists once the caller commits.
        """
        composed = self.compose(to, subject, text, html, **options)
        return await self.enqueue(composed, connection=connection)

    async def send_many(
        self, messages: Iterable[Email | Mapping[str, Any]], *, connection: object | None = None
    ) -> list[MessageId]:
        """Enqueue several messages; their ids in order.

        Every message is built (and checked) before any is stored, so a bad address
        stores nothing. Without ``connection`` the messages are enqueued concurrently (the
        backends commit them in groups); if one fails, others may be stored: call again
        with the same idempotency keys to finish without duplicates.
        """
        composed = self.compose_all(messages)
        return await self.enqueue_many(composed, connection=connection)

    async def send_template(
        self,
        name: str,
        *,
        to: AddressLike | Iterable[AddressLike],
        context: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> MessageId:
        """Render ``name`` (subject, text and/or HTML; see :mod:`hato.templates`) and send it.

        ``kwargs`` are ``send``'s other keyword arguments (``from_``, ``cc``, ...).
        """
        rendered = self._template_set().render(name, context or {})
        return await self.send(to, rendered.subject, rendered.text, rendered.html, **kwargs)

    def _template_set(self) -> Templates:
        if self._templates is None:
            self._templates = templates_of(self._templates_arg)
        return self._templates

    async def enqueue(self, composed: Composed, *, connection: object | None = None) -> MessageId:
        """Store a message built by :func:`~hato.mailer.compose`."""
        if connection is not None:
            return await self._caller_transaction().enqueue(connection, composed)
        queue = await self._open_queue()
        return await queue.enqueue(
            composed.envelope,
            composed.data,
            not_before=composed.not_before,
            idempotency_key=composed.idempotency_key,
        )

    async def enqueue_many(
        self, composed: Sequence[Composed], *, connection: object | None = None
    ) -> list[MessageId]:
        """Store messages built by :func:`~hato.mailer.compose`; their ids in order."""
        if connection is not None:
            transaction = self._caller_transaction()
            return [await transaction.enqueue(connection, c) for c in composed]
        queue = await self._open_queue()
        return list(
            await asyncio.gather(
                *(
                    queue.enqueue(
                        c.envelope,
                        c.data,
                        not_before=c.not_before,
                        idempotency_key=c.idempotency_key,
                    )
                    for c in composed
                )
            )
        )

    def _caller_transaction(self) -> CallerTransaction:
        if self._transaction is None:
            self._transaction = caller_transaction(self.queue_url, self._clock)
        return self._transaction

    # Reading.

    async def status(self, message_id: MessageId) -> Status:
        """The message's state and last reply; :class:`~hato.errors.MessageNotFound` if
        there is no such message (or its transaction was never committed)."""
        queue = await self._open_queue()
        msg = await queue.get(message_id)
        events = await message_events(queue, msg.id, msg.meta.get(META_ENVID, ""))
        return status_of(msg, events)

    async def events(self, message_id: MessageId) -> list[DeliveryEvent]:
        """The delivery events of a message from every hop, oldest first."""
        return list((await self.status(message_id)).events)

    async def record_events(self, events: Sequence[DeliveryEvent]) -> int:
        """Store delivery events another node reported (a webhook, a pull) in the outbox,
        where :meth:`status` finds them by the message's id (the ENVID it travelled with);
        one already stored is skipped. How many were new."""
        queue = await self._open_queue()
        return await queue.add_events(events)
