"""Delivery events: what happened to each recipient, on every node, as durable records.

Every Hato node records one :class:`DeliveryEvent` per recipient and step, in its queue,
in the same transaction as the step itself (a message accepted, an attempt recorded), so
the record can never say more or less than the queue holds. The names:

=============  =========================================================================
event          meaning
=============  =========================================================================
accepted       this node took the message (SMTP 250 or ``Mailer.send``)
deferred       an attempt failed temporarily; it will be retried
relayed        handed to a next hop that is not the recipient's own (a relay, the local
               relay, a smarthost); what happens next is that hop's to tell
delivered      accepted by the recipient domain's MX, or stored in our own mailbox: the
               meaning ESPs give the word (DSN actions keep the RFC's meaning)
bounced        refused for good (5xx, null MX, ...); a DSN went to the sender if asked
expired        given up after the queue lifetime; bounced with it
delayed        still undelivered after ``HATO_DELAY_WARNING``; a DELAY DSN went out
held           kept on this node on purpose (the capture route)
released       sent on by the operator (``hato queue release``, the console)
deleted        removed by the operator
=============  =========================================================================

Each event carries the *attempt record* (:class:`Attempt`): the same fields in the
console's timeline, the JSON API, ``hato events --json`` and webhooks; later releases add
fields, never rename one. ``envid`` is the RFC 3461 envelope id the message travels with:
``hato worker`` sends the outbox id as ENVID, so one grep (or one API call) follows a
message across every hop. Events pulled from another node keep that node's
``event_id`` and ``node``; a store keeps one copy of each ``event_id``.
"""

from __future__ import annotations

import datetime
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Final

from hato.clock import Clock

ACCEPTED: Final = "accepted"
DEFERRED: Final = "deferred"
RELAYED: Final = "relayed"
DELIVERED: Final = "delivered"
BOUNCED: Final = "bounced"
EXPIRED: Final = "expired"
DELAYED: Final = "delayed"
HELD: Final = "held"
RELEASED: Final = "released"
DELETED: Final = "deleted"

EVENT_NAMES: tuple[str, ...] = (
    ACCEPTED,
    DEFERRED,
    RELAYED,
    DELIVERED,
    BOUNCED,
    EXPIRED,
    DELAYED,
    HELD,
    RELEASED,
    DELETED,
)

