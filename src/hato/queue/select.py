"""Choosing queued messages by a filter, and acting on many at once (bulk operations).

One pure :class:`MessageFilter` (the query keys of ``GET /api/v1/messages``, the JSON
filter of ``POST /api/v1/messages/bulk`` and the flags of ``hato queue retry|release|
delete``), :func:`select` to list the messages it matches newest first, and
:func:`bulk` to retry, release or delete them, so the CLI and the HTTP API share one
meaning of every key:

===============  ========================================================================
key              matches a message when
===============  ========================================================================
``state``        its state is one of these (comma-separated, or a JSON list)
``q``            the text occurs (case-insensitively) in its id, sender, a recipient or
                 its last reply
``sender``       its envelope sender is this address (case-insensitively)
``recipient``    one of its recipients is this address (case-insensitively)
``domain``       one of its recipients is at this domain (case-insensitively)
``older_than``   it was queued at least this many seconds ago
===============  ========================================================================

Each action touches only the states it applies to, and counts only those as matched:
``retry`` queued and deferred messages, ``release`` held ones (both make them due now:
the worker routes them as the settings say), ``delete`` every state but ``sending`` (a
delivery in flight finishes first). Operator actions leave delivery events
(``released``, ``deleted``) beside the worker's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from hato.clock import Clock
from hato.errors import ConfigError, MessageNotFound
from hato.events import DELETED, RELEASED, DeliveryEvent, new_event_id
from hato.queue.base import MessageState, Queue, RecipientState, StoredMessage

Action = Literal["retry", "release", "delete"]
ACTIONS: Final[tuple[Action, ...]] = ("retry", "release", "delete")

# The states each action applies to (see the module docstring).
ACTION_STATES: Final[Mapping[Action, frozenset[MessageState]]] = {
    "retry": frozenset({MessageState.QUEUED, MessageState.DEFERRED}),
    "release": frozenset({MessageState.HELD}),
    "delete": frozenset(set(MessageState) - {MessageState.SENDING}),
}

# How many messages one scan reads at most: every filter reads the queue's own list
# (newest first) and filters it here, so one bulk action covers at most this many.
SCAN_LIMIT: Final = 1_000_000

FILTER_KEYS: Final = ("state", "q", "sender", "recipient", "domain", "older_than")

Progress = Callable[[int, int], None]
"""Called with ``(done, total)`` after each message a bulk action handles."""


class FilterError(ConfigError):
    """A filter key with a value that does not parse (an unknown state, a negative age)."""


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Which messages an operator means; the empty filter matches every message."""

    states: tuple[MessageState, ...] = ()
    q: str = ""
    sender: str = ""
    recipient: str = ""
    domain: str = ""
    older_than: float | None = None

    @classmethod
    def parse(cls, data: Mapping[str, object]) -> MessageFilter:
        """A filter from query keys or a JSON object (values as text, numbers or, for
        ``state``, a list). Raises :class:`FilterError` for an unknown key or a bad value."""
        unknown = sorted(set(data) - set(FILTER_KEYS))
        if unknown:
            raise FilterError(f"unknown filter key: {', '.join(unknown)}")
        states = _states(data.get("state"))
        texts = {}
        for key in ("q", "sender", "recipient", "domain"):
            value = data.get(key, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise FilterError(f"{key} must be text")
            texts[key] = value.strip()
        older_than = _seconds(data.get("older_than"))
        return cls(states=states, older_than=older_than, **texts)

    def is_empty(self) -> bool:
        return self == MessageFilter()

    def to_json(self) -> dict[str, object]:
        """The filter as ``parse`` takes it back (empty keys left out)."""
        out: dict[str, object] = {}
        if self.states:
            out["state"] = [str(s) for s in self.states]
        for key in ("q", "sender", "recipient", "domain"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.older_than is not None:
            out["older_than"] = self.older_than
        return out

    def matches(self, message: StoredMessage, now: float) -> bool:
        """Whether ``message`` passes every key of this filter at time ``now``."""
        if self.states and message.state not in self.states:
            return False
        recipients = [r.address.lower() for r in message.recipients]
        if self.sender and message.sender.lower() != self.sender.lower():
            return False
        if self.recipient and self.recipient.lower() not in recipients:
            return False
        if self.domain:
            domain = self.domain.lower().lstrip("@")
            if not any(r.rpartition("@")[2] == domain for r in recipients):
                return False
        if self.older_than is not None and message.created_at > now - self.older_than:
            return False
        if self.q:
            needle = self.q.lower()
            haystack = [message.id.lower(), message.sender.lower(), *recipients]
            haystack.append(message.last_reply.lower())
            if not any(needle in text for text in haystack):
                return False
        return True


def _states(value: object) -> tuple[MessageState, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        names: Iterable[object] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        names = value
    else:
        raise FilterError("state must be text or a list of states")
    states = []
    for name in names:
        if not isinstance(name, str):
            raise FilterError("state must be text or a list of states")
        try:
            states.append(MessageState(name.lower()))
        except ValueError:
            known = ", ".join(s.value for s in MessageState)
            raise FilterError(f"unknown state {name!r} (one of {known})") from None
    return tuple(dict.fromkeys(states))


def _seconds(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise FilterError("older_than must be a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            raise FilterError("older_than must be a number of seconds") from None
    else:
        raise FilterError("older_than must be a number of seconds")
    if not seconds >= 0 or seconds == float("inf"):
        raise FilterError("older_than must be a number of seconds, 0 or more")
    return seconds


def summary(message: StoredMessage) -> dict[str, Any]:
    """A message as ``hato queue list --json`` prints it and ``GET /api/v1/messages``
    lists it (an interface: add fields, never rename one)."""
    return {
        "id": message.id,
        "sender": message.sender,
        "recipients": [r.address for r in message.recipients],
        "state": str(message.state),
        # Backends may list without the bytes; then the size is unknown here.
        "size": message.size if message.data else None,
        "created_at": message.created_at,
        "next_attempt_at": message.next_attempt_at,
        "attempts": message.attempts,
        "last_reply": message.last_reply,
        "recipient_status": [
            {"address": r.address, "state": str(r.state), "reply": r.reply, "relay": r.relay}
            for r in message.recipients
        ],
    }


def newest_first(messages: Iterable[StoredMessage]) -> list[StoredMessage]:
    """Messages ordered newest first, ties broken by id (a stable order to page through)."""
    return sorted(messages, key=lambda m: (m.created_at, m.id), reverse=True)


async def select(
    queue: Queue,
    message_filter: MessageFilter,
    *,
    now: float | None = None,
    states: Iterable[MessageState] | None = None,
) -> list[StoredMessage]:
    """The messages ``message_filter`` matches, newest first (without their bytes, as
    ``Queue.list`` gives them). ``states``, when given, narrows further (an action's)."""
    matched, _ = await _scan(queue, message_filter, now=now, states=states, scan=SCAN_LIMIT)
    return matched


async def _scan(
    queue: Queue,
    message_filter: MessageFilter,
    *,
    now: float | None,
    states: Iterable[MessageState] | None,
    scan: int,
) -> tuple[list[StoredMessage], bool]:
    """What the filter matches among the ``scan`` newest messages, and whether those
    were all there are."""
    at = time.time() if now is None else now
    wanted: set[MessageState] | None = set(message_filter.states) or None
    if states is not None:
        allowed = set(states)
        wanted = allowed if wanted is None else wanted & allowed
    if wanted is not None and not wanted:
        return [], True
    order = [s for s in MessageState if wanted is None or s in wanted]
    listed = await queue.list(states=None if wanted is None else order, limit=scan)
    matched = newest_first(m for m in listed if message_filter.matches(m, at))
    return matched, len(listed) < scan


async def select_page(
    queue: Queue,
    message_filter: MessageFilter,
    *,
    limit: int,
    cursor: str = "",
    now: float | None = None,
) -> tuple[list[StoredMessage], str]:
    """One :func:`page` of what ``message_filter`` matches, reading no more of the queue
    than it needs: the newest 256 messages first, twice as many each time the page is not
    complete among them (a list the console polls stays cheap on a big queue)."""
    scan = 256
    while True:
        matched, exhausted = await _scan(
            queue, message_filter, now=now, states=None, scan=min(scan, SCAN_LIMIT)
        )
        chunk, next_cursor = page(matched, limit=limit, cursor=cursor)
        if exhausted or next_cursor or scan >= SCAN_LIMIT:
            return chunk, next_cursor
        scan *= 2


def operator_events(
    message: StoredMessage, event: str, *, node: str, clock: Clock = time.time
) -> list[DeliveryEvent]:
    """The delivery events of an operator's step on ``message`` (``released``: its
    pending recipients; ``deleted``: those not delivered yet, or all when none is left)."""
    now = clock()
    pending = [r.address for r in message.recipients if r.state is RecipientState.PENDING]
    recipients = pending or [r.address for r in message.recipients]
    return [
        DeliveryEvent(
            event_id=new_event_id(clock),
            event=event,
            time=now,
            node=node,
            queue_id=message.id,
            recipient=recipient,
            route="operator",
        )
        for recipient in recipients
    ]


async def act(
    queue: Queue,
    action: Action,
    message: StoredMessage,
    *,
    node: str,
    clock: Clock = time.time,
) -> None:
    """Retry, release or delete one message and record what the operator did.
    Raises :class:`~hato.errors.MessageNotFound` when it is gone."""
    if action == "delete":
        await queue.delete(message.id)
        await queue.add_events(operator_events(message, DELETED, node=node, clock=clock))
        return
    await queue.requeue(message.id)
    if action == "release":
        await queue.add_events(operator_events(message, RELEASED, node=node, clock=clock))


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk action matched and (unless it was a dry run) did; ``ids`` those matched."""

    matched: int
    done: int | None
    ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, int]:
        out = {"matched": self.matched}
        if self.done is not None:
            out["done"] = self.done
        return out


async def bulk(
    queue: Queue,
    action: Action,
    message_filter: MessageFilter,
    *,
    dry_run: bool = False,
    node: str = "",
    progress: Progress | None = None,
    clock: Clock = time.time,
) -> BulkResult:
    """Apply ``action`` to every message ``message_filter`` matches in the states the
    action applies to. A message gone meanwhile (delivered and deleted, deleted by
    another operator) is skipped and not counted as done."""
    if action not in ACTIONS:
        raise FilterError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    chosen = await select(queue, message_filter, now=clock(), states=ACTION_STATES[action])
    ids = tuple(m.id for m in chosen)
    if dry_run:
        return BulkResult(len(chosen), None, ids)
    done = 0
    for i, message in enumerate(chosen, 1):
        try:
            await act(queue, action, message, node=node, clock=clock)
        except MessageNotFound:
            pass
        else:
            done += 1
        if progress is not None:
            progress(i, len(chosen))
    return BulkResult(len(chosen), done, ids)


def page(
    messages: Sequence[StoredMessage], *, limit: int, cursor: str = ""
) -> tuple[list[StoredMessage], str]:
    """One page of ``messages`` (newest first) after ``cursor``, and the cursor of the
    next page (``""`` after the last). A cursor names the position after a message, as
    ``created_at:id``, so a page stays right when messages come and go meanwhile. Raises
    :class:`FilterError` for a cursor this function did not hand out."""
    start = 0
    if cursor:
        at, _, after_id = cursor.partition(":")
        try:
            key = (float(at), after_id)
        except ValueError:
            raise FilterError("cursor is not one this API handed out") from None
        if not after_id:
            raise FilterError("cursor is not one this API handed out")
        start = len(messages)
        for i, m in enumerate(messages):
            if (m.created_at, m.id) < key:
                start = i
                break
    chunk = list(messages[start : start + limit])
    more = start + limit < len(messages)
    next_cursor = f"{chunk[-1].created_at!r}:{chunk[-1].id}" if chunk and more else ""
    return chunk, next_cursor
