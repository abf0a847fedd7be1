"""Redis queue against a private redis-server that the tests kill and restart.

The shared server on 6379 is never touched: each test starts its own ``redis-server`` on
a free loopback port with AOF on (``appendfsync always``) in a temporary directory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hato.errors import QueueError, QueueFullError
from hato.message import Envelope
from hato.queue.base import MessageState, Outcome, RecipientState
from hato.queue.redis import RedisQueue
from peers.datastores import PrivateRedis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    srv = PrivateRedis(tmp_path)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def queue(server: PrivateRedis) -> AsyncIterator[RedisQueue]:
    q = RedisQueue(server.url + "?prefix=t:", clock=time.time)
    await q.open()
    yield q
    await q.close()


def env() -> Envelope:
    return Envelope("app@example.org", ["user@example.net"])


SENT = [Outcome("user@example.net", RecipientState.SENT, "250 2.0.0 ok")]


async def test_the_same_queue_object_carries_on_after_a_restart(
    server: PrivateRedis, queue: RedisQueue
) -> None:
    ids = [await queue.enqueue(env(), b"%d" % i) for i in range(10)]
    leased = await queue.claim(owner="w", limit=5, lease_seconds=300)
    await queue.wait_for_work(0.01)  # the wake subscription exists before the crash

    server.kill()
    with pytest.raises(QueueError):
        await queue.enqueue(env(), b"while down")
    started = time.monotonic()
    await queue.wait_for_work(0.5)  # does not spin, does not raise
    assert time.monotonic() - started >= 0.4

    server.start()
    # Leases survived the crash: the owner records as if nothing happened.
    for m in leased:
        assert await queue.record(m.id, SENT, owner="w", retry_at=None) is MessageState.SENT
    rest = await queue.claim(owner="w", limit=10, lease_seconds=300)
    assert sorted(m.id for m in leased + rest) == sorted(ids)
    # And the wake-up channel is back: an enqueue from elsewhere ends a long wait.
    probe = aioredis.Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + 15
        while (await probe.pubsub_numsub("t:wake"))[0][1] != 1:
            assert time.monotonic() < deadline, "the wake listener never resubscribed"
            await asyncio.sleep(0.02)
    finally:
        await probe.aclose()
    await queue.wait_for_work(0)  # take the "reconnected" wake-up
    producer = RedisQueue(server.url + "?prefix=t:", clock=time.time)
    await producer.open()
    try:
        waiter = asyncio.create_task(queue.wait_for_work(30))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        # Not due for an hour: only the published wake-up can end the wait early.
        await producer.enqueue(env(), b"after restart", not_before=time.time() + 3600)
        await asyncio.wait_for(waiter, 10)
        assert time.monotonic() - started < 5
    finally:
        await producer.close()


async def test_a_worker_loop_delivers_everything_across_a_redis_restart(
    server: PrivateRedis, queue: RedisQueue
) -> None:
    """A minimal worker (claim, record, wait; errors logged and retried) keeps going while
    Redis is killed and restarted; every message ends sent."""
    sent: set[str] = set()
    errors: list[str] = []
    stop = asyncio.Event()

    async def worker() -> None:
        q = RedisQueue(server.url + "?prefix=t:", clock=time.time)
        await q.open()
        try:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    for m in await q.claim(owner="worker", limit=20, lease_seconds=2):
                        if await q.record(m.id, SENT, owner="worker", retry_at=None):
                            sent.add(m.id)
                    await q.wait_for_work(0.2)
                except QueueError as exc:
                    errors.append(str(exc))
                    await q.wait_for_work(0.2)
        finally:
            await q.close()

    task = asyncio.create_task(worker())
    try:
        first = [await queue.enqueue(env(), b"a%d" % i) for i in range(50)]
        await _until(lambda: set(first) <= sent)
        server.kill()
        server.start()
        second = [await queue.enqueue(env(), b"b%d" % i) for i in range(50)]
        await _until(lambda: set(first + second) <= sent)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    counts = await queue.counts()
    assert counts[MessageState.SENT] == 100
    assert sum(counts.values()) == 100


async def test_every_acknowledged_enqueue_survives_kill_9(
    server: PrivateRedis, queue: RedisQueue
) -> None:
    """With appendfsync always, an id returned by enqueue is on disk: kill -9 the server
    under 20 concurrent producers, restart it, and look every acknowledged id up."""
    acked: list[str] = []
    failed = 0

    async def producer(n: int) -> None:
        nonlocal failed
        q = RedisQueue(server.url + "?prefix=t:", clock=time.time)
        await q.open()
        try:
            for i in range(500):  # bounded; the kill comes long before the end
                try:
                    acked.append(await q.enqueue(env(), b"p%d-%d" % (n, i)))
                except QueueError:
                    failed += 1
                    return
        finally:
            await q.close()

    tasks = [asyncio.create_task(producer(n)) for n in range(20)]
    await _until(lambda: len(acked) >= 300)
    server.kill()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    server.start()
    assert failed > 0, "the kill did not land while producers were writing"
    client = aioredis.Redis.from_url(server.url)
    try:
        pipe = client.pipeline(transaction=False)
        for message_id in acked:
            pipe.exists(f"t:m:{message_id}")
        present = await pipe.execute()
    finally:
        await client.aclose()
    missing = [m for m, p in zip(acked, present, strict=True) if not p]
    assert missing == [], f"{len(missing)} of {len(acked)} acknowledged messages lost"
    report = await queue.recover()
    assert report.quarantined == []
    assert (await queue.counts())[MessageState.QUEUED] >= len(acked)


async def test_wait_replicas_confirms_a_write_reached_a_replica(
    server: PrivateRedis, tmp_path: Path
) -> None:
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    replica = PrivateRedis(replica_dir, "--replicaof", "127.0.0.1", str(server.port))
    replica.start()
    try:
        probe = aioredis.Redis.from_url(replica.url)
        try:
            deadline = time.monotonic() + 15
            while (await probe.info("replication")).get("master_link_status") != "up":
                assert time.monotonic() < deadline, "replica never synced"
                await asyncio.sleep(0.05)
        finally:
            await probe.aclose()
        q = RedisQueue(server.url + "?prefix=t:&wait_replicas=1&wait_timeout=5000", clock=time.time)
        await q.open()
        try:
            mid = await q.enqueue(env(), b"replicated")
            (m,) = await q.claim(owner="w", limit=1, lease_seconds=30)
            assert await q.record(m.id, SENT, owner="w", retry_at=None) is MessageState.SENT
        finally:
            await q.close()
        on_replica = RedisQueue(replica.url + "?prefix=t:", clock=time.time)
        await on_replica.open()
        try:
            assert (await on_replica.get(mid)).state is MessageState.SENT
        finally:
            await on_replica.close()
        # Without enough replicas the write is not acknowledged.
        q2 = RedisQueue(server.url + "?prefix=t:&wait_replicas=2&wait_timeout=100", clock=time.time)
        await q2.open()
        try:
            with pytest.raises(QueueError, match="replicas"):
                await q2.enqueue(env(), b"under-replicated")
        finally:
            await q2.close()
    finally:
        replica.stop()


async def _until(check: object, within: float = 30.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_a_full_redis_is_reported_as_queue_full(tmp_path: Path) -> None:
    srv = PrivateRedis(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    srv.start()
    try:
        q = RedisQueue(srv.url + "?prefix=t:", clock=time.time)
        await q.open()
        try:
            with pytest.raises(QueueFullError):
                for _ in range(200):  # 200 x 100 KiB is far beyond 4 MiB
                    await q.enqueue(env(), b"x" * 100_000)
            # Refused writes leave nothing half stored.
            report = await q.recover()
            assert report.quarantined == []
        finally:
            await q.close()
    finally:
        srv.stop()
