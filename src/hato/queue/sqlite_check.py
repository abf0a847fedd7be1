"""Checking and repairing a SQLite spool: ``hato queue check [--repair]`` and the start-up check.

* :func:`check` reads the whole file: SQLite's ``integrity_check`` (every page, every
  index against its table), then every row through the queue's own decoder. It reports
  the problems, the counts by state, the rows that cannot be read (and are not yet
  quarantined) and the rows the file cannot even give back.
* :func:`repair` copies what can be read into a new file and swaps it in: good rows as
  they are, unreadable rows as ``quarantined`` with the reason (their bytes kept where
  the new file can hold them), rows on damaged pages reported as lost. The old file and
  its WAL are kept beside it as ``queue.db.damaged-<time>``. It takes the spool lock
  exclusively (no Hato may have the queue open), and a note file makes the swap
  resumable: a crash in the middle leaves the note, every open refuses, and the next
  ``--repair`` finishes the swap.
* :func:`startup_check` is what ``recover`` runs after an unclean stop: ``quick_check``
  (pages only, O(N)), and when it finds damage, :func:`rebuild_damaged_indexes` in place.

Rebuilding an index in place: a damaged index cannot be dropped or reindexed by SQLite
(both walk its pages and fail), and while it is damaged every write to the table fails,
so nothing can be claimed or recorded. If the table itself reads whole, the index's
entry is removed from ``sqlite_master`` without touching its pages (``writable_schema``)
and the index is created anew from the table. Its old pages are leaked (``integrity_check``
reports them as never used; harmless) until the next ``--repair`` or ``VACUUM``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hato.errors import QueueDamaged, QueueError
from hato.events import decode as decode_event
from hato.queue.base import MessageState
from hato.queue.sqlite_events import insert_events
from hato.queue.sqlite_files import (
    SpoolLock,
    marker_path,
    new_queue_id,
    read_marker,
    repair_note_path,
    write_marker,
)
from hato.queue.sqlite_records import (
    COLUMN_NAMES,
    COLUMNS,
    INDEXES,
    BadText,
    DamagedSchema,
    Unreadable,
    check_schema,
    decode,
    is_corrupt,
    migrate,
    named_seqs,
    readable_seqs,
    text_factory,
)

Progress = Callable[[int, int], None]

_LEAKED_PAGE = re.compile(r"^Page \d+ is never used$")
_ROW_VALUE = re.compile(r"^(NULL value in |CHECK constraint failed|\w+ value in \S+$)")
_ROW = f"SELECT {COLUMNS}, data FROM messages"
_FINAL = frozenset({MessageState.SENT.value, MessageState.FAILED.value})


def connect(path: str) -> sqlite3.Connection:
    """A connection that reads every cell, whatever it holds (see ``text_factory``)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.text_factory = text_factory
    return conn


def integrity_problems(conn: sqlite3.Connection, *, quick: bool) -> list[str]:
    """What ``PRAGMA quick_check``/``integrity_check`` reports, one problem per item
    (``[]`` for ``ok``)."""
    pragma = "quick_check" if quick else "integrity_check"
    try:
        rows = conn.execute(f"PRAGMA {pragma}(100)").fetchall()
    except UnicodeDecodeError:  # SQLite's message quotes a schema that is not text
        return ["damaged schema: its schema is not valid text"]
    except sqlite3.DatabaseError as exc:
        if not quick:  # integrity_check gives up on some damage that quick_check lists
            return integrity_problems(conn, quick=True) or [str(exc)]
        return [str(exc)]
    problems = []
    for (text,) in rows:
        for line in str(text).splitlines():
            line = line.strip()
            if line and line != "ok" and not line.startswith("*** in database"):
                problems.append(line)
    return problems


def harmless(problem: str) -> bool:
    """Not damage of the file's structure: a leaked page (after an index rebuild, or a
    crash in a page allocation; ``--repair`` or ``VACUUM`` gives it back), or a value a
    row should not hold (the queue's decoder quarantines that row, like any other)."""
    return bool(_LEAKED_PAGE.match(problem) or _ROW_VALUE.match(problem))


