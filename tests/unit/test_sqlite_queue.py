"""SQLite queue specifics: schema and versions, durability settings, group commit, disk
full, query plans at scale, and errors translated at the boundary."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hato.errors import ConfigError, MessageNotFound, QueueError, QueueFullError
from hato.message import Envelope
from hato.queue import open_queue
from hato.queue import sqlite as sqlite_queue
from hato.queue.base import MessageState
from hato.queue.sqlite import SCHEMA_VERSION, SQLiteQueue

ENV = Envelope("a@example.org", ["b@example.net"])
DATA = b"Subject: t\r\n\r\nbody\r\n"


def make(path: Path, **kwargs: object) -> SQLiteQueue:
    return SQLiteQueue(f"sqlite://{path}", str(path), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SQLiteQueue]:
    q = make(tmp_path / "q.db", fsync=False)
    await q.open()
    yield q
    await q.close()


async def test_open_creates_directories_and_a_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "queue.db"
    q = open_queue(f"sqlite://{path}")
    assert isinstance(q, SQLiteQueue)
    await q.open()
    await q.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM hato_schema").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"messages", "messages_due", "messages_idempotency", "messages_state"} <= tables


async def test_a_new_spool_is_private(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "queue.db"
    q = make(path)
    await q.open()
    try:
        await q.enqueue(ENV, DATA)
        for p in path.parent.iterdir():
            assert p.stat().st_mode & 0o077 == 0, p
        assert path.parent.stat().st_mode & 0o077 == 0
    finally:
        await q.close()


async def test_reopen_keeps_the_schema_and_data(tmp_path: Path) -> None:
    q = make(tmp_path / "q.db")
    await q.open()
    mid = await q.enqueue(ENV, DATA)
    await q.close()
    await q.open()  # the same object opens again
    try:
        assert (await q.get(mid)).data == DATA
    finally:
        await q.close()
    with sqlite3.connect(tmp_path / "q.db") as conn:
        assert conn.execute("SELECT count(*) FROM hato_schema").fetchone() == (1,)


async def test_an_older_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = make(path)
    await q.open()
    mid = await q.enqueue(ENV, DATA)
    await q.close()
    with sqlite3.connect(path) as conn:  # back to what version 1 created
        conn.execute("DROP TABLE hato_meta")
        conn.execute("DROP TABLE events")
        conn.execute("UPDATE hato_schema SET version = 1")
    await q.open()
    try:
        assert (await q.recover()).quarantined == []
        assert (await q.get(mid)).data == DATA
    finally:
        await q.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM hato_schema").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT value FROM hato_meta WHERE key = 'clean'").fetchone() == ("1",)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = make(path)
    await q.open()
    await q.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hato_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(QueueError, match="newer"):
        await make(path).open()


async def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"this is not sqlite" * 100)
    q = make(path)
    with pytest.raises(QueueError):
        await q.open()
    with pytest.raises(QueueError, match="not open"):
        await q.enqueue(ENV, DATA)


async def test_an_impossible_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(QueueError, match="cannot create"):
        await make(tmp_path / "file" / "sub" / "q.db").open()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite://:memory:"])
def test_urls_without_a_file_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_queue(url)


async def test_calls_on_a_closed_queue_raise(tmp_path: Path) -> None:
    q = make(tmp_path / "q.db")
    with pytest.raises(QueueError):
        await q.get("X")
    await q.open()
    await q.close()
    with pytest.raises(QueueError):
        await q.enqueue(ENV, DATA)


@pytest.mark.parametrize(("fsync", "level"), [(True, 2), (False, 1)])
async def test_fsync_setting(tmp_path: Path, fsync: bool, level: int) -> None:
    """fsync=True is WAL + synchronous=FULL: each commit flushes the WAL before the
    caller hears back. fsync=False keeps NORMAL: safe against a killed process, not
    against power loss."""
    q = make(tmp_path / "q.db", fsync=fsync)
    await q.open()
    try:
        got = await q._write(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert got == level
    finally:
        await q.close()


async def test_only_enqueues_pay_for_an_fsync(tmp_path: Path) -> None:
    """250 means durable: an enqueue commits with synchronous=FULL. Claims and delivery
    records commit with NORMAL (a power cut may cost a redelivery, never a message); the
    next FULL commit's fsync covers them, the WAL being written in order."""
    from hato.queue.base import Outcome, RecipientState

    q = make(tmp_path / "q.db", fsync=True)
    await q.open()

    def level(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    try:
        message_id = await q.enqueue(ENV, DATA)
        [claimed] = await q.claim(owner="w/1/a", limit=1, lease_seconds=60)
        assert await q._write(level, durable=False) == 1  # NORMAL for bookkeeping
        state = await q.record(
            claimed.id,
            [Outcome("b@example.net", RecipientState.SENT, "250 ok")],
            owner="w/1/a",
            retry_at=None,
        )
        assert state is MessageState.SENT
        assert await q._write(level) == 2  # FULL again for anything durable
        assert (await q.get(message_id)).state is MessageState.SENT
    finally:
        await q.close()


async def test_concurrent_enqueues_share_commits(tmp_path: Path) -> None:
    q = make(tmp_path / "q.db", fsync=True)
    await q.open()
    try:
        before_tx, before_calls = q.write_stats()
        ids = await asyncio.gather(*(q.enqueue(ENV, DATA + b"%d" % i) for i in range(300)))
        tx, calls = q.write_stats()
        assert len(set(ids)) == 300
        assert calls - before_calls == 300
        # One writer drains whatever has arrived: 300 enqueues fit in a handful of commits.
        assert tx - before_tx <= 30, (tx - before_tx, calls - before_calls)
        assert (await q.counts())[MessageState.QUEUED] == 300
    finally:
        await q.close()


async def test_one_bad_write_does_not_sink_its_batch(queue: SQLiteQueue) -> None:
    good = [queue.enqueue(ENV, DATA) for _ in range(20)]
    bad = queue.delete("0000000000000000")
    results = await asyncio.gather(*good, bad, *good[:0], return_exceptions=True)
    assert isinstance(results[-1], MessageNotFound)
    assert all(isinstance(r, str) for r in results[:-1])
    assert (await queue.counts())[MessageState.QUEUED] == 20


async def test_full_storage_raises_queue_full_and_recovers(tmp_path: Path) -> None:
    q = make(tmp_path / "q.db", fsync=False, max_bytes=512 * 1024)
    await q.open()
    try:
        stored: list[str] = []
        with pytest.raises(QueueFullError):
            for i in range(200):  # 200 x 16 KiB is far past the 512 KiB cap
                stored.append(await q.enqueue(ENV, bytes([i % 256]) * 16384))
        assert 5 < len(stored) < 40
        for mid in stored:  # everything acknowledged is intact
            assert len((await q.get(mid)).data) == 16384
        # A batch that overflows fails as a whole, each caller hears QueueFullError.
        results = await asyncio.gather(
            *(q.enqueue(ENV, b"x" * 16384) for _ in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, QueueFullError) for r in results)
        for mid in stored[:10]:
            await q.delete(mid)
        assert await q.enqueue(ENV, b"y" * 16384)
    finally:
        await q.close()


async def test_wait_for_work_wakes_when_a_deferred_message_falls_due(tmp_path: Path) -> None:
    q = make(tmp_path / "q.db", fsync=False, clock=time.time)
    await q.open()
    try:
        await q.enqueue(ENV, DATA, not_before=time.time() + 0.3)
        await q.wait_for_work(0)  # the enqueue's own wake-up
        started = time.monotonic()
        await asyncio.wait_for(q.wait_for_work(30), 10)
        assert time.monotonic() - started < 10
        assert len(await q.claim(owner="w", limit=1, lease_seconds=60)) == 1
    finally:
        await q.close()


# -- the hot path stays on indexes ------------------------------------------------------

HOT_QUERIES = {
    "claim": (
        f"{sqlite_queue._SELECT_WITH_DATA} {sqlite_queue._DUE_ROWS} AND next_attempt_at <= ?"
        " ORDER BY next_attempt_at, seq LIMIT ?",
        (0.0, 10),
        "USING INDEX messages_due",
    ),
    "next due": (
        f"SELECT min(next_attempt_at) {sqlite_queue._DUE_ROWS}",
        (),
        "INDEX messages_due",
    ),
    "by id": ("SELECT seq FROM messages WHERE id = ?", ("X",), "INDEX sqlite_autoindex"),
    "by idempotency key": (
        "SELECT id FROM messages WHERE idempotency_key = ?",
        ("k",),
        "INDEX messages_idempotency",
    ),
    # A rowid walk from the end that stops after LIMIT rows.
    "list": (f"{sqlite_queue._WITHOUT_DATA} ORDER BY seq DESC LIMIT ?", (10,), "SCAN messages"),
    "list held": (
        f"{sqlite_queue._WITHOUT_DATA} WHERE state IN (?) ORDER BY seq DESC LIMIT ?",
        ("held", 10),
        "INDEX messages_state",
    ),
}


@pytest.mark.parametrize("analyze", [False, True], ids=["fresh", "analyzed"])
@pytest.mark.parametrize("name", sorted(HOT_QUERIES))
async def test_hot_queries_use_indexes(
    queue: SQLiteQueue, tmp_path: Path, name: str, analyze: bool
) -> None:
    """The planner's choice, with and without statistics, on a queue where most rows
    are claimable (the shape that tempts it into a sort of every queued row)."""
    await asyncio.gather(
        *(queue.enqueue(ENV, DATA, held=i % 5 == 0, idempotency_key=f"k{i}") for i in range(500))
    )
    sql, params, expected = HOT_QUERIES[name]
    with sqlite3.connect(tmp_path / "q.db") as conn:
        if analyze:
            conn.execute("ANALYZE")
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert expected in plan, plan
    assert "TEMP B-TREE" not in plan, plan
