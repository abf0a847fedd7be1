"""Pipelined MAIL, RCPT and DATA (RFC 2920) in the shared SMTP session, against servers
that record how the commands arrive (``PipeliningServer``), and the reply-stream checks
that keep a server from steering the client (extra replies, STARTTLS injection)."""

from __future__ import annotations

import asyncio

import pytest

from hato.delivery.base import Result
from hato.delivery.session import Plan, Session, Tls, client_context, open_session, send
from peers.asyncsinks import HOST, Certs, PipeliningServer, certs, with_timeout

__all__ = ["certs"]  # the fixture, re-exported so pytest finds it here

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n.dot line\r\n"
STUFFED = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n..dot line\r\n"


def plan(port: int, *, tls: Tls = Tls.NONE, pipelining: bool = True, ca: str | None = None) -> Plan:
    context = client_context(verify=ca is not None, ca_file=ca, what="test CA")
    return Plan(
        host=HOST,
        port=port,
        helo_name="client.test",
        tls=tls,
        context=context,
        timeout=5.0,
        pipelining=pipelining,
    )


async def session_to(server: PipeliningServer, **kwargs: object) -> Session:
    session: Session = await with_timeout(open_session(plan(server.port, **kwargs)))  # type: ignore[arg-type]
    return session


async def test_mail_rcpt_and_data_go_in_one_write() -> None:
    async with PipeliningServer() as server:
        session = await session_to(server)
        assert session.pipe is not None
        t = await with_timeout(
            send(session, "a@example.org", ["b@example.net", "c@example.net"], MSG)
        )
        assert [r.result for r in t.results] == [Result.OK, Result.OK]
        assert t.results[0].reply.code == 250
        assert server.groups() == [
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
        ]
        # The second write is the body alone, dot-stuffed and ended.
        assert server.reads[-1] == (False, STUFFED + b".\r\n")
        assert server.messages == [("a@example.org", ["b@example.net", "c@example.net"], STUFFED)]
        # Reused without RSET: again one group, on the same connection.
        assert session.clean
        t = await with_timeout(send(session, "a@example.org", ["d@example.net"], MSG))
        assert t.results[0].result is Result.OK
        assert len(server.groups()) == 2 and server.connections == 1
        await session.quit(5.0)


async def test_switched_off_is_lock_step() -> None:
    async with PipeliningServer() as server:
        session = await session_to(server, pipelining=False)
        assert session.pipe is None
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert t.results[0].result is Result.OK
        assert server.groups() == [b"MAIL FROM:<a@example.org>\r\n"]
        assert (False, b"RCPT TO:<b@example.net>\r\n") in server.reads
        await session.quit(5.0)


async def test_hop_without_pipelining_is_lock_step() -> None:
    async with PipeliningServer(ehlo=["8BITMIME"]) as server:
        session = await session_to(server)
        assert session.pipe is None
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert t.results[0].result is Result.OK
        assert server.groups() == [b"MAIL FROM:<a@example.org>\r\n"]
        await session.quit(5.0)


async def test_per_recipient_refusals_in_a_pipelined_group() -> None:
    replies = {
        "gone@example.net": b"550 5.1.1 no such user\r\n",
        "full@example.net": b"452 4.2.2 mailbox full\r\n",
    }
    async with PipeliningServer(rcpt_replies=replies) as server:
        session = await session_to(server)
        rcpts = ["gone@example.net", "ok@example.net", "full@example.net", "bad address@x"]
        t = await with_timeout(send(session, "a@example.org", rcpts, MSG))
        got = [(r.result, r.reply.code, r.reply.enhanced) for r in t.results]
        assert got == [
            (Result.PERMANENT, 550, "5.1.1"),
            (Result.OK, 250, "2.0.0"),
            (Result.TEMPORARY, 452, "4.2.2"),
            (Result.PERMANENT, 553, "5.1.3"),  # never sent
        ]
        assert len(server.groups()) == 1 and b"bad address" not in server.groups()[0]
        assert server.messages == [("a@example.org", ["ok@example.net"], STUFFED)]
        await session.quit(5.0)


async def test_all_refused_and_354_sends_an_empty_message_and_stays_usable() -> None:
    replies = {"x@example.net": b"550 5.1.1 no\r\n", "y@example.net": b"550 5.1.1 no\r\n"}
    async with PipeliningServer(rcpt_replies=replies) as server:
        session = await session_to(server)
        t = await with_timeout(send(session, "a@example.org", list(replies), MSG))
        assert [(r.result, r.reply.code) for r in t.results] == [(Result.PERMANENT, 550)] * 2
        assert server.reads[-1] == (False, b".\r\n")  # no body, just the end
        assert server.messages == []
        assert session.alive and not session.clean
        # The connection is still in step: the next message goes through on it.
        t = await with_timeout(send(session, "a@example.org", ["ok@example.net"], MSG))
        assert t.results[0].result is Result.OK, t.results[0].reply
        assert server.connections == 1 and len(server.messages) == 1
        await session.quit(5.0)


async def test_mail_refused_gives_every_recipient_its_reply() -> None:
    async with PipeliningServer(mail_reply=b"550 5.7.1 sender refused\r\n") as server:
        session = await session_to(server)
        t = await with_timeout(send(session, "a@example.org", ["b@example.net", "bad x"], MSG))
        assert [(r.result, r.reply.code) for r in t.results] == [(Result.PERMANENT, 550)] * 2
        assert t.deferred_at_mail is None
        assert session.alive  # RCPT and DATA were answered 503 and read
        server.mail_reply = b"250 OK\r\n"
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert t.results[0].result is Result.OK
        await session.quit(5.0)


