"""The worker with the memory queue, the real smarthost courier and aiosmtpd sinks on loopback."""

from __future__ import annotations

import asyncio
import email
import io
import random
import socket

from hato.delivery.base import Courier
from hato.delivery.hold import HoldCourier
from hato.delivery.router import RouteKind, Router
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.base import MessageState
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.testing import FakeClock
from hato.worker import Worker
from peers.asyncsinks import HOST, Handler, Sink, wait_until

T0 = 1_700_000_000.0
MSG = b"From: app@example.org\r\nTo: user@example.net\r\nSubject: reset\r\n\r\nlink\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Rig:
    """A worker relaying to ``port`` (or holding, with ``route="hold"``)."""

    def __init__(self, port: int, *, route: str = "relay", lifetime: float = 3600.0) -> None:
        self.clock = FakeClock(T0)
        self.queue = MemoryQueue(clock=self.clock)
        self.out = io.StringIO()
        self.smarthost = SmarthostCourier(
            SmarthostConfig(host=HOST, port=port, tls="none", timeout=5.0)
        )
        couriers: dict[RouteKind, Courier] = {
            RouteKind.HOLD: HoldCourier(),
            RouteKind.RELAY: self.smarthost,
        }
        self.worker = Worker(
            self.queue,
            couriers,
            Router(frozenset(), route),
            RetrySchedule(min_delay=60, max_delay=600, max_lifetime=lifetime),
            MailLog(self.out, clock=self.clock),
            hostname="relay.example.org",
            clock=self.clock,
            rng=random.Random(1),
            idle_wait=0.05,
            stop_timeout=0.2,
        )

    async def __aenter__(self) -> Rig:
        await self.queue.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.smarthost.close()
        await self.queue.close()

    async def enqueue(self, sender: str, *rcpts: str) -> str:
        return await self.queue.enqueue(Envelope(sender, list(rcpts)), MSG)

    async def others(self, mid: str) -> list[str]:
        return [m.id for m in await self.queue.list() if m.id != mid]

    @property
    def log(self) -> str:
        return self.out.getvalue()


async def test_deferred_while_upstream_down_then_delivered() -> None:
    port = free_port()
    async with Rig(port) as rig:
        mid = await rig.enqueue("app@example.org", "user@example.net")
        await rig.worker.run_once()
        msg = await rig.queue.get(mid)
        assert msg.state is MessageState.DEFERRED
        assert "Connection refused" in msg.recipients[0].reply
        assert f"relay={HOST}[{HOST}]:{port}" in rig.log
        assert "status=deferred (451 4.4.1 connect to" in rig.log

        sink = await Sink().start(port)  # the upstream comes back on the same port
        try:
            assert await rig.worker.run_once() == 0  # not due yet
            rig.clock.now = msg.next_attempt_at
            assert await rig.worker.run_once() == 1
            msg = await rig.queue.get(mid)
            assert msg.state is MessageState.SENT
            assert msg.attempts == 2
            [got] = sink.handler.messages
            assert got.data == MSG
        finally:
            await sink.stop()
        assert "status=sent" in rig.log


async def test_permanent_failure_bounces_and_the_dsn_is_delivered() -> None:
    handler = Handler(
        rcpt_replies={"nobody@example.net": "550 5.1.1 <nobody@example.net>: unknown"}
    )
    async with Sink(handler) as sink, Rig(sink.port) as rig:
        mid = await rig.enqueue("app@example.org", "nobody@example.net", "user@example.net")
        await rig.worker.run_once()
        msg = await rig.queue.get(mid)
        assert msg.state is MessageState.FAILED
        [dsn_id] = await rig.others(mid)
        dsn = await rig.queue.get(dsn_id)
        assert dsn.sender == "" and dsn.pending == ["app@example.org"]

        await rig.worker.run_once()  # the DSN goes out through the same relay
        assert (await rig.queue.get(dsn_id)).state is MessageState.SENT
    first, bounce = sink.handler.messages
    assert first.rcpt_tos == ["user@example.net"]
    assert (bounce.mail_from, bounce.rcpt_tos) == ("<>", ["app@example.org"])
    report = email.message_from_bytes(bounce.data)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; nobody@example.net"
    assert status["Status"] == "5.1.1"
    assert status["Remote-MTA"] == f"dns; {HOST}"


