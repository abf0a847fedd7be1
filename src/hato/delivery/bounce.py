"""The bounce courier: bounces for messages this node sent become events, not mailbox clutter.

A remote MX may accept a message with ``250`` and bounce it hours later. The bounce comes
back to the envelope sender, whose domain is one of ours, so the worker's ``local`` route
brings it here. This courier wraps the local (Maildir) courier: a message that is a
delivery status notification (:func:`hato.bounces.parse_bounce`) and matches a message in
this node's queue is recorded as one delivery event per reported recipient on that
message (``bounced`` for ``failed``, ``delayed``, ``delivered``/``relayed`` for the
success reports) and is not delivered to the mailbox, unless ``keep`` is set
(``HATO_BOUNCE_KEEP``). Everything else goes to the wrapped courier unchanged: mail, a
bounce that matches nothing, and the DSNs this node wrote itself (the worker recorded
their events already; the sender reads them in the mailbox).

How a bounce is matched, most trusted first:

1. a VERP address it came to (:mod:`hato.verp`) whose signature is ours names the queue
   id; a forged or foreign token is ignored;
2. its ``Original-Envelope-Id``: our queue id, or the envid a message was kept with
   (found through the events that carry it);
3. the ``Message-ID`` of the returned message, among the events of the last
   ``lookback`` seconds.

Matches 2 and 3 are only clues anyone could write into a message, so they also need a
reported recipient to be one of the original message's; only those recipients get
events. Event ids are derived from the bounce's queue id, so a bounce delivered twice
(at least once) stores its events once. A recipient the original message still has as
``sent`` becomes ``failed`` in the same commit (``Queue.record_bounce``), so ``hato
queue list`` shows it too.

Only messages from the null sender (or ``MAILER-DAEMON``/``postmaster``), or to a VERP
address, are parsed at all. Queue errors while matching or recording are temporary
failures: the bounce is tried again later, never lost and never half-recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hato import events
from hato.bounces import (
    DELAYED,
    DELIVERED,
    EXPANDED,
    FAILED,
    RELAYED,
    Bounce,
    BouncedRecipient,
    parse_bounce,
)
from hato.clock import Clock
from hato.delivery.base import Courier, DeliveryResult, Result, all_results
from hato.dsn_params import DsnRequest
from hato.errors import MessageNotFound
from hato.events import DeliveryEvent, new_event_id
from hato.maillog import MailLog
from hato.message import META_ENVID, message_id_of
from hato.queue.base import Outcome, Queue, RecipientState, StoredMessage
from hato.reply import Reply
from hato.verp import Verp, split_token

ROUTE = "bounce"
# How far back a bounce is looked up by Message-ID (bounces come within the queue
# lifetimes of the MTAs on the way, five days for most), and how many events at most.
LOOKBACK = 10 * 86_400.0
MAX_SCAN = 100_000
_PAGE = 500

_EVENT_OF_ACTION = {
    FAILED: events.BOUNCED,
    DELAYED: events.DELAYED,
    DELIVERED: events.DELIVERED,
    EXPANDED: events.DELIVERED,
    RELAYED: events.RELAYED,
}
_DAEMONS = frozenset({"mailer-daemon", "postmaster"})
_LEADING_REPLY_RE = re.compile(r"^[245]\d\d(?:[ -][245]\.\d{1,3}\.\d{1,3})?[ -]?\s*")
_QUEUE_ID_RE = re.compile(r"^[0-9A-Fa-f]{19}$")


@dataclass(frozen=True, slots=True)
class Match:
    """The message a bounce is about, and how we know (``verp``, ``envid``,
    ``message-id``); ``signed`` when a VERP signature proves it."""

    message: StoredMessage
    how: str
    signed: bool


class BounceCourier:
    """Wraps the local courier; see the module docstring. A :class:`Courier`."""

    def __init__(
        self,
        inner: Courier,
        queue: Queue,
        *,
        hostname: str,
        verp: Verp | None = None,
        keep: bool = False,
        clock: Clock = time.time,
        lookback: float = LOOKBACK,
        log: MailLog | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.queue = queue
        self.hostname = hostname.lower().rstrip(".")
        self.verp = verp
        self.keep = keep
        self._clock = clock
        self.lookback = lookback
        self.log = log

    async def close(self) -> None:
        await self.inner.close()

    def _may_be_bounce(self, sender: str, recipients: Sequence[str]) -> bool:
        local = sender.rpartition("@")[0].lower()
        return (
            not sender or local in _DAEMONS or any(split_token(r) is not None for r in recipients)
        )

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: DsnRequest | None = None,
        require_tls: bool = False,  # local delivery: no hop to protect
    ) -> list[DeliveryResult]:
        if not self._may_be_bounce(sender, recipients):
            return await self.inner.deliver(
                sender, recipients, data, message_id=message_id, dsn=dsn
            )
        bounce = await asyncio.to_thread(_parse, data, recipients)
        if bounce is None or self._our_own(bounce):
            return await self.inner.deliver(
                sender, recipients, data, message_id=message_id, dsn=dsn
            )
        try:
            match = await self.match(bounce, recipients)
            if match is None:
                return await self.inner.deliver(
                    sender, recipients, data, message_id=message_id, dsn=dsn
                )
            recorded = self.events_for(bounce, match, message_id)
            failed = [
                Outcome(e.recipient, RecipientState.FAILED, _reply_of(e), e.relay_host or ROUTE)
                for e in recorded
                if e.event == events.BOUNCED
            ]
            if await self.queue.record_bounce(match.message.id, failed, events=recorded) is None:
                await self.queue.add_events(recorded)  # deleted meanwhile: keep the record
            self._log(match, recorded, bounce_id=message_id)
        except Exception as exc:  # the queue failed: try the whole bounce again later
            reply = Reply(451, "4.3.0", f"cannot record bounce: {type(exc).__name__}: {exc}")
            return all_results(recipients, Result.TEMPORARY, reply, ROUTE)
        if self.keep:
            return await self.inner.deliver(
                sender, recipients, data, message_id=message_id, dsn=dsn
            )
        reply = Reply(
            250,
            "2.0.0",
            f"bounce for {match.message.id} recorded ({match.how}, "
            f"{len(recorded)} event{'s' if len(recorded) != 1 else ''})",
        )
        return all_results(recipients, Result.OK, reply, ROUTE)

    def _log(self, match: Match, recorded: Sequence[DeliveryEvent], *, bounce_id: str) -> None:
        """One line per recorded event under the original message's queue id, so a grep
        for it shows the late bounce beside the delivery it contradicts."""
        if self.log is None:
            return
        for e in recorded:
            self.log.delivery(
                match.message.id,
                to=e.recipient,
                relay=e.relay_host or ROUTE,
                delay=max(0.0, e.time - match.message.created_at),
                attempts=match.message.attempts,
                dsn=e.reply_enhanced,
                status=e.event,
                detail=f"{_reply_of(e)} (reported by bounce {bounce_id or '-'}, {match.how})",
                service=ROUTE,
            )

    def _our_own(self, bounce: Bounce) -> bool:
        """A DSN this node wrote (the worker recorded its events when it wrote it)."""
        return bool(bounce.hato_queue_id) and bounce.reporting_mta == self.hostname

    # Matching.

    async def _get(self, queue_id: str) -> StoredMessage | None:
        for candidate in dict.fromkeys((queue_id.upper(), queue_id)):
            try:
                return await self.queue.get(candidate)
            except MessageNotFound:
                continue
        return None

    async def match(self, bounce: Bounce, recipients: Sequence[str]) -> Match | None:
        """The message in this node's queue ``bounce`` is about, or ``None``."""
        if self.verp is not None:
            for address in recipients:
                queue_id = self.verp.queue_id(address)
                if queue_id is None:
                    continue
                message = await self._get(queue_id)
                if message is not None:
                    return Match(message, "verp", signed=True)
        if bounce.envid:
            if _QUEUE_ID_RE.match(bounce.envid):
                message = await self._get(bounce.envid)
                if message is not None and _overlap(bounce, message):
                    return Match(message, "envid", signed=False)
            found = await self._by_events(envid=bounce.envid, bounce=bounce)
            if found is not None:
                return Match(found, "envid", signed=False)
        if bounce.message_id:
            found = await self._by_events(message_id=bounce.message_id, bounce=bounce)
            if found is not None:
                return Match(found, "message-id", signed=False)
        return None

    async def _by_events(
        self, *, bounce: Bounce, envid: str | None = None, message_id: str | None = None
    ) -> StoredMessage | None:
        """The newest message in the queue whose events carry ``envid`` (or, scanning
        the last ``lookback`` seconds, ``message_id``) and share a recipient with
        ``bounce``."""
        since = None if envid is not None else self._clock() - self.lookback
        candidates: dict[str, None] = {}
        cursor, scanned = "", 0
        while scanned < MAX_SCAN:
            page = await self.queue.events(after=cursor, envid=envid, since=since, limit=_PAGE)
            for event in page.events:
                if message_id is None or event.message_id == message_id:
                    candidates[event.queue_id] = None
            scanned += len(page.events)
            if len(page.events) < _PAGE or page.cursor == cursor:
                break
            cursor = page.cursor
        for queue_id in reversed(list(candidates)):
            message = await self._get(queue_id)
            if message is not None and _overlap(bounce, message):
                return message
        return None

    # Recording.

    def events_for(self, bounce: Bounce, match: Match, bounce_id: str = "") -> list[DeliveryEvent]:
        """The events ``bounce`` stands for on the matched message: one per reported
        recipient that is one of its own (with a signed match, a lone original recipient
        stands for an unknown reported one)."""
        message = match.message
        originals = {r.address.lower(): r.address for r in message.recipients}
        envid = message.meta.get(META_ENVID, "") or bounce.envid
        message_id = message_id_of(message.data) or bounce.message_id
        now = self._clock()
        out: list[DeliveryEvent] = []
        seen: set[tuple[str, str]] = set()
        for r in bounce.recipients:
            recipient = _original_of(r, originals)
            if recipient is None and match.signed:
                recipient = next(iter(originals.values())) if len(originals) == 1 else r.address
            if recipient is None:
                continue
            name = _EVENT_OF_ACTION.get(r.action, events.BOUNCED)
            if (recipient, name) in seen:
                continue
            seen.add((recipient, name))
            out.append(
                DeliveryEvent(
                    event_id=self._event_id(bounce_id, message.id, recipient, name, now),
                    event=name,
                    time=now,
                    node=self.hostname,
                    queue_id=message.id,
                    recipient=recipient,
                    envid=envid,
                    message_id=message_id,
                    attempt=message.attempts,
                    route=ROUTE,
                    relay_host=r.remote_mta or bounce.reporting_mta,
                    reply_code=r.reply_code,
                    reply_enhanced=r.status,
                    reply_text=_LEADING_REPLY_RE.sub("", r.diagnostic)[:900],
                )
            )
        return out

    def _event_id(
        self, bounce_id: str, queue_id: str, recipient: str, name: str, now: float
    ) -> str:
        """Time-ordered like :func:`hato.events.new_event_id`, and the same each time the
        same bounce (by its queue id) is delivered."""
        if not _QUEUE_ID_RE.match(bounce_id):
            return new_event_id(self._clock)
        millis = int(bounce_id[:11], 16) // 1000
        digest = hashlib.sha256(
            f"{bounce_id}\0{queue_id}\0{recipient}\0{name}".encode()
        ).hexdigest()
        return f"{millis:012x}{digest[:12]}"


def _reply_of(event: DeliveryEvent) -> str:
    """The recipient's reply as the queue keeps it (``550 5.1.1 text``, as a courier's)."""
    parts = [str(event.reply_code) if event.reply_code else "", event.reply_enhanced]
    return " ".join(p for p in (*parts, event.reply_text) if p)


def _parse(data: bytes, recipients: Sequence[str]) -> Bounce | None:
    try:
        return parse_bounce(data, recipients)
    except Exception:  # a message the email package chokes on is mail, not a bounce
        return None


def _original_of(r: BouncedRecipient, originals: dict[str, str]) -> str | None:
    for address in (r.original, r.address):
        if address and address.lower() in originals:
            return originals[address.lower()]
    return None


def _overlap(bounce: Bounce, message: StoredMessage) -> bool:
    originals = {r.address.lower(): r.address for r in message.recipients}
    return any(_original_of(r, originals) is not None for r in bounce.recipients)
