"""The delivery events the worker records with each attempt (hato.events).

The couriers are scripted (the worker's bookkeeping is under test); the attempt fields
come from the courier's result, as a real session stamps them (tests/integration covers
those against real peers).
"""

from __future__ import annotations

import dataclasses
import io
import random

from hato.delivery.base import Result
from hato.delivery.router import RouteKind, Router
from hato.maillog import MailLog
from hato.message import META_ENVID, Envelope
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.testing import FakeClock, ScriptedCourier
from hato.worker import Worker

MSG = b"From: a@example.org\r\nMessage-ID: <m1@example.org>\r\nSubject: t\r\n\r\nbody\r\n"
OK = (Result.OK, Reply(250, "2.0.0", "Ok: queued as ABC"))
BUSY = (Result.TEMPORARY, Reply(451, "4.3.0", "try later"))
UNKNOWN = (Result.PERMANENT, Reply(550, "5.1.1", "User unknown"))


class HopCourier(ScriptedCourier):
    """A scripted courier whose results carry the next hop, as a session's do."""

    async def deliver(self, sender, recipients, data, *, message_id="", dsn=None):  # type: ignore[no-untyped-def]
        results = await super().deliver(sender, recipients, data, message_id=message_id)
        return [
            dataclasses.replace(
                r,
                relay_host=f"{self.name}",
                relay_ip="192.0.2.1",
                tls_version="TLSv1.3",
                tls_verified=True,
            )
            for r in results
        ]


async def run(
    route: str, answer: object, *, lifetime: float = 3600, envid: str = ""
) -> tuple[MemoryQueue, str]:
    clock = FakeClock(1_700_000_000.0)
    queue = MemoryQueue(clock=clock)
    await queue.open()
    kind = RouteKind(route)
    courier = HopCourier(f"{route}.test", lambda r: answer)  # type: ignore[arg-type,return-value]
    worker = Worker(
        queue,
        {kind: courier},
        Router((), route),
        RetrySchedule(min_delay=60, max_delay=600, max_lifetime=lifetime),
        MailLog(io.StringIO(), clock=clock),
        hostname="relay.example.org",
        clock=clock,
        rng=random.Random(1),
        bounces=False,
    )
    envelope = Envelope(
        "a@example.org", ["b@example.net"], meta={META_ENVID: envid} if envid else {}
    )
    mid = await queue.enqueue(envelope, MSG)
    clock.advance(5)
    await worker.run_once()
    return queue, mid


async def test_a_relay_hand_off_is_relayed_with_the_whole_attempt_record() -> None:
    queue, mid = await run("relay", OK, envid="OUTBOX-1")
    [event] = (await queue.events(queue_id=mid)).events
    assert event.event == "relayed"
    assert (event.node, event.queue_id, event.recipient, event.envid) == (
        "relay.example.org",
        mid,
        "b@example.net",
        "OUTBOX-1",
    )
    assert event.message_id == "<m1@example.org>"
    assert (event.route, event.relay_host, event.relay_ip) == ("relay", "relay.test", "192.0.2.1")
    assert (event.reply_code, event.reply_enhanced, event.reply_text) == (
        250,
        "2.0.0",
        "Ok: queued as ABC",
    )
    assert (event.tls_version, event.tls_verified, event.attempt) == ("TLSv1.3", True, 1)
    assert event.time == 1_700_000_005.0


async def test_the_mx_accepting_is_delivered() -> None:
    queue, mid = await run("mx", OK)
    assert [e.event for e in (await queue.events(queue_id=mid)).events] == ["delivered"]


async def test_failures_are_deferred_bounced_or_expired() -> None:
    queue, mid = await run("relay", BUSY)
    assert [e.event for e in (await queue.events(queue_id=mid)).events] == ["deferred"]
    queue, mid = await run("relay", UNKNOWN)
    [bounced] = (await queue.events(queue_id=mid)).events
    assert (bounced.event, bounced.reply_code, bounced.reply_enhanced) == ("bounced", 550, "5.1.1")
    queue, mid = await run("relay", BUSY, lifetime=1)
    assert [e.event for e in (await queue.events(queue_id=mid)).events] == ["expired"]


async def test_the_hold_route_records_held() -> None:
    queue, mid = await run("hold", (Result.HELD, Reply(250, "2.0.0", "held")))
    assert [e.event for e in (await queue.events(queue_id=mid)).events] == ["held"]
