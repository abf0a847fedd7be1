"""Pipelined MAIL, RCPT and DATA (RFC 2920) against independent servers: Postfix's
``smtp-sink`` (offers PIPELINING, answers as fast as it can) and a private Postfix
smtpd (which logs ``improper command pipelining`` for a client that pipelines where it
may not)."""

from __future__ import annotations

import asyncio

from hato.delivery.base import Result
from hato.delivery.session import Plan, Session, Tls, client_context, open_session, send
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from peers.asyncsinks import HOST, Sink, wait_until, with_timeout
from peers.postfix import plain_relay, running
from peers.sinks import SmtpSinkProcess
from peers.tap import Tap

MSG = b"From: a@example.org\r\nSubject: pipelined\r\n\r\nHello.\r\n.dot\r\n"


async def session_to(port: int) -> Session:
    context = client_context(verify=False, ca_file=None, what="test")
    plan = Plan(host=HOST, port=port, helo_name="client.test", tls=Tls.NONE, context=context)
    session: Session = await with_timeout(open_session(plan))
    return session


async def test_smtp_sink_takes_pipelined_messages_on_one_connection() -> None:
    with SmtpSinkProcess() as sink:
        courier = SmarthostCourier(SmarthostConfig(host=HOST, port=sink.port, tls="none"))
        try:
            for n in range(20):
                rcpts = [f"r{n}-{i}@example.net" for i in range(3)]
                results = await with_timeout(courier.deliver("a@example.org", rcpts, MSG))
                assert [r.result for r in results] == [Result.OK] * 3, results[0].reply
        finally:
            await courier.close()
        assert courier.connections_opened == 1
        await asyncio.to_thread(sink.wait_for_count, 20, 30.0)


async def test_smtp_sink_answers_each_group_in_order() -> None:
    with SmtpSinkProcess() as sink:
        session = await session_to(sink.port)
        assert session.pipe is not None  # smtp-sink offers PIPELINING (not with -f/-r)
        for n in range(10):
            rcpts = [f"r{n}-{i}@example.net" for i in range(5)]
            t = await with_timeout(send(session, "a@example.org", rcpts, MSG))
            assert [r.result for r in t.results] == [Result.OK] * 5
            assert session.alive and session.clean
        await session.quit(5.0)
        await asyncio.to_thread(sink.wait_for_count, 10, 30.0)


async def test_postfix_smtpd_takes_a_pipelined_group_with_a_refused_recipient() -> None:
    refuse = "check_recipient_access inline:{ {refused@example.net=REJECT not here} }"
    main = {
        "smtpd_discard_ehlo_keywords": "chunking",  # DATA, so the group ends with DATA
        "smtpd_recipient_restrictions": f"{refuse}, permit_mynetworks, reject",
    }
    async with Sink() as onward:
        instance = plain_relay(("127.0.0.1", onward.port), main=main)
        with running(instance):
            async with Tap(instance.listeners["smtp"]) as tap:
                session = await session_to(tap.port)
                assert session.pipe is not None
                rcpts = ["one@example.net", "refused@example.net", "two@example.net"]
                t = await with_timeout(send(session, "a@example.org", rcpts, MSG), 30)
                got = [(r.result, r.reply.code) for r in t.results]
                assert got == [(Result.OK, 250), (Result.PERMANENT, 554), (Result.OK, 250)]
                t = await with_timeout(send(session, "a@example.org", ["three@example.net"], MSG))
                assert t.results[0].result is Result.OK
                await session.quit(5.0)
            await wait_until(lambda: len(onward.handler.messages) == 2, 60)
            log = instance.log()
    assert "improper command pipelining" not in log
    assert (
        b"MAIL FROM:<a@example.org> SIZE=%d\r\nRCPT TO:<one@example.net>\r\n"
        b"RCPT TO:<refused@example.net>\r\nRCPT TO:<two@example.net>\r\nDATA\r\n"
        % len(MSG)
        in tap.wire
    )
    # Postfix's queue manager relays the two messages in either order.
    [first] = [m for m in onward.handler.messages if "three@example.net" not in m.rcpt_tos]
    assert sorted(first.rcpt_tos) == ["one@example.net", "two@example.net"]
    assert first.data.endswith(b"Hello.\r\n.dot\r\n")


async def test_postfix_smtpd_with_chunking_gets_a_group_then_bdat() -> None:
    async with Sink() as onward:
        instance = plain_relay(("127.0.0.1", onward.port))
        with running(instance):
            async with Tap(instance.listeners["smtp"]) as tap:
                session = await session_to(tap.port)
                t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG), 30)
                assert t.results[0].result is Result.OK, t.results[0].reply
                await session.quit(5.0)
            await wait_until(lambda: len(onward.handler.messages) == 1, 60)
            log = instance.log()
    assert "improper command pipelining" not in log
    assert b"RCPT TO:<b@example.net>\r\nBDAT %d LAST\r\n" % len(MSG) in tap.wire
