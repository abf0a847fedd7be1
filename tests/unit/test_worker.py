"""The worker's decisions with the memory queue and scripted couriers (pure delivery logic).

Real SMTP peers are in ``tests/integration/test_worker_*.py``; here the couriers are
fakes because what is under test is the worker's bookkeeping: routing groups, outcomes,
retry times, holds, bounces, and that nothing escapes the loop.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Sequence

from hato.delivery.base import DeliveryResult, Result, all_results
from hato.delivery.hold import HoldCourier
from hato.delivery.router import RouteKind, Router
from hato.errors import QueueError
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.base import MessageState, RecipientState
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.testing import FakeClock, ScriptedCourier
from hato.worker import Worker

T0 = 1_700_000_000.0
MSG = b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n"


OK = (Result.OK, Reply(250, "2.0.0", "Ok: queued"))
BUSY = (Result.TEMPORARY, Reply(451, "4.3.0", "try later"))
UNKNOWN = (Result.PERMANENT, Reply(550, "5.1.1", "User unknown"))


class Rig:
    def __init__(
        self,
        couriers: dict[RouteKind, object],
        *,
        route: str = "relay",
        domains: frozenset[str] = frozenset({"example.org"}),
        retry: RetrySchedule | None = None,
        queue: MemoryQueue | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.clock = clock or FakeClock(T0)
        self.queue = queue or MemoryQueue(clock=self.clock)
        self.out = io.StringIO()
        self.worker = Worker(
            self.queue,
            couriers,  # type: ignore[arg-type]
            Router(domains, route),
            retry or RetrySchedule(min_delay=60, max_delay=600, max_lifetime=3600, jitter=0.2),
            MailLog(self.out, clock=self.clock),
            hostname="mx.example.org",
            clock=self.clock,
            rng=random.Random(7),
            owner="w1",
            idle_wait=0.05,
            stop_timeout=1.0,
        )

    async def enqueue(self, sender: str, *rcpts: str) -> str:
        return await self.queue.enqueue(Envelope(sender, list(rcpts)), MSG)

    @property
    def log(self) -> str:
        return self.out.getvalue()


async def start(rig: Rig) -> Rig:
    await rig.queue.open()
    return rig


async def test_sent_message_is_logged_like_postfix() -> None:
    relay = ScriptedCourier("relay.test", lambda r: OK)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("a@example.org", "b@example.net")
    rig.clock.now += 2.5
    assert await rig.worker.run_once() == 1
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.SENT
    assert msg.recipients[0].relay == "relay.test[192.0.2.1]:25"
    line = rig.log.strip().splitlines()[0]
    assert f"{mid}: to=<b@example.net>, relay=relay.test[192.0.2.1]:25, delay=2.50" in line
    assert "attempts=1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)" in line


async def test_recipients_grouped_by_route_and_local_is_held_for_now() -> None:
    relay = ScriptedCourier("relay.test", lambda r: OK)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("a@example.org", "x@example.net", "me@example.org", "y@example.com")
    await rig.worker.run_once()
    assert relay.calls == [("a@example.org", ["x@example.net", "y@example.com"])]
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.HELD
    assert msg.pending == ["me@example.org"]
    assert "status=held" in rig.log
    assert await rig.worker.run_once() == 0  # held is never claimed


async def test_temporary_failure_is_rescheduled_with_jitter() -> None:
    relay = ScriptedCourier("relay.test", lambda r: BUSY)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("a@example.org", "b@example.net")
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.DEFERRED
    assert 48 <= msg.next_attempt_at - T0 <= 72  # 60 s ± 20 %
    assert "dsn=4.3.0, status=deferred (451 4.3.0 try later)" in rig.log
    assert await rig.worker.run_once() == 0  # not due yet
    rig.clock.now = msg.next_attempt_at
    assert await rig.worker.run_once() == 1
    msg = await rig.queue.get(mid)
    assert msg.attempts == 2
    assert 96 <= msg.next_attempt_at - rig.clock.now <= 144  # doubled


async def test_courier_exception_counts_as_temporary() -> None:
    class Broken(ScriptedCourier):
        async def deliver(
            self,
            sender: str,
            recipients: Sequence[str],
            data: bytes,
            *,
            message_id: str = "",
            dsn: object = None,
        ) -> list[DeliveryResult]:
            raise RuntimeError("boom")

    rig = await start(Rig({RouteKind.RELAY: Broken("broken", lambda r: OK)}))
    mid = await rig.enqueue("a@example.org", "b@example.net")
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.DEFERRED
    assert "RuntimeError: boom" in msg.recipients[0].reply


async def test_missing_results_and_missing_courier_are_temporary() -> None:
    class Forgetful(ScriptedCourier):
        async def deliver(
            self,
            sender: str,
            recipients: Sequence[str],
            data: bytes,
            *,
            message_id: str = "",
            dsn: object = None,
        ) -> list[DeliveryResult]:
            return all_results(recipients[:1], Result.OK, Reply(250, "2.0.0", "ok"))

    rig = await start(Rig({RouteKind.RELAY: Forgetful("f", lambda r: OK)}))
    mid = await rig.enqueue("a@example.org", "b@example.net", "c@example.net")
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert [r.state for r in msg.recipients] == [RecipientState.SENT, RecipientState.PENDING]

    mx = await start(Rig({}, route="mx"))
    mid = await mx.enqueue("a@example.org", "b@example.net")
    await mx.worker.run_once()
    msg = await mx.queue.get(mid)
    assert msg.state is MessageState.DEFERRED
    assert "no courier is configured for route mx" in msg.recipients[0].reply


async def test_permanent_failure_bounces_to_sender() -> None:
    relay = ScriptedCourier("relay.test", lambda r: UNKNOWN if r.startswith("nobody") else OK)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("app@example.org", "nobody@example.net", "ok@example.net")
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.FAILED
    [dsn] = [m for m in await rig.queue.list() if m.id != mid]
    dsn = await rig.queue.get(dsn.id)
    assert dsn.sender == ""
    assert [r.address for r in dsn.recipients] == ["app@example.org"]
    assert dsn.meta["dsn_for"] == mid
    assert b"multipart/report" in dsn.data and b"Status: 5.1.1" in dsn.data
    assert b"ok@example.net" not in dsn.data.split(b"text/rfc822-headers")[0]
    assert "status=bounced (550 5.1.1 User unknown)" in rig.log
    assert f"notification={dsn.id}" in rig.log


async def test_bounce_of_a_bounce_is_never_sent() -> None:
    relay = ScriptedCourier("relay.test", lambda r: UNKNOWN)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("", "nobody@example.net")
    await rig.worker.run_once()
    assert (await rig.queue.get(mid)).state is MessageState.FAILED
    assert [m.id for m in await rig.queue.list()] == [mid]


async def test_give_up_after_lifetime_bounces_with_reason() -> None:
    relay = ScriptedCourier("relay.test", lambda r: BUSY)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("app@example.org", "b@example.net")
    await rig.worker.run_once()
    rig.clock.now = T0 + 3600
    await rig.queue.requeue(mid)
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.FAILED
    assert "status=bounced (gave up after 1 hours: 451 4.3.0 try later)" in rig.log
    [dsn] = [m for m in await rig.queue.list() if m.id != mid]
    data = (await rig.queue.get(dsn.id)).data
    assert b"could not be delivered within 1 hours" in data
    assert b"Status: 4.3.0" in data


async def test_dsn_enqueue_failure_keeps_recipient_pending() -> None:
    class NoRoom(MemoryQueue):
        async def enqueue(self, envelope: Envelope, data: bytes, **kwargs: object) -> str:  # type: ignore[override]
            if envelope.sender == "":
                raise QueueError("disk full")
            return await super().enqueue(envelope, data, **kwargs)  # type: ignore[arg-type]

    clock = FakeClock(T0)
    relay = ScriptedCourier("relay.test", lambda r: UNKNOWN)
    rig = Rig({RouteKind.RELAY: relay}, queue=NoRoom(clock=clock), clock=clock)
    await start(rig)
    mid = await rig.enqueue("app@example.org", "nobody@example.net")
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.DEFERRED
    assert "could not queue DSN" in rig.log


async def test_held_and_temporary_mix_retries_then_holds() -> None:
    answers = {"b@example.net": BUSY}
    relay = ScriptedCourier("relay.test", lambda r: answers.get(r, OK))
    rig = await start(Rig({RouteKind.RELAY: relay, RouteKind.HOLD: HoldCourier()}))
    mid = await rig.enqueue("a@example.org", "b@example.net", "me@example.org")
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.DEFERRED  # not held while a relay recipient waits
    answers.clear()
    rig.clock.now = msg.next_attempt_at
    await rig.worker.run_once()
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.HELD
    assert msg.pending == ["me@example.org"]


async def test_lost_lease_is_not_overwritten() -> None:
    relay = ScriptedCourier("relay.test", lambda r: OK)
    rig = await start(Rig({RouteKind.RELAY: relay}))
    mid = await rig.enqueue("a@example.org", "b@example.net")
    [claimed] = await rig.queue.claim(owner="w1", limit=1, lease_seconds=10)
    rig.clock.now += 20
    [_] = await rig.queue.claim(owner="w2", limit=1, lease_seconds=300)
    assert await rig.worker.process(claimed) is None
    assert (await rig.queue.get(mid)).lease_owner == "w2"
    assert "lease lost" in rig.log


async def test_run_loop_survives_errors_and_stops() -> None:
    seen: list[str] = []

    def answer(r: str) -> tuple[Result, Reply]:
        seen.append(r)
        if r.startswith("crash"):
            raise RuntimeError("courier bug")
        return OK

    rig = await start(Rig({RouteKind.RELAY: ScriptedCourier("relay.test", answer)}))
    crash = await rig.enqueue("a@example.org", "crash@example.net")
    task = asyncio.create_task(rig.worker.run())
    ok = await rig.enqueue("a@example.org", "fine@example.net")
    async with asyncio.timeout(5):
        while (await rig.queue.get(ok)).state is not MessageState.SENT:
            await asyncio.sleep(0.005)
    assert not task.done()
    assert (await rig.queue.get(crash)).state is MessageState.DEFERRED
    rig.worker.stop()
    async with asyncio.timeout(5):
        await task
    assert seen == ["crash@example.net", "fine@example.net"]


async def test_graceful_stop_releases_what_is_still_in_flight() -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    class Slow(ScriptedCourier):
        async def deliver(
            self,
            sender: str,
            recipients: Sequence[str],
            data: bytes,
            *,
            message_id: str = "",
            dsn: object = None,
        ) -> list[DeliveryResult]:
            started.set()
            await gate.wait()
            return all_results(recipients, *OK)

    rig = await start(Rig({RouteKind.RELAY: Slow("slow", lambda r: OK)}))
    rig.worker.stop_timeout = 0.05
    mid = await rig.enqueue("a@example.org", "b@example.net")
    task = asyncio.create_task(rig.worker.run())
    async with asyncio.timeout(5):
        await started.wait()
    assert (await rig.queue.get(mid)).state is MessageState.SENDING
    rig.worker.stop()
    async with asyncio.timeout(5):
        await task
    msg = await rig.queue.get(mid)
    assert msg.state is MessageState.QUEUED
    assert msg.lease_owner == ""
    assert "event=released" in rig.log


async def test_claim_failures_do_not_end_the_loop() -> None:
    class Flaky(MemoryQueue):
        failures = 2

        async def claim(self, **kwargs: object) -> list:  # type: ignore[override,type-arg]
            if self.failures:
                self.failures -= 1
                raise QueueError("database restarting")
            return await super().claim(**kwargs)  # type: ignore[arg-type]

    clock = FakeClock(T0)
    relay = ScriptedCourier("relay.test", lambda r: OK)
    rig = Rig({RouteKind.RELAY: relay}, queue=Flaky(clock=clock), clock=clock)
    rig.worker.error_backoff = 0.01
    await start(rig)
    mid = await rig.enqueue("a@example.org", "b@example.net")
    task = asyncio.create_task(rig.worker.run())
    async with asyncio.timeout(5):
        while (await rig.queue.get(mid)).state is not MessageState.SENT:
            await asyncio.sleep(0.005)
    rig.worker.stop()
    async with asyncio.timeout(5):
        await task
    assert rig.log.count("claim failed") == 2


async def test_run_takes_over_dead_nodes_leases_periodically_and_logs_it() -> None:
    """A shared queue's take-over (PostgresQueue.take_over_dead) runs every
    ``take_over_every`` seconds while the worker runs; a failure of it does not end the
    run; a take-over that found something is logged; none runs after the stop."""
    calls: list[int] = []
    answers = [QueueError("down"), 0, 3]

    async def take_over() -> int:
        calls.append(1)
        answer = answers.pop(0) if answers else 0
        if isinstance(answer, Exception):
            raise answer
        return answer

    rig = await start(Rig({RouteKind.RELAY: ScriptedCourier("relay.test", lambda r: OK)}))
    rig.worker.take_over = take_over
    rig.worker.take_over_every = 0.01
    task = asyncio.create_task(rig.worker.run())
    async with asyncio.timeout(5):
        while "of a dead node" not in rig.log:
            await asyncio.sleep(0.005)
    assert "status=recovered (3 message(s) of a dead node)" in rig.log
    rig.worker.stop()
    async with asyncio.timeout(5):
        await task
    made = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == made >= 3
