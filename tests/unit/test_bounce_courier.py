"""The bounce courier: which bounces become events on which message, and what still goes
to the mailbox. The queue is the in-memory backend; the wrapped local courier is
scripted (tests/e2e/test_async_bounce.py runs the whole path with Maildirs and Postfix).
"""

from __future__ import annotations

import io
import random

import pytest

from hato import events
from hato.delivery.base import Result
from hato.delivery.bounce import BounceCourier
from hato.delivery.router import RouteKind, Router
from hato.dsn import FailedRecipient, build_bounce
from hato.events import ACCEPTED, DeliveryEvent
from hato.maillog import MailLog
from hato.message import META_ENVID, Envelope
from hato.queue.base import MessageState, Outcome, RecipientState
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.testing import FakeClock, ScriptedCourier
from hato.verp import Verp
from hato.worker import Worker

HOST = "relay.example.com"
SENDER = "app@example.com"
RCPT = "user@example.net"
ORIGINAL = b"From: app@example.com\r\nMessage-ID: <orig-1@example.com>\r\n\r\nhello\r\n"
VERP = Verp(b"0123456789abcdef0123456789abcdef", ["example.com"])
BOUNCE_ID = "0193A1B2C3D4EFFFFFF"  # the bounce's own queue id
STORED = (Result.OK, Reply(250, "2.0.0", "delivered to maildir"))


def dsn(
    rcpt: str = RCPT,
    *,
    envid: str = "",
    message_id: str = "<orig-1@example.com>",
    status: str = "5.1.1",
    action: str = "failed",
) -> bytes:
    envid_line = f"Original-Envelope-Id: {envid}\r\n" if envid else ""
    return (
        "From: MAILER-DAEMON@mx.example.net\r\nTo: app@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nThis is the mail system at host mx.example.net.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.net\r\n{envid_line}\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        "Remote-MTA: dns; store.example.net\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{rcpt}>: User unknown\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: app@example.com\r\nMessage-ID: {message_id}\r\n\r\n--b--\r\n"
    ).encode()


class Node:
    def __init__(self, *, keep: bool = False, verp: Verp | None = VERP) -> None:
        self.clock = FakeClock(1_764_750_000.0)
        self.queue = MemoryQueue(clock=self.clock)
        self.mailbox = ScriptedCourier("maildir", lambda r: STORED, relay="maildir")
        self.courier = BounceCourier(
            self.mailbox, self.queue, hostname=HOST, verp=verp, keep=keep, clock=self.clock
        )

    async def sent(self, *recipients: str, envid: str = "") -> str:
        await self.queue.open()
        meta = {META_ENVID: envid} if envid else {}
        accepted = [
            DeliveryEvent(
                event_id=events.new_event_id(self.clock),
                event=ACCEPTED,
                time=self.clock(),
                node=HOST,
                queue_id="",
                recipient=r,
                envid=envid,
                message_id="<orig-1@example.com>",
            )
            for r in recipients or (RCPT,)
        ]
        return await self.queue.enqueue(
            Envelope(SENDER, list(recipients or (RCPT,)), meta=meta), ORIGINAL, events=accepted
        )

    async def bounce(self, data: bytes, to: str = SENDER, sender: str = "") -> list[Result]:
        results = await self.courier.deliver(sender, [to], data, message_id=BOUNCE_ID)
        return [r.result for r in results]

    async def recorded(self, queue_id: str, name: str = events.BOUNCED) -> list[DeliveryEvent]:
        page = await self.queue.events(queue_id=queue_id)
        return [e for e in page.events if e.event == name]


async def test_a_signed_verp_address_matches_without_any_other_clue() -> None:
    node = Node()
    qid = await node.sent()
    to = VERP.return_path(SENDER, qid)
    data = dsn(message_id="<unrelated@example.org>", rcpt="rewritten@example.net")
    assert await node.bounce(data, to) == [Result.OK]
    assert node.mailbox.calls == []  # not in the mailbox
    [event] = await node.recorded(qid)
    assert event.recipient == RCPT  # the lone original recipient stands for it
    assert (event.reply_code, event.reply_enhanced) == (550, "5.1.1")
    assert event.reply_text == "<rewritten@example.net>: User unknown"
    assert event.relay_host == "store.example.net"
    assert (event.route, event.node, event.message_id) == ("bounce", HOST, "<orig-1@example.com>")
    # Delivered again (at least once): the same event id, stored once.
    assert await node.bounce(data, to) == [Result.OK]
    assert len(await node.recorded(qid)) == 1


async def test_a_forged_verp_token_is_ignored() -> None:
    node = Node()
    qid = await node.sent()
    to = VERP.return_path(SENDER, qid)
    forged = to.replace(to.split(".")[1][:4], "0000")
    data = dsn(message_id="<unrelated@example.org>")
    assert await node.bounce(data, forged) == [Result.OK]
    assert node.mailbox.calls == [("", [forged])]  # goes to the mailbox like any mail
    assert await node.recorded(qid) == []


async def test_envid_as_our_queue_id_needs_a_shared_recipient() -> None:
    node = Node()
    qid = await node.sent()
    assert await node.bounce(dsn("stranger@example.net", envid=qid, message_id="<x@y>")) == [
        Result.OK
    ]
    assert len(node.mailbox.calls) == 1
    assert await node.recorded(qid) == []
    assert await node.bounce(dsn(envid=qid, message_id="<x@y>")) == [Result.OK]
    assert len(node.mailbox.calls) == 1
    [event] = await node.recorded(qid)
    assert event.recipient == RCPT


