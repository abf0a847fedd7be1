"""Redis queue: a hash that does not decode is quarantined and the rest delivered; a lease
owner whose heartbeat key ran out gives its leases back at the next recovery (issue 8).

Runs against the shared Redis (``HATO_TEST_REDIS_URL``), each test under its own prefix.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hato.message import Envelope
from hato.queue.base import MessageState
from hato.queue.redis import RedisQueue

SERVER = os.environ.get("HATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SRC = Path(__file__).resolve().parents[2] / "src"
ENV = Envelope("app@example.org", ["user@example.net"])
DEEP = b"[" * 5000 + b"]" * 5000


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"hato-damage-{secrets.token_hex(4)}:"
    yield name
    client = aioredis.Redis.from_url(SERVER)
    try:
        keys = [k async for k in client.scan_iter(match=name + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def queue(prefix: str) -> AsyncIterator[RedisQueue]:
    q = RedisQueue(f"{SERVER}?prefix={prefix}", clock=FakeClock())
    await q.open()
    yield q
    await q.close()


async def redis_do(action: Callable[[aioredis.Redis], Awaitable[object]]) -> None:
    client = aioredis.Redis.from_url(SERVER)
    try:
        await action(client)
    finally:
        await client.aclose()


# field -> bytes written over it; None deletes the field
DAMAGE: dict[str, tuple[str, bytes | None]] = {
    "rcpts not UTF-8": ("rcpts", b'[{"a":"\xff"}]'),
    "rcpts nested too deep for Python": ("rcpts", DEEP),
    "rcpts of another shape": ("rcpts", b'[{"a": "x"}]'),
    "meta nested too deep for Python": ("meta", DEEP),
    "meta not an object": ("meta", b"[1]"),
    "sender not UTF-8": ("sender", b"\xfe\xff"),
    "sender missing": ("sender", None),
    "created not a number": ("created", b"yesterday"),
    "attempts not a number": ("attempts", b"two"),
    "data missing": ("data", None),
    "checksum wrong": ("sum", b"00000000"),
    "last_reply not UTF-8": ("last_reply", b"\x80"),
    "idem not UTF-8": ("idem", b"\xc3"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_a_hash_that_does_not_decode_is_quarantined_and_the_rest_delivered(
    queue: RedisQueue, prefix: str, kind: str
) -> None:
    ids = [await queue.enqueue(ENV, b"m%d" % n) for n in range(3)]
    field, value = DAMAGE[kind]
    key = f"{prefix}m:{ids[1]}"
    if value is None:
        await redis_do(lambda r: r.hdel(key, field))
    else:
        await redis_do(lambda r: r.hset(key, field, value))
    reported: list[tuple[str, str]] = []
    queue.on_quarantine = lambda mid, why: reported.append((mid, why))

    assert len(await queue.list()) == 3
    claimed = await queue.claim(owner="w", limit=10, lease_seconds=60)
    assert sorted(m.id for m in claimed) == sorted([ids[0], ids[2]])
    assert [mid for mid, _ in reported] == [ids[1]]
    msg = await queue.get(ids[1])
    assert msg.state is MessageState.QUARANTINED
    assert msg.last_reply == f"quarantined: {reported[0][1]}"
    counts = await queue.counts()
    assert counts[MessageState.QUARANTINED] == 1 and counts[MessageState.SENDING] == 2
    assert ids[1] in (await queue.recover()).quarantined
    assert await queue.claim(owner="w", limit=10, lease_seconds=60) == []


async def test_a_key_of_another_type_is_set_aside_not_a_failed_claim(
    queue: RedisQueue, prefix: str
) -> None:
    """Every hash command fails on a list: before, the whole claim script did."""
    ids = [await queue.enqueue(ENV, b"m%d" % n) for n in range(3)]
    key = f"{prefix}m:{ids[1]}"

    async def replace(r: aioredis.Redis) -> None:
        await r.delete(key)
        await r.rpush(key, "not", "a", "hash")

    await redis_do(replace)
    reported: list[tuple[str, str]] = []
    queue.on_quarantine = lambda mid, why: reported.append((mid, why))
    listed = {m.id: m for m in await queue.list()}
    assert listed[ids[1]].state is MessageState.QUARANTINED
    claimed = await queue.claim(owner="w", limit=10, lease_seconds=60)
    assert sorted(m.id for m in claimed) == sorted([ids[0], ids[2]])
    assert reported == [(ids[1], "the record is not a hash")]
    assert (await queue.counts())[MessageState.QUARANTINED] == 1
    assert ids[1] in (await queue.recover()).quarantined
    assert (await queue.get(ids[1])).state is MessageState.QUARANTINED
    await queue.delete(ids[1])


async def test_an_id_that_is_not_utf8_is_quarantined(queue: RedisQueue, prefix: str) -> None:
    good = await queue.enqueue(ENV, b"good")
    bad_id = b"\xffBAD"

    async def plant(r: aioredis.Redis) -> None:
        src = f"{prefix}m:{good}".encode()
        await r.copy(src, prefix.encode() + b"m:" + bad_id)
        await r.zadd(f"{prefix}due", {bad_id: 0.0})
        await r.zadd(f"{prefix}all", {bad_id: 0.0})
        await r.zadd(f"{prefix}s:queued", {bad_id: 0.0})

    await redis_do(plant)
    reported: list[tuple[str, str]] = []
    queue.on_quarantine = lambda mid, why: reported.append((mid, why))
    assert len(await queue.list()) == 2
    claimed = await queue.claim(owner="w", limit=10, lease_seconds=60)
    assert [m.id for m in claimed] == [good]
    assert reported == [("\\xffBAD", "id is not valid UTF-8")]
    assert (await queue.counts())[MessageState.QUARANTINED] == 1


# -- liveness ----------------------------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from hato.queue.redis import RedisQueue

    async def main(url, owner):
        q = RedisQueue(url, clock=time.time, owner_ttl=1.0)
        await q.open()
        [m] = await q.claim(owner=owner.format(pid=os.getpid()), limit=1, lease_seconds=600)
        print(m.id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


class Claimer:
    def __init__(self, url: str, owner: str) -> None:
        self.owner = owner
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLAIMER, url, owner],
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


async def test_recover_returns_the_leases_of_an_owner_whose_heartbeat_ran_out(
    prefix: str, claimers: list[Claimer]
) -> None:
    url = f"{SERVER}?prefix={prefix}"
    q = RedisQueue(url, clock=time.time)
    await q.open()
    try:
        for n in range(3):
            await q.enqueue(ENV, b"m%d" % n)
        gone = Claimer(url, f"host/{{pid}}/{secrets.token_hex(2)}")
        live = Claimer(url, f"host/{{pid}}/{secrets.token_hex(2)}")
        claimers += [gone, live]
        gone_id, live_id = await gone.claimed(), await live.claimed()
        gone.kill_and_leave_unreaped()
        client = aioredis.Redis.from_url(SERVER)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}alive:*")]
            assert len(keys) == 2
            deadline = time.monotonic() + 10
            while len([k async for k in client.scan_iter(match=f"{prefix}alive:*")]) == 2:
                assert time.monotonic() < deadline, "the dead owner's key never ran out"
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

        report = await q.recover()  # leases of 600 s: only the heartbeat can end them
        assert report.leases_expired == 1
        assert (await q.get(gone_id)).state is MessageState.QUEUED
        assert (await q.get(live_id)).state is MessageState.SENDING
    finally:
        await q.close()


async def test_a_closed_queue_gives_its_leases_back_at_the_next_recovery(prefix: str) -> None:
    url = f"{SERVER}?prefix={prefix}"
    worker, other = RedisQueue(url, clock=time.time), RedisQueue(url, clock=time.time)
    await worker.open()
    await other.open()
    try:
        mid = await worker.enqueue(ENV, b"m")
        await worker.claim(owner="host/1/w", limit=1, lease_seconds=600)
        assert (await other.recover()).leases_expired == 0  # alive
        await worker.close()
        assert (await other.recover()).leases_expired == 1
        assert (await other.get(mid)).state is MessageState.QUEUED
    finally:
        await worker.close()
        await other.close()