async def test_mail_deferred_is_deferred_at_mail() -> None:
    async with PipeliningServer(mail_reply=b"451 4.3.0 try later\r\n") as server:
        session = await session_to(server)
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert t.results[0].result is Result.TEMPORARY
        assert t.deferred_at_mail is not None and t.deferred_at_mail.code == 451
        await session.quit(5.0)


async def test_recipient_limit_continues_on_the_same_connection() -> None:
    async with PipeliningServer(limit=2) as server:
        session = await session_to(server)
        rcpts = [f"r{i}@example.net" for i in range(5)]
        t = await with_timeout(send(session, "a@example.org", rcpts, MSG))
        assert [r.result for r in t.results] == [Result.OK] * 5
        assert [m[1] for m in server.messages] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]
        assert server.connections == 1 and len(server.groups()) == 3
        await session.quit(5.0)


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA", "BODY"])
async def test_an_extra_reply_makes_the_connection_unusable(verb: str) -> None:
    async with PipeliningServer(inject_after={verb: b"250 2.1.5 injected\r\n"}) as server:
        session = await session_to(server)
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert not session.alive
        if verb == "BODY":
            # Seen with the final reply: the message counts as not sent (a duplicate at
            # worst, never a loss).
            assert len(server.messages) == 1
        [res] = t.results
        assert res.result is Result.TEMPORARY, res.reply
        assert res.reply.code == 451 and "more replies than commands" in res.reply.text


async def test_a_reply_left_over_from_ehlo_makes_the_connection_unusable() -> None:
    async with PipeliningServer(inject_after={"EHLO": b"250 2.1.0 smuggled\r\n"}) as server:
        session = await session_to(server)
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        [res] = t.results
        assert res.result is Result.TEMPORARY and "before the group" in res.reply.text
        assert t.deferred_at_mail is not None and not session.alive
        assert server.groups() == [] and server.messages == []


async def test_a_reply_between_messages_makes_the_connection_unusable() -> None:
    async with PipeliningServer() as server:
        session = await session_to(server)
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert t.results[0].result is Result.OK
        server.inject_after["NOOP"] = b"250 2.1.5 smuggled\r\n"
        assert session.pipe is not None
        session.pipe.write(b"NOOP\r\n")  # its reply, and the smuggled one, come unasked
        await with_timeout(_closed(session))
        t = await with_timeout(send(session, "a@example.org", ["c@example.net"], MSG))
        assert t.results[0].result is Result.TEMPORARY
        assert t.deferred_at_mail is not None  # nothing was accepted: another host may try
        assert len(server.messages) == 1


async def _closed(session: Session) -> None:
    while session.alive:
        await asyncio.sleep(0.005)


async def test_pipelining_only_after_starttls_and_the_new_ehlo(certs: Certs) -> None:
    # A reply injected after the 220 to STARTTLS is dropped with the plaintext buffer,
    # and the group goes only over TLS, after the second EHLO.
    server = PipeliningServer(
        ehlo=["PIPELINING", "STARTTLS"],
        tls=certs.server,
        inject_after={"STARTTLS": b"250 2.1.0 injected\r\n"},
    )
    async with server:
        session = await session_to(server, tls=Tls.ENCRYPT, ca=certs.ca_file)
        assert session.encrypted and session.pipe is not None
        t = await with_timeout(send(session, "a@example.org", ["b@example.net"], MSG))
        assert t.results[0].result is Result.OK, t.results[0].reply
        plain = [data for encrypted, data in server.reads if not encrypted]
        assert plain == [b"EHLO client.test\r\n", b"STARTTLS\r\n"]
        encrypted = [data for encrypted, data in server.reads if encrypted]
        assert encrypted[0] == b"EHLO client.test\r\n"
        assert encrypted[1].startswith(b"MAIL FROM:") and encrypted[1].endswith(b"DATA\r\n")
        await session.quit(5.0)


def test_pipelining_under_uvloop(certs: Certs) -> None:
    # uvloop's transports are its own: the reply reader is put in front of aiosmtplib's
    # protocol with set_protocol there too, in plaintext and after STARTTLS.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[list[Result]]:
        outcomes = []
        for tls in (Tls.NONE, Tls.ENCRYPT):
            ehlo = ["PIPELINING", "STARTTLS"] if tls is Tls.ENCRYPT else ["PIPELINING"]
            replies = {"gone@example.net": b"550 5.1.1 no\r\n"}
            async with PipeliningServer(ehlo=ehlo, tls=certs.server, rcpt_replies=replies) as s:
                session = await session_to(s, tls=tls, ca=certs.ca_file)
                assert session.pipe is not None and session.encrypted is (tls is Tls.ENCRYPT)
                for _ in range(2):
                    t = await with_timeout(
                        send(session, "a@example.org", ["ok@example.net", "gone@example.net"], MSG)
                    )
                    outcomes.append([r.result for r in t.results])
                assert len(s.groups()) == 2 and len(s.messages) == 2
                await session.quit(5.0)
        return outcomes

    assert uvloop.run(scenario()) == [[Result.OK, Result.PERMANENT]] * 4
