"""Torn and corrupted SQLite records: detected, quarantined, kept, never delivered.

Each case damages one row behind the queue's back (as a crash on lying hardware, a bad
sector or a careless hand would) and checks that ``recover``, ``claim`` and ``get`` all
refuse to hand it out while the healthy messages flow on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hato.message import Envelope
from hato.queue.base import MessageState, Outcome, RecipientState
from hato.queue.sqlite import SQLiteQueue

ENV = Envelope("a@example.org", ["b@example.net", "c@example.net"])
DATA = b"Subject: t\r\n\r\n" + b"line of body text\r\n" * 200

DAMAGE = {
    "flipped byte in data": "UPDATE messages SET data = CAST(substr(data, 1, 100) ||"
    " X'00' || substr(data, 102) AS BLOB) WHERE id = ?",
    "truncated data": "UPDATE messages SET data = substr(data, 1, 1000) WHERE id = ?",
    "data as text": "UPDATE messages SET data = CAST(data AS TEXT) WHERE id = ?",
    "altered envelope": "UPDATE messages SET envelope = replace(envelope, 'b@example.net',"
    " 'evil@example.net') WHERE id = ?",
    "torn envelope": "UPDATE messages SET envelope = substr(envelope, 1, 10) WHERE id = ?",
    "torn recipient state": "UPDATE messages SET rcpt_state = substr(rcpt_state, 1, 7)"
    " WHERE id = ?",
    "recipient state of another shape": "UPDATE messages SET rcpt_state = '[[1,2]]' WHERE id = ?",
    "unknown state": "UPDATE messages SET state = 'qu-eued' WHERE id = ?",
    "lost checksum": "UPDATE messages SET checksum = X'' WHERE id = ?",
}


def damage(path: Path, message_id: str, sql: str) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute(sql, (message_id,)).rowcount == 1


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "q.db"


@pytest.fixture
async def queue(path: Path) -> AsyncIterator[SQLiteQueue]:
    q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await q.open()
    yield q
    await q.close()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_recover_quarantines_damaged_records(
    queue: SQLiteQueue, path: Path, kind: str
) -> None:
    before = await queue.enqueue(ENV, DATA)
    bad = await queue.enqueue(ENV, DATA)
    after = await queue.enqueue(ENV, DATA)
    damage(path, bad, DAMAGE[kind])

    report = await queue.recover()
    assert report.quarantined == [bad]

    msg = await queue.get(bad)
    assert msg.state is MessageState.QUARANTINED
    assert msg.last_reply.startswith("quarantined:")
    assert [m.id for m in await queue.list(states=[MessageState.QUARANTINED])] == [bad]
    assert (await queue.counts())[MessageState.QUARANTINED] == 1

    claimed = await queue.claim(owner="w", limit=10, lease_seconds=60)
    assert sorted(m.id for m in claimed) == sorted([before, after])
    assert all(m.data == DATA for m in claimed)

    # Kept until the operator deletes it; never released by requeue.
    await queue.requeue(bad)
    assert (await queue.get(bad)).state is MessageState.QUARANTINED
    await queue.delete(bad)
    assert (await queue.counts())[MessageState.QUARANTINED] == 0


@pytest.mark.parametrize("kind", ["flipped byte in data", "torn recipient state"])
async def test_claim_checks_every_record_it_hands_out(
    queue: SQLiteQueue, path: Path, kind: str
) -> None:
    bad = await queue.enqueue(ENV, DATA)
    good = await queue.enqueue(ENV, DATA)
    damage(path, bad, DAMAGE[kind])
    claimed = await queue.claim(owner="w", limit=10, lease_seconds=60)
    assert [m.id for m in claimed] == [good]
    assert (await queue.get(bad)).state is MessageState.QUARANTINED
    assert (await queue.recover()).quarantined == [bad]


async def test_get_notices_damage_and_quarantines(queue: SQLiteQueue, path: Path) -> None:
    bad = await queue.enqueue(ENV, DATA)
    damage(path, bad, DAMAGE["truncated data"])
    assert (await queue.get(bad)).state is MessageState.QUARANTINED
    assert await queue.claim(owner="w", limit=10, lease_seconds=60) == []


async def test_damage_in_a_half_delivered_message(queue: SQLiteQueue, path: Path) -> None:
    """A message with one recipient delivered and one pending is quarantined whole:
    nothing more of it goes out."""
    mid = await queue.enqueue(ENV, DATA)
    await queue.claim(owner="w", limit=1, lease_seconds=60)
    await queue.record(
        mid,
        [
            Outcome("b@example.net", RecipientState.SENT, "250 ok"),
            Outcome("c@example.net", RecipientState.PENDING, "451 later"),
        ],
        owner="w",
        retry_at=0.0,
    )
    damage(path, mid, DAMAGE["flipped byte in data"])
    assert (await queue.recover()).quarantined == [mid]
    assert await queue.claim(owner="w", limit=10, lease_seconds=60) == []


async def test_damage_during_a_lease_is_caught_at_record(queue: SQLiteQueue, path: Path) -> None:
    mid = await queue.enqueue(ENV, DATA)
    await queue.claim(owner="w", limit=1, lease_seconds=60)
    damage(path, mid, DAMAGE["torn recipient state"])
    state = await queue.record(
        mid, [Outcome("b@example.net", RecipientState.SENT, "250")], owner="w", retry_at=1.0
    )
    assert state is MessageState.QUARANTINED


async def test_finished_messages_are_not_rechecked(queue: SQLiteQueue, path: Path) -> None:
    """Sent and failed messages are never delivered again, so recovery leaves them be."""
    mid = await queue.enqueue(Envelope("a@example.org", ["b@example.net"]), DATA)
    await queue.claim(owner="w", limit=1, lease_seconds=60)
    await queue.record(
        mid, [Outcome("b@example.net", RecipientState.SENT, "250")], owner="w", retry_at=None
    )
    damage(path, mid, DAMAGE["flipped byte in data"])
    assert (await queue.recover()).quarantined == []


async def test_recover_reports_earlier_quarantines_again(queue: SQLiteQueue, path: Path) -> None:
    bad = await queue.enqueue(ENV, DATA)
    damage(path, bad, DAMAGE["truncated data"])
    assert (await queue.recover()).quarantined == [bad]
    # Still there for the operator at the next start: the report says so again.
    assert (await queue.recover()).quarantined == [bad]


async def test_a_clean_queue_recovers_clean(queue: SQLiteQueue) -> None:
    for _ in range(50):
        await queue.enqueue(ENV, DATA)
    report = await queue.recover()
    assert (report.leases_expired, report.quarantined) == (0, [])


async def test_the_sweep_runs_after_an_unclean_stop_only(path: Path) -> None:
    """A clean close marks the spool clean: the next start skips the sweep (claim still
    checks). A process that ran recover() and died leaves it unclean: the next start
    sweeps and reports."""
    first = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await first.open()
    await first.recover()
    quiet = await first.enqueue(ENV, DATA)
    loud = await first.enqueue(ENV, DATA)
    await first.close()

    damage(path, quiet, DAMAGE["flipped byte in data"])
    second = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await second.open()
    try:
        assert (await second.recover()).quarantined == []
        assert [m.id for m in await second.claim(owner="w", limit=10, lease_seconds=60)] == [loud]
        assert (await second.get(quiet)).state is MessageState.QUARANTINED
        await second.release(loud, owner="w")
        damage(path, loud, DAMAGE["truncated data"])
    finally:
        await second._stop()  # a crash: no clean mark

    third = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await third.open()
    try:
        assert (await third.recover()).quarantined == [quiet, loud]
    finally:
        await third.close()


async def test_instances_that_never_recover_leave_the_mark_alone(path: Path) -> None:
    """``hato queue`` commands open the spool beside the server; their close must not
    mark a running (or crashed) server's spool clean."""
    server = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await server.open()
    await server.recover()
    mid = await server.enqueue(ENV, DATA)
    cli = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await cli.open()
    await cli.close()
    await server._stop()  # the server crashes
    damage(path, mid, DAMAGE["torn envelope"])
    again = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await again.open()
    try:
        assert (await again.recover()).quarantined == [mid]
    finally:
        await again.close()
