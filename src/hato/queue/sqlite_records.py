"""The schema and row format of the SQLite spool: its tables, and how a message is
written to a row and read back.

Schema (version in ``hato_schema``; each change is a step in ``MIGRATIONS``):

``messages``
    one row per message. ``envelope`` is immutable JSON ``{"s": sender, "r":
    [addresses], "m": meta}``; ``rcpt_state`` is JSON ``[[state, reply, relay,
    attempts], ...]`` aligned with ``envelope.r``; ``data`` is the message as a BLOB;
    ``checksum`` is BLAKE2b-128 over ``envelope || 0x00 || data``.
``hato_meta``
    key/value pairs: ``clean`` is the clean-shutdown mark, ``queue_id`` the id the
    marker file beside the database names.

Per-recipient state lives in a JSON column rather than a recipients table because a
message is always read and written whole (claim, deliver, record): one row per message
keeps an enqueue to one insert and a record to one update, it commits atomically with
the message, and no query selects by recipient. Recipient lists are short (bounded by
the SMTP recipient limit).

Indexes keep the hot path off full scans at a million messages: ``messages_due`` is a
partial index on ``next_attempt_at`` over the claimable states only, so ``claim`` is an
index range scan whatever the number of held or finished messages; ``id`` and
``idempotency_key`` (partial, non-null keys only) are unique indexes; ``messages_state``
serves ``counts`` and filtered ``list``.

Reading never trusts the file. A row may hold anything a torn write, a bad sector or a
careless hand left there: text that is not UTF-8, a number where text belongs, a NULL,
JSON of another shape, bytes that no longer match their checksum. :func:`decode` proves
every column before it builds a message and raises :class:`Unreadable` with the reason
otherwise, so the queue quarantines that one row and goes on with the rest.

Python's ``sqlite3`` decodes TEXT cells while it *fetches* a row, and a cell that is not
UTF-8 fails the whole fetch (``Could not decode to UTF-8 column ...``): one such row
would stop every query that meets it. The queue's connections therefore read text
through :func:`text_factory`, which turns such a cell into a :class:`BadText` value for
:func:`decode` to refuse, instead of an exception.

:func:`is_corrupt` tells damage of the file itself (``database disk image is malformed``,
``file is not a database``) from every other error, because the answer differs: a
damaged page is not retried, it is worked around and reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Sequence
from typing import Any

from hato.errors import QueueError
from hato.queue.base import MessageState, RecipientState, RecipientStatus, StoredMessage

SCHEMA_VERSION = 3

_MESSAGES = """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_until REAL NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        envelope TEXT NOT NULL,
        rcpt_state TEXT NOT NULL,
        checksum BLOB NOT NULL,
        data BLOB NOT NULL
    )"""

DUE = "state IN ('queued', 'deferred', 'sending')"

# The indexes a damaged file may lose and get back (see hato.queue.sqlite_check), each
# with a query that reads all of it. The unique index on ``id`` is part of the table.
INDEXES = {
    "messages_idempotency": (
        """CREATE UNIQUE INDEX messages_idempotency ON messages(idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
        "SELECT count(*) FROM messages INDEXED BY messages_idempotency"
        " WHERE idempotency_key IS NOT NULL",
    ),
    # The WHERE clause must match DUE word for word for SQLite to use this index.
    "messages_due": (
        f"""CREATE INDEX messages_due ON messages(next_attempt_at)
        WHERE {DUE}""",
        f"SELECT count(*) FROM messages INDEXED BY messages_due WHERE {DUE}",
    ),
    "messages_state": (
        "CREATE INDEX messages_state ON messages(state)",
        "SELECT count(*) FROM messages INDEXED BY messages_state",
    ),
}

_SCHEMA_V1 = (_MESSAGES, *(create for create, _ in INDEXES.values()))

