"""Redis-only queue tests: atomic claims under concurrency, leases, wake-ups, damage, URLs.

They run against the shared Redis on 127.0.0.1:6379 (``HATO_TEST_REDIS_URL`` overrides),
each test under its own key prefix, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from hato.errors import ConfigError, MessageNotFound, QueueError
from hato.message import Envelope
from hato.queue import open_queue
from hato.queue.base import MessageState, Outcome, RecipientState
from hato.queue.redis import RedisQueue
from hato.testing import FakeClock

SERVER = os.environ.get("HATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _url(prefix: str, extra: str = "") -> str:
    return f"{SERVER}?prefix={prefix}{extra}"


async def _wait_until(check: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"hato-test-{secrets.token_hex(4)}:"
    yield name
    client = aioredis.Redis.from_url(SERVER)
    try:
        keys = [k async for k in client.scan_iter(match=name + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
async def queue(prefix: str, clock: FakeClock) -> AsyncIterator[RedisQueue]:
    q = RedisQueue(_url(prefix), clock=clock)
    await q.open()
    yield q
    await q.close()


async def _queues(prefix: str, n: int, clock: Callable[[], float]) -> list[RedisQueue]:
    queues = [RedisQueue(_url(prefix), clock=clock) for _ in range(n)]
    await asyncio.gather(*(q.open() for q in queues))
    return queues


def env(*rcpts: str) -> Envelope:
    return Envelope("sender@example.org", list(rcpts) or ["rcpt@example.net"])


# -- claims under concurrency ---------------------------------------------------------


async def test_many_concurrent_claimers_never_share_a_message(
    prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    ids = {await queue.enqueue(env(), b"m%d" % i) for i in range(300)}
    claimers = await _queues(prefix, 20, clock)
    try:

        async def drain(q: RedisQueue, owner: str) -> list[str]:
            got: list[str] = []
            for _ in range(200):  # bounded: 300 messages, 20 claimers
                batch = await q.claim(owner=owner, limit=7, lease_seconds=300)
                if not batch:
                    break
                got += [m.id for m in batch]
            return got

        results = await asyncio.gather(*(drain(q, f"w{n}") for n, q in enumerate(claimers)))
    finally:
        await asyncio.gather(*(q.close() for q in claimers))
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == ids
    assert sum(1 for r in results if r) > 1, "the claims were not actually concurrent"
    assert (await queue.counts())[MessageState.SENDING] == 300


async def test_expired_leases_are_taken_over_by_exactly_one_claimer(
    prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    for i in range(100):
        await queue.enqueue(env(), b"%d" % i)
    first = await queue.claim(owner="dead", limit=100, lease_seconds=30)
    assert len(first) == 100
    clock.now += 31
    claimers = await _queues(prefix, 10, clock)
    try:
        results = await asyncio.gather(
            *(q.claim(owner=f"w{n}", limit=100, lease_seconds=30) for n, q in enumerate(claimers))
        )
    finally:
        await asyncio.gather(*(q.close() for q in claimers))
    taken = [m.id for r in results for m in r]
    assert sorted(taken) == sorted(m.id for m in first)
    # The dead worker wakes up late: every record of it is refused.
    refused = await asyncio.gather(
        *(
            queue.record(
                m.id,
                [Outcome(m.recipients[0].address, RecipientState.SENT, "250 ok")],
                owner="dead",
                retry_at=None,
            )
            for m in first
        )
    )
    assert refused == [None] * 100


async def test_records_race_reclaims_and_the_lua_scripts_keep_indexes_consistent(
    prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    """Owners record while others reclaim expired leases: each message ends in exactly
    one state index, the lease and due sets agree with it, and no update is half done."""
    ids = [await queue.enqueue(env("a@x.org", "b@x.org"), b"x") for _ in range(60)]
    held = await queue.claim(owner="old", limit=60, lease_seconds=10)
    clock.now += 11
    rivals = await _queues(prefix, 4, clock)
    try:
        outcome = [
            Outcome("a@x.org", RecipientState.SENT, "250 ok"),
            Outcome("b@x.org", RecipientState.PENDING, "451 later"),
        ]
        results = await asyncio.gather(
            *(queue.record(m.id, outcome, owner="old", retry_at=clock.now + 60) for m in held),
            *(q.claim(owner=f"r{n}", limit=20, lease_seconds=10) for n, q in enumerate(rivals)),
        )
    finally:
        await asyncio.gather(*(q.close() for q in rivals))
    recorded = {m.id for m, r in zip(held, results[:60], strict=True) if r is not None}
    reclaimed = {m.id for batch in results[60:] for m in batch}  # type: ignore[union-attr]
    assert recorded | reclaimed == set(ids)
    assert not recorded & reclaimed
    client = aioredis.Redis.from_url(SERVER)
    try:
        for message_id in ids:
            msg = await queue.get(message_id)
            memberships = [
                s
                for s in MessageState
                if await client.zscore(f"{prefix}s:{s.value}", message_id) is not None
            ]
            assert memberships == [msg.state]
            in_leases = await client.zscore(f"{prefix}leases", message_id) is not None
            in_due = await client.zscore(f"{prefix}due", message_id) is not None
            if message_id in recorded:
                assert msg.state is MessageState.DEFERRED and msg.attempts == 1
                assert (in_leases, in_due) == (False, True)
                assert msg.recipients[0].state is RecipientState.SENT
            else:
                assert msg.state is MessageState.SENDING and msg.attempts == 0
                assert (in_leases, in_due) == (True, False)
                assert msg.lease_owner.startswith("r")
    finally:
        await client.aclose()


async def test_concurrent_enqueues_with_one_idempotency_key_store_one_message(
    prefix: str, queue: RedisQueue
) -> None:
    others = await _queues(prefix, 5, time.time)
    try:
        ids = await asyncio.gather(
            *(
                q.enqueue(env(), b"once", idempotency_key="signup-42")
                for q in others
                for _ in range(10)
            )
        )
    finally:
        await asyncio.gather(*(q.close() for q in others))
    assert len(set(ids)) == 1
    assert await queue.find("signup-42") == ids[0]
    assert sum((await queue.counts()).values()) == 1


# -- leases ---------------------------------------------------------------------------


async def test_lease_expiry_hands_the_message_to_a_new_owner(
    queue: RedisQueue, clock: FakeClock
) -> None:
    mid = await queue.enqueue(env(), b"x")
    (m,) = await queue.claim(owner="w1", limit=5, lease_seconds=30)
    assert (m.lease_owner, m.lease_until, m.next_attempt_at) == (
        "w1",
        clock.now + 30,
        clock.now + 30,
    )
    clock.now += 29
    assert await queue.claim(owner="w2", limit=5, lease_seconds=30) == []
    clock.now += 2
    (again,) = await queue.claim(owner="w2", limit=5, lease_seconds=30)
    assert again.id == mid and again.lease_owner == "w2"
    sent = [Outcome("rcpt@example.net", RecipientState.SENT, "250 2.0.0 ok")]
    assert await queue.record(mid, sent, owner="w1", retry_at=None) is None
    await queue.release(mid, owner="w1")
    assert (await queue.get(mid)).lease_owner == "w2"
    assert await queue.record(mid, sent, owner="w2", retry_at=None) is MessageState.SENT


async def test_recover_returns_expired_leases_only(queue: RedisQueue, clock: FakeClock) -> None:
    a = await queue.enqueue(env(), b"a")
    await queue.claim(owner="w", limit=1, lease_seconds=10)
    b = await queue.enqueue(env(), b"b")
    clock.now += 5
    await queue.claim(owner="w", limit=1, lease_seconds=10)
    clock.now += 6  # a's lease is over, b's is not
    report = await queue.recover()
    assert report.leases_expired == 1 and report.quarantined == []
    assert (await queue.get(a)).state is MessageState.QUEUED
    assert (await queue.get(b)).state is MessageState.SENDING
    assert [m.id for m in await queue.claim(owner="x", limit=5, lease_seconds=10)] == [a]


# -- waking ---------------------------------------------------------------------------


async def test_enqueue_from_another_connection_wakes_a_waiter_at_once(
    prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    await queue.wait_for_work(0.01)  # subscribes
    producer = RedisQueue(_url(prefix), clock=time.time)
    await producer.open()
    try:
        waiter = asyncio.create_task(queue.wait_for_work(30))
        await asyncio.sleep(0)  # let the waiter block first
        started = time.monotonic()
        # Not due for an hour: only the published wake-up can end the wait early.
        await producer.enqueue(env(), b"wake up", not_before=clock.now + 3600)
        await asyncio.wait_for(waiter, 10)
        assert time.monotonic() - started < 5
    finally:
        await producer.close()


async def test_a_wake_published_before_waiting_is_not_lost(
    prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    await queue.wait_for_work(0.01)
    producer = RedisQueue(_url(prefix), clock=time.time)
    await producer.open()
    try:
        await producer.enqueue(env(), b"early", not_before=clock.now + 3600)
    finally:
        await producer.close()
    started = time.monotonic()
    await queue.wait_for_work(30)
    assert time.monotonic() - started < 5


async def test_wait_ends_when_the_next_message_falls_due(prefix: str) -> None:
    q = RedisQueue(_url(prefix), clock=time.time)
    await q.open()
    try:
        due = time.time() + 0.3
        await q.enqueue(env(), b"later", not_before=due)
        started = time.monotonic()
        # The enqueue's own wake may end a wait early (when it arrives is up to the load
        # on the machine): wait again until the message is due. A wait that did not end
        # when it fell due would take the whole 30 s.
        while time.time() < due:
            await q.wait_for_work(30)
        assert time.monotonic() - started < 5
        assert len(await q.claim(owner="w", limit=1, lease_seconds=5)) == 1
    finally:
        await q.close()


async def test_wait_falls_back_to_the_timeout(queue: RedisQueue) -> None:
    started = time.monotonic()
    await queue.wait_for_work(0.2)
    assert 0.15 < time.monotonic() - started < 5


# -- damage and errors ----------------------------------------------------------------


async def test_damaged_records_are_quarantined_never_delivered(
    prefix: str, queue: RedisQueue
) -> None:
    good = await queue.enqueue(env(), b"good")
    torn = await queue.enqueue(env(), b"torn bytes")
    garbled = await queue.enqueue(env(), b"garbled")
    client = aioredis.Redis.from_url(SERVER)
    try:
        await client.hset(f"{prefix}m:{torn}", "data", b"torn by")
        await client.hset(f"{prefix}m:{garbled}", "rcpts", b"{not json")
    finally:
        await client.aclose()
    claimed = await queue.claim(owner="w", limit=10, lease_seconds=30)
    assert [m.id for m in claimed] == [good]
    assert (await queue.counts())[MessageState.QUARANTINED] == 2
    listed = await queue.list(states=[MessageState.QUARANTINED])
    assert sorted(m.id for m in listed) == sorted([torn, garbled])
    report = await queue.recover()
    assert sorted(report.quarantined) == sorted([torn, garbled])
    kept = await queue.get(torn)  # the operator can still look at what is left
    assert kept.state is MessageState.QUARANTINED and kept.data == b"torn by"
    await queue.delete(torn)
    await queue.delete(garbled)
    assert (await queue.counts())[MessageState.QUARANTINED] == 0


async def test_recover_quarantines_records_damaged_at_rest(prefix: str, queue: RedisQueue) -> None:
    mid = await queue.enqueue(env(), b"x")
    client = aioredis.Redis.from_url(SERVER)
    try:
        await client.hdel(f"{prefix}m:{mid}", "sender")
        await client.zadd(f"{prefix}all", {"DANGLING": 1.0})
    finally:
        await client.aclose()
    report = await queue.recover()
    assert report.quarantined == [mid]
    assert (await queue.counts())[MessageState.QUARANTINED] == 1
    assert await queue.claim(owner="w", limit=5, lease_seconds=5) == []


async def test_unreachable_server_raises_queue_error() -> None:
    q = RedisQueue(f"redis://127.0.0.1:{free_port()}/0", clock=time.time)
    with pytest.raises(QueueError):
        await q.open()


async def test_operations_before_open_raise_queue_error(prefix: str) -> None:
    q = RedisQueue(_url(prefix), clock=time.time)
    with pytest.raises(QueueError):
        await q.enqueue(env(), b"x")


async def test_wait_aof_is_refused_clearly_where_the_server_cannot_do_it(prefix: str) -> None:
    probe = aioredis.Redis.from_url(SERVER)
    try:
        info = await probe.info("server")
        aof = (await probe.config_get("appendonly")).get(b"appendonly", b"no")
    finally:
        await probe.aclose()
    version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
    if version >= (7, 2) and aof == b"yes":
        pytest.skip("this server supports WAITAOF with AOF on")
    q = RedisQueue(_url(prefix, "&wait_aof=1"), clock=time.time)
    with pytest.raises(ConfigError, match=r"WAITAOF|appendonly"):
        await q.open()


def test_url_options_are_parsed_and_checked() -> None:
    q = RedisQueue(
        "redis://127.0.0.1:6379/2?prefix=app1:&wait_replicas=1&wait_timeout=250", clock=time.time
    )
    assert q.prefix == "app1:"
    assert q._server_url == "redis://127.0.0.1:6379/2"
    assert isinstance(open_queue("redis://127.0.0.1/0"), RedisQueue)
    assert RedisQueue("redis://127.0.0.1/0", clock=time.time).prefix == "hato:"
    for bad in ("prefix=", "wait_replicas=x", "wait_timeout=-1"):
        with pytest.raises(ConfigError):
            RedisQueue(f"redis://127.0.0.1/0?{bad}", clock=time.time)


# -- data fidelity --------------------------------------------------------------------


async def test_bytes_unicode_and_per_recipient_state_survive_the_lua_round_trip(
    queue: RedisQueue, clock: FakeClock
) -> None:
    data = bytes(range(256)) * 40
    rcpts = ["ü@exämple.org", "b@x.org", "c@x.org"]
    mid = await queue.enqueue(
        Envelope("jörg@exämple.org", rcpts, meta={"from_app": "1"}),
        data,
        meta={"tenant": "日本"},
        idempotency_key="k/ü",
    )
    (m,) = await queue.claim(owner="w", limit=1, lease_seconds=60)
    assert m.data == data and m.sender == "jörg@exämple.org"
    assert m.meta == {"from_app": "1", "tenant": "日本"}
    state = await queue.record(
        mid,
        [
            Outcome(
                "ü@exämple.org", RecipientState.SENT, "250 2.0.0 “ok” ✓", relay="mx[127.0.0.1]:25"
            ),
            Outcome("b@x.org", RecipientState.FAILED, "550 5.1.1 no such user"),
            Outcome("c@x.org", RecipientState.PENDING, "451 4.3.0 try later"),
        ],
        owner="w",
        retry_at=clock.now + 300,
    )
    assert state is MessageState.DEFERRED
    got = await queue.get(mid)
    assert [(r.address, r.state, r.attempts) for r in got.recipients] == [
        ("ü@exämple.org", RecipientState.SENT, 1),
        ("b@x.org", RecipientState.FAILED, 1),
        ("c@x.org", RecipientState.PENDING, 1),
    ]
    assert got.recipients[0].reply == "250 2.0.0 “ok” ✓"
    assert got.recipients[0].relay == "mx[127.0.0.1]:25"
    assert got.last_reply == "451 4.3.0 try later"
    assert got.next_attempt_at == clock.now + 300
    assert await queue.find("k/ü") == mid
    with pytest.raises(MessageNotFound):
        await queue.get("NOPE")


async def test_record_refuses_unknown_recipients_and_missing_retry_without_changes(
    queue: RedisQueue,
) -> None:
    mid = await queue.enqueue(env("a@x.org"), b"x")
    await queue.claim(owner="w", limit=1, lease_seconds=60)
    with pytest.raises(ValueError):
        await queue.record(
            mid, [Outcome("zz@x.org", RecipientState.SENT, "250")], owner="w", retry_at=None
        )
    with pytest.raises(ValueError):
        await queue.record(
            mid, [Outcome("a@x.org", RecipientState.PENDING, "451")], owner="w", retry_at=None
        )
    m = await queue.get(mid)
    assert m.state is MessageState.SENDING and m.attempts == 0 and m.lease_owner == "w"


# -- helpers --------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_an_id_clash_picks_a_new_id_and_never_overwrites(
    queue: RedisQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two enqueues in one microsecond may draw the same 20 random bits: the second must
    get a new id, not be taken for a retry of the first."""
    import hato.queue.redis as module

    ids = iter(["SAMEID000000000", "SAMEID000000000", "OTHERID00000000"])
    monkeypatch.setattr(module, "new_message_id", lambda clock: next(ids))
    first = await queue.enqueue(env("a@x.org"), b"first")
    second = await queue.enqueue(env("b@x.org"), b"second", idempotency_key="k2")
    assert (first, second) == ("SAMEID000000000", "OTHERID00000000")
    assert (await queue.get(first)).data == b"first"
    assert (await queue.get(second)).data == b"second"
    assert await queue.find("k2") == second