async def test_null_sender_is_never_bounced() -> None:
    handler = Handler(rcpt_replies={"nobody@example.net": "550 5.1.1 unknown"})
    async with Sink(handler) as sink, Rig(sink.port) as rig:
        mid = await rig.enqueue("", "nobody@example.net")
        await rig.worker.run_once()
        assert (await rig.queue.get(mid)).state is MessageState.FAILED
        assert await rig.others(mid) == []
        assert await rig.worker.run_once() == 0


async def test_4xx_is_retried_not_bounced() -> None:
    handler = Handler(rcpt_replies={"user@example.net": "450 4.2.1 mailbox busy"})
    async with Sink(handler) as sink, Rig(sink.port) as rig:
        mid = await rig.enqueue("app@example.org", "user@example.net")
        await rig.worker.run_once()
        msg = await rig.queue.get(mid)
        assert msg.state is MessageState.DEFERRED
        handler.rcpt_replies.clear()
        rig.clock.now = msg.next_attempt_at
        await rig.worker.run_once()
        assert (await rig.queue.get(mid)).state is MessageState.SENT
        assert await rig.others(mid) == []
        assert sink.connections == 1  # the connection was kept and reused


async def test_give_up_after_lifetime() -> None:
    port = free_port()
    async with Rig(port, lifetime=600) as rig:
        mid = await rig.enqueue("app@example.org", "user@example.net")
        await rig.worker.run_once()
        for _ in range(10):  # bounded: the lifetime is over long before this
            msg = await rig.queue.get(mid)
            if msg.state is not MessageState.DEFERRED:
                break
            rig.clock.now = msg.next_attempt_at
            await rig.worker.run_once()
        assert msg.state is MessageState.FAILED
        assert rig.clock.now - T0 >= 600
        [dsn_id] = await rig.others(mid)
        data = (await rig.queue.get(dsn_id)).data
        assert b"Action: failed" in data and b"Status: 4.4.1" in data
        assert "status=bounced (gave up after 600 seconds: 451 4.4.1 connect to" in rig.log


async def test_held_messages_stay_held() -> None:
    async with Sink() as sink, Rig(sink.port, route="hold") as rig:
        mid = await rig.enqueue("app@example.org", "user@example.net")
        await rig.worker.run_once()
        msg = await rig.queue.get(mid)
        assert msg.state is MessageState.HELD
        assert "status=held (250 2.0.0 held: no relay configured)" in rig.log
        rig.clock.now += 10 * 86_400
        assert await rig.worker.run_once() == 0
        assert (await rig.queue.get(mid)).state is MessageState.HELD
    assert sink.connections == 0


async def test_run_loop_delivers_new_mail_promptly() -> None:
    async with Sink() as sink, Rig(sink.port) as rig:
        task = asyncio.create_task(rig.worker.run())
        ids = [await rig.enqueue("app@example.org", f"u{n}@example.net") for n in range(5)]
        await wait_until(lambda: len(sink.handler.messages) == 5)
        rig.worker.stop()
        async with asyncio.timeout(5):
            await task
        for mid in ids:
            assert (await rig.queue.get(mid)).state is MessageState.SENT


async def test_graceful_stop_releases_a_stalled_delivery() -> None:
    gate = asyncio.Event()
    async with Sink(Handler(data_gate=gate)) as sink, Rig(sink.port) as rig:
        mid = await rig.enqueue("app@example.org", "user@example.net")
        task = asyncio.create_task(rig.worker.run())
        await wait_until(lambda: "DATA" in sink.handler.verbs())
        rig.worker.stop()
        async with asyncio.timeout(5):
            await task
        msg = await rig.queue.get(mid)
        assert msg.state is MessageState.QUEUED  # released, due again at once
        assert msg.lease_owner == ""
        assert "event=released" in rig.log
        gate.set()  # let the sink's handler finish before it shuts down
