"""The SQLite queue: the spool of a single ``hato serve``, durable and group-committed.

Threads. One writer thread owns the only write connection. Every change (enqueue,
claim, record, release, requeue, delete, quarantine) is a small function sent to it; the
thread drains whatever has arrived, runs the lot in one ``BEGIN IMMEDIATE`` transaction
(each function inside its own savepoint, so one failure undoes only itself), commits
once, and only then resolves the callers' futures. With ``fsync=True`` the database runs
in WAL mode with ``synchronous=FULL``, so the commit returns after the WAL is on stable
storage: a returned id means the message survives a crash or a power cut, and a hundred
SMTP sessions finishing DATA together share one flush. A reader thread with its own
connection serves ``get``/``list``/``counts``/``find`` without waiting for writes (WAL
readers see the last commit). A checkpointer thread copies the WAL into the database
once a second, so no commit stalls behind an automatic checkpoint.

Schema (version in ``hato_schema``; each change is a step in ``_MIGRATIONS``):

``messages``
    one row per message. ``envelope`` is immutable JSON ``{"s": sender, "r":
    [addresses], "m": meta}``; ``rcpt_state`` is JSON ``[[state, reply, relay,
    attempts], ...]`` aligned with ``envelope.r``; ``data`` is the message as a BLOB;
    ``checksum`` is BLAKE2b-128 over ``envelope || 0x00 || data``.
``hato_meta``
    key/value pairs; ``clean`` is the clean-shutdown mark (see below).

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

Torn or corrupted records: every claim (and ``get``) re-checks the checksum and the JSON;
a record that fails is moved to ``quarantined`` (never claimed, never half-delivered,
kept for the operator). ``recover`` at start-up also sweeps every undelivered record,
but only after an unclean stop (the process that ran ``recover`` did not ``close``):
that is when lying hardware tears writes, and a sweep of a million-message backlog
takes ~15 s that a clean restart should not pay. Damage that appears at rest is still
caught by the claim-time check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from hato.clock import Clock
from hato.errors import ConfigError, MessageNotFound, QueueError, QueueFullError
from hato.message import Envelope
from hato.queue.base import (
    MessageState,
    Outcome,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
    StoredMessage,
    new_message_id,
    settle_attempt,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 2

_SCHEMA_V1 = (
    """CREATE TABLE messages (
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
    )""",
    """CREATE UNIQUE INDEX messages_idempotency ON messages(idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
    # The WHERE clause must match _DUE below word for word for SQLite to use this index.
    """CREATE INDEX messages_due ON messages(next_attempt_at)
        WHERE state IN ('queued', 'deferred', 'sending')""",
    "CREATE INDEX messages_state ON messages(state)",
)