async def test_a_kept_envid_is_found_through_the_events() -> None:
    node = Node()
    await node.sent("other@example.net", envid="outbox-0001")
    qid = await node.sent(envid="outbox-0002")
    assert await node.bounce(dsn(envid="outbox-0002", message_id="<x@y>")) == [Result.OK]
    [event] = await node.recorded(qid)
    assert event.envid == "outbox-0002"
    assert node.mailbox.calls == []


async def test_the_returned_message_id_matches_the_newest_message_with_that_recipient() -> None:
    node = Node(verp=None)
    await node.sent("other@example.net")
    qid = await node.sent("a@example.net", RCPT)
    assert await node.bounce(dsn(status="5.2.2", action="failed")) == [Result.OK]
    [event] = await node.recorded(qid)
    assert (event.recipient, event.reply_enhanced) == (RCPT, "5.2.2")


async def test_delay_reports_become_delayed_events() -> None:
    node = Node()
    qid = await node.sent()
    assert await node.bounce(dsn(status="4.4.1", action="delayed")) == [Result.OK]
    assert await node.recorded(qid) == []
    [event] = await node.recorded(qid, events.DELAYED)
    assert event.reply_enhanced == "4.4.1"


@pytest.mark.parametrize(
    ("sender", "data"),
    [
        ("", b"From: a@example.org\r\nSubject: hi\r\n\r\nnot a bounce\r\n"),
        ("someone@example.org", dsn()),  # a normal sender is not parsed at all
        ("", dsn(rcpt="nobody@example.org", message_id="<unknown@example.org>")),
    ],
    ids=["not-a-dsn", "not-from-a-daemon", "matches-nothing"],
)
async def test_everything_else_goes_to_the_mailbox(sender: str, data: bytes) -> None:
    node = Node()
    qid = await node.sent()
    assert await node.bounce(data, sender=sender) == [Result.OK]
    assert node.mailbox.calls == [(sender, [SENDER])]
    assert await node.recorded(qid) == []


async def test_our_own_dsn_is_left_to_the_mailbox() -> None:
    node = Node()
    qid = await node.sent()
    own = build_bounce(
        hostname=HOST,
        queue_id=qid,
        sender=SENDER,
        recipients=[FailedRecipient(RCPT, Reply(550, "5.1.1", "unknown"))],
        original=ORIGINAL,
        arrival=node.clock(),
        now=node.clock(),
    )
    assert own is not None
    assert await node.bounce(own.data) == [Result.OK]
    assert len(node.mailbox.calls) == 1
    assert await node.recorded(qid) == []


async def test_keep_records_and_delivers() -> None:
    node = Node(keep=True)
    qid = await node.sent()
    assert await node.bounce(dsn()) == [Result.OK]
    assert len(node.mailbox.calls) == 1
    assert len(await node.recorded(qid)) == 1


async def test_a_queue_failure_is_temporary() -> None:
    node = Node()
    await node.sent()
    await node.queue.close()
    assert await node.bounce(dsn()) == [Result.TEMPORARY]
    assert node.mailbox.calls == []


async def test_the_worker_sends_with_a_verp_return_path_off_the_local_route() -> None:
    clock = FakeClock(1_764_750_000.0)
    queue = MemoryQueue(clock=clock)
    await queue.open()
    mx = ScriptedCourier("mx", lambda r: STORED)
    local = ScriptedCourier("maildir", lambda r: STORED, relay="maildir")
    worker = Worker(
        queue,
        {RouteKind.MX: mx, RouteKind.LOCAL: local},
        Router(["example.com"], "mx"),
        RetrySchedule(),
        MailLog(io.StringIO(), clock=clock),
        hostname=HOST,
        clock=clock,
        rng=random.Random(1),
        return_path=VERP.return_path,
    )
    qid = await queue.enqueue(Envelope(SENDER, [RCPT, "me@example.com"]), ORIGINAL)
    other = await queue.enqueue(Envelope("x@example.org", [RCPT]), ORIGINAL)
    await worker.run_once()
    assert (VERP.return_path(SENDER, qid), [RCPT]) in mx.calls
    assert ("x@example.org", [RCPT]) in mx.calls  # not our domain: unchanged
    assert local.calls == [(SENDER, ["me@example.com"])]
    assert VERP.queue_id(VERP.return_path(SENDER, qid)) == qid.lower()
    assert other


async def test_a_delivered_recipient_becomes_failed_in_the_queue() -> None:
    node = Node()
    qid = await node.sent("a@example.net", RCPT)
    await node.queue.claim(owner="w", limit=1, lease_seconds=60)
    sent = [Outcome(r, RecipientState.SENT, "250 2.0.0 ok") for r in ("a@example.net", RCPT)]
    assert await node.queue.record(qid, sent, owner="w", retry_at=None) is MessageState.SENT
    assert await node.bounce(dsn(envid=qid)) == [Result.OK]
    message = await node.queue.get(qid)
    assert message.state is MessageState.FAILED
    assert [(r.address, r.state, r.reply, r.relay) for r in message.recipients] == [
        ("a@example.net", RecipientState.SENT, "250 2.0.0 ok", ""),
        (
            RCPT,
            RecipientState.FAILED,
            "550 5.1.1 <user@example.net>: User unknown",
            "store.example.net",
        ),
    ]
