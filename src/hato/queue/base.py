"""The queue protocol every backend implements, and the pure rules of a message's state.

A message is stored once with its envelope and bytes, and carries one
:class:`RecipientStatus` per recipient. Its :class:`MessageState` is derived from those
recipients and its lease:

===========  ==============================================================
state        meaning
===========  ==============================================================
queued       has pending recipients, never tried (or released for retry)
sending      claimed by a worker whose lease has not expired
deferred     has pending recipients, tried at least once, waits ``next_attempt_at``
held         kept on purpose (hold courier, no relay configured); never claimed
sent         every recipient delivered
failed       every recipient has an end state and at least one failed (bounced)
quarantined  the stored record is unreadable (checksum or decoding failed); never
             claimed, kept for the operator to inspect or delete; ``last_reply``
             says why (``quarantined: <reason>``)
===========  ==============================================================

Contract (the suite in ``tests/contract`` checks it on every backend):

* ``enqueue`` returns only once the message is durable (for SQLite: committed and
  fsync'd). Concurrent enqueues may share one commit (group commit).
* ``claim`` hands out due messages (queued/deferred with ``next_attempt_at <= now``, or
  ``sending`` whose lease expired) oldest-due first, each to one owner at a time, and
  marks them ``sending`` until ``now + lease_seconds``.
* ``record`` stores per-recipient outcomes from the lease owner and releases the lease.
  A record from an owner whose lease was taken over is refused (returns ``None``) so a
  slow worker cannot overwrite a newer attempt.
* Nothing is ever deleted implicitly; ``delete`` is the only way a message goes.
* A claimed message's ``next_attempt_at`` is its lease end (when it becomes claimable
  again). An expired lease reads as ``sending`` until it is claimed again or ``recover``
  runs. ``release``/``record`` from a non-owner and ``record`` on a deleted message change
  nothing; ``requeue`` touches only queued, deferred and held messages.
* One unreadable record never stops the rest: whatever a row holds (bad bytes, bad JSON,
  wrong types, missing fields), ``claim`` and ``get`` quarantine it (and call
  ``on_quarantine`` with its id and the reason), ``recover`` quarantines it (and lists it
  in its report), ``list`` shows it as quarantined; all go on with the others.
* ``recover`` gives back the leases of owners that no longer run at once, whatever their
  lease says. Each backend asks a liveness signal the kernel or the server ends with the
  process (a lock file, a session lock, a key with a short TTL), never a pid.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from hato.clock import Clock
from hato.events import DeliveryEvent, EventPage
from hato.message import Envelope


class MessageState(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    HELD = "held"
    SENT = "sent"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class RecipientState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(slots=True)
class RecipientStatus:
    """One recipient's progress. ``reply`` is the last remote (or local) reply as text."""

    address: str
    state: RecipientState = RecipientState.PENDING
    reply: str = ""
    relay: str = ""
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt did to one recipient, as ``record`` takes it.

    ``state`` is ``sent``, ``failed`` (permanent) or ``pending`` (temporary: retry).
    """

    address: str
    state: RecipientState
    reply: str
    relay: str = ""


@dataclass(slots=True)
class StoredMessage:
    id: str
    sender: str
    recipients: list[RecipientStatus]
    data: bytes
    state: MessageState
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    last_reply: str = ""
    lease_owner: str = ""
    lease_until: float = 0.0
    idempotency_key: str | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> list[str]:
        return [r.address for r in self.recipients if r.state is RecipientState.PENDING]

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class RecoveryReport:
    """What ``recover()`` found at start-up.

    ``integrity`` is what a check of the storage itself found (SQLite runs ``PRAGMA
    quick_check`` after an unclean stop), as one line; ``""`` when no check ran.
    """

    leases_expired: int = 0
    quarantined: list[str] = field(default_factory=list)
    integrity: str = ""


QuarantineHook = Callable[[str, str], None]
"""Called with ``(message_id, reason)`` each time a backend quarantines a record."""


def derive_state(
    recipients: Sequence[RecipientStatus], *, attempts: int, held: bool = False
) -> MessageState:
    """The message state implied by its recipients (leases aside)."""
    if any(r.state is RecipientState.PENDING for r in recipients):
        if held:
            return MessageState.HELD
        return MessageState.DEFERRED if attempts > 0 else MessageState.QUEUED
    if any(r.state is RecipientState.FAILED for r in recipients):
        return MessageState.FAILED
    return MessageState.SENT


def apply_outcomes(
    recipients: Sequence[RecipientStatus], outcomes: Sequence[Outcome]
) -> tuple[list[RecipientStatus], str]:
    """The recipients after one attempt, and the reply to keep as ``last_reply``.

    Named recipients take their outcome and one more attempt; the others are copied
    unchanged. ``last_reply`` is the last reply of a recipient that is not sent (it says
    why the message is not done), else the last reply. Raises :class:`ValueError`, before
    anything changes, for an address the message does not have.
    """
    by_address = {o.address: o for o in outcomes}
    unknown = set(by_address) - {r.address for r in recipients}
    if unknown:
        raise ValueError(f"outcomes for unknown recipients: {sorted(unknown)}")
    updated = []
    for r in recipients:
        o = by_address.get(r.address)
        if o is None:
            updated.append(RecipientStatus(r.address, r.state, r.reply, r.relay, r.attempts))
        else:
            updated.append(RecipientStatus(r.address, o.state, o.reply, o.relay, r.attempts + 1))
    return updated, last_reply_of(outcomes)


def last_reply_of(outcomes: Sequence[Outcome]) -> str:
    """The reply one attempt leaves as ``last_reply``: the last reply of a recipient that
    is not sent (it says why the message is not done), else the last reply; ``""`` when
    the outcomes carry none."""
    unsent = [o.reply for o in outcomes if o.state is not RecipientState.SENT and o.reply]
    replies = unsent or [o.reply for o in outcomes if o.reply]
    return replies[-1] if replies else ""


def settle_attempt(
    recipients: Sequence[RecipientStatus],
    outcomes: Sequence[Outcome],
    *,
    attempts: int,
    held: bool,
    retry_at: float | None,
) -> tuple[list[RecipientStatus], str, MessageState]:
    """What ``record`` stores for one attempt, its pure part: the recipients after it, the
    reply to keep as ``last_reply`` (``""``: keep the old one) and the new state.

    ``attempts`` counts this attempt. Raises :class:`ValueError`, before anything changes,
    for an address the message does not have, or when recipients stay pending (and the
    message is not ``held``) without ``retry_at``.
    """
    updated, last_reply = apply_outcomes(recipients, outcomes)
    state = derive_state(updated, attempts=attempts, held=held)
    if state is MessageState.DEFERRED and retry_at is None:
        raise ValueError("retry_at is required while recipients stay pending")
    return updated, last_reply, state


def apply_bounce(
    recipients: Sequence[RecipientStatus], outcomes: Sequence[Outcome]
) -> tuple[list[RecipientStatus], bool]:
    """The recipients after a bounce that came once the message was delivered, and
    whether any changed: each ``sent`` recipient named by a ``failed`` outcome becomes
    ``failed`` with its reply and relay (attempts unchanged); anything else, an address
    the message does not have included, changes nothing."""
    failed = {o.address: o for o in outcomes if o.state is RecipientState.FAILED}
    updated, changed = [], False
    for r in recipients:
        o = failed.get(r.address)
        if o is not None and r.state is RecipientState.SENT:
            updated.append(
                RecipientStatus(r.address, RecipientState.FAILED, o.reply, o.relay, r.attempts)
            )
            changed = True
        else:
            updated.append(RecipientStatus(r.address, r.state, r.reply, r.relay, r.attempts))
    return updated, changed


def state_after_bounce(state: MessageState, recipients: Sequence[RecipientStatus]) -> MessageState:
    """A ``sent`` message with a recipient failed by a bounce is ``failed``; any other
    state stands (pending recipients, a lease or a quarantine decide it)."""
    if state is MessageState.SENT and any(r.state is RecipientState.FAILED for r in recipients):
        return MessageState.FAILED
    return state


def check_enqueue_lease(
    lease_owner: str | None,
    lease_seconds: float,
    *,
    held: bool,
    not_before: float | None,
    idempotency_key: str | None,
) -> None:
    """The arguments an enqueue with ``lease_owner`` refuses (:class:`ValueError`)."""
    if lease_owner is None:
        return
    if not lease_owner:
        raise ValueError("lease_owner must not be empty")
    if held or not_before is not None or idempotency_key is not None:
        raise ValueError("a message leased at enqueue is due now, not held, without a key")
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")


def new_message_id(clock: Clock = time.time) -> str:
    """A queue id: 11 upper-case hex digits of microseconds, then 8 random ones.

    Sortable by creation time, short enough for a log line, unique across processes:
    32 random bits keep ids made in the same microsecond apart (300 of them collide with
    a chance of about one in 100,000; 20 bits made that one in 25).
    """
    return f"{int(clock() * 1_000_000):011X}"[-11:] + secrets.token_hex(4).upper()


@runtime_checkable
class Queue(Protocol):
    """The queue protocol. Every method is a coroutine; backends translate their errors
    into :class:`hato.errors.QueueError`."""

    url: str
    # Told of every record this queue quarantines (the worker points it at the mail log).
    on_quarantine: QuarantineHook | None

    async def open(self) -> None:
        """Connect and create the schema if needed."""

    async def close(self) -> None: ...

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
        """Store a message durably and return its id.

        With ``idempotency_key``, a second enqueue with the same key returns the first
        message's id and stores nothing. ``events`` (the ``accepted`` ones) are stored in
        the same commit; an empty ``queue_id`` in them is the new message's id.

        With ``lease_owner`` the message is stored already leased (``sending``) to that
        owner until ``now + lease_seconds``, in the same commit: the in-process worker it
        is handed to delivers it without a claim commit. Such a lease is one like any
        other (recovered when the owner dies, or when it runs out); the owner's liveness
        signal is taken before the commit. Refused (:class:`ValueError`) with ``held``,
        ``not_before`` or ``idempotency_key`` (the id returned could be another message's).
        """
        ...

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        """Lease up to ``limit`` due messages to ``owner``."""
        ...

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
        """Store outcomes, bump ``attempts``, release the lease and return the new state.

        Recipients not named in ``outcomes`` keep their state. Pending recipients are
        retried at ``retry_at`` (required when any stay pending, unless ``held``).
        ``events`` (what the attempt did) are stored in the same commit.
        Returns ``None`` (and changes nothing) when ``owner`` no longer holds the lease.
        """
        ...

    async def record_bounce(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        """Store what a bounce that came after delivery says (:func:`apply_bounce`): no
        lease needed, attempts, lease and schedule untouched; a ``sent`` message becomes
        ``failed`` (:func:`state_after_bounce`). ``events`` are stored in the same
        commit. Returns the state after; ``None`` (storing nothing) when the message is
        not in the queue."""
        ...

    async def release(self, message_id: str, *, owner: str) -> None:
        """Give a lease back untouched (graceful stop): the message is due again now."""
        ...

    async def requeue(self, message_id: str) -> None:
        """Make a held or deferred message due now (``hato queue release/retry``)."""
        ...

    async def get(self, message_id: str) -> StoredMessage:
        """Raise :class:`hato.errors.MessageNotFound` if absent."""
        ...

    async def find(self, idempotency_key: str) -> str | None: ...

    async def list(
        self, *, states: Sequence[MessageState] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        """Newest first. ``data`` may be empty in listed messages; use ``get`` for bytes."""
        ...

    async def delete(self, message_id: str) -> None: ...

    async def counts(self) -> dict[MessageState, int]: ...

    async def oldest(self) -> dict[MessageState, float]:
        """The ``created_at`` of the oldest message in each state that has any."""
        ...

    async def ping(self) -> None:
        """Prove the queue takes writes now, by a small real write that touches no
        message (``/readyz``); raises :class:`hato.errors.QueueError` when it does not."""
        ...

    async def recover(self) -> RecoveryReport:
        """Start-up: expired leases come back; unreadable records are quarantined."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return early when new work may be due (in-process event, LISTEN/NOTIFY, ...)."""
        ...

    # Delivery events (hato.events): this node's record of each step, and the steps of
    # other nodes it was told about.

    async def add_events(self, events: Sequence[DeliveryEvent]) -> int:
        """Store events durably (operator actions, events pulled from another node or
        received by webhook); one whose ``event_id`` is stored already is skipped. The
        number stored."""
        ...

    async def events(
        self,
        *,
        after: str = "",
        queue_id: str | None = None,
        envid: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> EventPage:
        """Stored events in the order they were stored, those after the cursor ``after``
        (``""``: from the first), filtered; the page's cursor continues after its last
        event (or stays at ``after`` when there is none)."""
        ...

    async def prune_events(self, before: float) -> int:
        """Forget events whose ``time`` is before ``before`` (retention); how many."""
        ...

    async def get_cursor(self, name: str) -> str:
        """A cursor a reader of events keeps here (a webhook URL's, an upstream's);
        ``""`` when none was stored under ``name``."""
        ...

    async def set_cursor(self, name: str, value: str) -> None:
        """Store ``value`` durably as cursor ``name`` (replacing the previous one)."""
        ...
