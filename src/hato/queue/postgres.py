"""The PostgreSQL queue backend: many workers on many hosts share one table of messages.

One row per message (``hato_messages``); its recipients' states live in a JSONB array on
the same row, so every change to a message is one atomic row update. Times are floats
from the injected clock, never the server's ``now()``, so a fake clock works.

* **Claim** is one statement: ``UPDATE ... FROM (SELECT ... ORDER BY next_attempt_at
  LIMIT n FOR UPDATE SKIP LOCKED) RETURNING ...``. A claimed message's
  ``next_attempt_at`` is its lease end, so one partial index on ``next_attempt_at``
  finds new work, due retries and expired leases alike.
* **Enqueue** returns after the server's COMMIT (durable as long as the server keeps
  ``synchronous_commit`` on). Concurrent enqueues of one process share one multi-row
  INSERT and one commit (group commit); an idle queue's enqueue goes alone at once. With
  ``lease_owner`` the row is inserted leased (``sending``), the owner's advisory lock
  taken first, so fresh mail needs no claim.
* **Record** is a compare-and-set on ``(lease_owner, lease_until)``: a worker whose lease
  was taken over (even by itself, later) changes nothing. The row a claim (or an
  ``enqueue(lease_owner=...)``) returned is remembered, so a record from the leasing
  process needs no read: such records arriving together share one statement (each row
  still its own compare-and-set, its events joined to it) and one commit, made with
  ``synchronous_commit`` off for that transaction only. At-least-once holds: a record the
  server loses in a crash (at most the last ~``wal_writer_delay`` of them) leaves its
  message ``sending`` under the old lease, which recovery or the lease's end gives back,
  so the message is delivered once more, never lost. Enqueues keep their durable commit.
* **Wake-ups**: enqueue, requeue, release, recovery and a retry that is due now call
  ``pg_notify`` in the same statement, so in the same transaction: a rolled-back enqueue
  wakes nobody. A listener connection, opened by the first ``wait_for_work``, wakes the
  waiters; the waiter's timeout is the polling fallback.
* **Transactional outbox**: :meth:`PostgresQueue.enqueue_in` (an ``AsyncConnection``, or
  a sync ``Connection`` from a worker thread), :meth:`PostgresQueue.enqueue_sync` and
  :func:`enqueue_sync` (a sync ``Connection`` in the calling thread) run the same INSERT
  on the caller's connection and never commit, so the caller's commit or rollback decides
  whether the message exists. The queue need not be open for them.
* **Unreadable rows**: every row is decoded in Python column by column (the JSON columns
  arrive as text, so even a JSON nesting too deep for Python's parser fails that row
  only, and text that is not UTF-8, which a ``SQL_ASCII`` database stores and hands
  over as bytes, fails that row only). Claim quarantines such a row with the reason in
  ``last_reply`` (``quarantined: ...``) and hands out the rest.
* **Liveness**: each lease owner of this process holds a session-level advisory lock
  (``pg_try_advisory_lock`` on a hash of the owner) on a connection of its own for as
  long as the process runs; the server drops it when the session ends, however the
  process ended. ``recover`` tries each lease owner's lock (inside a transaction, so it
  is released at once): an owner whose lock is free is gone, and its leases come back
  now instead of when they expire. The liveness connection is checked every few seconds
  and, after a database restart, opened again and the locks taken again.
* **Restarts**: an operation that fails on a dead connection is retried once after the
  pool has replaced its broken connections, else it raises
  :class:`hato.errors.QueueError` and the caller's loop retries later. The listener
  reconnects by itself and then wakes the waiters (notifications sent while it was away
  are lost).

URL: ``postgresql://user@host:port/db?schema=NAME&table_prefix=hato_&pool_size=10&
pool_timeout=10``; those four query parameters are Hato's, the rest go to libpq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from hato.clock import Clock
from hato.errors import ConfigError, MessageNotFound, QueueError, QueueFullError
from hato.events import DeliveryEvent, EventPage, stamped
from hato.events import decode as decode_event
from hato.events import encode as encode_event
from hato.message import Envelope
from hato.queue.base import (
    MessageState,
    Outcome,
    QuarantineHook,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
    StoredMessage,
    apply_bounce,
    check_enqueue_lease,
    new_message_id,
    settle_attempt,
    state_after_bounce,
)

__all__ = ["SCHEMA_VERSION", "PostgresQueue", "enqueue_sync"]

SCHEMA_VERSION = 2

T = TypeVar("T")
AsyncConn = psycopg.AsyncConnection[TupleRow]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_]{0,40}")
_HATO_PARAMS = frozenset({"schema", "table_prefix", "pool_size", "pool_timeout"})
# PostgreSQL truncates identifiers, and refuses channel names, past NAMEDATALEN - 1 bytes.
_MAX_IDENTIFIER = 63
_CLAIMABLE = "('queued', 'deferred', 'sending')"
_KNOWN = "(" + ", ".join(f"'{s.value}'" for s in MessageState) + ")"
# A leased message always has pending recipients, so giving its lease back is this:
_UNLEASED_STATE = "CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END"
# Column order of every SELECT/RETURNING that builds a StoredMessage (see _row_to_message).
# The JSON columns come as text: the decoder, not the driver, parses them (see
# _row_to_message), so one unparseable row cannot fail a whole fetch.
_COLUMNS = (
    "id, sender, recipients::text, {data}, state, created_at, next_attempt_at, attempts,"
    " last_reply, lease_owner, lease_until, idempotency_key, meta::text"
)
_STATE_OF: dict[object, MessageState] = {s.value: s for s in MessageState}
# How often the connection that holds the owners' locks is checked (seconds).
_LIVENESS_CHECK = 5.0


def _columns(*, with_data: bool = True) -> str:
    return _COLUMNS.format(data="data" if with_data else "''::bytea AS data")


@dataclass(frozen=True, slots=True)
class _Lease:
    """A claim this process made: its owner and the row ``record`` would otherwise read
    (recipients, attempts, lease_until, last_reply)."""

    owner: str
    row: tuple[object, int, float, str]


# Rows per group commit: large enough to absorb a burst, small enough for one round trip.
_MAX_GROUP = 200


def _settle(future: asyncio.Future[str], outcome: str | BaseException) -> None:
    if future.done():  # the caller was cancelled; the message may still be stored
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# Enough for any sane worker's in-flight batch; older entries just mean one more read.
_MAX_REMEMBERED_LEASES = 10_000


@dataclass(frozen=True, slots=True)
class _Settings:
    conninfo: str
    schema: str | None
    prefix: str
    pool_size: int
    pool_timeout: float


def _parse_url(url: str) -> _Settings:
    """Split Hato's query parameters off a ``postgresql://`` URL; libpq gets the rest."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _HATO_PARAMS:
            ours[key] = value
        else:
            theirs.append((key, value))
    schema = ours.get("schema") or None
    prefix = ours.get("table_prefix", "hato_")
    if schema is not None and (not _NAME_RE.fullmatch(schema) or len(schema) > _MAX_IDENTIFIER):
        raise ConfigError(f"queue URL: schema {schema!r} must match [A-Za-z_][A-Za-z0-9_]*")
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"queue URL: table_prefix {prefix!r} must match [A-Za-z0-9_]{{0,40}}")
    try:
        pool_size = int(ours.get("pool_size", "10"))
        pool_timeout = float(ours.get("pool_timeout", "10"))
    except ValueError as exc:
        raise ConfigError(f"queue URL: bad pool_size or pool_timeout ({exc})") from exc
    if pool_size < 1 or pool_timeout <= 0:
        raise ConfigError("queue URL: pool_size must be >= 1 and pool_timeout > 0")
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    conninfo = urlunsplit((scheme, parts.netloc, parts.path, urlencode(theirs), parts.fragment))
    return _Settings(conninfo, schema, prefix, pool_size, pool_timeout)