# Migrations from version N to N + 1, run in order inside the opening transaction. A new
# database is created at version 1 and goes through all of them, so every step runs in
# every test.
MIGRATIONS: dict[int, Sequence[str]] = {
    # 2: the clean-shutdown mark ('clean' = '1' once the process that ran recover()
    # closed the queue; '0' while it runs or after it crashed).
    1: ("CREATE TABLE hato_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
    # 3: delivery events (hato.events), one row each; ``body`` is the event's JSON, the
    # other columns what queries select by.
    2: (
        """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        queue_id TEXT NOT NULL,
        envid TEXT NOT NULL,
        time REAL NOT NULL,
        body TEXT NOT NULL
    )""",
        "CREATE INDEX events_queue_id ON events(queue_id)",
        "CREATE INDEX events_envid ON events(envid) WHERE envid != ''",
        "CREATE INDEX events_time ON events(time)",
    ),
}


# What sqlite_master holds for a spool, in the order migrate() creates it: (type, name,
# sql). A new file gets them on pages 2, 3, ... in this order.
SCHEMA_ROWS = (
    ("table", "hato_schema", "CREATE TABLE hato_schema (version INTEGER NOT NULL)"),
    ("table", "messages", _MESSAGES),
    ("index", "sqlite_autoindex_messages_1", None),
    *(("index", name, create) for name, (create, _) in INDEXES.items()),
    ("table", "hato_meta", MIGRATIONS[1][0]),
    ("index", "sqlite_autoindex_hato_meta_1", None),
    ("table", "events", MIGRATIONS[2][0]),
    ("index", "sqlite_autoindex_events_1", None),
    *(("index", sql.split()[2], sql) for sql in MIGRATIONS[2][1:]),
)


def _words(sql: object) -> object:
    return " ".join(sql.split()) if isinstance(sql, str) else sql


def check_schema(conn: sqlite3.Connection) -> None:
    """Raise :class:`DamagedSchema` when a table or index of the spool is defined other
    than Hato defines it (a damaged page 1 can rename a column or break a WHERE)."""
    stored = dict(conn.execute("SELECT name, sql FROM sqlite_master").fetchall())
    for _, name, sql in SCHEMA_ROWS:
        if name in stored and _words(stored[name]) != _words(sql):
            raise DamagedSchema(f"the definition of {name} is not Hato's")
    unknown = set(stored) - {name for _, name, _ in SCHEMA_ROWS}
    if unknown:
        names = ", ".join(sorted(map(repr, unknown)))
        raise DamagedSchema(f"its schema has objects Hato does not make ({names})")


def migrate(conn: sqlite3.Connection, *, new_queue_id: str) -> str:
    """Create the schema in a new database or bring an older one up to date; the
    queue's id (``new_queue_id`` when it had none)."""
    check_schema(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS hato_schema (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM hato_schema").fetchone()
    version = row[0]
    if (
        version is None
        and conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone()
    ):
        raise DamagedSchema("its schema version is missing")
    if version is None:
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        conn.execute("INSERT INTO hato_schema (version) VALUES (1)")
        version = 1
    if not isinstance(version, int):
        raise DamagedSchema(f"its schema version is unreadable ({version!r})")
    if version > SCHEMA_VERSION:
        raise QueueError(
            f"the queue database has schema version {version}, newer than this Hato"
            f" understands ({SCHEMA_VERSION}); upgrade Hato"
        )
    for v in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[v]:
            conn.execute(statement)
    if version < SCHEMA_VERSION:
        conn.execute("UPDATE hato_schema SET version = ?", (SCHEMA_VERSION,))
    columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    if columns != list(COLUMN_NAMES):
        raise DamagedSchema(f"the messages table has other columns than Hato's ({columns!r})")
    # An index that a rebuild of a damaged file dropped and could not create again.
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    for name, (create, _) in INDEXES.items():
        if name not in present:
            conn.execute(create)
    conn.execute(
        "INSERT OR IGNORE INTO hato_meta (key, value) VALUES ('queue_id', ?)", (new_queue_id,)
    )
    queue_id = conn.execute("SELECT value FROM hato_meta WHERE key = 'queue_id'").fetchone()[0]
    if not isinstance(queue_id, str):
        raise DamagedSchema(f"its queue id is unreadable ({queue_id!r})")
    return queue_id


def readable_seqs(conn: sqlite3.Connection) -> list[int]:
    """The row numbers of every message the damaged file may still hold, in order.

    Each structure is read as far as it goes: the table, then each index (they are
    separate pages and name rows by number), then every number between (a new row takes
    the highest number plus one, so the numbers are dense). A number may name no row;
    the caller reads each one on its own.
    """
    named = named_seqs(conn)
    seqs = set(named)
    # Fill the gaps between the numbers seen (a damaged page hides the rows it held),
    # but not the stretch up to a number a flipped bit made huge.
    known = sorted(named)
    for low, high in zip([0, *known], known, strict=False):
        if high - low <= _MAX_GAP:
            seqs.update(range(low + 1, high))
    return sorted(seqs)


def named_seqs(conn: sqlite3.Connection) -> set[int]:
    """The row numbers the table or any of its indexes names (as far as each reads)."""
    seqs: set[int] = set()
    queries = [
        "SELECT seq FROM messages NOT INDEXED",
        *(probe.replace("count(*)", "seq") for _, probe in INDEXES.values()),
        "SELECT seq FROM messages INDEXED BY sqlite_autoindex_messages_1 WHERE id >= ''",
        "SELECT max(seq) FROM messages",
    ]
    for query in queries:
        try:
            for (seq,) in conn.execute(query):
                if isinstance(seq, int):
                    seqs.add(seq)
        except sqlite3.DatabaseError:
            continue  # this structure is damaged (or gone); the others may tell
    return seqs


# The widest run of row numbers one damaged page of the table (or of an index above the
# table's leaves) can hide.
_MAX_GAP = 100_000

# Column order of every SELECT that builds a message (``decode`` unpacks it).
COLUMNS = (
    "seq, id, state, created_at, next_attempt_at, attempts, last_reply, lease_owner,"
    " lease_until, idempotency_key, envelope, rcpt_state, checksum"
)
COLUMN_NAMES = (*(c.strip() for c in COLUMNS.split(",")), "data")

_STATES = frozenset(s.value for s in MessageState)


class DamagedSchema(Exception):
    """The file's schema is not the one Hato wrote (a damaged page 1 or sqlite_master)."""


class Unreadable(Exception):
    """A stored record failed its checksum or could not be decoded."""


class BadText:
    """A TEXT cell that is not UTF-8, as :func:`text_factory` hands it over."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        return f"BadText({self.raw!r})"


def text_factory(raw: bytes) -> str | BadText:
    """The ``text_factory`` of the queue's connections: UTF-8 text, or :class:`BadText`."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return BadText(raw)


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Is this error damage of the database file itself (not a lock, not a full disk)?"""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc)
    # A damaged header field (the schema format number) reads as a plain error.
    return "malformed" in text or "not a database" in text or "unsupported file format" in text


def checksum(envelope: bytes, data: bytes) -> bytes:
    """BLAKE2b-128 over ``envelope || 0x00 || data``: what ``verify`` compares."""
    h = hashlib.blake2b(envelope, digest_size=16)
    h.update(b"\0")
    h.update(data)
    return h.digest()


def encode_rcpt_state(recipients: Sequence[RecipientStatus]) -> str:
    return json.dumps(
        [[r.state.value, r.reply, r.relay, r.attempts] for r in recipients],
        separators=(",", ":"),
    )


def wrong(column: str, value: object) -> str:
    """Why ``value`` cannot be the ``column`` of a message, in words."""
    if isinstance(value, BadText):
        return f"{column} is not valid UTF-8"
    if value is None:
        return f"{column} is missing"
    return f"{column} has the wrong type ({type(value).__name__})"


def _text(value: object, column: str) -> str:
    if not isinstance(value, str):
        raise Unreadable(wrong(column, value))
    return value


def _number(value: object, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unreadable(wrong(column, value))
    if not math.isfinite(value):
        raise Unreadable(f"{column} is not finite")
    return float(value)


def _load_json(text: object, what: str) -> object:
    if not isinstance(text, str):
        raise Unreadable(wrong(what, text))
    try:
        value: object = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"{what} is not JSON ({type(exc).__name__})") from None
    return value


def decode_envelope(text: object) -> tuple[str, list[str], dict[str, str]]:
    env = _load_json(text, "envelope")
    if not isinstance(env, dict):
        raise Unreadable("envelope has the wrong shape")
    sender, rcpts, meta = env.get("s"), env.get("r"), env.get("m")
    if (
        not isinstance(sender, str)
        or not isinstance(rcpts, list)
        or not rcpts
        or not all(isinstance(a, str) for a in rcpts)
        or not isinstance(meta, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise Unreadable("envelope has the wrong shape")
    return sender, rcpts, meta


def decode_recipients(addresses: list[str], text: object) -> list[RecipientStatus]:
    states = _load_json(text, "recipient state")
    if not isinstance(states, list) or len(states) != len(addresses):
        raise Unreadable("recipient state does not match the envelope")
    recipients = []
    for address, item in zip(addresses, states, strict=True):
        try:
            state, reply, relay, attempts = item
            status = RecipientStatus(address, RecipientState(state), reply, relay, attempts)
        except (TypeError, ValueError):
            raise Unreadable("recipient state has the wrong shape") from None
        if not (type(reply) is str and type(relay) is str and type(attempts) is int):
            raise Unreadable("recipient state has the wrong shape")
        recipients.append(status)
    return recipients


def decode(row: Sequence[Any], *, verify: bool) -> StoredMessage:
    """A row of ``COLUMNS`` plus data (or NULL) as a message; :class:`Unreadable` if any
    column is not what the queue wrote. With ``verify`` the checksum is checked too
    (needs the data column).

    The claim path runs this for every message, so a row exactly as the queue writes it
    is recognised by one test of plain types first; anything else takes the careful way,
    which says what is wrong (or accepts what is merely unusual, an integer time)."""
    (
        _seq,
        message_id,
        state,
        created_at,
        next_attempt_at,
        attempts,
        last_reply,
        lease_owner,
        lease_until,
        key,
        envelope,
        rcpt_state,
        stored_sum,
        data,
    ) = row
    if not (
        type(message_id) is str
        and state in _STATES
        and type(attempts) is int
        and attempts >= 0
        and type(last_reply) is str
        and type(lease_owner) is str
        and (key is None or type(key) is str)
        and type(envelope) is str
        and type(created_at) is float
        and type(next_attempt_at) is float
        and type(lease_until) is float
        # finite: inf - inf and nan - nan are nan
        and created_at - created_at == next_attempt_at - next_attempt_at == 0.0
        and lease_until - lease_until == 0.0
        and (type(data) is bytes or not verify)
    ):
        return _decode_carefully(row, verify=verify)
    if verify and stored_sum != checksum(envelope.encode(), data):
        raise Unreadable("checksum mismatch")
    sender, addresses, meta = decode_envelope(envelope)
    return StoredMessage(
        id=message_id,
        sender=sender,
        recipients=decode_recipients(addresses, rcpt_state),
        data=data if type(data) is bytes else b"",
        state=MessageState(state),
        created_at=created_at,
        next_attempt_at=next_attempt_at,
        attempts=attempts,
        last_reply=last_reply,
        lease_owner=lease_owner,
        lease_until=lease_until,
        idempotency_key=key,
        meta=meta,
    )


def _decode_carefully(row: Sequence[Any], *, verify: bool) -> StoredMessage:
    (
        _seq,
        message_id,
        state,
        created_at,
        next_attempt_at,
        attempts,
        last_reply,
        lease_owner,
        lease_until,
        key,
        envelope,
        rcpt_state,
        stored_sum,
        data,
    ) = row
    message_id = _text(message_id, "id")
    if state not in _STATES:
        raise Unreadable(
            f"unknown state {state!r}" if isinstance(state, str) else wrong("state", state)
        )
    if verify:
        if not isinstance(data, bytes):
            raise Unreadable(wrong("data", data))
        envelope = _text(envelope, "envelope")
        if stored_sum != checksum(envelope.encode(), data):
            raise Unreadable("checksum mismatch")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise Unreadable(wrong("attempts", attempts))
    if key is not None and not isinstance(key, str):
        raise Unreadable(wrong("idempotency_key", key))
    sender, addresses, meta = decode_envelope(envelope)
    return StoredMessage(
        id=message_id,
        sender=sender,
        recipients=decode_recipients(addresses, rcpt_state),
        data=data if isinstance(data, bytes) else b"",
        state=MessageState(state),
        created_at=_number(created_at, "created_at"),
        next_attempt_at=_number(next_attempt_at, "next_attempt_at"),
        attempts=attempts,
        last_reply=_text(last_reply, "last_reply"),
        lease_owner=_text(lease_owner, "lease_owner"),
        lease_until=_number(lease_until, "lease_until"),
        idempotency_key=key,
        meta=meta,
    )


def damage(row: Sequence[Any]) -> str:
    """Why a row (with its data) cannot be delivered; ``""`` when it can."""
    try:
        decode(row, verify=True)
    except Unreadable as exc:
        return str(exc)
    return ""


def shown_id(value: object, seq: int) -> str:
    """An id fit for a listing even when the stored one is unreadable."""
    if isinstance(value, str) and value:
        return value
    return f"#{seq}"


def for_display(row: Sequence[Any], *, verify: bool) -> tuple[StoredMessage, str]:
    """Like :func:`decode` but never fails: an unreadable row comes back as a quarantined
    shell with what could be read, plus the reason (``""`` when the row is fine)."""
    try:
        return decode(row, verify=verify), ""
    except Unreadable as exc:
        reason = str(exc)
    return damaged_shell(row, reason), reason


def damaged_shell(row: Sequence[Any], reason: str) -> StoredMessage:
    """A quarantined message built from what can be read of ``row`` (at least its seq)."""

    def number(i: int) -> float:
        value = row[i] if len(row) > i else None
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
        return 0.0

    data = row[13] if len(row) > 13 else None
    stored_reply = row[6] if len(row) > 6 else None
    if (
        isinstance(stored_reply, str)
        and stored_reply.startswith("quarantined:")
        and len(row) > 2
        and row[2] == MessageState.QUARANTINED.value
    ):
        last_reply = stored_reply  # quarantined before: keep the reason it was given then
    else:
        last_reply = f"quarantined: {reason}"
    key = row[9] if len(row) > 9 else None
    return StoredMessage(
        id=shown_id(row[1] if len(row) > 1 else None, int(row[0])),
        sender="",
        recipients=[],
        data=data if isinstance(data, bytes) else b"",
        state=MessageState.QUARANTINED,
        created_at=number(3),
        next_attempt_at=number(4),
        attempts=int(number(5)),
        last_reply=last_reply,
        idempotency_key=key if isinstance(key, str) else None,
    )
