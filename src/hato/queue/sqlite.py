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

The schema and the row format are in :mod:`hato.queue.sqlite_records`; the files beside
the database (the marker that a queue exists, the lease owners' lock files) in
:mod:`hato.queue.sqlite_files`; checking and repairing the file in
:mod:`hato.queue.sqlite_check`.

Torn or corrupted records: every claim (and ``get``) re-checks the checksum and every
column; a record that fails is moved to ``quarantined`` (never claimed, never
half-delivered, kept for the operator, reported through ``on_quarantine``). Text that is
not UTF-8 is one such failure, not an error of the whole query. ``recover`` at start-up
also sweeps every undelivered record, but only after an unclean stop (the process that
ran ``recover`` did not ``close``): that is when lying hardware tears writes, and a sweep
of a million-message backlog takes ~15 s that a clean restart should not pay. Damage
that appears at rest is still caught by the claim-time check.

A damaged file (``database disk image is malformed``): after an unclean stop
``recover`` runs ``PRAGMA quick_check`` first; damaged indexes are rebuilt in place, any
other damage stops the start with one line that names ``hato queue check --repair``. A
file that cannot be opened at all stops ``open`` the same way. Damage met while running
is worked around where it can be: an index that cannot be read is rebuilt, and so is
one whose entry disagrees with its row; when the table itself has a damaged page,
``claim`` and ``list`` fall back to reading row by row, so every row the file can still
give back is delivered or listed, and the rest reported. Claims then find and read their
rows on the reader, outside the write transaction: a damaged page read inside one
spoils every write after it, and the commit.

Leases of processes that are gone come back at start-up at once: each lease owner holds
a lock file that the kernel releases when the process ends (see
:mod:`hato.queue.sqlite_files`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from hato.errors import ConfigError, MessageNotFound, QueueDamaged, QueueError, QueueFullError
from hato.events import DeliveryEvent, EventPage, stamped
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
    new_message_id,
    settle_attempt,
    state_after_bounce,
)
from hato.queue.sqlite_check import rebuild_damaged_indexes, startup_check
from hato.queue.sqlite_events import delete_events_before, insert_events, select_events
from hato.queue.sqlite_files import (
    OwnerLocks,
    SpoolLock,
    check_identity,
    new_queue_id,
    read_marker,
    refuse_without_database,
    write_marker,
)
from hato.queue.sqlite_records import (
    COLUMNS,
    DUE,
    SCHEMA_VERSION,
    DamagedSchema,
    Unreadable,
    checksum,
    damage,
    damaged_shell,
    decode,
    decode_envelope,
    decode_recipients,
    encode_rcpt_state,
    for_display,
    is_corrupt,
    migrate,
    readable_seqs,
    shown_id,
    text_factory,
)

__all__ = ["SCHEMA_VERSION", "SQLiteQueue"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Without statistics the planner prefers messages_state for the IN and then sorts every
# queued row; INDEXED BY pins the due index (and fails loudly if it cannot be used).
_DUE_ROWS = f"FROM messages INDEXED BY messages_due WHERE {DUE}"

_SELECT_WITH_DATA = f"SELECT {COLUMNS}, data"
_WITH_DATA = f"{_SELECT_WITH_DATA} FROM messages"
_WITHOUT_DATA = f"SELECT {COLUMNS}, NULL FROM messages"

_INSERT = (
    "INSERT OR IGNORE INTO messages (id, state, created_at, next_attempt_at,"
    " idempotency_key, envelope, rcpt_state, checksum, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Enqueue with the lease taken in the same statement (``enqueue(lease_owner=...)``).
_INSERT_LEASED = (
    "INSERT OR IGNORE INTO messages (id, state, created_at, next_attempt_at,"
    " idempotency_key, envelope, rcpt_state, checksum, data, lease_owner, lease_until)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_LEASE = (
    "UPDATE messages SET state = 'sending', lease_owner = ?, lease_until = ?,"
    " next_attempt_at = ? WHERE seq = ?"
)

# How many queued calls the writer folds into one transaction.
_MAX_BATCH = 512

# The names the benchmark (bench/queue_scale.py) builds rows with.
_checksum = checksum
_encode_rcpt_state = encode_rcpt_state


def _damaged(path: str, why: object) -> QueueDamaged:
    return QueueDamaged(
        f"the queue database {path} is damaged: {why}; run hato queue check --repair"
    )


def _translate(exc: sqlite3.Error, what: str, path: str) -> QueueError:
    """A sqlite3 error as the queue error callers handle (disk full and a damaged file
    get their own)."""
    if is_corrupt(exc):
        return _damaged(path, exc)
    code = getattr(exc, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "is full" in str(exc):
        return QueueFullError(f"{what}: queue storage is full ({exc})")
    return QueueError(f"{what}: {exc}")


def _fetch(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[Any]:
    """The hot path's rows (claim, record): sqlite3 decodes the text itself, in C. A cell
    that is not UTF-8 fails that whole fetch, so then the query runs again through
    ``text_factory`` (the connection's own), where that cell fails only its row."""
    conn.text_factory = str
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "Could not decode" not in str(exc):
            raise
    finally:
        conn.text_factory = text_factory
    return conn.execute(sql, params).fetchall()


def _error_of(exc: Exception, what: str, path: str) -> Exception:
    """What a caller gets for an exception in a queue thread: sqlite3's translated; a
    UnicodeDecodeError (sqlite3 failing to decode SQLite's own message, which quotes a
    damaged schema) as damage; anything else (ours, ValueError) as it is."""
    if isinstance(exc, sqlite3.Error):
        return _translate(exc, what, path)
    if isinstance(exc, UnicodeDecodeError):
        return _damaged(path, "its schema is not valid text")
    if isinstance(exc, DamagedSchema):
        return _damaged(path, exc)
    return exc


def _fallback(exc: sqlite3.DatabaseError) -> bool:
    """May a query that failed so be answered row by row instead?"""
    return is_corrupt(exc) or "no such index" in str(exc)


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
        path: str,
        connect: Callable[[], sqlite3.Connection],
        *,
        batch: bool,
        fsync: bool = False,
    ) -> None:
        self._path = path
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
        except OSError as exc:
            connect_error = QueueError(f"cannot open the queue database: {exc}")
        except Exception as exc:
            error = _error_of(exc, "cannot open the queue database", self._path)
            connect_error = error if isinstance(error, QueueError) else QueueError(str(error))
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
            except Exception as exc:
                done.append((call, None, _error_of(exc, "queue read failed", self._path)))
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
                    done.append((call, None, _error_of(exc, "queue write failed", self._path)))
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
            error = _error_of(exc, "queue write failed", self._path)
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
        self.on_quarantine: QuarantineHook | None = None
        self._clock = clock
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._writer: _ConnectionThread | None = None
        self._reader: _ConnectionThread | None = None
        self._checkpointer: _Checkpointer | None = None
        self._spool_lock: SpoolLock | None = None
        self._owners = OwnerLocks(path)
        # Set once recover() ran: this instance is the spool's owner and marks a clean
        # shutdown on close().
        self._marks_clean = False
        self._work = asyncio.Event()
        # Rows on damaged pages that the file cannot give back (seq -> why): claim skips
        # them, and each is reported once. Only the reader thread touches it.
        self._lost: dict[int, str] = {}
        # Set once a claim met a damaged page that rebuilding the indexes did not cure.
        self._row_by_row = False
        self._healing = asyncio.Lock()
        self._healed_at = -_HEAL_INTERVAL

    # -- connections ---------------------------------------------------------------

    def _connect(self, *, write: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. The timeout covers other
        # processes (``hato queue`` commands) holding the write lock for a moment.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        # Text that is not UTF-8 becomes a value decode() refuses, not a failed query.
        conn.text_factory = text_factory
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

    async def _change(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """``_write``; when the file turns out damaged, rebuild the indexes that cannot be
        read (while the table reads whole) and try once more."""
        try:
            return await self._write(fn, durable=durable)
        except QueueDamaged:
            if not await self._heal():
                raise
        return await self._write(fn, durable=durable)

    async def _heal(self) -> bool:
        """Rebuild damaged indexes in place, at most once per ``_HEAL_INTERVAL`` (each
        try reads the whole table); True when one was rebuilt."""
        async with self._healing:
            if time.monotonic() - self._healed_at < _HEAL_INTERVAL:
                return False
            self._healed_at = time.monotonic()
            try:
                rebuilt = await asyncio.to_thread(rebuild_damaged_indexes, self.path)
            except sqlite3.Error as exc:
                log.warning(
                    "queue: %s is damaged and its indexes cannot be rebuilt: %s", self.path, exc
                )
                return False
            if rebuilt:
                log.warning(
                    "queue: %s had a damaged index (%s); rebuilt it in place. Run hato queue"
                    " check --repair when convenient to reclaim its pages",
                    self.path,
                    ", ".join(rebuilt),
                )
            return bool(rebuilt)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._reader is None:
            raise QueueError(f"queue {self.url} is not open")
        return self._reader.submit(fn)

    def _report(self, quarantined: Sequence[tuple[str, str]]) -> None:
        for message_id, reason in quarantined:
            log.warning("queue: quarantined %s: %s", message_id, reason)
            if self.on_quarantine is not None:
                self.on_quarantine(message_id, reason)

    async def open(self) -> None:
        if self._writer is not None:
            return
        refuse_without_database(self.path)
        # A spool with a marker is locked before it is touched: a repair holds it.
        lock = SpoolLock(self.path, exclusive=False) if read_marker(self.path) else None
        try:
            await self._open(lock)
        except BaseException:
            if self._spool_lock is None and lock is not None:
                lock.release()
            raise

    async def _open(self, lock: SpoolLock | None) -> None:
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
            "hato-queue-writer",
            self.path,
            lambda: self._connect(write=True),
            batch=True,
            fsync=self._fsync,
        )
        writer.start()
        self._writer = writer
        # A database without an id (made by an older Hato) takes the marker's.
        fresh_id = read_marker(self.path) or new_queue_id()
        try:
            queue_id = await writer.submit(lambda conn: migrate(conn, new_queue_id=fresh_id))
            check_identity(self.path, queue_id)
            try:
                write_marker(self.path, queue_id, fsync=self._fsync)
            except OSError as exc:
                raise QueueError(f"cannot create {self.path}.hato: {exc}") from exc
            self._spool_lock = lock or SpoolLock(self.path, exclusive=False)
        except BaseException:
            await self._stop()
            raise
        if self._fsync and (not existed or lock is None):
            _fsync_dir(parent)  # the new database's or marker's directory entry
        reader = _ConnectionThread(
            "hato-queue-reader", self.path, lambda: self._connect(write=False), batch=False
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
        # Our leases end with us: the next recovery gives back whatever we still held.
        self._owners.release_all()
        lock, self._spool_lock = self._spool_lock, None
        if lock is not None:
            lock.release()

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
        events: Sequence[DeliveryEvent] = (),
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
    ) -> str:
        if not envelope.recipients:
            raise ValueError("a message needs at least one recipient")
        check_enqueue_lease(
            lease_owner,
            lease_seconds,
            held=held,
            not_before=not_before,
            idempotency_key=idempotency_key,
        )
        if lease_owner is not None:
            # Before the lease commits: recovery elsewhere must find the owner alive.
            self._owners.hold(lease_owner)
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
        rcpt_state = encode_rcpt_state([RecipientStatus(a) for a in envelope.recipients])
        state = MessageState.HELD.value if held else MessageState.QUEUED.value
        due = now if not_before is None else not_before
        lease: tuple[str, float] | tuple[()] = ()
        if lease_owner is not None:
            state = MessageState.SENDING.value
            due = now + lease_seconds
            lease = (lease_owner, due)
        payload = bytes(data)

        def insert(conn: sqlite3.Connection) -> str:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT seq, id FROM messages WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return shown_id(row[1], row[0])
            stored_sum = checksum(env_text.encode(), payload)
            mid = message_id
            # An id collides only within one microsecond and 1 in 2**20; draw again.
            for _ in range(8):
                cur = conn.execute(
                    _INSERT_LEASED if lease else _INSERT,
                    (
                        mid,
                        state,
                        now,
                        due,
                        idempotency_key,
                        env_text,
                        rcpt_state,
                        stored_sum,
                        payload,
                        *lease,
                    ),
                )
                if cur.rowcount == 1:
                    insert_events(conn, stamped(events, mid))
                    return mid
                mid = new_message_id(lambda: now)
            raise QueueError("could not allocate a unique message id")

        message_id = await self._change(insert)
        self._work.set()
        return message_id

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        if limit <= 0:
            return []
        # Before the first lease of this owner commits: from then on recovery in another
        # process must find the owner alive for as long as this process runs.
        self._owners.hold(owner)
        now = self._clock()
        lease_until = now + lease_seconds
        if not self._row_by_row:
            try:
                claimed, bad, reindexed = await self._change(
                    lambda conn: _claim_due(conn, owner, now, limit, lease_until), durable=False
                )
            except QueueDamaged as exc:
                # A damaged page read inside the write transaction spoils all of it; from
                # now on rows are found and read outside it, one by one.
                log.warning(
                    "queue: %s; claiming row by row (slowly) from now on, delivering what"
                    " can be read",
                    exc,
                )
                self._row_by_row = True
            else:
                if reindexed:
                    log.warning(
                        "queue: %s: the due index disagreed with the table; rebuilt it",
                        self.path,
                    )
                self._report(bad)
                return claimed
        return await self._claim_row_by_row(owner, now, limit, lease_until)

    async def _claim_row_by_row(
        self, owner: str, now: float, limit: int, lease_until: float
    ) -> list[StoredMessage]:
        """``claim`` on a file with a damaged page that is not an index: the reader finds
        and reads due rows one by one (outside any write transaction, where a damaged
        page costs nothing but its own rows), then the writer leases those it could read,
        each only if it is still due."""
        lost = self._lost
        found = await self._read(lambda conn: _due_rows_one_by_one(conn, now, limit, lost))
        good, bad, newly_lost = found

        def lease(conn: sqlite3.Connection) -> list[int]:
            for seq, _, reason in bad:
                _quarantine(conn, seq, reason)
            leased = []
            for seq, _ in good:
                cur = conn.execute(
                    f"{_LEASE} AND {DUE} AND next_attempt_at <= ?",
                    (owner, lease_until, lease_until, seq, now),
                )
                if cur.rowcount:
                    leased.append(seq)
            return leased

        leased = set(await self._write(lease, durable=False))
        self._report([*newly_lost, *((mid, reason) for _, mid, reason in bad)])
        claimed = []
        for seq, msg in good:
            if seq in leased:
                msg.state = MessageState.SENDING
                msg.lease_owner = owner
                msg.lease_until = msg.next_attempt_at = lease_until
                claimed.append(msg)
        return claimed

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
        """See :class:`hato.queue.base.Queue`. Records arriving together share the
        writer's transaction, committed without an fsync of its own (``durable=False``):
        the next durable commit's fsync covers it (the WAL is written in order). A power
        cut may lose the last records, never a message: a lost record leaves the message
        ``sending`` under a lease whose owner is gone, which recovery gives back, so it is
        delivered once more (at-least-once)."""
        now = self._clock()
        bad: list[tuple[str, str]] = []

        def record(conn: sqlite3.Connection) -> MessageState | None:
            bad.clear()  # a second try after an index rebuild starts afresh
            rows = _fetch(
                conn,
                "SELECT seq, state, lease_owner, attempts, last_reply, envelope, rcpt_state"
                " FROM messages WHERE id = ?",
                (message_id,),
            )
            row = rows[0] if rows else None
            if row is None or row[1] != MessageState.SENDING.value or row[2] != owner:
                return None
            seq, _, _, attempts, last_reply, envelope, rcpt_state = row
            try:
                if isinstance(attempts, bool) or not isinstance(attempts, int):
                    raise Unreadable(f"attempts has the wrong type ({type(attempts).__name__})")
                _, addresses, _ = decode_envelope(envelope)
                recipients = decode_recipients(addresses, rcpt_state)
            except Unreadable as exc:
                _quarantine(conn, seq, str(exc))
                bad.append((message_id, str(exc)))
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
                    reply or (last_reply if isinstance(last_reply, str) else ""),
                    retry_at if retry_at is not None else now,
                    encode_rcpt_state(updated),
                    seq,
                ),
            )
            insert_events(conn, events)
            return state

        state = await self._change(record, durable=False)
        self._report(bad)
        return state

    async def record_bounce(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        bad: list[tuple[str, str]] = []

        def record_bounce(conn: sqlite3.Connection) -> MessageState | None:
            bad.clear()
            rows = _fetch(
                conn,
                "SELECT seq, state, envelope, rcpt_state FROM messages WHERE id = ?",
                (message_id,),
            )
            if not rows:
                return None
            seq, stored_state, envelope, rcpt_state = rows[0]
            try:
                state = MessageState(stored_state)
                if state is not MessageState.QUARANTINED:
                    _, addresses, _ = decode_envelope(envelope)
                    recipients = decode_recipients(addresses, rcpt_state)
            except (Unreadable, ValueError) as exc:
                _quarantine(conn, seq, str(exc))
                bad.append((message_id, str(exc)))
                state = MessageState.QUARANTINED
            if state is not MessageState.QUARANTINED:
                updated, changed = apply_bounce(recipients, outcomes)
                if changed:
                    state = state_after_bounce(state, updated)
                    conn.execute(
                        "UPDATE messages SET state = ?, rcpt_state = ? WHERE seq = ?",
                        (state.value, encode_rcpt_state(updated), seq),
                    )
            insert_events(conn, events)
            return state

        state = await self._change(record_bounce)
        self._report(bad)
        return state

    async def release(self, message_id: str, *, owner: str) -> None:
        now = self._clock()

        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, lease_owner = '', lease_until = 0, next_attempt_at = ?"
                " WHERE id = ? AND state = 'sending' AND lease_owner = ?",
                (now, message_id, owner),
            )

        await self._change(release, durable=False)
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

        await self._change(requeue)
        self._work.set()

    async def delete(self, message_id: str) -> None:
        # "#<seq>" names a row whose id cannot be read (as list shows it).
        where, key = _where_id(message_id)

        def delete(conn: sqlite3.Connection) -> None:
            cur = conn.execute(f"DELETE FROM messages WHERE {where}", (key,))
            if cur.rowcount == 0:
                raise MessageNotFound(message_id)

        await self._change(delete)

    # -- reads ---------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage:
        where, key = _where_id(message_id)

        def get(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"{_WITH_DATA} WHERE {where}", (key,)
            ).fetchone()
            return row

        row = await self._read(get)
        if row is None:
            raise MessageNotFound(message_id)
        msg, reason = for_display(row, verify=True)
        if reason and row[2] != MessageState.QUARANTINED.value:
            seq = row[0]
            await self._change(lambda conn: _quarantine(conn, seq, reason))
            self._report([(msg.id, reason)])
        return msg

    async def find(self, idempotency_key: str) -> str | None:
        def find(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT seq, id FROM messages WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            return None if row is None else shown_id(row[1], row[0])

        return await self._read(find)

    async def list(
        self, *, states: Sequence[MessageState] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        wanted = None if states is None else [MessageState(s).value for s in states]

        def list_rows(conn: sqlite3.Connection) -> list[StoredMessage]:
            if wanted is not None and not wanted:
                return []
            try:
                if wanted is None:
                    rows = conn.execute(
                        f"{_WITHOUT_DATA} ORDER BY seq DESC LIMIT ?", (limit,)
                    ).fetchall()
                else:
                    marks = ", ".join("?" * len(wanted))
                    rows = conn.execute(
                        f"{_WITHOUT_DATA} WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?",
                        (*wanted, limit),
                    ).fetchall()
            except sqlite3.DatabaseError as exc:
                if not _fallback(exc):
                    raise
                return _list_row_by_row(conn, wanted, limit)
            return [for_display(row, verify=False)[0] for row in rows]

        return await self._read(list_rows)

    async def oldest(self) -> dict[MessageState, float]:
        def oldest(conn: sqlite3.Connection) -> list[tuple[object, float]]:
            return conn.execute(
                "SELECT state, min(created_at) FROM messages GROUP BY state"
            ).fetchall()

        result: dict[MessageState, float] = {}
        for state, created in await self._read(oldest):
            known = _STATE_OF.get(state, MessageState.QUARANTINED)
            result[known] = min(result.get(known, float(created)), float(created))
        return result

    async def ping(self) -> None:
        now = repr(self._clock())

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO hato_meta (key, value) VALUES ('probe', ?)", (now,)
            )

        await self._change(probe)

    async def counts(self) -> dict[MessageState, int]:
        def counts(conn: sqlite3.Connection) -> list[tuple[object, int]]:
            try:
                return conn.execute(
                    "SELECT state, count(*) FROM messages GROUP BY state"
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                if not _fallback(exc):
                    raise
                return [(m.state.value, 1) for m in _list_row_by_row(conn, None, None)]

        result = dict.fromkeys(MessageState, 0)
        for state, n in await self._read(counts):
            # A state that is not one of ours is a damaged row: it counts as quarantined.
            result[_STATE_OF.get(state, MessageState.QUARANTINED)] += n
        return result

    async def recover(self) -> RecoveryReport:
        now = self._clock()
        report = RecoveryReport()
        mark = await self._read(_clean_mark)
        if mark == "0":  # the last process that ran recover() did not close: a crash
            found = await asyncio.to_thread(startup_check, self.path)
            report.integrity = found.summary()
            if found.problems:
                raise _damaged(self.path, report.integrity)
        owners = self._owners

        def expire(conn: sqlite3.Connection) -> int:
            back = (
                "UPDATE messages SET state = CASE WHEN attempts > 0 THEN 'deferred'"
                " ELSE 'queued' END, lease_owner = '', lease_until = 0,"
                " next_attempt_at = min(next_attempt_at, ?) WHERE state = 'sending'"
            )
            expired: int = conn.execute(back + " AND lease_until <= ?", (now, now)).rowcount
            # Leases of owners whose lock is free (the process ended, however) come back
            # now rather than when their lease runs out, minutes later.
            owners_now = [
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT lease_owner FROM messages WHERE state = 'sending'"
                )
                if isinstance(row[0], str)
            ]
            for owner in filter(owners.is_gone, owners_now):
                expired += conn.execute(back + " AND lease_owner = ?", (now, owner)).rowcount
            # Marked unclean until our close() says otherwise: a crash from here on
            # leaves it so, and the next start sweeps.
            conn.execute("INSERT OR REPLACE INTO hato_meta (key, value) VALUES ('clean', '0')")
            return expired

        def quarantine(conn: sqlite3.Connection) -> list[str]:
            for seq, message_id, reason in bad:
                log.warning("queue: quarantined %s: %s", message_id, reason)
                _quarantine(conn, seq, reason)
            return [
                shown_id(r[1], r[0])
                for r in conn.execute(
                    "SELECT seq, id FROM messages WHERE state = 'quarantined' ORDER BY seq"
                )
            ]

        report.leases_expired = await self._change(expire)
        self._marks_clean = True
        owners.sweep()
        bad: list[tuple[int, str, str]] = []
        if mark != "1":  # not clean (or never started): sweep every undelivered record
            # Its own connection and thread: at a million messages the sweep takes
            # seconds, and get/list/wait_for_work on the reader should not wait for it.
            try:
                bad = await asyncio.to_thread(_sweep, lambda: self._connect(write=False))
            except sqlite3.Error as exc:
                raise _translate(exc, "queue recovery failed", self.path) from exc
        report.quarantined = await self._change(quarantine)
        if report.leases_expired:
            self._work.set()
        return report

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a message was enqueued, released or requeued in this process, when
        the earliest scheduled message falls due, or after ``timeout`` seconds."""
        if not self._work.is_set():

            def next_due(conn: sqlite3.Connection) -> float | None:
                try:
                    value = conn.execute(f"SELECT min(next_attempt_at) {_DUE_ROWS}").fetchone()[0]
                except sqlite3.DatabaseError as exc:
                    if not _fallback(exc):
                        raise
                    return None  # a damaged index: claim finds the way; wait the timeout
                return float(value) if isinstance(value, int | float) else None

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

    # -- delivery events (hato.queue.sqlite_events) ----------------------------------

    async def add_events(self, events: Sequence[DeliveryEvent]) -> int:
        if not events:
            return 0
        batch = list(events)
        return await self._change(lambda conn: insert_events(conn, batch))

    async def events(
        self,
        *,
        after: str = "",
        queue_id: str | None = None,
        envid: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> EventPage:
        return await self._read(
            lambda conn: select_events(
                conn, after=after, queue_id=queue_id, envid=envid, since=since, limit=limit
            )
        )

    async def prune_events(self, before: float) -> int:
        return await self._change(lambda conn: delete_events_before(conn, before), durable=False)

    async def get_cursor(self, name: str) -> str:
        def read(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT value FROM hato_meta WHERE key = ?", (_CURSOR + name,))
            found = row.fetchone()
            return str(found[0]) if found is not None else ""

        return await self._read(read)

    async def set_cursor(self, name: str, value: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO hato_meta (key, value) VALUES (?, ?)",
                (_CURSOR + name, value),
            )

        await self._change(write)


# Cursors of event readers live in ``hato_meta`` under this key prefix.
_CURSOR = "cursor:"


# A damaged file is rebuilt in place at most this often (seconds): each try reads the
# whole table.
_HEAL_INTERVAL = 60.0

_STATE_OF: dict[object, MessageState] = {s.value: s for s in MessageState}
_CLAIMABLE = frozenset({"queued", "deferred", "sending"})


def _due(next_attempt_at: object, now: float) -> bool:
    return isinstance(next_attempt_at, int | float) and next_attempt_at <= now


def _where_id(message_id: str) -> tuple[str, str | int]:
    """The WHERE clause for a message id, or for ``#<seq>`` (a row whose id is unreadable)."""
    if message_id.startswith("#") and message_id[1:].isdigit():
        return "seq = ?", int(message_id[1:])
    return "id = ?", message_id


def _clean_mark(conn: sqlite3.Connection) -> object:
    """``"1"`` after a clean stop, ``"0"`` after a crash, ``None`` before the first start."""
    row = conn.execute("SELECT value FROM hato_meta WHERE key = 'clean'").fetchone()
    return None if row is None else row[0]


def _claim_due(
    conn: sqlite3.Connection, owner: str, now: float, limit: int, lease_until: float
) -> tuple[list[StoredMessage], list[tuple[str, str]], bool]:
    """The claim (in the writer's transaction): the due rows, oldest first, checked and
    leased; the unreadable ones quarantined, ``(id, reason)`` each; and whether the due
    index had to be rebuilt."""
    rows = _fetch(
        conn,
        f"{_SELECT_WITH_DATA} {_DUE_ROWS} AND next_attempt_at <= ? ORDER BY next_attempt_at, seq"
        " LIMIT ?",
        (now, limit),
    )
    claimed: list[StoredMessage] = []
    leases: list[tuple[str, float, float, int]] = []
    bad: list[tuple[str, str]] = []
    reindexed = False
    for row in rows:
        if row[2] not in _CLAIMABLE or (
            row[2] == MessageState.SENDING.value and not _due(row[8], now)
        ):
            # The due index names a row the table says is not due (a live lease;
            # next_attempt_at comes from the index itself): a damaged entry that would
            # hand the row out again and again. SQLite rebuilds the index from the table.
            if not reindexed:
                conn.execute("REINDEX messages_due")
                reindexed = True
            continue
        try:
            msg = decode(row, verify=True)
        except Unreadable as exc:
            bad.append((shown_id(row[1], row[0]), str(exc)))
            _quarantine(conn, row[0], str(exc))
            continue
        msg.state = MessageState.SENDING
        msg.lease_owner = owner
        msg.lease_until = msg.next_attempt_at = lease_until
        claimed.append(msg)
        leases.append((owner, lease_until, lease_until, row[0]))
    conn.executemany(_LEASE, leases)
    return claimed, bad, reindexed


def _due_rows_one_by_one(
    conn: sqlite3.Connection, now: float, limit: int, lost: dict[int, str]
) -> tuple[list[tuple[int, StoredMessage]], list[tuple[int, str, str]], list[tuple[str, str]]]:
    """Up to ``limit`` due messages read one row at a time, oldest due first: the good
    ones ``(seq, message)``, the unreadable ones ``(seq, id, reason)``, and rows the file
    cannot give back (reported once each, remembered in ``lost``)."""
    newly_lost: list[tuple[str, str]] = []

    def gone(seq: int, exc: sqlite3.DatabaseError) -> None:
        if not is_corrupt(exc):
            raise exc
        lost[seq] = f"unreadable row ({exc})"
        newly_lost.append((f"#{seq}", lost[seq]))

    due: list[tuple[float, int]] = []
    for seq in readable_seqs(conn):
        if seq in lost:
            continue
        try:
            row = conn.execute(
                "SELECT state, next_attempt_at FROM messages WHERE seq = ?", (seq,)
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            gone(seq, exc)
            continue
        if (
            row is not None
            and row[0] in _CLAIMABLE
            and isinstance(row[1], int | float)
            and row[1] <= now
        ):
            due.append((float(row[1]), seq))
    good: list[tuple[int, StoredMessage]] = []
    bad: list[tuple[int, str, str]] = []
    for _, seq in sorted(due):
        if len(good) >= limit:
            break
        try:
            row = conn.execute(f"{_WITH_DATA} WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.DatabaseError as exc:
            gone(seq, exc)
            continue
        if row is None:
            continue
        try:
            good.append((seq, decode(row, verify=True)))
        except Unreadable as exc:
            bad.append((seq, shown_id(row[1], seq), str(exc)))
    return good, bad, newly_lost


def _list_row_by_row(
    conn: sqlite3.Connection, wanted: Sequence[str] | None, limit: int | None
) -> list[StoredMessage]:
    """``list`` on a file with a damaged page: newest first, row by row; a row the file
    cannot give back shows as quarantined under ``#<seq>``."""
    found: list[StoredMessage] = []
    for seq in reversed(readable_seqs(conn)):
        if limit is not None and len(found) >= limit:
            break
        try:
            row = conn.execute(f"{_WITHOUT_DATA} WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            msg = damaged_shell((seq,), f"unreadable row ({exc})")
        else:
            if row is None:
                continue
            msg = for_display(row, verify=False)[0]
        if wanted is None or msg.state.value in wanted:
            found.append(msg)
    return found


def _sweep(connect: Callable[[], sqlite3.Connection]) -> list[tuple[int, str, str]]:
    """``(seq, id, reason)`` of every undelivered record that is damaged.

    Finished and quarantined messages are never delivered again, so only the rest need
    proving readable. Rows stream through one at a time (memory stays flat).
    """
    conn = connect()
    try:
        bad = []
        for row in conn.execute(
            f"{_WITH_DATA} WHERE state NOT IN ('sent', 'failed', 'quarantined')"
        ):
            reason = damage(row)
            if reason:
                bad.append((row[0], shown_id(row[1], row[0]), reason))
        return bad
    finally:
        conn.close()


def _missing(conn: sqlite3.Connection, message_id: str) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is None


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