# How far each event takes a recipient: the state a message reports is its least
# advanced recipient's (see hato.mailer's Status).
FINAL_EVENTS = frozenset({DELIVERED, BOUNCED, EXPIRED, DELETED})


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt as every view shows it (console timeline, API, events).

    ``route`` is ``relay``, ``mx``, ``local``, ``hold`` (or ``smtp``/``outbox`` for the
    step that accepted the message); ``relay_host``/``relay_ip`` the next hop spoken to
    (empty when none was reached); ``reply_*`` its reply, split; ``tls_version`` the
    negotiated protocol (``TLSv1.3``, empty for plaintext) and ``tls_verified`` whether
    its certificate was checked. ``tls_policy`` says which rule chose the TLS level
    (``none``, ``opportunistic``, ``mta-sts-enforce``, ``mta-sts-testing``, ``dane``,
    ``operator``), empty where no TLS decision was made.
    """

    time: float
    route: str = ""
    relay_host: str = ""
    relay_ip: str = ""
    reply_code: int = 0
    reply_enhanced: str = ""
    reply_text: str = ""
    tls_version: str = ""
    tls_verified: bool = False
    tls_policy: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """One recipient's step on one node (see the module docstring for the names)."""

    event_id: str
    event: str
    time: float
    node: str
    queue_id: str
    recipient: str
    envid: str = ""
    message_id: str = ""
    attempt: int = 0
    route: str = ""
    relay_host: str = ""
    relay_ip: str = ""
    reply_code: int = 0
    reply_enhanced: str = ""
    reply_text: str = ""
    tls_version: str = ""
    tls_verified: bool = False
    tls_policy: str = ""

    def to_json(self) -> dict[str, Any]:
        """The event as the JSON API, ``hato events --json`` and webhooks write it."""
        # Every field is a str, number or bool: asdict's deep copy is not needed, and it
        # showed in the per-message profile (every enqueue and record encodes events).
        return {name: getattr(self, name) for name in _EVENT_FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeliveryEvent:
        """An event from its JSON form (another node's API, a webhook). Unknown keys are
        ignored (a newer node may send more); raises ``ValueError`` for a missing or
        mistyped field."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in _REQUIRED:
                    raise ValueError(f"event without {f.name!r}")
                continue
            value = data[f.name]
            kind = _TYPES[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"event field {f.name!r} is not {kind.__name__}")
            values[f.name] = value
        if values["event"] not in EVENT_NAMES:
            raise ValueError(f"unknown event {values['event']!r}")
        return cls(**values)

    @property
    def attempt_record(self) -> Attempt:
        return Attempt(
            time=self.time,
            route=self.route,
            relay_host=self.relay_host,
            relay_ip=self.relay_ip,
            reply_code=self.reply_code,
            reply_enhanced=self.reply_enhanced,
            reply_text=self.reply_text,
            tls_version=self.tls_version,
            tls_verified=self.tls_verified,
            tls_policy=self.tls_policy,
        )

    def with_attempt(self, attempt: Attempt) -> DeliveryEvent:
        """This event carrying ``attempt``'s fields (its time included)."""
        return replace(self, **asdict(attempt))


_REQUIRED = frozenset({"event_id", "event", "time", "node", "queue_id", "recipient"})
_TYPES: dict[str, type] = {
    "event_id": str,
    "event": str,
    "time": float,
    "node": str,
    "queue_id": str,
    "recipient": str,
    "envid": str,
    "message_id": str,
    "attempt": int,
    "route": str,
    "relay_host": str,
    "relay_ip": str,
    "reply_code": int,
    "reply_enhanced": str,
    "reply_text": str,
    "tls_version": str,
    "tls_verified": bool,
    "tls_policy": str,
}

# The fields of an event, in order (to_json's keys).
_EVENT_FIELDS = tuple(f.name for f in fields(DeliveryEvent))


def new_event_id(clock: Clock = time.time) -> str:
    """A unique, time-ordered event id: 12 hex digits of milliseconds and 12 random ones
    (48 random bits: ids made by many nodes in one millisecond stay apart)."""
    return f"{int(clock() * 1000):012x}{secrets.token_hex(6)}"


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events in store order and the cursor to ask for the next ones (``after=``).

    A cursor is opaque text a store hands out (``""`` is the beginning); it stays valid
    across restarts of the store.
    """

    events: list[DeliveryEvent]
    cursor: str


def stamped(events: Sequence[DeliveryEvent], queue_id: str) -> list[DeliveryEvent]:
    """``events`` with an empty ``queue_id`` given ``queue_id`` (a store fills in the id it
    has just allocated to the message they belong to)."""
    return [e if e.queue_id else replace(e, queue_id=queue_id) for e in events]


def matches(
    event: DeliveryEvent,
    *,
    queue_id: str | None = None,
    envid: str | None = None,
    since: float | None = None,
) -> bool:
    """Whether ``event`` passes the filters of a store's ``events()`` query."""
    return (
        (queue_id is None or event.queue_id == queue_id)
        and (envid is None or event.envid == envid)
        and (since is None or event.time >= since)
    )


def encode(event: DeliveryEvent) -> str:
    """The stored form of an event: its JSON, compact."""
    return json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False)


def decode(text: str | bytes) -> DeliveryEvent:
    """An event from :func:`encode`'s form; ``ValueError`` if it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("an event is a JSON object")
    return DeliveryEvent.from_json(data)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_since(text: str, now: float) -> float:
    """The time ``text`` names, as ``hato events --since`` and the API's ``since=`` take
    it: a duration back from ``now`` (``90s``, ``30m``, ``2h``, ``1d``, ``1w``), an ISO
    8601 time (``2026-12-03T12:00:00Z``; without an offset it is UTC) or Unix seconds.
    Raises ``ValueError`` for anything else."""
    value = text.strip()
    if not value:
        raise ValueError("empty time")
    unit = _DURATION_UNITS.get(value[-1].lower())
    if unit is not None and value[:-1].replace(".", "", 1).isdigit():
        return now - float(value[:-1]) * unit
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = datetime.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (a duration such as 2h, 30m, 1d, or ISO 8601)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def describe(event: DeliveryEvent) -> str:
    """One line for a person: ``hato events``' text form."""
    when = datetime.datetime.fromtimestamp(event.time, datetime.UTC)
    parts = [
        when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        event.node,
        event.queue_id,
        event.event,
        f"to=<{event.recipient}>",
    ]
    if event.envid:
        parts.append(f"envid={event.envid}")
    if event.route:
        parts.append(f"route={event.route}")
    if event.relay_host or event.relay_ip:
        parts.append(f"relay={event.relay_host or '?'}[{event.relay_ip}]")
    if event.tls_version:
        parts.append(f"tls={event.tls_version}{'' if event.tls_verified else ',unverified'}")
    if event.attempt:
        parts.append(f"attempt={event.attempt}")
    if event.reply_code:
        reply = " ".join(
            p for p in (str(event.reply_code), event.reply_enhanced, event.reply_text) if p
        )
        parts.append(f"({reply})")
    return " ".join(parts)


def reply_of(event: DeliveryEvent) -> str:
    """The remote reply an event carries, as one line (``""`` when none)."""
    if not event.reply_code:
        return event.reply_text
    return " ".join(p for p in (str(event.reply_code), event.reply_enhanced, event.reply_text) if p)