def _quote(name: str) -> str:
    return '"' + name + '"'  # only ever called on names checked by _parse_url


@dataclass(frozen=True, slots=True)
class _Names:
    """Where one queue lives: its tables and its NOTIFY channel."""

    schema: str | None
    prefix: str
    messages: str
    versions: str
    channel: str
    events: str

    @classmethod
    def of(cls, settings: _Settings) -> _Names:
        schema, prefix = settings.schema, settings.prefix

        def qualified(table: str) -> str:
            name = _quote(prefix + table)
            return f"{_quote(schema)}.{name}" if schema else name

        channel = f"{prefix}work" + (f"@{schema}" if schema else "")
        if len(channel.encode()) > _MAX_IDENTIFIER:
            raise ConfigError("queue URL: schema and table_prefix together are too long")
        return cls(
            schema,
            prefix,
            qualified("messages"),
            qualified("schema_version"),
            channel,
            qualified("events"),
        )

    @property
    def insert(self) -> str:
        """One statement for enqueue, so the caller's transaction holds all of it."""
        return (
            f"WITH ins AS (INSERT INTO {self.messages}"
            " (id, sender, recipients, data, state, created_at, next_attempt_at,"
            " idempotency_key, meta, lease_owner, lease_until)"
            " VALUES (%(id)s, %(sender)s, %(recipients)s, %(data)s, %(state)s, %(now)s,"
            " %(due)s, %(key)s, %(meta)s, %(owner)s, %(until)s)"
            # No conflict target: a retried INSERT (same id) and a repeated
            # idempotency key both end up in the SELECT of ``existing``.
            " ON CONFLICT DO NOTHING RETURNING id, state),"
            f" ev AS (INSERT INTO {self.events} (event_id, queue_id, envid, time, body)"
            " SELECT e.event_id, ins.id, e.envid, e.time, e.body FROM ins,"
            " unnest(%(ev_id)s::text[], %(ev_envid)s::text[], %(ev_time)s::float8[],"
            " %(ev_body)s::text[]) AS e(event_id, envid, time, body)"
            " ON CONFLICT DO NOTHING)"
            " SELECT id, CASE WHEN state = 'queued' THEN pg_notify(%(channel)s, '')::text END"
            " FROM ins"
        )

    @property
    def existing(self) -> str:
        return f"SELECT id FROM {self.messages} WHERE idempotency_key = %(key)s OR id = %(id)s"

    @property
    def insert_many(self) -> str:
        """Group commit: the concurrent enqueues of one process in one statement.

        Rows go in array order, so of two rows with one idempotency key the first wins.
        """
        return (
            f"WITH ins AS (INSERT INTO {self.messages}"
            " (id, sender, recipients, data, state, created_at, next_attempt_at,"
            " idempotency_key, meta, lease_owner, lease_until)"
            " SELECT * FROM unnest(%(id)s::text[], %(sender)s::text[], %(recipients)s::jsonb[],"
            " %(data)s::bytea[], %(state)s::text[], %(now)s::float8[], %(due)s::float8[],"
            " %(key)s::text[], %(meta)s::jsonb[], %(owner)s::text[], %(until)s::float8[])"
            " ON CONFLICT DO NOTHING RETURNING id, state),"
            f" ev AS (INSERT INTO {self.events} (event_id, queue_id, envid, time, body)"
            " SELECT e.event_id, ins.id, e.envid, e.time, e.body FROM ins JOIN"
            " unnest(%(ev_qid)s::text[], %(ev_id)s::text[], %(ev_envid)s::text[],"
            " %(ev_time)s::float8[], %(ev_body)s::text[])"
            " AS e(queue_id, event_id, envid, time, body) ON e.queue_id = ins.id"
            " ON CONFLICT DO NOTHING)"
            " SELECT id, CASE WHEN state = 'queued' THEN pg_notify(%(channel)s, '')::text END"
            " FROM ins"
        )

    @property
    def record_many(self) -> str:
        """The records of many messages (each a compare-and-set on its lease) and their
        events in one statement, committed without waiting for the WAL flush
        (``synchronous_commit`` off for this transaction only): see ``record``."""
        return (
            "WITH cfg AS (SELECT set_config('synchronous_commit', 'off', true)),"
            " v AS (SELECT * FROM unnest(%(id)s::text[], %(owner)s::text[],"
            " %(lease_until)s::float8[], %(recipients)s::jsonb[], %(attempts)s::int[],"
            " %(state)s::text[], %(next)s::float8[], %(last_reply)s::text[],"
            " %(notify)s::bool[]) AS v(id, owner, lease_until, recipients, attempts, state,"
            " next, last_reply, notify)),"
            f" upd AS (UPDATE {self.messages} AS m SET recipients = v.recipients,"
            " attempts = v.attempts, state = v.state, next_attempt_at = v.next,"
            " last_reply = v.last_reply, lease_owner = '', lease_until = 0"
            " FROM v WHERE m.id = v.id AND m.state = 'sending' AND m.lease_owner = v.owner"
            " AND m.lease_until = v.lease_until"
            " RETURNING m.id, CASE WHEN v.notify THEN pg_notify(%(channel)s, '')::text END),"
            f" ev AS (INSERT INTO {self.events} (event_id, queue_id, envid, time, body)"
            " SELECT e.event_id, e.queue_id, e.envid, e.time, e.body FROM unnest("
            "%(ev_of)s::text[], %(ev_id)s::text[], %(ev_qid)s::text[], %(ev_envid)s::text[],"
            " %(ev_time)s::float8[], %(ev_body)s::text[])"
            " AS e(of, event_id, queue_id, envid, time, body) JOIN upd ON upd.id = e.of"
            " ON CONFLICT DO NOTHING)"
            " SELECT upd.id FROM upd, cfg"
        )

    @property
    def insert_events(self) -> str:
        """Events of other steps or nodes; an ``event_id`` stored already is skipped."""
        return (
            f"INSERT INTO {self.events} (event_id, queue_id, envid, time, body)"
            " SELECT * FROM unnest(%(ev_id)s::text[], %(ev_qid)s::text[], %(ev_envid)s::text[],"
            " %(ev_time)s::float8[], %(ev_body)s::text[])"
            " ON CONFLICT DO NOTHING"
        )

    @property
    def existing_many(self) -> str:
        return (
            f"SELECT id, idempotency_key FROM {self.messages}"
            " WHERE idempotency_key = ANY(%(key)s) OR id = ANY(%(id)s)"
        )


def _translate(exc: BaseException, what: str) -> QueueError:
    if isinstance(exc, pg_errors.InsufficientResources | pg_errors.ProgramLimitExceeded):
        return QueueFullError(f"postgres queue: {what}: {exc}")
    if isinstance(exc, PoolTimeout):
        return QueueError(f"postgres queue: {what}: no database connection ({exc})")
    return QueueError(f"postgres queue: {what}: {exc}")


def _recipients_json(recipients: Iterable[RecipientStatus]) -> Jsonb:
    return Jsonb(
        [
            {
                "address": r.address,
                "state": r.state.value,
                "reply": r.reply,
                "relay": r.relay,
                "attempts": r.attempts,
            }
            for r in recipients
        ]
    )


