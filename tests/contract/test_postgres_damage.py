"""PostgreSQL queue: a row that does not decode is quarantined and the rest delivered; a
lease owner that is gone gives its leases back at the next recovery (issue 8, items 1, 5).

Runs against the real server of ``HATO_TEST_POSTGRES_URL``; each test has its own schema
(one has a database of its own, in the SQL_ASCII encoding that lets text hold any byte).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from hato.message import Envelope
from hato.queue.base import MessageState
from hato.queue.postgres import PostgresQueue

SERVER = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SRC = Path(__file__).resolve().parents[2] / "src"
ENV = Envelope("app@example.org", ["user@example.net"])


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _with(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + "&".join(f"{k}={v}" for k, v in params.items())


@pytest.fixture
def schema() -> Iterator[str]:
    name = "hato_d_" + secrets.token_hex(6)
    yield name
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def url(schema: str) -> str:
    return _with(SERVER, schema=schema)


@pytest.fixture
async def queue(url: str) -> AsyncIterator[PostgresQueue]:
    q = PostgresQueue(url, clock=FakeClock())
    await q.open()
    yield q
    await q.close()


# column -> SQL written over it (as damage, a hand with psql, or another program would)
DAMAGE = {
    "recipients nested too deep for Python": "recipients = ("
    "repeat('[', 5000) || repeat(']', 5000))::jsonb",
    "recipients not an array": 'recipients = \'{"address": "x"}\'',
    "recipients empty": "recipients = '[]'",
    "recipient attempts not a number": 'recipients = \'[{"address": "u@example.net",'
    ' "state": "pending", "attempts": "two"}]\'',
    "recipient reply not text": 'recipients = \'[{"address": "u@example.net", "reply": 5}]\'',
    "recipient state unknown": 'recipients = \'[{"address": "u@example.net", "state": "lost"}]\'',
    "meta not an object": "meta = '[1, 2]'",
    "meta value not text": 'meta = \'{"k": {"deep": true}}\'',
    "meta nested too deep for Python": "meta = (repeat('[', 5000) || repeat(']', 5000))::jsonb",
    "created_at NaN": "created_at = 'NaN'",
    "created_at infinite": "created_at = '-Infinity'",
    "attempts negative": "attempts = -4",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_a_row_that_does_not_decode_is_quarantined_and_the_rest_delivered(
    queue: PostgresQueue, schema: str, kind: str
) -> None:
    ids = [await queue.enqueue(ENV, b"m%d" % n) for n in range(3)]
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".hato_messages SET {DAMAGE[kind]} WHERE id = %s', (ids[1],))
    reported: list[tuple[str, str]] = []
    queue.on_quarantine = lambda mid, why: reported.append((mid, why))

    listed = {m.id: m for m in await queue.list()}
    assert listed[ids[1]].state is MessageState.QUARANTINED  # shown for what it is

    claimed = await queue.claim(owner="w", limit=10, lease_seconds=60)
    assert sorted(m.id for m in claimed) == sorted([ids[0], ids[2]])
    assert [mid for mid, _ in reported] == [ids[1]]
    msg = await queue.get(ids[1])
    assert msg.state is MessageState.QUARANTINED
    assert msg.last_reply == f"quarantined: {reported[0][1]}"
    counts = await queue.counts()
    assert counts[MessageState.QUARANTINED] == 1 and counts[MessageState.SENDING] == 2
    assert await queue.claim(owner="w", limit=10, lease_seconds=60) == []


async def test_an_unknown_state_counts_as_quarantined(queue: PostgresQueue, schema: str) -> None:
    mid = await queue.enqueue(ENV, b"m")
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(
            f"UPDATE \"{schema}\".hato_messages SET state = 'qu-eued' WHERE id = %s", (mid,)
        )
    assert (await queue.counts())[MessageState.QUARANTINED] == 1
    report = await queue.recover()
    assert report.quarantined == [mid]
    assert (await queue.get(mid)).last_reply.startswith("quarantined: ")


@pytest.fixture
def ascii_database() -> Iterator[str]:
    """A database in SQL_ASCII, where text columns take any byte (and come back as bytes)."""
    name = "hato_ascii_" + secrets.token_hex(4)
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0"
            " LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    try:
        yield SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# (A claim writes lease_owner and lease_until anew, so damage there costs nothing.)
@pytest.mark.parametrize("column", ["id", "sender", "last_reply", "state"])
async def test_text_that_is_not_utf8_quarantines_its_row_only(
    ascii_database: str, column: str
) -> None:
    q = PostgresQueue(ascii_database, clock=FakeClock())
    await q.open()
    try:
        ids = [await q.enqueue(ENV, b"m%d" % n) for n in range(3)]
        value = "convert_from('\\xff41'::bytea, 'SQL_ASCII')"
        if column == "state":
            value = "'queued' || " + value  # still a string, but not one of ours
        with psycopg.connect(ascii_database, autocommit=True) as conn:
            conn.execute(f"UPDATE hato_messages SET {column} = {value} WHERE id = %s", (ids[1],))
        reported: list[tuple[str, str]] = []
        q.on_quarantine = lambda mid, why: reported.append((mid, why))
        listed = await q.list()
        assert len(listed) == 3
        claimed = await q.claim(owner="w", limit=10, lease_seconds=60)
        assert sorted(m.id for m in claimed) == sorted([ids[0], ids[2]])
        if column != "state":  # an unknown state is never due: recover quarantines it
            [(_, why)] = reported
            assert why == f"{column} is not valid UTF-8"
        assert (await q.recover()).quarantined != [] or reported
        assert (await q.counts())[MessageState.QUARANTINED] == 1
    finally:
        await q.close()


# -- liveness ----------------------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from hato.queue.postgres import PostgresQueue

    async def main(url, owner):
        q = PostgresQueue(url)
        await q.open()
        [m] = await q.claim(owner=owner.format(pid=os.getpid()), limit=1, lease_seconds=600)
        print(m.id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


class Claimer:
    """A child process holding the lease of one message, under its own application_name."""

    def __init__(self, url: str, owner: str) -> None:
        self.app = "hato_claimer_" + secrets.token_hex(4)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLAIMER, _with(url, application_name=self.app), owner],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(SRC)},
            text=True,
        )

    async def claimed(self) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        assert line, f"the claimer died (rc={self.proc.poll()})"
        return line.strip()

    def kill_and_leave_unreaped(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _proc_state(self.proc.pid) != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)

    def sessions(self) -> int:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app,)
            ).fetchone()
        return int(row[0]) if row else 0

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def claimers() -> Iterator[list[Claimer]]:
    started: list[Claimer] = []
    yield started
    for claimer in started:
        claimer.reap()


async def test_recover_returns_the_leases_of_a_killed_unreaped_worker_at_once(
    url: str, claimers: list[Claimer]
) -> None:
    q = PostgresQueue(url)
    await q.open()
    try:
        for n in range(3):
            await q.enqueue(ENV, b"m%d" % n)
        gone, live = Claimer(url, "host/{pid}/dead"), Claimer(url, "host/{pid}/live")
        claimers += [gone, live]
        gone_id, live_id = await gone.claimed(), await live.claimed()
        gone.kill_and_leave_unreaped()
        # The server ends the session when the dead process's socket closes.
        deadline = time.monotonic() + 10
        while gone.sessions():
            assert time.monotonic() < deadline, "the server kept the dead worker's session"
            await asyncio.sleep(0.02)

        report = await q.recover()  # leases of 600 s: only liveness can end them now
        assert report.leases_expired == 1
        assert (await q.get(gone_id)).state is MessageState.QUEUED
        assert (await q.get(live_id)).state is MessageState.SENDING
        claimed = await q.claim(owner="host/1/new", limit=10, lease_seconds=60)
        assert gone_id in {m.id for m in claimed} and live_id not in {m.id for m in claimed}
    finally:
        await q.close()


async def test_the_owners_locks_come_back_after_their_session_is_killed(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_terminate_backend of the liveness session (a restart does the same): the next
    claim takes the locks again, so a recovery elsewhere leaves the leases alone."""
    monkeypatch.setattr("hato.queue.postgres._LIVENESS_CHECK", 0.0)
    worker, other = PostgresQueue(url), PostgresQueue(url)
    await worker.open()
    await other.open()
    try:
        a = await worker.enqueue(ENV, b"a")
        b = await worker.enqueue(ENV, b"b")
        assert [m.id for m in await worker.claim(owner="w/1/x", limit=1, lease_seconds=600)] == [a]
        alive = worker._alive
        assert alive is not None
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (alive.info.backend_pid,))
        assert [m.id for m in await worker.claim(owner="w/1/x", limit=1, lease_seconds=600)] == [b]
        assert worker._alive is not alive
        assert (await other.recover()).leases_expired == 0
        assert (await other.get(a)).state is MessageState.SENDING
        await worker.close()  # its leases end with it
        # The server drops the session's locks when its backend exits, a moment after
        # the client closed the connection: wait for that, with a deadline.
        returned, deadline = 0, time.monotonic() + 10
        while returned < 2 and time.monotonic() < deadline:
            returned += (await other.recover()).leases_expired
            await asyncio.sleep(0.05)
        assert returned == 2
    finally:
        await worker.close()
        await other.close()


async def test_get_quarantines_an_unreadable_row_it_meets(
    queue: PostgresQueue, schema: str
) -> None:
    mid = await queue.enqueue(ENV, b"m")
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"UPDATE \"{schema}\".hato_messages SET meta = '[1]' WHERE id = %s", (mid,))
    reported: list[tuple[str, str]] = []
    queue.on_quarantine = lambda m, why: reported.append((m, why))
    assert (await queue.get(mid)).last_reply == "quarantined: meta is not a string mapping"
    assert reported == [(mid, "meta is not a string mapping")]
    assert (await queue.counts())[MessageState.QUARANTINED] == 1
    await queue.get(mid)
    assert len(reported) == 1  # reported once, when it was quarantined
