"""Hato's own DSNs (RFC 3461) from the worker: the real smarthost courier against aiosmtpd
sinks (which do not offer DSN) and Hato's own intake (which does), the Maildir courier,
the memory queue; every DSN read back with the email package."""

from __future__ import annotations

import email
import email.policy
import io
import random
from email.message import Message
from pathlib import Path

from hato import events
from hato.aliases import LocalRecipients
from hato.delivery.base import Courier
from hato.delivery.maildir import MaildirCourier
from hato.delivery.router import RouteKind, Router
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.dsn_params import META_NOTIFY, META_RET, RecipientDsn, store_recipients
from hato.maillog import MailLog
from hato.message import META_ENVID, Envelope
from hato.queue.base import StoredMessage
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.server import start_listener
from hato.testing import FakeClock
from hato.worker import Worker
from peers.asyncsinks import HOST, Handler, Sink

T0 = 1_700_000_000.0
MSG = (
    b"From: app@example.org\r\nTo: user@example.net\r\nSubject: reset\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nsecret link\r\n"
)
SENDER = "app@example.org"
RCPT = "user@example.net"


class Rig:
    """A worker with DSNs on, relaying to ``port`` and delivering example.org locally."""

    def __init__(self, port: int, maildir: Path, *, delay_warning: float = 4 * 3600) -> None:
        self.clock = FakeClock(T0)
        self.queue = MemoryQueue(clock=self.clock)
        self.out = io.StringIO()
        self.smarthost = SmarthostCourier(
            SmarthostConfig(host=HOST, port=port, tls="none", timeout=5.0)
        )
        local = MaildirCourier(
            maildir,
            LocalRecipients(["example.com"], user_exists=lambda local, _domain: True),
            clock=self.clock,
            hostname="relay.example.org",
            fsync=False,
        )
        couriers: dict[RouteKind, Courier] = {
            RouteKind.RELAY: self.smarthost,
            RouteKind.LOCAL: local,
        }
        self.worker = Worker(
            self.queue,
            couriers,
            Router(frozenset({"example.com"}), "relay"),
            RetrySchedule(min_delay=60, max_delay=600, max_lifetime=5 * 86400),
            MailLog(self.out, clock=self.clock),
            hostname="relay.example.org",
            clock=self.clock,
            rng=random.Random(1),
            delay_warning=delay_warning,
        )

    async def __aenter__(self) -> Rig:
        await self.queue.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.smarthost.close()
        await self.queue.close()

    async def enqueue(
        self, *rcpts: str, sender: str = SENDER, ret: str = "", **dsn: RecipientDsn
    ) -> str:
        envelope = Envelope(sender, list(rcpts))
        envelope.meta[META_ENVID] = "app-4711"
        if ret:
            envelope.meta[META_RET] = ret
        store_recipients(
            envelope.meta, {r: dsn.get(r.split("@")[0], RecipientDsn()) for r in rcpts}
        )
        return await self.queue.enqueue(envelope, MSG)

    async def run(self) -> None:
        self.clock.advance(1)
        await self.worker.run_once()

    async def dsns(self, mid: str) -> list[StoredMessage]:
        listed = [m for m in await self.queue.list() if m.meta.get("dsn_for") == mid]
        return [await self.queue.get(m.id) for m in sorted(listed, key=lambda m: m.id)]