class _TextOrBytes(Loader):
    """Text as ``str`` when it is UTF-8, else its bytes (see :func:`_configure`)."""

    def load(self, data: Buffer) -> str | bytes:
        raw = bytes(data)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw


class _TextOrBytesBinary(_TextOrBytes):
    format = Format.BINARY


async def _configure(conn: AsyncConn) -> None:
    """A SQL_ASCII database stores any byte in a text column, and psycopg hands all its
    text over as bytes: read what is UTF-8 as text, and leave a value that is not as
    bytes for the decoder to refuse, failing its row and not the whole fetch."""
    if conn.info.encoding == "ascii":
        for oid in ("text", "varchar"):
            conn.adapters.register_loader(oid, _TextOrBytes)
            conn.adapters.register_loader(oid, _TextOrBytesBinary)


class _Unreadable(ValueError):
    """A stored row that cannot be turned back into a message; the text says why."""


def _text(value: object, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # a SQL_ASCII database hands text over undecoded
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise _Unreadable(f"{column} is not valid UTF-8") from None
    raise _Unreadable(f"{column} has the wrong type ({type(value).__name__})")


def _json(value: object, column: str) -> object:
    if not isinstance(value, str | bytes):
        return value  # already parsed (a jsonb column read without the text cast)
    try:
        return json.loads(_text(value, column))
    except (ValueError, RecursionError) as exc:
        raise _Unreadable(f"{column} is not JSON ({type(exc).__name__})") from None


def _number(value: object, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Unreadable(f"{column} has the wrong type ({type(value).__name__})")
    if not math.isfinite(value):
        raise _Unreadable(f"{column} is not finite")
    return float(value)


def _parse_recipients(value: object) -> list[RecipientStatus]:
    value = _json(value, "recipients")
    if not isinstance(value, list) or not value:
        raise _Unreadable("recipients is not a non-empty array")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("address"), str):
            raise _Unreadable("recipient without an address")
        reply, relay = item.get("reply", ""), item.get("relay", "")
        attempts = item.get("attempts", 0)
        if not (isinstance(reply, str) and isinstance(relay, str)) or (
            isinstance(attempts, bool) or not isinstance(attempts, int)
        ):
            raise _Unreadable("recipient state has the wrong shape")
        try:
            state = RecipientState(item.get("state", "pending"))
        except ValueError:
            raise _Unreadable(f"unknown recipient state {item.get('state')!r}") from None
        out.append(RecipientStatus(item["address"], state, reply, relay, attempts))
    return out


def _row_to_message(row: Sequence[Any]) -> StoredMessage:
    """A message from a row in ``_COLUMNS`` order; :class:`_Unreadable` if any column is
    not what Hato wrote."""
    meta = _json(row[12], "meta")
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _Unreadable("meta is not a string mapping")
    try:
        state = MessageState(_text(row[4], "state"))
    except ValueError as exc:
        raise _Unreadable(str(exc)) from None
    if not isinstance(row[3], bytes | bytearray | memoryview):
        raise _Unreadable(f"data has the wrong type ({type(row[3]).__name__})")
    attempts = row[7]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise _Unreadable(f"attempts is not a count ({attempts!r})")
    key = row[11]
    return StoredMessage(
        id=_text(row[0], "id"),
        sender=_text(row[1], "sender"),
        recipients=_parse_recipients(row[2]),
        data=bytes(row[3]),
        state=state,
        created_at=_number(row[5], "created_at"),
        next_attempt_at=_number(row[6], "next_attempt_at"),
        attempts=attempts,
        last_reply=_text(row[8], "last_reply"),
        lease_owner=_text(row[9], "lease_owner"),
        lease_until=_number(row[10], "lease_until"),
        idempotency_key=None if key is None else _text(key, "idempotency_key"),
        meta=meta,
    )


def _shown(value: object) -> str:
    """A value of an unreadable row, fit for a listing."""
    if isinstance(value, bytes):
        return value.decode(errors="backslashreplace")
    return str(value)


def _row_for_reader(row: Sequence[Any]) -> StoredMessage:
    """For ``get`` and ``list``: an unreadable row shows as quarantined, with what is left
    and why."""
    try:
        return _row_to_message(row)
    except _Unreadable as exc:
        reason = str(exc)

    def number(value: object) -> float:
        return float(value) if isinstance(value, int | float) else 0.0

    stored = row[8] if isinstance(row[8], str) else ""
    quarantined = row[4] == MessageState.QUARANTINED.value and stored.startswith("quarantined:")
    return StoredMessage(
        id=_shown(row[0]),
        sender=_shown(row[1]),
        recipients=[],
        data=bytes(row[3]) if isinstance(row[3], bytes | bytearray | memoryview) else b"",
        state=MessageState.QUARANTINED,
        created_at=number(row[5]),
        next_attempt_at=number(row[6]),
        attempts=int(number(row[7])),
        last_reply=stored if quarantined else f"quarantined: {reason}",
        idempotency_key=row[11] if isinstance(row[11], str) else None,
    )


def _enqueue_params(
    names: _Names,
    envelope: Envelope,
    data: bytes,
    *,
    clock: Clock,
    held: bool,
    not_before: float | None,
    idempotency_key: str | None,
    meta: dict[str, str] | None,
    events: Sequence[DeliveryEvent] = (),
    lease_owner: str | None = None,
    lease_seconds: float = 0.0,
) -> dict[str, object]:
    if not envelope.recipients:
        raise ValueError("a message needs at least one recipient")
    check_enqueue_lease(
        lease_owner,
        lease_seconds,
        held=held,
        not_before=not_before,
        idempotency_key=idempotency_key,
    )
    now = clock()
    message_id = new_message_id(lambda: now)
    if lease_owner is not None:
        until = now + lease_seconds
        leased: dict[str, object] = {
            "state": MessageState.SENDING.value,
            "due": until,
            "owner": lease_owner,
            "until": until,
        }
    else:
        leased = {"owner": "", "until": 0.0}
    return {
        **_event_params(stamped(events, message_id)),
        "id": message_id,
        "sender": envelope.sender,
        "recipients": _recipients_json(RecipientStatus(a) for a in envelope.recipients),
        "data": bytes(data),
        "state": (MessageState.HELD if held else MessageState.QUEUED).value,
        "now": now,
        "due": now if not_before is None else not_before,
        "key": idempotency_key,
        "meta": Jsonb({**envelope.meta, **(meta or {})}),
        "channel": names.channel,
        **leased,
    }


def _event_params(events: Sequence[DeliveryEvent]) -> dict[str, object]:
    """The ``ev_*`` arrays of the statements that store events."""
    return {
        "ev_id": [e.event_id for e in events],
        "ev_qid": [e.queue_id for e in events],
        "ev_envid": [e.envid for e in events],
        "ev_time": [e.time for e in events],
        "ev_body": [encode_event(e) for e in events],
    }


def _enqueue_on_sync(
    conn: psycopg.Connection[Any], names: _Names, params: dict[str, object]
) -> str:
    try:
        with conn.cursor() as cur:
            row = cur.execute(names.insert, params).fetchone()
            if row is None:
                row = cur.execute(names.existing, params).fetchone()
    except psycopg.Error as exc:
        raise _translate(exc, "enqueue") from exc
    if row is None:
        raise QueueError("postgres queue: enqueue: conflicting message vanished; try again")
    return str(row[0])


async def _enqueue_on_async(
    conn: psycopg.AsyncConnection[Any], names: _Names, params: dict[str, object]
) -> str:
    async with conn.cursor() as cur:
        await cur.execute(names.insert, params)
        row = await cur.fetchone()
        if row is None:
            await cur.execute(names.existing, params)
            row = await cur.fetchone()
    if row is None:
        raise QueueError("postgres queue: enqueue: conflicting message vanished; try again")
    return str(row[0])


def enqueue_sync(
    conn: psycopg.Connection[Any],
    envelope: Envelope,
    data: bytes,
    *,
    queue_url: str = "postgresql://",
    clock: Clock = time.time,
    held: bool = False,
    not_before: float | None = None,
    idempotency_key: str | None = None,
    meta: dict[str, str] | None = None,
    events: Sequence[DeliveryEvent] = (),
) -> str:
    """Enqueue inside the caller's transaction on a sync psycopg connection; return the id.

    Nothing is committed here: the caller's ``commit()`` makes the message exist and wakes
    the workers, a rollback discards it (in autocommit mode the INSERT commits at once).
    Only ``schema`` and ``table_prefix`` of ``queue_url`` matter; the tables must already
    exist (``hato queue init``, or any ``PostgresQueue.open()``).
    """
    names = _Names.of(_parse_url(queue_url))
    params = _enqueue_params(
        names,
        envelope,
        data,
        clock=clock,
        held=held,
        not_before=not_before,
        idempotency_key=idempotency_key,
        meta=meta,
        events=events,
    )
    return _enqueue_on_sync(conn, names, params)


class PostgresQueue:
    """A :class:`hato.queue.base.Queue` on PostgreSQL (12+) through psycopg 3 and a pool."""

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        self.url = url
        self.on_quarantine: QuarantineHook | None = None
        self._clock = clock
        self._settings = _parse_url(url)
        self._names = _Names.of(self._settings)
        self._pool: AsyncConnectionPool[AsyncConn] | None = None
        self._wakeup = asyncio.Event()
        self._listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        # What this process claimed, so ``record`` is one compare-and-set statement
        # instead of a read and a write; a miss (another process claimed it) reads.
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._to_insert: list[tuple[dict[str, object], asyncio.Future[str]]] = []
        self._inserter: asyncio.Task[None] | None = None
        # Records of leases this process remembers, waiting for the next group statement.
        self._to_record: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
        self._recorder: asyncio.Task[None] | None = None
        # The session whose advisory locks say our lease owners are alive.
        self._alive: AsyncConn | None = None
        self._alive_lock = asyncio.Lock()
        self._alive_checked = 0.0
        self._owners: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create or upgrade the schema (see :meth:`migrate`)."""
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            self._settings.conninfo,
            open=False,
            min_size=1,
            max_size=self._settings.pool_size,
            timeout=self._settings.pool_timeout,
            kwargs={"autocommit": True},
            configure=_configure,
            name="hato-queue",
        )
        try:
            await pool.open(wait=True, timeout=self._settings.pool_timeout)
            self._pool = pool
            await self.migrate()
        except BaseException as exc:
            self._pool = None
            await pool.close()
            if isinstance(exc, psycopg.Error):
                raise _translate(exc, "open") from exc
            raise

    async def close(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            await asyncio.wait([recorder])  # records in flight finish (or fail) first
        inserter = self._inserter
        if inserter is not None:
            await asyncio.wait([inserter])  # enqueues in flight finish (or fail) first
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        # Our leases end with us: closing the session frees the owners' locks.
        alive, self._alive = self._alive, None
        self._owners.clear()
        if alive is not None:
            with contextlib.suppress(psycopg.Error):
                await alive.close()

    async def migrate(self) -> int:
        """Create or upgrade the schema (what ``hato queue init`` runs); return its version.

        Runs under a transaction-scoped advisory lock, so workers starting together are safe.
        """
        names = self._names

        async def run(conn: AsyncConn) -> int:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"hato:{names.messages}",)
                )
                if names.schema:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(names.schema)}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {names.versions}"
                    " (version integer PRIMARY KEY, applied_at double precision NOT NULL)"
                )
                cur = await conn.execute(f"SELECT coalesce(max(version), 0) FROM {names.versions}")
                row = await cur.fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise QueueError(
                        f"postgres queue: schema version {version} is newer than this Hato"
                        f" knows ({SCHEMA_VERSION}); upgrade Hato"
                    )
                if version < 1:
                    await self._create_v1(conn)
                    await conn.execute(
                        f"INSERT INTO {names.versions} (version, applied_at) VALUES (1, %s)",
                        (self._clock(),),
                    )
                if version < 2:
                    await self._create_v2(conn)
                    await conn.execute(
                        f"INSERT INTO {names.versions} (version, applied_at) VALUES (2, %s)",
                        (self._clock(),),
                    )
            return SCHEMA_VERSION

        return await self._run("migrate", run)

    async def _create_v1(self, conn: AsyncConn) -> None:
        names = self._names
        await conn.execute(
            f"CREATE TABLE {names.messages} ("
            " id text PRIMARY KEY,"
            " sender text NOT NULL,"
            " recipients jsonb NOT NULL,"
            " data bytea NOT NULL,"
            " state text NOT NULL,"
            " created_at double precision NOT NULL,"
            " next_attempt_at double precision NOT NULL,"
            " attempts integer NOT NULL DEFAULT 0,"
            " last_reply text NOT NULL DEFAULT '',"
            " lease_owner text NOT NULL DEFAULT '',"
            " lease_until double precision NOT NULL DEFAULT 0,"
            " idempotency_key text UNIQUE,"
            " meta jsonb NOT NULL DEFAULT '{}'::jsonb)"
        )
        await conn.execute(
            f"CREATE INDEX {_quote(names.prefix + 'messages_due')}"
            f" ON {names.messages} (next_attempt_at) WHERE state IN {_CLAIMABLE}"
        )
        await conn.execute(
            f"CREATE INDEX {_quote(names.prefix + 'messages_created')}"
            f" ON {names.messages} (created_at DESC, id DESC)"
        )
        await conn.execute(
            f"CREATE INDEX {_quote(names.prefix + 'messages_state')} ON {names.messages} (state)"
        )

    async def _create_v2(self, conn: AsyncConn) -> None:
        """Version 2: delivery events (hato.events), ``body`` the event's JSON."""
        names = self._names
        await conn.execute(
            f"CREATE TABLE {names.events} ("
            " seq bigserial PRIMARY KEY,"
            " event_id text NOT NULL UNIQUE,"
            " queue_id text NOT NULL,"
            " envid text NOT NULL,"
            " time double precision NOT NULL,"
            " body text NOT NULL)"
        )
        for column, where in (("queue_id", ""), ("envid", " WHERE envid <> ''"), ("time", "")):
            await conn.execute(
                f"CREATE INDEX {_quote(names.prefix + 'events_' + column)}"
                f" ON {names.events} ({column}){where}"
            )

    async def _run(self, what: str, op: Callable[[AsyncConn], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection; retry once if the connection was dead."""
        pool = self._pool
        if pool is None:
            raise QueueError(f"postgres queue: {what}: the queue is not open")
        for attempt in (1, 2):
            try:
                async with pool.connection() as conn:
                    return await op(conn)
            except PoolTimeout as exc:
                raise _translate(exc, what) from exc
            except psycopg.OperationalError as exc:
                # After a restart or pg_terminate_backend every idle pooled connection is
                # dead: let the pool test and replace them, then try once more.
                if attempt == 2:
                    raise _translate(exc, what) from exc
                with contextlib.suppress(psycopg.Error):
                    await pool.check()
            except psycopg.Error as exc:
                raise _translate(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute(
        self, what: str, query: str, params: Any, *, binary: bool = False
    ) -> list[Any]:
        """One autocommitted statement; its rows."""

        async def run(conn: AsyncConn) -> list[Any]:
            cur = await conn.execute(query, params, binary=binary)
            return await cur.fetchall() if cur.description is not None else []

        return await self._run(what, run)

    # -- the protocol ------------------------------------------------------------------

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
        connection: object | None = None,
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
    ) -> str:
        """Store a message and return its id (see :class:`hato.queue.base.Queue`).

        ``connection``: as :meth:`enqueue_in` (a psycopg ``AsyncConnection`` or
        ``Connection``; :class:`TypeError` for anything else); not with ``lease_owner``.
        """
        if lease_owner is not None and connection is not None:
            raise ValueError("lease_owner is for the queue's own commit, not a connection")
        if connection is not None:
            if not isinstance(connection, psycopg.AsyncConnection | psycopg.Connection):
                raise TypeError(
                    "connection must be a psycopg Connection or AsyncConnection,"
                    f" not {type(connection).__name__}"
                )
            return await self.enqueue_in(
                connection,
                envelope,
                data,
                held=held,
                not_before=not_before,
                idempotency_key=idempotency_key,
                meta=meta,
                events=events,
            )
        params = _enqueue_params(
            self._names,
            envelope,
            data,
            clock=self._clock,
            held=held,
            not_before=not_before,
            idempotency_key=idempotency_key,
            meta=meta,
            events=events,
            lease_owner=lease_owner,
            lease_seconds=lease_seconds,
        )
        if lease_owner is not None:
            # Before the lease commits: recovery elsewhere must find the owner alive.
            await self._hold(lease_owner)
        message_id = await self._enqueue_grouped(params)
        if lease_owner is not None and message_id == params["id"]:
            until = cast(float, params["until"])
            self._remember_lease(
                StoredMessage(
                    id=message_id,
                    sender=envelope.sender,
                    recipients=[RecipientStatus(a) for a in envelope.recipients],
                    data=b"",
                    state=MessageState.SENDING,
                    created_at=0.0,
                    next_attempt_at=until,
                    lease_owner=lease_owner,
                    lease_until=until,
                )
            )
        return message_id

    async def enqueue_in(
        self,
        connection: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
        envelope: Envelope,
        data: bytes,
        *,
        held: bool = False,
        not_before: float | None = None,
        idempotency_key: str | None = None,
        meta: dict[str, str] | None = None,
        events: Sequence[DeliveryEvent] = (),
    ) -> str:
        """Store a message inside the caller's open transaction on ``connection``; its id.

        Nothing is committed here: the caller's commit makes the message exist and wakes
        the workers, a rollback discards it (in autocommit mode the INSERT commits at
        once). A sync ``Connection`` is used from a worker thread, so the loop is not
        blocked. The queue need not be open; its tables must exist.
        """
        params = _enqueue_params(
            self._names,
            envelope,
            data,
            clock=self._clock,
            held=held,
            not_before=not_before,
            idempotency_key=idempotency_key,
            meta=meta,
            events=events,
        )
        if isinstance(connection, psycopg.AsyncConnection):
            try:
                return await _enqueue_on_async(connection, self._names, params)
            except psycopg.Error as exc:
                raise _translate(exc, "enqueue") from exc
        return await asyncio.to_thread(_enqueue_on_sync, connection, self._names, params)

    async def _enqueue_grouped(self, params: dict[str, object]) -> str:
        """Join the next group commit; the first enqueue of an idle queue goes alone."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._to_insert.append((params, future))
        if self._inserter is None or self._inserter.done():
            self._inserter = asyncio.create_task(self._insert_groups(), name="hato-pg-enqueue")
        return await future

    async def _insert_groups(self) -> None:
        while self._to_insert:
            group = self._to_insert[:_MAX_GROUP]
            del self._to_insert[:_MAX_GROUP]
            try:
                ids = await self._insert_group([p for p, _ in group])
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][1], exc)
                    continue
                # One bad message must not fail its neighbours: go one by one.
                for params, future in group:
                    try:
                        _settle(future, (await self._insert_group([params]))[0])
                    except Exception as single:
                        _settle(future, single)
            else:
                for (_, future), message_id in zip(group, ids, strict=True):
                    _settle(future, message_id)

    async def _insert_group(self, group: list[dict[str, object]]) -> list[str]:
        if len(group) == 1:
            params = group[0]
            return [await self._run("enqueue", lambda c: _enqueue_on_async(c, self._names, params))]
        columns = (
            "id",
            "sender",
            "recipients",
            "data",
            "state",
            "now",
            "due",
            "key",
            "meta",
            "owner",
            "until",
        )
        arrays: dict[str, object] = {c: [p[c] for p in group] for c in columns}
        for column in ("ev_id", "ev_qid", "ev_envid", "ev_time", "ev_body"):
            arrays[column] = [v for p in group for v in p[column]]  # type: ignore[attr-defined]
        arrays["channel"] = self._names.channel

        async def run(conn: AsyncConn) -> list[str]:
            cur = await conn.execute(self._names.insert_many, arrays)
            inserted = {str(row[0]) for row in await cur.fetchall()}
            by_key: dict[str, str] = {}
            if len(inserted) < len(group):
                cur = await conn.execute(self._names.existing_many, arrays)
                for message_id, key in await cur.fetchall():
                    inserted.add(str(message_id))
                    if key is not None:
                        by_key.setdefault(str(key), str(message_id))
            ids = []
            for p in group:
                key = p["key"]
                if isinstance(key, str) and key in by_key:
                    ids.append(by_key[key])  # an earlier message (or row of this group)
                elif p["id"] in inserted:
                    ids.append(str(p["id"]))
                else:
                    raise QueueError("postgres queue: enqueue: conflicting message vanished")
            return ids

        # The ids are fixed before the first try, so a retry after a lost reply to a
        # committed INSERT finds those rows instead of adding second copies.
        return await self._run("enqueue", run)

    def enqueue_sync(
        self,
        conn: psycopg.Connection[Any],
        envelope: Envelope,
        data: bytes,
        *,
        held: bool = False,
        not_before: float | None = None,
        idempotency_key: str | None = None,
        meta: dict[str, str] | None = None,
        events: Sequence[DeliveryEvent] = (),
    ) -> str:
        """:meth:`enqueue_in` for sync code: the INSERT runs in the calling thread, on the
        caller's sync connection, and is not committed (see :func:`enqueue_sync`)."""
        params = _enqueue_params(
            self._names,
            envelope,
            data,
            clock=self._clock,
            held=held,
            not_before=not_before,
            idempotency_key=idempotency_key,
            meta=meta,
            events=events,
        )
        return _enqueue_on_sync(conn, self._names, params)

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        if limit <= 0:
            return []
        # Before the first lease of this owner commits: recovery elsewhere must find the
        # owner alive for as long as this process runs.
        await self._hold(owner)
        now = self._clock()
        until = now + lease_seconds
        query = (
            f"UPDATE {self._names.messages} AS m SET state = 'sending', lease_owner = %(owner)s,"
            " lease_until = %(until)s, next_attempt_at = %(until)s"
            f" FROM (SELECT id AS due_id, next_attempt_at AS was_due FROM {self._names.messages}"
            f"  WHERE state IN {_CLAIMABLE} AND next_attempt_at <= %(now)s"
            "  ORDER BY next_attempt_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS due"
            f" WHERE m.id = due.due_id RETURNING {_columns()}, due.was_due, m.ctid::text"
        )
        params = {"owner": owner, "until": until, "now": now, "limit": limit}
        rows = await self._execute("claim", query, params, binary=True)
        rows.sort(key=lambda row: (row[13], row[5], _shown(row[0])))
        claimed: list[StoredMessage] = []
        unreadable: list[tuple[str, str, str]] = []
        for row in rows:
            try:
                message = _row_to_message(row)
            except _Unreadable as exc:
                unreadable.append((row[14], _shown(row[0]), str(exc)))
                continue
            claimed.append(message)
            self._remember_lease(message)
        if unreadable:
            # By row address: an id that is not text cannot be matched as text. The
            # rows are ours (leased just now), so their address has not moved.
            await self._execute(
                "quarantine",
                f"UPDATE {self._names.messages} AS m SET state = 'quarantined',"
                " lease_owner = '', lease_until = 0, last_reply = 'quarantined: ' || bad.reason"
                " FROM (SELECT unnest(%(at)s::tid[]) AS at, unnest(%(why)s::text[]) AS reason)"
                " AS bad WHERE m.ctid = bad.at AND m.lease_owner = %(owner)s",
                {
                    "at": [at for at, _, _ in unreadable],
                    "why": [why for _, _, why in unreadable],
                    "owner": owner,
                },
            )
            for _, message_id, why in unreadable:
                if self.on_quarantine is not None:
                    self.on_quarantine(message_id, why)
        return claimed

    async def _hold(self, owner: str) -> None:
        """Hold ``owner``'s advisory lock on the liveness connection (see the module
        docstring); open it, or open it again after a restart, as needed."""
        loop = asyncio.get_running_loop()
        if owner in self._owners and loop.time() < self._alive_checked + _LIVENESS_CHECK:
            return
        async with self._alive_lock:
            conn = self._alive
            if conn is not None and owner in self._owners:
                try:
                    await conn.execute("SELECT 1")
                    self._alive_checked = loop.time()
                    return
                except psycopg.Error:
                    pass  # the session is gone, and our locks with it: take them again
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        await conn.close()
                self._alive = None
                try:
                    conn = await psycopg.AsyncConnection.connect(
                        self._settings.conninfo, autocommit=True
                    )
                except psycopg.Error as exc:
                    raise _translate(exc, "liveness lock") from exc
                self._alive = conn
                owners = self._owners | {owner}
            else:
                owners = {owner}
            try:
                for name in owners:
                    cur = await conn.execute(
                        "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                        (self._owner_key(name),),
                    )
                    row = await cur.fetchone()
                    if row is None or not row[0]:
                        raise QueueError(
                            f"postgres queue: lease owner {name!r} is in use by another"
                            " session; owners must be unique"
                        )
                    self._owners.add(name)
            except psycopg.Error as exc:
                raise _translate(exc, "liveness lock") from exc
            self._alive_checked = loop.time()

    def _owner_key(self, owner: str) -> str:
        return f"hato-owner:{self._names.messages}:{owner}"

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
        names = self._names
        read = (
            f"SELECT recipients, attempts, lease_until, last_reply FROM {names.messages}"
            " WHERE id = %s AND state = 'sending' AND lease_owner = %s"
        )
        # One statement, so the events commit with the outcome or not at all.
        update = (
            f"WITH upd AS (UPDATE {names.messages} SET recipients = %(recipients)s,"
            " attempts = %(attempts)s,"
            " state = %(state)s, next_attempt_at = %(next)s, last_reply = %(last_reply)s,"
            " lease_owner = '', lease_until = 0"
            " WHERE id = %(id)s AND state = 'sending' AND lease_owner = %(owner)s"
            " AND lease_until = %(lease_until)s"
            " RETURNING id, CASE WHEN %(notify)s THEN pg_notify(%(channel)s, '')::text END),"
            f" ev AS (INSERT INTO {names.events} (event_id, queue_id, envid, time, body)"
            " SELECT e.* FROM unnest(%(ev_id)s::text[], %(ev_qid)s::text[],"
            " %(ev_envid)s::text[], %(ev_time)s::float8[], %(ev_body)s::text[]) AS e"
            " WHERE EXISTS (SELECT 1 FROM upd) ON CONFLICT DO NOTHING)"
            " SELECT * FROM upd"
        )
        event_params = _event_params(events)

        lease = self._leases.get(message_id)
        if lease is not None and lease.owner == owner:
            del self._leases[message_id]
        else:
            lease = None

        if lease is not None:
            # The common case (this process leased it): no read, so the record joins the
            # next group statement with the records of other messages.
            row = lease.row
            attempts = int(row[1]) + 1
            recipients, last_reply, state = settle_attempt(
                _parse_recipients(row[0]), outcomes, attempts=attempts, held=held, retry_at=retry_at
            )
            now = self._clock()
            next_at = retry_at if retry_at is not None else now
            item: dict[str, Any] = {
                "id": message_id,
                "owner": owner,
                "lease_until": row[2],
                "recipients": _recipients_json(recipients),
                "attempts": attempts,
                "state": state.value,
                "next": next_at,
                "last_reply": last_reply or row[3],
                "notify": state is MessageState.DEFERRED and next_at <= now,
                **event_params,
            }
            return state if await self._record_grouped(item) else None

        async def run(conn: AsyncConn) -> MessageState | None:
            if lease is not None:
                row: Sequence[Any] | None = lease.row
            else:
                cur = await conn.execute(read, (message_id, owner))
                row = await cur.fetchone()
            if row is None:
                return None
            attempts = int(row[1]) + 1
            recipients, last_reply, state = settle_attempt(
                _parse_recipients(row[0]), outcomes, attempts=attempts, held=held, retry_at=retry_at
            )
            now = self._clock()
            next_at = retry_at if retry_at is not None else now
            cur = await conn.execute(
                update,
                {
                    "recipients": _recipients_json(recipients),
                    "attempts": attempts,
                    "state": state.value,
                    "next": next_at,
                    "last_reply": last_reply or row[3],
                    "id": message_id,
                    "owner": owner,
                    "lease_until": row[2],
                    "notify": state is MessageState.DEFERRED and next_at <= now,
                    "channel": names.channel,
                    **event_params,
                },
            )
            # No row: the lease moved on between the two statements.
            return state if await cur.fetchone() is not None else None

        return await self._run("record", run)

    async def _record_grouped(self, item: dict[str, Any]) -> bool:
        """Join the next group of records; whether this one's lease still held."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._to_record.append((item, future))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_groups(), name="hato-pg-record")
        return await future

    async def _record_groups(self) -> None:
        while self._to_record:
            group: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
            ids: set[str] = set()
            # One statement updates each row once: a second record of one message (a
            # caller's bug, or a retry) waits for the next group.
            rest: list[tuple[dict[str, Any], asyncio.Future[bool]]] = []
            for entry in self._to_record:
                if len(group) < _MAX_GROUP and entry[0]["id"] not in ids:
                    ids.add(entry[0]["id"])
                    group.append(entry)
                else:
                    rest.append(entry)
            self._to_record = rest
            try:
                done = await self._record_group([item for item, _ in group])
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for item, future in group:
                    if not future.done():  # the caller was cancelled
                        future.set_result(item["id"] in done)

    async def _record_group(self, group: list[dict[str, Any]]) -> set[str]:
        """The ids whose record was stored (their lease still held)."""
        columns = (
            "id",
            "owner",
            "lease_until",
            "recipients",
            "attempts",
            "state",
            "next",
            "last_reply",
            "notify",
        )
        arrays: dict[str, object] = {c: [item[c] for item in group] for c in columns}
        for column in ("ev_id", "ev_qid", "ev_envid", "ev_time", "ev_body"):
            arrays[column] = [v for item in group for v in item[column]]
        arrays["ev_of"] = [item["id"] for item in group for _ in item["ev_id"]]
        arrays["channel"] = self._names.channel
        rows = await self._execute("record", self._names.record_many, arrays)
        return {str(row[0]) for row in rows}

    async def record_bounce(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        names = self._names
        read = f"SELECT recipients, state FROM {names.messages} WHERE id = %s FOR UPDATE"
        update = f"UPDATE {names.messages} SET recipients = %s, state = %s WHERE id = %s"

        async def run(conn: AsyncConn) -> MessageState | None:
            async with conn.transaction():
                cur = await conn.execute(read, (message_id,))
                row = await cur.fetchone()
                if row is None:
                    return None
                try:
                    state = MessageState(row[1])
                    recipients = (
                        _parse_recipients(row[0]) if state is not MessageState.QUARANTINED else []
                    )
                except ValueError:  # unreadable: left for claim/get to quarantine
                    state, recipients = MessageState.QUARANTINED, []
                if state is not MessageState.QUARANTINED:
                    updated, changed = apply_bounce(recipients, outcomes)
                    if changed:
                        state = state_after_bounce(state, updated)
                        await conn.execute(
                            update, (_recipients_json(updated), state.value, message_id)
                        )
                if events:
                    await conn.execute(names.insert_events, _event_params(events))
                return state

        return await self._run("record bounce", run)

    def _remember_lease(self, message: StoredMessage) -> None:
        self._leases[message.id] = _Lease(
            message.lease_owner,
            (
                _recipients_json(message.recipients).obj,
                message.attempts,
                message.lease_until,
                message.last_reply,
            ),
        )
        while len(self._leases) > _MAX_REMEMBERED_LEASES:
            self._leases.popitem(last=False)

    async def release(self, message_id: str, *, owner: str) -> None:
        if (lease := self._leases.get(message_id)) is not None and lease.owner == owner:
            del self._leases[message_id]
        query = (
            f"WITH u AS (UPDATE {self._names.messages} SET state = {_UNLEASED_STATE},"
            " lease_owner = '', lease_until = 0, next_attempt_at = %(now)s"
            " WHERE id = %(id)s AND state = 'sending' AND lease_owner = %(owner)s RETURNING id)"
            " SELECT id, pg_notify(%(channel)s, '')::text FROM u"
        )
        params = {
            "now": self._clock(),
            "id": message_id,
            "owner": owner,
            "channel": self._names.channel,
        }
        await self._execute("release", query, params)

    async def requeue(self, message_id: str) -> None:
        query = (
            f"WITH u AS (UPDATE {self._names.messages} SET state = {_UNLEASED_STATE},"
            " next_attempt_at = %(now)s"
            " WHERE id = %(id)s AND state IN ('held', 'queued', 'deferred') RETURNING id)"
            " SELECT id, pg_notify(%(channel)s, '')::text FROM u"
            f" UNION ALL SELECT id, NULL FROM {self._names.messages} WHERE id = %(id)s"
        )
        params = {"now": self._clock(), "id": message_id, "channel": self._names.channel}
        if not await self._execute("requeue", query, params):
            raise MessageNotFound(message_id)

    async def get(self, message_id: str) -> StoredMessage:
        query = f"SELECT {_columns()} FROM {self._names.messages} WHERE id = %s"
        rows = await self._execute("get", query, (message_id,), binary=True)
        if not rows:
            raise MessageNotFound(message_id)
        message = _row_for_reader(rows[0])
        if message.state is MessageState.QUARANTINED and rows[0][4] != message.state.value:
            # Unreadable and not yet quarantined: quarantine it now, as claim would.
            reason = message.last_reply.removeprefix("quarantined: ")
            await self._execute(
                "quarantine",
                f"UPDATE {self._names.messages} SET state = 'quarantined', lease_owner = '',"
                " lease_until = 0, last_reply = %s WHERE id = %s AND state <> 'quarantined'",
                (message.last_reply, message_id),
            )
            if self.on_quarantine is not None:
                self.on_quarantine(message_id, reason)
        return message

    async def find(self, idempotency_key: str) -> str | None:
        query = f"SELECT id FROM {self._names.messages} WHERE idempotency_key = %s"
        rows = await self._execute("find", query, (idempotency_key,))
        return str(rows[0][0]) if rows else None

    async def list(
        self, *, states: Sequence[MessageState] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        where = "" if states is None else " WHERE state = ANY(%(states)s)"
        query = (
            f"SELECT {_columns(with_data=False)} FROM {self._names.messages}{where}"
            " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
        )
        params = {"states": [MessageState(s).value for s in states or ()], "limit": limit}
        return [_row_for_reader(row) for row in await self._execute("list", query, params)]

    async def delete(self, message_id: str) -> None:
        query = f"DELETE FROM {self._names.messages} WHERE id = %s RETURNING id"
        if not await self._execute("delete", query, (message_id,)):
            raise MessageNotFound(message_id)

    async def oldest(self) -> dict[MessageState, float]:
        query = f"SELECT state, min(created_at) FROM {self._names.messages} GROUP BY state"
        result: dict[MessageState, float] = {}
        for state, created in await self._execute("oldest", query, None):
            known = _STATE_OF.get(state, MessageState.QUARANTINED)
            result[known] = min(result.get(known, float(created)), float(created))
        return result

    async def ping(self) -> None:
        # Assigning a transaction id writes to the WAL, and fails on a read-only standby.
        await self._execute("ping", "SELECT txid_current()", None)

    async def counts(self) -> dict[MessageState, int]:
        query = f"SELECT state, count(*) FROM {self._names.messages} GROUP BY state"
        counts = dict.fromkeys(MessageState, 0)
        for state, n in await self._execute("counts", query, None):
            # A state that is not one of ours is a damaged row: it counts as quarantined.
            counts[_STATE_OF.get(state, MessageState.QUARANTINED)] += int(n)
        return counts

    async def recover(self) -> RecoveryReport:
        names = self._names
        expire = (
            f"UPDATE {names.messages} SET state = {_UNLEASED_STATE}, lease_owner = '',"
            " lease_until = 0 WHERE state = 'sending' AND lease_until <= %(now)s RETURNING id"
        )
        # Rows are never torn here (the database is transactional), so "unreadable" means a
        # shape Hato cannot use: an unknown state, or recipients or meta of the wrong form.
        arr = "(CASE WHEN jsonb_typeof(recipients) = 'array' THEN recipients ELSE '[]' END)"
        quarantine = (
            f"UPDATE {names.messages} SET state = 'quarantined', lease_owner = '', lease_until = 0,"
            " last_reply = 'quarantined: the stored state, recipients or meta have the wrong"
            " shape'"
            f" WHERE state <> 'quarantined' AND (state NOT IN {_KNOWN}"
            f"  OR jsonb_array_length({arr}) = 0 OR jsonb_typeof(meta) <> 'object'"
            f"  OR EXISTS (SELECT 1 FROM jsonb_array_elements({arr}) AS r WHERE"
            "   jsonb_typeof(r) <> 'object' OR jsonb_typeof(r -> 'address') IS DISTINCT FROM"
            "   'string' OR coalesce(r ->> 'state', 'pending') NOT IN"
            "   ('pending', 'sent', 'failed')))"
        )
        quarantined = f"SELECT id FROM {names.messages} WHERE state = 'quarantined' ORDER BY id"
        now = self._clock()
        params = {"now": now, "channel": names.channel}

        async def run(conn: AsyncConn) -> RecoveryReport:
            async with conn.transaction():
                cur = await conn.execute(expire, params)
                expired = len(await cur.fetchall())
                expired += await self._take_over_on(conn, now)
                await conn.execute(quarantine, params)
                cur = await conn.execute(quarantined)
                bad = [str(r[0]) for r in await cur.fetchall()]
                if expired:
                    await conn.execute("SELECT pg_notify(%(channel)s, '')", params)
            return RecoveryReport(leases_expired=expired, quarantined=bad)

        return await self._run("recover", run)

    async def _take_over_on(self, conn: AsyncConn, now: float) -> int:
        """Unlease the messages of every lease owner whose liveness lock is free (its
        process is gone); the number of messages. Runs inside the caller's transaction."""
        names = self._names
        owners = (
            f"SELECT DISTINCT lease_owner FROM {names.messages}"
            " WHERE state = 'sending' AND lease_until > %s"
        )
        # A transaction-level try: it fails while the owner's session holds the lock,
        # and whatever it takes is let go at commit.
        gone = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"
        take_over = (
            f"UPDATE {names.messages} SET state = {_UNLEASED_STATE}, lease_owner = '',"
            " lease_until = 0, next_attempt_at = least(next_attempt_at, %s)"
            " WHERE state = 'sending' AND lease_owner = %s RETURNING id"
        )
        taken = 0
        cur = await conn.execute(owners, (now,))
        for (owner,) in await cur.fetchall():
            if not isinstance(owner, str) or owner in self._owners:
                continue  # an unreadable row (its lease expires on its own), or our own
            cur = await conn.execute(gone, (self._owner_key(owner),))
            row = await cur.fetchone()
            if row is not None and row[0]:
                cur = await conn.execute(take_over, (now, owner))
                taken += len(await cur.fetchall())
        return taken

    async def take_over_dead(self) -> int:
        """Give the leases of dead nodes back to the queue now (a node sharing this queue
        killed with kill -9, say): the messages of every lease owner whose liveness lock
        no session holds any more. Cheap enough to run every few seconds (one indexed
        query, one lock try per other owner); the live workers call it during the run so
        a dead node's mail moves on as soon as the server has seen its session end."""
        channel = self._names.channel

        async def run(conn: AsyncConn) -> int:
            async with conn.transaction():
                taken = await self._take_over_on(conn, self._clock())
                if taken:
                    await conn.execute("SELECT pg_notify(%s, '')", (channel,))
            return taken

        return await self._run("take over", run)

    # -- wake-ups ----------------------------------------------------------------------

    # -- delivery events ---------------------------------------------------------------

    async def add_events(self, events: Sequence[DeliveryEvent]) -> int:
        if not events:
            return 0

        async def run(conn: AsyncConn) -> int:
            cur = await conn.execute(self._names.insert_events, _event_params(events))
            return max(cur.rowcount, 0)

        return await self._run("add events", run)

    async def events(
        self,
        *,
        after: str = "",
        queue_id: str | None = None,
        envid: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> EventPage:
        try:
            start = int(after) if after else 0
        except ValueError:
            raise QueueError(f"not an event cursor of this queue: {after!r}") from None
        table = self._names.events
        where, params = (
            ["seq > %(start)s", "seq <= %(top)s"],
            {
                "start": start,
                "queue_id": queue_id,
                "envid": envid,
                "since": since,
                "limit": limit,
            },
        )
        if queue_id is not None:
            where.append("queue_id = %(queue_id)s")
        if envid is not None:
            where.append("envid = %(envid)s")
        if since is not None:
            where.append("time >= %(since)s")

        async def run(conn: AsyncConn) -> EventPage:
            # The newest event first: what commits after it waits for the next page, so
            # the cursor may skip what did not match without skipping what arrived.
            cur = await conn.execute(f"SELECT max(seq) FROM {table}")
            row = await cur.fetchone()
            top = row[0] if row is not None else None
            if top is None or top <= start:
                return EventPage([], str(start))
            cur = await conn.execute(
                f"SELECT seq, body FROM {table} WHERE {' AND '.join(where)}"
                " ORDER BY seq LIMIT %(limit)s",
                {**params, "top": top},
            )
            rows = await cur.fetchall()
            found: list[DeliveryEvent] = []
            cursor = start
            for seq, body in rows:
                cursor = int(seq)
                try:
                    found.append(decode_event(body))
                except (ValueError, TypeError):
                    continue  # a damaged event is a lost record, never lost mail
            return EventPage(found, str(top if len(rows) < limit else cursor))

        return await self._run("events", run)

    async def prune_events(self, before: float) -> int:
        async def run(conn: AsyncConn) -> int:
            cur = await conn.execute(f"DELETE FROM {self._names.events} WHERE time < %s", (before,))
            return max(cur.rowcount, 0)

        return await self._run("prune events", run)

    # Cursors of event readers (webhooks, pullers): a small table made on first use, so
    # the schema version stays that of the messages and events.
    def _cursors_table(self) -> str:
        names = self._names
        table = _quote(names.prefix + "cursors")
        return f"{_quote(names.schema)}.{table}" if names.schema else table

    async def get_cursor(self, name: str) -> str:
        table = self._cursors_table()

        async def run(conn: AsyncConn) -> str:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (name text PRIMARY KEY, value text NOT NULL)"
            )
            cur = await conn.execute(f"SELECT value FROM {table} WHERE name = %s", (name,))
            row = await cur.fetchone()
            return str(row[0]) if row is not None else ""

        return await self._run("get cursor", run)

    async def set_cursor(self, name: str, value: str) -> None:
        table = self._cursors_table()

        async def run(conn: AsyncConn) -> None:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (name text PRIMARY KEY, value text NOT NULL)"
            )
            await conn.execute(
                f"INSERT INTO {table} (name, value) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (name, value),
            )

        await self._run("set cursor", run)

    async def wait_for_work(self, timeout: float) -> None:
        """Return on a NOTIFY from any process, when the earliest waiting message falls
        due, or after ``timeout`` seconds (the polling fallback while the database is away).
        """
        if self._pool is None:
            raise QueueError("postgres queue: wait_for_work: the queue is not open")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="hato-pg-listen")
        if self._wakeup.is_set():
            self._wakeup.clear()
            return
        # LISTEN first, then look at the table: a change committed before LISTEN is seen
        # by the query below, one committed after it is notified. With the database
        # down this is where the polling fallback waits.
        if not self._listening.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listening.wait(), deadline - loop.time())
            if not self._listening.is_set():
                return
        with contextlib.suppress(TimeoutError, QueueError):
            async with asyncio.timeout_at(deadline):
                rows = await self._execute(
                    "wait_for_work",
                    f"SELECT min(next_attempt_at) FROM {self._names.messages}"
                    f" WHERE state IN {_CLAIMABLE}",
                    None,
                )
                if rows and rows[0][0] is not None:
                    deadline = min(deadline, loop.time() + float(rows[0][0]) - self._clock())
        remaining = deadline - loop.time()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        self._wakeup.clear()

    async def _listen(self) -> None:
        """Hold a LISTEN connection; reconnect with a capped backoff while it fails."""
        delay = 0.0
        first = True
        while True:
            conn: AsyncConn | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._settings.conninfo, autocommit=True
                )
                await conn.execute(f"LISTEN {_quote(self._names.channel)}")
                self._listening.set()
                if not first:
                    self._wakeup.set()  # we were away: whatever was sent meanwhile is lost
                first, delay = False, 0.0
                async for _ in conn.notifies():
                    self._wakeup.set()
            except psycopg.Error:
                first = False
            finally:
                self._listening.clear()
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        await conn.close()
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2 or 0.05)
