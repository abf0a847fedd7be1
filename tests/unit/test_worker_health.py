"""A worker whose queue keeps failing says so once, not once a second, and says when it
works again; a full disk is a line, never a traceback (issue 8: must-fix 1, disk full)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence

import pytest

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.router import RouteKind, Router
from hato.errors import QueueFullError
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.base import MessageState, StoredMessage
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.worker import UNHEALTHY_AFTER, Health, Worker

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FullDisk(MemoryQueue):
    """Claims fail with a full disk ``failures`` times, then work."""

    def __init__(self, failures: int, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.failures = failures
        self.attempts = 0

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            self._clock.now += 1.0  # type: ignore[attr-defined]
            raise QueueFullError(
                "queue write failed: queue storage is full (database or disk is full)"
            )
        return await super().claim(owner=owner, limit=limit, lease_seconds=lease_seconds)


class Accept:
    name = "relay.test"

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: object = None,
    ) -> list[DeliveryResult]:
        return [DeliveryResult(r, Result.OK, Reply(250, "2.0.0", "ok")) for r in recipients]

    async def close(self) -> None:
        return None


def make_worker(queue: MemoryQueue, out: io.StringIO, clock: Clock) -> Worker:
    worker = Worker(
        queue,
        {RouteKind.RELAY: Accept()},  # type: ignore[dict-item]
        Router((), RouteKind.RELAY),
        RetrySchedule(min_delay=60, max_delay=600, max_lifetime=3600),
        MailLog(out, clock=clock),
        hostname="mx.example.org",
        clock=clock,
        owner="w1",
        idle_wait=0.05,
    )
    worker.error_backoff = 0.001
    return worker


async def run_until(worker: Worker, done: asyncio.Event | None = None, *, sent: str = "") -> None:
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        while (await worker.queue.get(sent)).state is not MessageState.SENT:
            await asyncio.sleep(0.002)
    worker.stop()
    async with asyncio.timeout(5):
        await task


@pytest.mark.parametrize("failures", [1, UNHEALTHY_AFTER - 1, UNHEALTHY_AFTER, 60])
async def test_a_failing_queue_is_logged_once_and_its_recovery_once(
    failures: int, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    queue = FullDisk(failures, clock)
    out = io.StringIO()
    worker = make_worker(queue, out, clock)
    await queue.open()
    mid = await queue.enqueue(Envelope("a@example.org", ["b@example.net"]), b"x\r\n")
    seen: list[Health] = []
    original = worker._claim_failed

    def watch(exc: Exception) -> None:
        original(exc)
        seen.append(worker.health)

    worker._claim_failed = watch  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="hato"):
        await run_until(worker, sent=mid)

    lines = out.getvalue().splitlines()
    failed = [line for line in lines if "warning=claim failed: QueueFullError" in line]
    unhealthy = [line for line in lines if "status=unhealthy" in line]
    healthy = [line for line in lines if "status=healthy" in line]
    assert len(failed) == min(failures, UNHEALTHY_AFTER - 1)
    assert len(unhealthy) == len(healthy) == (1 if failures >= UNHEALTHY_AFTER else 0)
    if unhealthy:
        assert (
            f"{UNHEALTHY_AFTER} claims failed in a row: claim failed: QueueFullError"
            in unhealthy[0]
        )
        assert f"after {failures} failures in {failures - 1}s" in healthy[0]
        assert [h.ok for h in seen][UNHEALTHY_AFTER - 1 :] == [False] * (
            failures - UNHEALTHY_AFTER + 1
        )
        assert seen[-1].failures == failures and seen[-1].since == T0 + 1
    assert all(h.ok for h in seen[: UNHEALTHY_AFTER - 1])
    assert worker.health == Health()
    # A full disk is not a bug: no traceback anywhere.
    assert not [r for r in caplog.records if r.exc_info]
    assert "Traceback" not in out.getvalue()


def test_health_reads_as_ok_or_unhealthy_with_since() -> None:
    assert str(Health()) == "ok"
    sick = Health(False, "claim failed: QueueError: database restarting", T0, 7)
    assert str(sick) == (
        "unhealthy: claim failed: QueueError: database restarting"
        " (since 2023-11-14T22:13:20Z, 7 failed claims)"
    )


async def test_quarantines_during_claims_are_logged_with_their_reason() -> None:
    clock = Clock()
    queue = MemoryQueue(clock=clock)
    out = io.StringIO()
    worker = make_worker(queue, out, clock)
    assert queue.on_quarantine is not None
    queue.on_quarantine("0123456789ABCDEF012", "recipient state is not valid UTF-8")
    assert "0123456789ABCDEF012: event=quarantined, reason=recipient state is not valid UTF-8" in (
        out.getvalue()
    )
    other = MemoryQueue(clock=clock)
    chosen: list[str] = []
    other.on_quarantine = lambda mid, why: chosen.append(mid)
    make_worker(other, out, clock)
    assert other.on_quarantine is not None
    other.on_quarantine("X", "y")  # a hook set before the worker is left in place
    assert chosen == ["X"]
    del worker