def leaked(problem: str) -> bool:
    return bool(_LEAKED_PAGE.match(problem))


def _table_reads_whole(conn: sqlite3.Connection) -> bool:
    try:
        for _ in conn.execute(
            "SELECT id, state, next_attempt_at, idempotency_key FROM messages NOT INDEXED"
        ):
            pass
    except sqlite3.DatabaseError as exc:
        if is_corrupt(exc):
            return False
        raise
    return True


def damaged_indexes(conn: sqlite3.Connection) -> list[str]:
    """The rebuildable indexes that cannot be read through (or are missing)."""
    damaged = []
    for name, (_, probe) in INDEXES.items():
        try:
            conn.execute(probe).fetchall()
        except sqlite3.DatabaseError as exc:
            if not (is_corrupt(exc) or "no such index" in str(exc)):
                raise
            damaged.append(name)
    return damaged


def rebuild_damaged_indexes(path: str) -> list[str]:
    """Rebuild in place the indexes that cannot be read, when the table itself reads
    whole (see the module docstring); the names of those rebuilt."""
    conn = connect(path)
    try:
        if not _table_reads_whole(conn):
            return []
        damaged = damaged_indexes(conn)
        if not damaged:
            return []
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name in damaged:
                conn.execute("DELETE FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
            version = int(conn.execute("PRAGMA schema_version").fetchone()[0])
            # Other connections (the queue's writer and reader) see the new version and
            # read the schema again before their next statement.
            conn.execute(f"PRAGMA schema_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA writable_schema = OFF")
    finally:
        conn.close()
    conn = connect(path)  # a connection that never knew the old index
    try:
        for name in damaged:
            conn.execute(INDEXES[name][0])
    finally:
        conn.close()
    return damaged


@dataclass(slots=True)
class StartupCheck:
    """What :func:`startup_check` found: ``problems`` left (start-up must stop), indexes
    rebuilt, pages leaked."""

    problems: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    leaked_pages: int = 0

    def summary(self) -> str:
        """One line for stderr and the log."""
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return f"quick_check found damage: {self.problems[0]}{more}"
        said = "quick_check after an unclean stop: ok"
        if self.rebuilt:
            said += f"; damaged index {', '.join(self.rebuilt)} rebuilt"
        if self.leaked_pages:
            said += f"; {self.leaked_pages} unused page(s), reclaimed by hato queue check --repair"
        return said


def startup_check(path: str) -> StartupCheck:
    """``quick_check`` the spool; rebuild damaged indexes in place; check again."""
    result = StartupCheck()
    for attempt in (1, 2):
        conn = connect(path)
        try:
            found = integrity_problems(conn, quick=True)
        finally:
            conn.close()
        result.problems = [p for p in found if not harmless(p)]
        result.leaked_pages = sum(map(leaked, found))
        if not result.problems or attempt == 2:
            break
        rebuilt = rebuild_damaged_indexes(path)
        if not rebuilt:
            break
        result.rebuilt = rebuilt
    return result


# -- check -----------------------------------------------------------------------------


@dataclass(slots=True)
class CheckReport:
    """What :func:`check` found in one spool file."""

    path: str
    problems: list[str] = field(default_factory=list)
    leaked_pages: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not (self.problems or self.unreadable or self.lost)


def _rows(conn: sqlite3.Connection) -> Iterator[tuple[int, Sequence[Any] | None, str]]:
    """Every row the file can give back, as ``(seq, row, "")``, and every one it cannot,
    as ``(seq, None, reason)``: one scan while the table reads, else row by row."""
    seen: set[int] = set()
    try:
        for row in conn.execute(f"{_ROW} NOT INDEXED ORDER BY seq"):
            if row[0] not in seen:  # a damaged page can lead the scan to a leaf twice
                seen.add(row[0])
                yield row[0], row, ""
        complete = True
    except sqlite3.DatabaseError as exc:
        if not is_corrupt(exc):
            raise
        complete = False
    named = named_seqs(conn)
    # A scan that ends without an error may still have missed cells of a damaged page:
    # the rows an index names and the scan did not meet are read (or reported) one by one.
    candidates = sorted(named - seen) if complete else readable_seqs(conn)
    for seq in candidates:
        if seq in seen:
            continue
        try:
            row = conn.execute(f"{_ROW} WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            yield seq, None, str(exc)
            continue
        if row is not None:
            yield seq, row, ""
        elif seq in named:
            yield seq, None, "an index names the row, the table no longer has it"


def _count_rows(conn: sqlite3.Connection) -> int:
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.DatabaseError:
        return 0


def _open_for_check(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise QueueError(f"no queue database at {path}")
    conn = connect(path)
    try:
        conn.execute("PRAGMA query_only = 1")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise QueueDamaged(f"the queue database {path} cannot be opened: {exc}") from exc
    return conn


def schema_damage(conn: sqlite3.Connection) -> str:
    """Why the file's schema is not the one Hato writes; ``""`` when it is."""
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    except UnicodeDecodeError:
        return "its schema is not valid text"
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if columns != list(COLUMN_NAMES):
        return f"the messages table has other columns than Hato's ({columns!r})"
    try:
        check_schema(conn)
    except DamagedSchema as exc:
        return str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return ""


_PAGE = 8192  # the spool's page size (sqlite.py sets it on a new database)


def _with_page_one_replaced(path: str, scratch: str) -> sqlite3.Connection:
    """A copy of ``path`` whose first page (the file header and the schema) is the one
    Hato writes in a new spool.

    A spool's tables and indexes are created in one order on a new file, so their root
    pages are always the same numbers; only their names and SQL live on page 1. With a
    sound page 1 put back, every other page reads as it is. (The header's page count is
    set from the file's size; free pages are forgotten: the copy is only read.)
    """
    template = scratch + ".template"
    conn = sqlite3.connect(template, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size = {_PAGE}")
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("BEGIN")
        migrate(conn, new_queue_id="0")
        conn.execute("COMMIT")
    finally:
        conn.close()
    try:
        with open(template, "rb") as f:
            page = bytearray(f.read(_PAGE))
    finally:
        os.unlink(template)
    shutil.copyfile(path, scratch)
    pages = max(1, os.path.getsize(scratch) // _PAGE)
    page[28:32] = pages.to_bytes(4, "big")  # in-header database size
    page[32:40] = bytes(8)  # no freelist
    page[92:96] = page[24:28]  # the size above is valid for this change counter
    with open(scratch, "r+b") as f:
        f.write(page)
    return _open_for_check(scratch)


def check(path: str, *, progress: Progress | None = None) -> CheckReport:
    """Read the whole spool (pages, indexes, every row) and say what is wrong."""
    report = CheckReport(path)
    if os.path.exists(path) and os.path.getsize(path) == 0:
        report.problems.append("the file is empty (0 bytes)")
        return report
    conn = _open_for_check(path)
    try:
        found = integrity_problems(conn, quick=False)
        report.problems = [p for p in found if not harmless(p)]
        report.leaked_pages = sum(map(leaked, found))
        if (why := f"damaged schema: {schema_damage(conn)}") != "damaged schema: ":
            if why not in report.problems:
                report.problems.append(why)
            return report  # rows cannot be read by name; --repair rebuilds the schema
        total = _count_rows(conn)
        for n, (seq, row, lost) in enumerate(_rows(conn), 1):
            if progress is not None and n % 1000 == 0:
                progress(n, total)
            if row is None:
                report.lost.append((seq, lost))
                continue
            state = row[2] if isinstance(row[2], str) else "?"
            try:
                decode(row, verify=state not in _FINAL)
            except Unreadable as exc:
                if state == MessageState.QUARANTINED.value:
                    report.counts[state] += 1
                else:
                    report.counts[MessageState.QUARANTINED.value] += 1
                    report.unreadable.append((_shown(row[1], seq), str(exc)))
                continue
            report.counts[state] += 1
    except sqlite3.DatabaseError as exc:
        if not is_corrupt(exc):
            raise
        report.problems.append(str(exc))
    finally:
        conn.close()
    return report


def _shown(value: object, seq: int) -> str:
    return value if isinstance(value, str) and value else f"#{seq}"


# -- repair ----------------------------------------------------------------------------


@dataclass(slots=True)
class RepairReport:
    """What :func:`repair` did."""

    copied: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)
    kept_as: str = ""
    finished_earlier: bool = False


def _raw(value: object) -> str | bytes:
    """A cell of an unreadable row as the new file can hold it (TEXT or BLOB)."""
    if isinstance(value, BadText):
        return value.raw
    if isinstance(value, str | bytes):
        return value
    return "" if value is None else str(value)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def _quarantined_values(row: Sequence[Any], seq: int, reason: str) -> list[object]:
    stored_reply = row[6]
    if row[2] == MessageState.QUARANTINED.value and isinstance(stored_reply, str):
        reply = stored_reply
    else:
        reply = f"quarantined: {reason}"
    attempts = row[5] if isinstance(row[5], int) and not isinstance(row[5], bool) else 0
    return [
        seq,
        _shown(row[1], seq),
        MessageState.QUARANTINED.value,
        _number(row[3]),
        _number(row[4]),
        attempts,
        reply,
        "",
        0.0,
        row[9] if isinstance(row[9], str) else None,
        _raw(row[10]),
        _raw(row[11]),
        row[12] if isinstance(row[12], bytes) else b"",
        row[13] if isinstance(row[13], bytes) else _raw(row[13]),
    ]


_INSERT = f"INSERT INTO messages ({COLUMNS}, data) VALUES ({', '.join('?' * 14)})"


def _insert(conn: sqlite3.Connection, values: list[object]) -> None:
    """Insert; a second row with a row number, id or idempotency key taken already
    (damage can copy one) keeps its record under a new number and id, without the key."""
    try:
        conn.execute(_INSERT, values)
        return
    except sqlite3.IntegrityError:
        values = list(values)
        values[0] = values[9] = None
    base = values[1]
    for n in itertools.count(1):
        values[1] = f"{base}-copy{n}"
        try:
            conn.execute(_INSERT, values)
            return
        except sqlite3.IntegrityError:
            continue


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        rows = conn.execute("SELECT key, value FROM hato_meta").fetchall()
    except sqlite3.DatabaseError:
        return {}
    return {k: v for k, v in rows if isinstance(k, str) and isinstance(v, str)}


def _queue_id_of(path: str) -> str:
    if not os.path.exists(path):
        return ""
    try:
        conn = _open_for_check(path)
    except QueueError:
        return ""
    try:
        return _meta(conn).get("queue_id", "")
    finally:
        conn.close()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        _fsync_file(os.path.dirname(os.path.abspath(path)))


def _copy_events(old: sqlite3.Connection, dst: sqlite3.Connection) -> None:
    """Copy the delivery events that read back whole; a damaged stretch of the events
    table costs its events only (they are a record, not mail)."""
    try:
        rows = old.execute("SELECT CAST(body AS BLOB) FROM events ORDER BY seq").fetchall()
    except sqlite3.DatabaseError:
        return
    for (body,) in rows:
        try:
            event = decode_event(body)
        except (ValueError, TypeError):
            continue
        insert_events(dst, [event])


def _copy(path: str, new: str, report: RepairReport, progress: Progress | None) -> None:
    old = _open_for_check(path)
    scratch = ""
    if schema_damage(old):
        old.close()
        scratch = new + ".schema"
        old = _with_page_one_replaced(path, scratch)
    dst = sqlite3.connect(new, isolation_level=None)
    try:
        dst.execute("PRAGMA page_size = 8192")
        dst.execute("PRAGMA journal_mode = DELETE")
        dst.execute("PRAGMA synchronous = OFF")  # the whole file is fsync'd before the swap
        meta = _meta(old)
        dst.execute("BEGIN")
        # The marker names the queue; a damaged id inside the file does not.
        migrate(dst, new_queue_id=read_marker(path) or meta.get("queue_id") or new_queue_id())
        total = _count_rows(old)
        for n, (seq, row, lost) in enumerate(_rows(old), 1):
            if progress is not None and n % 1000 == 0:
                progress(n, total)
            if row is None:
                report.lost.append((seq, lost))
                continue
            state = row[2]
            try:
                decode(row, verify=state not in _FINAL)
            except Unreadable as exc:
                values = _quarantined_values(row, seq, str(exc))
                if state != MessageState.QUARANTINED.value:
                    report.quarantined.append((str(values[1]), str(exc)))
            else:
                values = list(row)
            _insert(dst, values)
            report.copied += 1
        _copy_events(old, dst)
        for key, value in meta.items():
            if key != "queue_id":
                dst.execute(
                    "INSERT OR REPLACE INTO hato_meta (key, value) VALUES (?, ?)", (key, value)
                )
        # Every row of the new file was read back through the decoder: no sweep needed.
        dst.execute("INSERT OR REPLACE INTO hato_meta (key, value) VALUES ('clean', '1')")
        dst.execute("COMMIT")
        problems = integrity_problems(dst, quick=False)
        if problems:
            raise QueueError(f"the repaired copy {new} fails its own check: {problems[0]}")
    finally:
        dst.close()
        old.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            if scratch:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(scratch + suffix)


def _swap(path: str, new: str, aside: str) -> None:
    """Move the old file (and its WAL) aside and the new one in; resumable (see
    :func:`_finish`)."""
    if os.path.exists(new):
        if os.path.exists(path):
            for suffix in ("-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, aside + suffix)
            os.replace(path, aside)
        os.replace(new, path)
    _fsync_dir(path)
    os.unlink(repair_note_path(path))
    _fsync_dir(path)


def _finish(path: str) -> str | None:
    """Finish a swap a crash interrupted; the name the old file is kept under."""
    note = repair_note_path(path)
    try:
        with open(note, encoding="utf-8") as f:
            new, aside = f.read().splitlines()[:2]
    except (FileNotFoundError, ValueError):
        return None
    _swap(path, new, aside)
    return aside


def repair(
    path: str,
    *,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
) -> RepairReport:
    """Copy the readable rows of ``path`` into a new file and swap it in, keeping the
    old one as ``<path>.damaged-<time>`` (see the module docstring)."""
    report = RepairReport()
    if read_marker(path) is None:  # a spool from before markers: the lock needs one
        write_marker(path, _queue_id_of(path) or new_queue_id(), fsync=True)
    lock = SpoolLock(path, exclusive=True)
    try:
        aside = _finish(path)
        if aside is not None:
            report.kept_as, report.finished_earlier = aside, True
            return report
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            raise QueueDamaged(
                f"the queue database {path} is missing or empty: there is nothing to copy;"
                f" restore it from a backup, or delete {marker_path(path)} to start with an"
                " empty queue"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(clock()))
        new, aside = f"{path}.repaired-{stamp}", f"{path}.damaged-{stamp}"
        for leftover in (new, new + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        try:
            _copy(path, new, report, progress)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(new)
            raise
        os.chmod(new, 0o600)
        _fsync_file(new)
        note = repair_note_path(path)
        with open(note, "w", encoding="utf-8") as f:
            f.write(f"{new}\n{aside}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)
        _swap(path, new, aside)
        report.kept_as = aside
        return report
    finally:
        lock.release()