# Migrations from version N to N + 1, run in order inside the opening transaction. A new
# database is created at version 1 and goes through all of them, so every step runs in
# every test.
_MIGRATIONS: dict[int, Sequence[str]] = {
    # 2: the clean-shutdown mark ('clean' = '1' once the process that ran recover()
    # closed the queue; '0' while it runs or after it crashed).
    1: ("CREATE TABLE hato_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
}

_DUE = "state IN ('queued', 'deferred', 'sending')"
# Without statistics the planner prefers messages_state for the IN and then sorts every
# queued row; INDEXED BY pins the due index (and fails loudly if it cannot be used).
_DUE_ROWS = f"FROM messages INDEXED BY messages_due WHERE {_DUE}"

_COLUMNS = (
    "seq, id, state, created_at, next_attempt_at, attempts, last_reply, lease_owner,"
    " lease_until, idempotency_key, envelope, rcpt_state, checksum"
)
_SELECT_WITH_DATA = f"SELECT {_COLUMNS}, data"
_WITH_DATA = f"{_SELECT_WITH_DATA} FROM messages"
_WITHOUT_DATA = f"SELECT {_COLUMNS}, NULL FROM messages"

_INSERT = (
    "INSERT OR IGNORE INTO messages (id, state, created_at, next_attempt_at,"
    " idempotency_key, envelope, rcpt_state, checksum, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# How many queued calls the writer folds into one transaction.
_MAX_BATCH = 512


def _checksum(envelope: bytes, data: bytes) -> bytes:
    h = hashlib.blake2b(envelope, digest_size=16)
    h.update(b"\0")
    h.update(data)
    return h.digest()


def _translate(exc: sqlite3.Error, what: str) -> QueueError:
    """A sqlite3 error as the queue error callers handle (disk full gets its own)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "is full" in str(exc):
        return QueueFullError(f"{what}: queue storage is full ({exc})")
    return QueueError(f"{what}: {exc}")


class _Unreadable(Exception):
    """A stored record failed its checksum or could not be decoded."""


def _encode_rcpt_state(recipients: Sequence[RecipientStatus]) -> str:
    return json.dumps(
        [[r.state.value, r.reply, r.relay, r.attempts] for r in recipients],
        separators=(",", ":"),
    )


def _load_json(text: object, what: str) -> object:
    if not isinstance(text, str):
        raise _Unreadable(f"{what} is not text")
    try:
        value: object = json.loads(text)
    except ValueError as exc:
        raise _Unreadable(f"{what} is not JSON ({exc})") from None
    return value


def _decode_envelope(text: object) -> tuple[str, list[str], dict[str, str]]:
    env = _load_json(text, "envelope")
    if not isinstance(env, dict):
        raise _Unreadable("envelope has the wrong shape")
    sender, rcpts, meta = env.get("s"), env.get("r"), env.get("m")
    if (
        not isinstance(sender, str)
        or not isinstance(rcpts, list)
        or not all(isinstance(a, str) for a in rcpts)
        or not isinstance(meta, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise _Unreadable("envelope has the wrong shape")
    return sender, rcpts, meta


def _decode_recipients(addresses: list[str], text: object) -> list[RecipientStatus]:
    states = _load_json(text, "recipient state")
    if not isinstance(states, list) or len(states) != len(addresses):
        raise _Unreadable("recipient state does not match the envelope")
    recipients = []
    for address, item in zip(addresses, states, strict=True):
        try:
            state, reply, relay, attempts = item
            status = RecipientStatus(address, RecipientState(state), reply, relay, attempts)
        except (TypeError, ValueError):
            raise _Unreadable("recipient state has the wrong shape") from None
        if not (isinstance(reply, str) and isinstance(relay, str) and isinstance(attempts, int)):
            raise _Unreadable("recipient state has the wrong shape")
        recipients.append(status)
    return recipients


_STATES = frozenset(s.value for s in MessageState)


def _damage(
    state: object, envelope: object, rcpt_state: object, checksum: object, data: object
) -> str:
    """Why a stored record cannot be delivered, ``""`` when it can: the checks of
    ``_decode(verify=True)`` without building the message (the start-up sweep's path)."""
    if state not in _STATES:
        return f"unknown state {state!r}"
    if not isinstance(data, bytes) or not isinstance(envelope, str):
        return "data or envelope has the wrong type"
    try:
        envelope_bytes = envelope.encode()
    except UnicodeEncodeError:
        return "envelope is not valid text"
    if checksum != _checksum(envelope_bytes, data):
        return "checksum mismatch"
    try:
        _, addresses, _ = _decode_envelope(envelope)
        _decode_recipients(addresses, rcpt_state)
    except _Unreadable as exc:
        return str(exc)
    return ""


def _decode(row: tuple[Any, ...], *, verify: bool) -> StoredMessage:
    """A row of ``_WITH_DATA``/``_WITHOUT_DATA`` as a message; ``_Unreadable`` if torn.

    With ``verify`` the checksum is checked too (needs the data column).
    """
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
        checksum,
        data,
    ) = row
    if verify:
        if not isinstance(data, bytes) or not isinstance(envelope, str):
            raise _Unreadable("data or envelope has the wrong type")
        try:
            envelope_bytes = envelope.encode()
        except UnicodeEncodeError:
            raise _Unreadable("envelope is not valid text") from None
        if checksum != _checksum(envelope_bytes, data):
            raise _Unreadable("checksum mismatch")
    try:
        message_state = MessageState(state)
    except ValueError:
        raise _Unreadable(f"unknown state {state!r}") from None
    sender, addresses, meta = _decode_envelope(envelope)
    return StoredMessage(
        id=message_id,
        sender=sender,
        recipients=_decode_recipients(addresses, rcpt_state),
        data=data if isinstance(data, bytes) else b"",
        state=message_state,
        created_at=float(created_at),
        next_attempt_at=float(next_attempt_at),
        attempts=int(attempts),
        last_reply=str(last_reply),
        lease_owner=str(lease_owner),
        lease_until=float(lease_until),
        idempotency_key=key,
        meta=meta,
    )


def _decode_for_display(row: tuple[Any, ...], *, verify: bool) -> tuple[StoredMessage, str]:
    """Like ``_decode`` but never fails: an unreadable row comes back as a quarantined
    shell with what could be read, plus the reason (``""`` when the row is fine)."""
    try:
        return _decode(row, verify=verify), ""
    except _Unreadable as exc:
        reason = str(exc)
    data = row[13]
    return (
        StoredMessage(
            id=str(row[1]),
            sender="",
            recipients=[],
            data=data if isinstance(data, bytes) else b"",
            state=MessageState.QUARANTINED,
            created_at=float(row[3] or 0.0),
            next_attempt_at=float(row[4] or 0.0),
            attempts=int(row[5] or 0),
            last_reply=f"quarantined: {reason}",
            idempotency_key=row[9] if isinstance(row[9], str) else None,
        ),
        reason,
    )


def _owner_is_gone(owner: str) -> bool:
    """Is the lease owner (``host/pid/token``, as the worker names itself) a process that
    no longer runs? Our own pid counts as gone: recovery runs before this process claims
    anything, so such a lease belongs to an earlier process that had the same pid."""
    parts = owner.split("/")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False
    pid = int(parts[-2])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another user
        return False
    return False


def _quarantine(conn: sqlite3.Connection, seq: int, reason: str) -> None:
    conn.execute(
        "UPDATE messages SET state = 'quarantined', lease_owner = '', lease_until = 0,"
        " last_reply = ? WHERE seq = ?",
        (f"quarantined: {reason}", seq),
    )


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    # False for bookkeeping whose loss a crash may cost (claims, delivery records,
    # releases): at worst a message is delivered once more, never lost. A batch made
    # only of such calls commits without its own fsync; the next durable commit's fsync
    # covers it, since the WAL is written in order.
    durable: bool = True


def _settle(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, exc in items:
        if future.done():  # the caller was cancelled; the work is done regardless
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class _ConnectionThread:
    """One SQLite connection owned by one thread, running submitted calls in order.

    With ``batch`` (the writer) each drained group of calls shares one transaction and
    callers hear back only after its commit.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        *,
        batch: bool,
        fsync: bool = False,
    ) -> None:
        self._connect = connect
        self._batch = batch
        self._fsync = fsync
        self._synchronous = "FULL" if fsync else "NORMAL"
        self._requests: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        # Written by the thread only; read by anyone for metrics (ints are safe to read).
        self.transactions = 0
        self.calls = 0

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True
    ) -> asyncio.Future[T]:
        if self._closed:
            raise QueueError("the queue is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._requests.put(_Call(fn, future, loop, durable))
        return future

    def stop(self) -> None:
        """Finish what was submitted, then close the connection and end the thread."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        connect_error: QueueError | None = None
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            connect_error = _translate(exc, "cannot open the queue database")
        except OSError as exc:
            connect_error = QueueError(f"cannot open the queue database: {exc}")
        try:
            while True:
                call = self._requests.get()
                if call is None:
                    return
                calls = [call]
                stopping = False
                while len(calls) < _MAX_BATCH:
                    try:
                        more = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    calls.append(more)
                if conn is None:
                    assert connect_error is not None
                    self._post([(c, None, connect_error) for c in calls])
                elif self._batch:
                    self._run_transaction(conn, calls)
                else:
                    self._run_each(conn, calls)
                if stopping:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _run_each(self, conn: sqlite3.Connection, calls: list[_Call]) -> None:
        done: list[tuple[_Call, Any, BaseException | None]] = []
        for call in calls:
            try:
                done.append((call, call.fn(conn), None))
            except sqlite3.Error as exc:
                done.append((call, None, _translate(exc, "queue read failed")))
            except Exception as exc:
                done.append((call, None, exc))
        self._post(done)

    def _run_transaction(self, conn: sqlite3.Connection, calls: list[_Call]) -> None:
        done: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            if self._fsync:
                wanted = "FULL" if any(call.durable for call in calls) else "NORMAL"
                if wanted != self._synchronous:  # only outside a transaction
                    conn.execute(f"PRAGMA synchronous = {wanted}")
                    self._synchronous = wanted
            conn.execute("BEGIN IMMEDIATE")
            for call in calls:
                conn.execute("SAVEPOINT call")
                try:
                    result = call.fn(conn)
                except Exception as exc:
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (disk full, I/O
                        # error): every call of the batch is lost, say so to each.
                        raise
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                    if isinstance(exc, sqlite3.Error):
                        done.append((call, None, _translate(exc, "queue write failed")))
                    else:
                        done.append((call, None, exc))
                else:
                    conn.execute("RELEASE call")
                    done.append((call, result, None))
            conn.execute("COMMIT")
            self.transactions += 1
            self.calls += len(calls)
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback failed")
            error: BaseException = (
                _translate(exc, "queue write failed") if isinstance(exc, sqlite3.Error) else exc
            )
            done = [(c, None, error) for c in calls]
        self._post(done)

    @staticmethod
    def _post(done: list[tuple[_Call, Any, BaseException | None]]) -> None:
        """Hand results to their event loops: one thread-safe wake-up per loop."""
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        ] = {}
        for call, result, exc in done:
            by_loop.setdefault(call.loop, []).append((call.future, result, exc))
        for loop, items in by_loop.items():
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, items)


class _Checkpointer:
    """Copies the WAL back into the database in the background, once a second when
    there were commits, so that no enqueue waits behind a checkpoint.

    A PASSIVE checkpoint takes no write lock: the writer keeps committing meanwhile.
    """

    interval = 1.0

    def __init__(self, connect: Callable[[], sqlite3.Connection], writer: _ConnectionThread):
        self._connect = connect
        self._writer = writer
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hato-queue-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error:
            log.exception("queue: no checkpointer; SQLite's automatic checkpoints remain")
            return
        try:
            # query_only does not forbid checkpoints; it keeps this connection honest.
            seen = self._writer.transactions
            while not self._stopping.wait(self.interval):
                if self._writer.transactions == seen:
                    continue
                seen = self._writer.transactions
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("queue: checkpoint failed: %s", exc)
        finally:
            conn.close()


class SQLiteQueue:
    """A :class:`hato.queue.base.Queue` in one SQLite file (see the module docstring).

    ``max_bytes`` caps the database size (``PRAGMA max_page_count``); past it, enqueue
    raises :class:`QueueFullError` just as on a full disk.
    """

    def __init__(
        self,
        url: str,
        path: str,
        *,
        clock: Clock = time.time,
        fsync: bool = True,
        max_bytes: int | None = None,
    ) -> None:
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ConfigError(f"queue URL {url!r} needs a file path (sqlite:///path/queue.db)")
        self.url = url
        self.path = path
        self._clock = clock
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._writer: _ConnectionThread | None = None
        self._reader: _ConnectionThread | None = None
        self._checkpointer: _Checkpointer | None = None
        # Set once recover() ran: this instance is the spool's owner and marks a clean
        # shutdown on close().
        self._marks_clean = False
        self._work = asyncio.Event()

    # -- connections ---------------------------------------------------------------

    def _connect(self, *, write: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. The timeout covers other
        # processes (``hato queue`` commands) holding the write lock for a moment.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            # Only takes effect in a new database. A 2 KiB message leaves half of a 4 KiB
            # page empty (one such row fits per page); 8 KiB pages hold three.
            conn.execute("PRAGMA page_size = 8192")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
            conn.execute("PRAGMA cache_size = -32768")
            if write:
                # The checkpointer thread keeps the WAL short; this is only the safety net
                # should it fall behind (an automatic checkpoint stalls the commit that
                # runs it, which is why it is not the normal path).
                conn.execute("PRAGMA wal_autocheckpoint = 50000")
                # After a burst the WAL is cut back to this size instead of staying big.
                conn.execute(f"PRAGMA journal_size_limit = {64 * 2**20}")
                if self._max_bytes is not None:
                    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                    pages = max(1, self._max_bytes // page_size)
                    conn.execute(f"PRAGMA max_page_count = {int(pages)}")
            else:
                conn.execute("PRAGMA query_only = 1")
        except BaseException:
            conn.close()
            raise
        return conn

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True
    ) -> asyncio.Future[T]:
        if self._writer is None:
            raise QueueError(f"queue {self.url} is not open")
        return self._writer.submit(fn, durable=durable)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._reader is None:
            raise QueueError(f"queue {self.url} is not open")
        return self._reader.submit(fn)

    async def open(self) -> None:
        if self._writer is not None:
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        existed = os.path.exists(self.path)
        try:
            # Mail is private: a new spool directory and database are the owner's only
            # (SQLite gives the -wal and -shm files the database file's mode).
            os.makedirs(parent, mode=0o700, exist_ok=True)
            if not existed:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise QueueError(f"cannot create {self.path}: {exc}") from exc
        writer = _ConnectionThread(
            "hato-queue-writer", lambda: self._connect(write=True), batch=True, fsync=self._fsync
        )
        writer.start()
        self._writer = writer
        try:
            await writer.submit(_migrate)
        except BaseException:
            await self._stop()
            raise
        if not existed and self._fsync:
            _fsync_dir(parent)
        reader = _ConnectionThread(
            "hato-queue-reader", lambda: self._connect(write=False), batch=False
        )
        reader.start()
        self._reader = reader
        self._checkpointer = _Checkpointer(lambda: self._connect(write=False), writer)
        self._checkpointer.start()

    async def close(self) -> None:
        if self._marks_clean and self._writer is not None:
            self._marks_clean = False
            with contextlib.suppress(QueueError):  # then the next start sweeps: safe
                await self._write(
                    lambda conn: conn.execute(
                        "INSERT OR REPLACE INTO hato_meta (key, value) VALUES ('clean', '1')"
                    )
                )
        await self._stop()

    async def _stop(self) -> None:
        threads: list[_ConnectionThread | _Checkpointer] = [
            t for t in (self._checkpointer, self._writer, self._reader) if t is not None
        ]
        self._writer = self._reader = self._checkpointer = None
        for t in threads:
            t.stop()
        for t in threads:
            await asyncio.to_thread(t.join)

    def write_stats(self) -> tuple[int, int]:
        """``(transactions, writes)`` committed so far: their ratio is the group-commit
        batch size (for metrics and tests)."""
        if self._writer is None:
            return (0, 0)
        return (self._writer.transactions, self._writer.calls)

    # -- writes --------------------------------------------------------------------

    async def enqueue(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        held: bool = False,
        not_before: float | None = None,
        idempotency_key: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> str:
        if not envelope.recipients:
            raise ValueError("a message needs at least one recipient")
        now = self._clock()
        message_id = new_message_id(lambda: now)
        env_text = json.dumps(
            {
                "s": envelope.sender,
                "r": envelope.recipients,
                "m": {**envelope.meta, **(meta or {})},
            },
            separators=(",", ":"),
        )
        rcpt_state = _encode_rcpt_state([RecipientStatus(a) for a in envelope.recipients])
        state = MessageState.HELD.value if held else MessageState.QUEUED.value
        due = now if not_before is None else not_before
        payload = bytes(data)

        def insert(conn: sqlite3.Connection) -> str:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT id FROM messages WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return str(row[0])
            checksum = _checksum(env_text.encode(), payload)
            mid = message_id
            # An id collides only within one microsecond and 1 in 2**20; draw again.
            for _ in range(8):
                cur = conn.execute(
                    _INSERT,
                    (
                        mid,
                        state,
                        now,
                        due,
                        idempotency_key,
                        env_text,
                        rcpt_state,
                        checksum,
                        payload,
                    ),
                )
                if cur.rowcount == 1:
                    return mid
                mid = new_message_id(lambda: now)
            raise QueueError("could not allocate a unique message id")

        message_id = await self._write(insert)
        self._work.set()
        return message_id

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        if limit <= 0:
            return []
        now = self._clock()
        lease_until = now + lease_seconds

        def claim(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"{_SELECT_WITH_DATA} {_DUE_ROWS} AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, seq LIMIT ?",
                (now, limit),
            ).fetchall()
            claimed: list[StoredMessage] = []
            leases: list[tuple[str, float, float, int]] = []
            for row in rows:
                try:
                    msg = _decode(row, verify=True)
                except _Unreadable as exc:
                    log.warning("queue: quarantined %s: %s", row[1], exc)
                    _quarantine(conn, row[0], str(exc))
                    continue
                msg.state = MessageState.SENDING
                msg.lease_owner = owner
                msg.lease_until = msg.next_attempt_at = lease_until
                claimed.append(msg)
                leases.append((owner, lease_until, lease_until, row[0]))
            conn.executemany(
                "UPDATE messages SET state = 'sending', lease_owner = ?, lease_until = ?,"
                " next_attempt_at = ? WHERE seq = ?",
                leases,
            )
            return claimed

        return await self._write(claim, durable=False)

    async def record(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        owner: str,
        retry_at: float | None,
        held: bool = False,
    ) -> MessageState | None:
        now = self._clock()

        def record(conn: sqlite3.Connection) -> MessageState | None:
            row = conn.execute(
                "SELECT seq, state, lease_owner, attempts, last_reply, envelope, rcpt_state"
                " FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            if row is None or row[1] != MessageState.SENDING.value or row[2] != owner:
                return None
            seq, _, _, attempts, last_reply, envelope, rcpt_state = row
            try:
                _, addresses, _ = _decode_envelope(envelope)
                recipients = _decode_recipients(addresses, rcpt_state)
            except _Unreadable as exc:
                _quarantine(conn, seq, str(exc))
                return MessageState.QUARANTINED
            updated, reply, state = settle_attempt(
                recipients, outcomes, attempts=attempts + 1, held=held, retry_at=retry_at
            )
            conn.execute(
                "UPDATE messages SET state = ?, attempts = ?, last_reply = ?, lease_owner = '',"
                " lease_until = 0, next_attempt_at = ?, rcpt_state = ? WHERE seq = ?",
                (
                    state.value,
                    attempts + 1,
                    reply or last_reply,
                    retry_at if retry_at is not None else now,
                    _encode_rcpt_state(updated),
                    seq,
                ),
            )
            return state

        return await self._write(record, durable=False)

    async def release(self, message_id: str, *, owner: str) -> None:
        now = self._clock()

        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, lease_owner = '', lease_until = 0, next_attempt_at = ?"
                " WHERE id = ? AND state = 'sending' AND lease_owner = ?",
                (now, message_id, owner),
            )

        await self._write(release, durable=False)
        self._work.set()

    async def requeue(self, message_id: str) -> None:
        now = self._clock()

        def requeue(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, next_attempt_at = ?"
                " WHERE id = ? AND state IN ('held', 'deferred', 'queued')",
                (now, message_id),
            )
            if cur.rowcount == 0 and _missing(conn, message_id):
                raise MessageNotFound(message_id)

        await self._write(requeue)
        self._work.set()

    async def delete(self, message_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if cur.rowcount == 0:
                raise MessageNotFound(message_id)

        await self._write(delete)

    # -- reads ---------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage:
        def get(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"{_WITH_DATA} WHERE id = ?", (message_id,)
            ).fetchone()
            return row

        row = await self._read(get)
        if row is None:
            raise MessageNotFound(message_id)
        msg, reason = _decode_for_display(row, verify=True)
        if reason and row[2] != MessageState.QUARANTINED.value:
            seq = row[0]
            await self._write(lambda conn: _quarantine(conn, seq, reason))
        return msg

    async def find(self, idempotency_key: str) -> str | None:
        def find(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT id FROM messages WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._read(find)

    async def list(
        self, *, states: Sequence[MessageState] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        wanted = None if states is None else [MessageState(s).value for s in states]

        def list_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            if wanted is None:
                return conn.execute(
                    f"{_WITHOUT_DATA} ORDER BY seq DESC LIMIT ?", (limit,)
                ).fetchall()
            if not wanted:
                return []
            marks = ", ".join("?" * len(wanted))
            return conn.execute(
                f"{_WITHOUT_DATA} WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?",
                (*wanted, limit),
            ).fetchall()

        rows = await self._read(list_rows)
        return [_decode_for_display(row, verify=False)[0] for row in rows]

    async def counts(self) -> dict[MessageState, int]:
        def counts(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            return conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall()

        result = dict.fromkeys(MessageState, 0)
        for state, n in await self._read(counts):
            try:
                result[MessageState(state)] += n
            except ValueError:
                result[MessageState.QUARANTINED] += n
        return result

    async def recover(self) -> RecoveryReport:
        now = self._clock()

        def expire(conn: sqlite3.Connection) -> tuple[int, bool]:
            back = (
                "UPDATE messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, lease_owner = '', lease_until = 0,"
                " next_attempt_at = min(next_attempt_at, ?) WHERE state = 'sending'"
            )
            expired = conn.execute(back + " AND lease_until <= ?", (now, now)).rowcount
            # A SQLite spool is local to this machine, so every lease owner is a process
            # here: leases of processes that no longer exist (a kill -9) come back now
            # rather than when their lease runs out, minutes later.
            owners = [
                str(row[0])
                for row in conn.execute(
                    "SELECT DISTINCT lease_owner FROM messages WHERE state = 'sending'"
                )
            ]
            for owner in filter(_owner_is_gone, owners):
                expired += conn.execute(back + " AND lease_owner = ?", (now, owner)).rowcount
            row = conn.execute("SELECT value FROM hato_meta WHERE key = 'clean'").fetchone()
            # Marked unclean until our close() says otherwise: a crash from here on
            # leaves it so, and the next start sweeps.
            conn.execute("INSERT OR REPLACE INTO hato_meta (key, value) VALUES ('clean', '0')")
            return expired, row is not None and row[0] == "1"

        def quarantine(conn: sqlite3.Connection) -> list[str]:
            for seq, message_id, reason in bad:
                log.warning("queue: quarantined %s: %s", message_id, reason)
                _quarantine(conn, seq, reason)
            return [
                str(r[0])
                for r in conn.execute(
                    "SELECT id FROM messages WHERE state = 'quarantined' ORDER BY seq"
                )
            ]

        expired, clean = await self._write(expire)
        self._marks_clean = True
        report = RecoveryReport(leases_expired=expired)
        bad: list[tuple[int, str, str]] = []
        if not clean:
            # Its own connection and thread: at a million messages the sweep takes
            # seconds, and get/list/wait_for_work on the reader should not wait for it.
            try:
                bad = await asyncio.to_thread(_sweep, lambda: self._connect(write=False))
            except sqlite3.Error as exc:
                raise _translate(exc, "queue recovery failed") from exc
        report.quarantined = await self._write(quarantine)
        if report.leases_expired:
            self._work.set()
        return report

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a message was enqueued, released or requeued in this process, when
        the earliest scheduled message falls due, or after ``timeout`` seconds."""
        if not self._work.is_set():

            def next_due(conn: sqlite3.Connection) -> float | None:
                row = conn.execute(f"SELECT min(next_attempt_at) {_DUE_ROWS}")
                value = row.fetchone()[0]
                return None if value is None else float(value)

            due = await self._read(next_due)
            if due is not None:
                timeout = min(timeout, due - self._clock())
            if timeout > 0 and not self._work.is_set():
                try:
                    async with asyncio.timeout(timeout):
                        await self._work.wait()
                except TimeoutError:
                    pass
        self._work.clear()


def _sweep(connect: Callable[[], sqlite3.Connection]) -> list[tuple[int, str, str]]:
    """``(seq, id, reason)`` of every undelivered record that is damaged.

    Finished and quarantined messages are never delivered again, so only the rest need
    proving readable. Rows stream through one at a time (memory stays flat).
    """
    conn = connect()
    try:
        bad = []
        for seq, message_id, state, envelope, rcpt_state, checksum, data in conn.execute(
            "SELECT seq, id, state, envelope, rcpt_state, checksum, data FROM messages"
            " WHERE state NOT IN ('sent', 'failed', 'quarantined')"
        ):
            reason = _damage(state, envelope, rcpt_state, checksum, data)
            if reason:
                bad.append((seq, str(message_id), reason))
        return bad
    finally:
        conn.close()


def _missing(conn: sqlite3.Connection, message_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is None


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the schema in a new database or bring an older one up to date."""
    conn.execute("CREATE TABLE IF NOT EXISTS hato_schema (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM hato_schema").fetchone()
    version = row[0]
    if version is None:
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        conn.execute("INSERT INTO hato_schema (version) VALUES (1)")
        version = 1
    if version > SCHEMA_VERSION:
        raise QueueError(
            f"the queue database has schema version {version}, newer than this Hato"
            f" understands ({SCHEMA_VERSION}); upgrade Hato"
        )
    for v in range(version, SCHEMA_VERSION):
        for statement in _MIGRATIONS[v]:
            conn.execute(statement)
    if version < SCHEMA_VERSION:
        conn.execute("UPDATE hato_schema SET version = ?", (SCHEMA_VERSION,))


def _fsync_dir(path: str) -> None:
    """Make a newly created database file's directory entry durable too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
