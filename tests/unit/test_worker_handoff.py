"""Fresh mail handed to the worker without a claim (``Worker.enqueue_fresh``, issue 11):
leased in the enqueue's commit, delivered at once, the bounded channel falling back to the
claim path when full, nothing kept leased by a stopping worker.

The couriers are fakes (what is under test is the worker's bookkeeping); the real
intake → relay path is in tests/integration/test_serve_*.py and the crash tests.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Sequence

from hato.delivery.base import DeliveryResult, Result, all_results
from hato.delivery.router import RouteKind, Router
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.base import MessageState, StoredMessage
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.testing import FakeClock, ScriptedCourier
from hato.worker import Worker

T0 = 1_700_000_000.0
MSG = b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n"
OK = (Result.OK, Reply(250, "2.0.0", "Ok: queued"))


class CountingQueue(MemoryQueue):
    """The memory queue, counting the messages ``claim`` hands out."""

    claimed: list[str]

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        got = await super().claim(owner=owner, limit=limit, lease_seconds=lease_seconds)
        self.claimed.extend(m.id for m in got)
        return got


class Gated(ScriptedCourier):
    """Delivers once ``gate`` opens; ``started`` lists the recipients it began with."""

    def __init__(self) -> None:
        super().__init__("relay.test", lambda r: OK)
        self.gate = asyncio.Event()
        self.started: list[str] = []

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: object = None,
    ) -> list[DeliveryResult]:
        self.started.extend(recipients)
        await self.gate.wait()
        return all_results(recipients, *OK)


def build(courier: object, *, concurrency: int = 4, handoff_limit: int | None = None) -> Worker:
    clock = FakeClock(T0)
    queue = CountingQueue(clock=clock)
    queue.claimed = []
    return Worker(
        queue,
        {RouteKind.RELAY: courier},  # type: ignore[dict-item]
        Router(frozenset({"example.org"}), "relay"),
        RetrySchedule(min_delay=60, max_delay=600, max_lifetime=3600, jitter=0.2),
        MailLog(io.StringIO(), clock=clock),
        hostname="mx.example.org",
        clock=clock,
        rng=random.Random(7),
        owner="w1",
        idle_wait=0.05,
        stop_timeout=1.0,
        concurrency=concurrency,
        handoff_limit=handoff_limit,
    )


async def until(condition: object, seconds: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(seconds):
        while not await condition():
            await asyncio.sleep(0.005)


async def running(worker: Worker) -> asyncio.Task[None]:
    await worker.queue.open()
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(5):
        while not worker.running:
            await asyncio.sleep(0)
    return task


async def stopped(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.stop()
    async with asyncio.timeout(5):
        await task


def env(rcpt: str) -> Envelope:
    return Envelope("a@example.org", [rcpt], meta={"source": "smtp"})


async def test_fresh_mail_is_delivered_without_a_claim() -> None:
    worker = build(ScriptedCourier("relay.test", lambda r: OK))
    queue = worker.queue
    assert isinstance(queue, CountingQueue)
    task = await running(worker)
    mid = await worker.enqueue_fresh(env("b@example.net"), MSG)

    async def sent() -> bool:
        return (await queue.get(mid)).state is MessageState.SENT

    await until(sent)
    await stopped(worker, task)
    assert worker.handoffs == 1
    assert mid not in queue.claimed
    msg = await queue.get(mid)
    assert (msg.attempts, msg.lease_owner, msg.meta) == (1, "", {"source": "smtp"})


async def test_a_full_channel_falls_back_to_the_claim_path() -> None:
    courier = Gated()
    worker = build(courier, concurrency=1, handoff_limit=0)
    queue = worker.queue
    assert isinstance(queue, CountingQueue)
    task = await running(worker)
    first = await worker.enqueue_fresh(env("first@example.net"), MSG)
    second = await worker.enqueue_fresh(env("second@example.net"), MSG)
    # The first took the only slot; the second was stored plainly, for the claim loop.
    assert (await queue.get(first)).lease_owner == "w1"
    plain = await queue.get(second)
    assert (plain.state, plain.lease_owner) == (MessageState.QUEUED, "")
    courier.gate.set()

    async def both_sent() -> bool:
        states = {(await queue.get(m)).state for m in (first, second)}
        return states == {MessageState.SENT}

    await until(both_sent)
    await stopped(worker, task)
    assert worker.handoffs == 1
    assert queue.claimed == [second]


async def test_handed_off_messages_wait_for_a_free_slot() -> None:
    courier = Gated()
    worker = build(courier, concurrency=1, handoff_limit=2)
    queue = worker.queue
    task = await running(worker)
    ids = [await worker.enqueue_fresh(env(f"r{i}@example.net"), MSG) for i in range(3)]
    assert [(await queue.get(m)).lease_owner for m in ids] == ["w1"] * 3

    async def first_started() -> bool:
        return bool(courier.started)

    await until(first_started)
    await asyncio.sleep(0)  # nothing else may start while the only slot is busy
    assert courier.started == ["r0@example.net"]
    courier.gate.set()

    async def all_sent() -> bool:
        return {(await queue.get(m)).state for m in ids} == {MessageState.SENT}

    await until(all_sent)
    await stopped(worker, task)
    assert worker.handoffs == 3
    assert courier.started == ["r0@example.net", "r1@example.net", "r2@example.net"]


async def test_a_stopped_worker_takes_no_handoff_and_gives_back_what_waits() -> None:
    courier = Gated()
    worker = build(courier, concurrency=1, handoff_limit=1)
    worker.stop_timeout = 0.05
    queue = worker.queue
    task = await running(worker)
    busy = await worker.enqueue_fresh(env("busy@example.net"), MSG)
    waiting = await worker.enqueue_fresh(env("waiting@example.net"), MSG)
    assert (await queue.get(waiting)).lease_owner == "w1"
    await stopped(worker, task)
    for mid in (busy, waiting):
        msg = await queue.get(mid)
        assert (msg.state, msg.lease_owner) == (MessageState.QUEUED, ""), mid
    later = await worker.enqueue_fresh(env("later@example.net"), MSG)
    msg = await queue.get(later)
    assert (msg.state, msg.lease_owner) == (MessageState.QUEUED, "")
    assert worker.handoffs == 2
