"""The in-memory queue: the reference backend, for tests and throw-away development runs.

Nothing survives the process, so ``enqueue`` is "durable" only in the sense that the
message is in the dict before the id is returned. Every method runs to completion
without awaiting, so within one event loop each call is atomic, which is what the other
backends get from their transactions.

Due messages sit in a heap keyed by ``next_attempt_at`` (a claimed message's
``next_attempt_at`` is its lease end, so expired leases come back through the same
heap). Entries are invalidated lazily: each message remembers the ticket of its live
entry, and ``claim`` skips the rest.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Sequence

from hato.clock import Clock
from hato.errors import MessageNotFound, QueueError
from hato.events import DeliveryEvent, EventPage, matches, stamped
from hato.message import Envelope
from hato.queue.base import (
    MessageState,
    Outcome,
    QuarantineHook,
    RecipientStatus,
    RecoveryReport,
    StoredMessage,
    apply_bounce,
    check_enqueue_lease,
    derive_state,
    new_message_id,
    settle_attempt,
    state_after_bounce,
)

_CLAIMABLE = frozenset({MessageState.QUEUED, MessageState.DEFERRED, MessageState.SENDING})


def _copy(msg: StoredMessage) -> StoredMessage:
    """A copy a caller may mutate without touching the stored message."""
    return StoredMessage(
        id=msg.id,
        sender=msg.sender,
        recipients=[
            RecipientStatus(r.address, r.state, r.reply, r.relay, r.attempts)
            for r in msg.recipients
        ],
        data=msg.data,
        state=msg.state,
        created_at=msg.created_at,
        next_attempt_at=msg.next_attempt_at,
        attempts=msg.attempts,
        last_reply=msg.last_reply,
        lease_owner=msg.lease_owner,
        lease_until=msg.lease_until,
        idempotency_key=msg.idempotency_key,
        meta=dict(msg.meta),
    )


class MemoryQueue:
    """A :class:`hato.queue.base.Queue` held in process memory."""

    def __init__(self, url: str = "memory://", *, clock: Clock = time.time) -> None:
        self.url = url
        self.on_quarantine: QuarantineHook | None = None
        self._clock = clock
        self._open = False
        self._messages: dict[str, StoredMessage] = {}
        self._by_key: dict[str, str] = {}
        self._due: list[tuple[float, int, str]] = []
        self._ticket: dict[str, int] = {}
        self._tickets = itertools.count()
        self._work = asyncio.Event()
        self._events: list[DeliveryEvent] = []
        self._event_ids: set[str] = set()
        # Cursor of the first event in _events: pruning drops from the front.
        self._events_base = 0
        self._cursors: dict[str, str] = {}

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise QueueError(f"queue {self.url} is not open")

    def _schedule(self, msg: StoredMessage) -> None:
        """Point the due heap at the message's current ``next_attempt_at`` (or nowhere)."""
        if msg.state in _CLAIMABLE:
            ticket = next(self._tickets)
            self._ticket[msg.id] = ticket
            heapq.heappush(self._due, (msg.next_attempt_at, ticket, msg.id))
            # Stale entries pile up as messages move; rebuild once they dominate.
            if len(self._due) > 64 and len(self._due) > 2 * len(self._ticket):
                self._due = [e for e in self._due if self._ticket.get(e[2]) == e[1]]
                heapq.heapify(self._due)
        else:
            self._ticket.pop(msg.id, None)

    def _drop_stale_top(self) -> None:
        while self._due and self._ticket.get(self._due[0][2]) != self._due[0][1]:
            heapq.heappop(self._due)

    async def enqueue(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        held: bool = False,
        not_before: float | None = None,
        idempotency_key: str | None = None,
        meta: dict[str, str] | None = None,
        events: Sequence[DeliveryEvent] = (),
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
    ) -> str:
        self._check_open()
        check_enqueue_lease(
            lease_owner,
            lease_seconds,
            held=held,
            not_before=not_before,
            idempotency_key=idempotency_key,
        )
        if idempotency_key is not None and idempotency_key in self._by_key:
            return self._by_key[idempotency_key]
        if not envelope.recipients:
            raise ValueError("a message needs at least one recipient")
        now = self._clock()
        message_id = new_message_id(lambda: now)
        while message_id in self._messages:
            message_id = new_message_id(lambda: now)
        msg = StoredMessage(
            id=message_id,
            sender=envelope.sender,
            recipients=[RecipientStatus(a) for a in envelope.recipients],
            data=bytes(data),
            state=MessageState.HELD if held else MessageState.QUEUED,
            created_at=now,
            next_attempt_at=now if not_before is None else not_before,
            idempotency_key=idempotency_key,
            meta={**envelope.meta, **(meta or {})},
        )
        if lease_owner is not None:
            msg.state = MessageState.SENDING
            msg.lease_owner = lease_owner
            msg.lease_until = msg.next_attempt_at = now + lease_seconds
        self._messages[message_id] = msg
        if idempotency_key is not None:
            self._by_key[idempotency_key] = message_id
        self._schedule(msg)
        self._store_events(stamped(events, message_id))
        self._work.set()
        return message_id

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        self._check_open()
        now = self._clock()
        claimed: list[StoredMessage] = []
        while len(claimed) < limit and self._due:
            self._drop_stale_top()
            if not self._due or self._due[0][0] > now:
                break
            _, _, message_id = heapq.heappop(self._due)
            msg = self._messages[message_id]
            msg.state = MessageState.SENDING
            msg.lease_owner = owner
            msg.lease_until = now + lease_seconds
            msg.next_attempt_at = msg.lease_until
            self._schedule(msg)
            claimed.append(_copy(msg))
        return claimed

    def _leased(self, message_id: str, owner: str) -> StoredMessage | None:
        msg = self._messages.get(message_id)
        if msg is None or msg.state is not MessageState.SENDING or msg.lease_owner != owner:
            return None
        return msg

    async def record(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        owner: str,
        retry_at: float | None,
        held: bool = False,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        self._check_open()
        msg = self._leased(message_id, owner)
        if msg is None:
            return None
        attempts = msg.attempts + 1
        recipients, last_reply, state = settle_attempt(
            msg.recipients, outcomes, attempts=attempts, held=held, retry_at=retry_at
        )
        msg.recipients = recipients
        msg.attempts = attempts
        msg.last_reply = last_reply or msg.last_reply
        msg.state = state
        msg.lease_owner = ""
        msg.lease_until = 0.0
        msg.next_attempt_at = retry_at if retry_at is not None else self._clock()
        self._schedule(msg)
        self._store_events(events)
        return state

    async def record_bounce(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        self._check_open()
        msg = self._messages.get(message_id)
        if msg is None:
            return None
        if msg.state is not MessageState.QUARANTINED:
            msg.recipients, _ = apply_bounce(msg.recipients, outcomes)
            msg.state = state_after_bounce(msg.state, msg.recipients)
        self._store_events(events)
        return msg.state

    async def release(self, message_id: str, *, owner: str) -> None:
        self._check_open()
        msg = self._leased(message_id, owner)
        if msg is None:
            return
        msg.state = derive_state(msg.recipients, attempts=msg.attempts)
        msg.lease_owner = ""
        msg.lease_until = 0.0
        msg.next_attempt_at = self._clock()
        self._schedule(msg)
        self._work.set()

    async def requeue(self, message_id: str) -> None:
        self._check_open()
        msg = self._messages.get(message_id)
        if msg is None:
            raise MessageNotFound(message_id)
        if msg.state not in (MessageState.HELD, MessageState.DEFERRED, MessageState.QUEUED):
            return
        msg.state = derive_state(msg.recipients, attempts=msg.attempts)
        msg.next_attempt_at = self._clock()
        self._schedule(msg)
        self._work.set()

    async def get(self, message_id: str) -> StoredMessage:
        self._check_open()
        msg = self._messages.get(message_id)
        if msg is None:
            raise MessageNotFound(message_id)
        return _copy(msg)

    async def find(self, idempotency_key: str) -> str | None:
        self._check_open()
        return self._by_key.get(idempotency_key)

    async def list(
        self, *, states: Sequence[MessageState] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        self._check_open()
        wanted = None if states is None else frozenset(states)
        found: list[StoredMessage] = []
        # dicts keep insertion order, so reversed() is newest first.
        for msg in reversed(self._messages.values()):
            if len(found) >= limit:
                break
            if wanted is None or msg.state in wanted:
                found.append(_copy(msg))
        return found

    async def delete(self, message_id: str) -> None:
        self._check_open()
        msg = self._messages.pop(message_id, None)
        if msg is None:
            raise MessageNotFound(message_id)
        if msg.idempotency_key is not None:
            self._by_key.pop(msg.idempotency_key, None)
        self._ticket.pop(message_id, None)

    async def oldest(self) -> dict[MessageState, float]:
        self._check_open()
        result: dict[MessageState, float] = {}
        for msg in self._messages.values():
            state = msg.state
            result[state] = min(result.get(state, msg.created_at), msg.created_at)
        return result

    async def ping(self) -> None:
        self._check_open()

    async def counts(self) -> dict[MessageState, int]:
        self._check_open()
        counts = dict.fromkeys(MessageState, 0)
        for msg in self._messages.values():
            counts[msg.state] += 1
        return counts

    async def recover(self) -> RecoveryReport:
        self._check_open()
        now = self._clock()
        report = RecoveryReport()
        for msg in self._messages.values():
            if msg.state is MessageState.SENDING and msg.lease_until <= now:
                msg.state = derive_state(msg.recipients, attempts=msg.attempts)
                msg.lease_owner = ""
                msg.lease_until = 0.0
                self._schedule(msg)
                report.leases_expired += 1
        # Records in memory cannot be torn; quarantine exists for the stored backends.
        report.quarantined = [
            m.id for m in self._messages.values() if m.state is MessageState.QUARANTINED
        ]
        if report.leases_expired:
            self._work.set()
        return report

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a message was enqueued, released or requeued in this process, when
        the earliest scheduled message falls due, or after ``timeout`` seconds."""
        self._check_open()
        if not self._work.is_set():
            self._drop_stale_top()
            if self._due:
                timeout = min(timeout, self._due[0][0] - self._clock())
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout):
                        await self._work.wait()
                except TimeoutError:
                    pass
        self._work.clear()

    # Delivery events.

    def _store_events(self, events: Sequence[DeliveryEvent]) -> int:
        stored = 0
        for event in events:
            if event.event_id not in self._event_ids:
                self._event_ids.add(event.event_id)
                self._events.append(event)
                stored += 1
        return stored

    async def add_events(self, events: Sequence[DeliveryEvent]) -> int:
        self._check_open()
        return self._store_events(events)

    async def events(
        self,
        *,
        after: str = "",
        queue_id: str | None = None,
        envid: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> EventPage:
        self._check_open()
        try:
            position = max(int(after or 0), self._events_base)
        except ValueError:
            raise QueueError(f"not an event cursor of this queue: {after!r}") from None
        found: list[DeliveryEvent] = []
        for index in range(position - self._events_base, len(self._events)):
            position = self._events_base + index + 1
            event = self._events[index]
            if matches(event, queue_id=queue_id, envid=envid, since=since):
                found.append(event)
                if len(found) >= limit:
                    break
        return EventPage(found, str(position))

    async def prune_events(self, before: float) -> int:
        self._check_open()
        keep = [e for e in self._events if e.time >= before]
        dropped = len(self._events) - len(keep)
        # The cursor counts stored events; pruning keeps it meaning the same position
        # only when it drops a prefix, which time order makes the usual case.
        if dropped:
            self._events_base += dropped
            self._event_ids = {e.event_id for e in keep}
            self._events = keep
        return dropped

    async def get_cursor(self, name: str) -> str:
        self._check_open()
        return self._cursors.get(name, "")

    async def set_cursor(self, name: str, value: str) -> None:
        self._check_open()
        self._cursors[name] = value