def parsed(msg: StoredMessage) -> Message:
    report = email.message_from_bytes(msg.data, policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert msg.sender == ""
    return report


def fields(report: Message) -> tuple[Message, list[Message]]:
    blocks = report.get_payload()[1].get_payload()
    return blocks[0], blocks[1:]


NOTIFY_FAILURE = RecipientDsn(frozenset({"FAILURE"}), "rfc822;User@example.net")


async def test_failure_with_ret_hdrs_reports_headers_envid_and_orcpt(tmp_path: Path) -> None:
    handler = Handler(rcpt_replies={RCPT: "550 5.1.1 no such user"})
    sink = await Sink(handler).start()
    async with Rig(sink.port, tmp_path) as rig:
        mid = await rig.enqueue(RCPT, ret="HDRS", user=NOTIFY_FAILURE)
        await rig.run()
        (dsn,) = await rig.dsns(mid)
        assert dsn.recipients[0].address == SENDER
        report = parsed(dsn)
        assert report["Subject"] == "Undelivered Mail Returned to Sender"
        per_message, (per_rcpt,) = fields(report)
        assert per_message["Original-Envelope-Id"] == "app-4711"
        assert per_rcpt["Original-Recipient"] == "rfc822;User@example.net"
        assert per_rcpt["Final-Recipient"] == f"rfc822; {RCPT}"
        assert per_rcpt["Action"] == "failed"
        assert per_rcpt["Status"] == "5.1.1"
        returned = report.get_payload()[2]
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"secret link" not in dsn.data
    await sink.stop()


async def test_failure_with_ret_full_returns_the_message(tmp_path: Path) -> None:
    sink = await Sink(Handler(rcpt_replies={RCPT: "550 5.1.1 no such user"})).start()
    async with Rig(sink.port, tmp_path) as rig:
        mid = await rig.enqueue(RCPT, ret="FULL")
        await rig.run()
        (dsn,) = await rig.dsns(mid)
        returned = parsed(dsn).get_payload()[2]
        assert returned.get_content_type() == "message/rfc822"
        assert returned.get_payload()[0]["Message-ID"] == "<m1@example.org>"
        assert b"secret link" in dsn.data
    await sink.stop()


async def test_never_and_null_sender_get_no_dsn(tmp_path: Path) -> None:
    sink = await Sink(Handler(rcpt_replies={RCPT: "550 5.1.1 no such user"})).start()
    async with Rig(sink.port, tmp_path) as rig:
        never = await rig.enqueue(RCPT, user=RecipientDsn(frozenset({"NEVER"})))
        null = await rig.enqueue(RCPT, sender="")
        success_only = await rig.enqueue(RCPT, user=RecipientDsn(frozenset({"SUCCESS"})))
        await rig.run()
        for mid in (never, null, success_only):
            assert (await rig.queue.get(mid)).state == "failed"
            assert await rig.dsns(mid) == []
        assert len(await rig.queue.list()) == 3
    await sink.stop()


async def test_delay_warning_is_sent_once_after_the_delay(tmp_path: Path) -> None:
    sink = await Sink(Handler(rcpt_replies={RCPT: "451 4.2.0 try later"})).start()
    async with Rig(sink.port, tmp_path, delay_warning=3600) as rig:
        mid = await rig.enqueue(RCPT, user=RecipientDsn(orcpt="rfc822;User@example.net"))
        never = await rig.enqueue(RCPT, user=RecipientDsn(frozenset({"NEVER"})))
        await rig.run()
        assert await rig.dsns(mid) == []  # not late yet
        for _ in range(3):  # every later attempt is past the delay: still one warning
            rig.clock.advance(3600)
            await rig.run()
        (dsn,) = await rig.dsns(mid)
        report = parsed(dsn)
        assert report["Subject"] == "Delayed Mail (still being retried)"
        per_message, (per_rcpt,) = fields(report)
        assert per_rcpt["Action"] == "delayed"
        assert per_rcpt["Status"] == "4.2.0"
        assert per_rcpt["Original-Recipient"] == "rfc822;User@example.net"
        assert per_message["Original-Envelope-Id"] == "app-4711"
        assert (await rig.queue.get(mid)).state == "deferred"
        assert await rig.dsns(never) == []
        for queue_id in (mid, never):
            page = await rig.queue.events(queue_id=queue_id)
            delayed = [e for e in page.events if e.event == events.DELAYED]
            assert len(delayed) == 1
            assert delayed[0].envid == "app-4711"
    await sink.stop()


async def test_success_to_a_next_hop_without_dsn_is_relayed(tmp_path: Path) -> None:
    sink = await Sink(Handler()).start()
    async with Rig(sink.port, tmp_path) as rig:
        mid = await rig.enqueue(
            RCPT, "other@example.net", user=RecipientDsn(frozenset({"SUCCESS", "FAILURE"}))
        )
        await rig.run()
        assert (await rig.queue.get(mid)).state == "sent"
        (dsn,) = await rig.dsns(mid)
        report = parsed(dsn)
        assert report["Subject"] == "Successful Mail Delivery Report"
        _, (per_rcpt,) = fields(report)  # only the recipient that asked
        assert per_rcpt["Final-Recipient"] == f"rfc822; {RCPT}"
        assert per_rcpt["Action"] == "relayed"
        assert per_rcpt["Status"].startswith("2.")
        assert per_rcpt["Remote-MTA"] == f"dns; {HOST}"
        # The sink offers no DSN: nothing went on to it.
        assert not any("ENVID" in o or "RET" in o for o in sink.handler.messages[0].mail_options)
    await sink.stop()


async def test_success_in_our_own_maildir_is_delivered(tmp_path: Path) -> None:
    async with Rig(1, tmp_path) as rig:
        mid = await rig.enqueue("taro@example.com", taro=RecipientDsn(frozenset({"SUCCESS"})))
        plain = await rig.enqueue("jiro@example.com")
        await rig.run()
        assert (await rig.queue.get(mid)).state == "sent"
        (dsn,) = await rig.dsns(mid)
        _, (per_rcpt,) = fields(parsed(dsn))
        assert per_rcpt["Action"] == "delivered"
        assert per_rcpt["Status"] == "2.0.0"
        assert await rig.dsns(plain) == []  # default NOTIFY: no success report


async def test_success_to_a_next_hop_with_dsn_is_passed_on_not_reported(tmp_path: Path) -> None:
    """Hato's intake offers DSN: NOTIFY, ORCPT, RET and ENVID go on, and no DSN is sent."""
    upstream = MemoryQueue()
    await upstream.open()
    listener = await start_listener(
        ListenerConfig("127.0.0.1", 0, ListenerRole.SMTP),
        queue=upstream,
        policy=Policy(role=ListenerRole.SMTP, mynetworks=parse_networks(["127.0.0.0/8"])),
        log=MailLog(io.StringIO()),
        hostname="upstream.example.net",
    )
    try:
        async with Rig(listener.port, tmp_path) as rig:
            mid = await rig.enqueue(
                RCPT,
                ret="HDRS",
                user=RecipientDsn(frozenset({"SUCCESS", "DELAY"}), "rfc822;User+x@example.net"),
            )
            await rig.run()
            assert (await rig.queue.get(mid)).state == "sent"
            assert await rig.dsns(mid) == []
            assert "envid=app-4711" in rig.out.getvalue()
        (got,) = await upstream.list()
        assert got.meta[META_ENVID] == "app-4711"
        assert got.meta[META_RET] == "HDRS"
        assert got.meta["dsn_rcpt"] == (
            '{"user@example.net":{"notify":"SUCCESS,DELAY","orcpt":"rfc822;User+x@example.net"}}'
        )
    finally:
        await listener.aclose(timeout=2)
        await upstream.close()


async def test_outbox_worker_sends_envid_of_its_queue_id_and_the_apps_notify(
    tmp_path: Path,
) -> None:
    upstream = MemoryQueue()
    await upstream.open()
    log = io.StringIO()
    listener = await start_listener(
        ListenerConfig("127.0.0.1", 0, ListenerRole.SMTP),
        queue=upstream,
        policy=Policy(role=ListenerRole.SMTP, mynetworks=parse_networks(["127.0.0.0/8"])),
        log=MailLog(log),
        hostname="relay.example.net",
    )
    try:
        async with Rig(listener.port, tmp_path) as rig:
            rig.worker.envid_from_id = True
            rig.worker.bounces = False
            envelope = Envelope(SENDER, [RCPT, "b@example.net"])
            envelope.meta[META_NOTIFY] = "SUCCESS,FAILURE"
            mid = await rig.queue.enqueue(envelope, MSG)
            await rig.run()
            assert f"envid={mid}" in rig.out.getvalue()
            page = await rig.queue.events(queue_id=mid)
            assert {e.envid for e in page.events} == {mid}
        (got,) = await upstream.list()
        assert got.meta[META_ENVID] == mid
        assert got.meta["dsn_rcpt"] == (
            '{"b@example.net":{"notify":"SUCCESS,FAILURE"},'
            '"user@example.net":{"notify":"SUCCESS,FAILURE"}}'
        )
        # The next node keeps the ENVID beside its own queue id, in its log too.
        assert f"{got.id}: " in log.getvalue() and f"envid={mid}" in log.getvalue()
    finally:
        await listener.aclose(timeout=2)
        await upstream.close()
