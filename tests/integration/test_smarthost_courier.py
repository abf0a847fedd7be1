"""The smarthost courier against real SMTP peers on loopback: aiosmtpd sinks and a raw server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from peers import free_port
from peers.asyncsinks import HOST, Certs, Handler, RawServer, Sink, certs, with_timeout

__all__ = ["certs"]  # the fixture, re-exported so pytest finds it here

MSG = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def courier(port: int, **kwargs: object) -> SmarthostCourier:
    kwargs.setdefault("tls", "none")
    kwargs.setdefault("timeout", 5.0)
    return SmarthostCourier(SmarthostConfig(host=HOST, port=port, **kwargs))  # type: ignore[arg-type]


async def deliver_once(port: int, **kwargs: object) -> DeliveryResult:
    """MSG from a@example.org to b@example.net through a new courier, closed afterwards."""
    c = courier(port, **kwargs)
    [res] = await c.deliver("a@example.org", ["b@example.net"], MSG)
    await c.close()
    return res


async def test_plain_delivery_records_envelope_and_bytes() -> None:
    async with Sink() as sink:
        res = await deliver_once(sink.port)
    assert res.result is Result.OK
    assert (res.reply.code, res.reply.enhanced) == (250, "2.0.0")
    assert res.relay == f"{HOST}[{HOST}]:{sink.port}"
    [got] = sink.handler.messages
    assert (got.mail_from, got.rcpt_tos, got.data) == ("a@example.org", ["b@example.net"], MSG)
    assert "QUIT" not in sink.handler.verbs()  # QUIT is not a handler hook; closed cleanly


async def test_starttls_with_private_ca_verifies(certs: Certs) -> None:
    async with Sink(starttls=certs.server) as sink:
        res = await deliver_once(sink.port, tls="encrypt", ca_file=certs.ca_file)
    assert res.result is Result.OK, res.reply
    assert sink.handler.messages[0].tls
    # EHLO again after STARTTLS (RFC 3207 4.2), and nothing but EHLO before it.
    assert [(c.verb, c.tls) for c in sink.handler.commands][:2] == [("EHLO", False), ("EHLO", True)]


async def test_may_uses_starttls_when_offered(certs: Certs) -> None:
    async with Sink(starttls=certs.server) as sink:
        res = await deliver_once(sink.port, tls="may", ca_file=certs.ca_file)
    assert res.result is Result.OK
    assert sink.handler.messages[0].tls


async def test_may_without_starttls_sends_in_clear() -> None:
    async with Sink() as sink:
        res = await deliver_once(sink.port, tls="may")
    assert res.result is Result.OK
    assert not sink.handler.messages[0].tls


async def test_self_signed_upstream_needs_verify_off(certs: Certs) -> None:
    async with Sink(starttls=certs.server) as sink:
        strict = courier(sink.port, tls="encrypt")  # system CAs only: not trusted
        [res] = await strict.deliver("a@example.org", ["b@example.net"], MSG)
        await strict.close()
        assert res.result is Result.TEMPORARY
        assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
        assert "CERTIFICATE_VERIFY_FAILED" in res.reply.text
        assert "MAIL" not in sink.handler.verbs()

        lax = courier(sink.port, tls="encrypt", verify=False)
        [res] = await lax.deliver("a@example.org", ["b@example.net"], MSG)
        await lax.close()
    assert res.result is Result.OK
    assert sink.handler.messages[0].tls


async def test_implicit_tls(certs: Certs) -> None:
    async with Sink(implicit=certs.server) as sink:
        res = await deliver_once(sink.port, tls="implicit", ca_file=certs.ca_file)
    assert res.result is Result.OK, res.reply
    assert sink.handler.messages[0].tls


async def test_implicit_tls_against_plain_server_is_temporary() -> None:
    async with Sink() as sink:
        res = await deliver_once(sink.port, tls="implicit", verify=False, timeout=2.0)
    assert res.result is Result.TEMPORARY
    assert sink.handler.messages == []


async def test_auth_over_starttls(certs: Certs) -> None:
    users = {"postfix@example.org": "s3cret"}
    async with Sink(starttls=certs.server, users=users) as sink:
        c = courier(
            sink.port,
            tls="encrypt",
            ca_file=certs.ca_file,
            username="postfix@example.org",
            password="s3cret",
        )
        [res] = await c.deliver("a@example.org", ["b@example.net"], MSG)
        await c.close()
    assert res.result is Result.OK, res.reply
    assert sink.auth_attempts == [("PLAIN", "postfix@example.org")]
    got = sink.handler.messages[0]
    assert got.tls and got.authenticated


async def test_auth_over_implicit_tls(certs: Certs) -> None:
    async with Sink(implicit=certs.server, users={"u": "p"}) as sink:
        res = await deliver_once(
            sink.port, tls="implicit", ca_file=certs.ca_file, username="u", password="p"
        )
    assert res.result is Result.OK, res.reply
    assert sink.handler.messages[0].authenticated


async def test_wrong_password_defers_with_upstream_reply(certs: Certs) -> None:
    async with Sink(starttls=certs.server, users={"u": "right"}) as sink:
        c = courier(sink.port, tls="encrypt", ca_file=certs.ca_file, username="u", password="wrong")
        results = await c.deliver("a@example.org", ["b@example.net", "c@example.net"], MSG)
        await c.close()
    assert [r.result for r in results] == [Result.TEMPORARY, Result.TEMPORARY]
    reply = results[0].reply
    assert reply.code == 454 and reply.enhanced.startswith("4.")
    assert "SASL authentication failed" in reply.text
    assert "535" in reply.text  # the upstream's own words are kept for the log
    assert "wrong" not in str(reply)
    assert "MAIL" not in sink.handler.verbs()


async def test_credentials_without_tls_never_send_auth() -> None:
    async with Sink(users={"u": "p"}) as sink:
        # aiosmtpd offers no AUTH in clear by default; make the check ours, not theirs:
        # the courier must refuse before ever looking at what the server offers.
        for mode in ("none", "may"):
            res = await deliver_once(sink.port, tls=mode, username="u", password="p")
            assert res.result is Result.TEMPORARY
            assert "not sending AUTH" in res.reply.text
    assert sink.auth_attempts == []
    assert "MAIL" not in sink.handler.verbs()


async def test_credentials_without_tls_against_server_offering_auth_in_clear() -> None:
    raw = RawServer(ehlo=["AUTH PLAIN LOGIN", "8BITMIME"])
    async with raw:
        res = await deliver_once(raw.port, tls="may", username="u", password="p")
    assert res.result is Result.TEMPORARY
    assert not any(line.upper().startswith((b"AUTH", b"MAIL")) for line in raw.lines)


async def test_encrypt_without_starttls_is_temporary_and_sends_nothing_in_clear() -> None:
    async with Sink() as sink:
        res = await deliver_once(sink.port, tls="encrypt", username="u", password="p")
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.4")
    assert "TLS is required, but was not offered" in res.reply.text
    assert sink.handler.verbs() == ["EHLO"]
    assert sink.auth_attempts == []


async def test_connection_reused_across_messages_without_rset() -> None:
    """A clean transaction leaves nothing to reset: the next MAIL follows at once."""
    async with Sink() as sink:
        c = courier(sink.port)
        for n in range(3):
            [res] = await c.deliver("a@example.org", [f"b{n}@example.net"], MSG)
            assert res.result is Result.OK
        await c.close()
    assert sink.connections == 1
    assert len(sink.handler.messages) == 3
    assert sink.handler.verbs() == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3
    assert sink.handler.verbs().count("EHLO") == 1


async def test_dead_pooled_connection_is_replaced_once() -> None:
    async with Sink() as sink:
        c = courier(sink.port)
        [res] = await c.deliver("a@example.org", ["b@example.net"], MSG)
        assert res.result is Result.OK
        sink.drop_connections()  # the upstream's idle timeout fires
        [res] = await c.deliver("a@example.org", ["c@example.net"], MSG)
        await c.close()
    assert res.result is Result.OK, res.reply
    assert sink.connections == 2
    assert [m.rcpt_tos for m in sink.handler.messages] == [["b@example.net"], ["c@example.net"]]


async def test_pooled_connection_gone_at_mail_is_replaced_once() -> None:
    """Reused without RSET, the connection closes as MAIL arrives (the server's idle
    timeout racing the client): nothing was accepted, so the courier tries once more on
    a new connection instead of deferring the message."""

    class ClosesAtSecondMail(Handler):
        async def handle_MAIL(
            self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            if self.verbs().count("MAIL") == 1 and server.transport is not None:
                self._note(server, session, "MAIL", address)
                server.transport.abort()  # no reply: the connection is just gone
                return "421 4.4.2 closing"
            return await super().handle_MAIL(server, session, envelope, address, options)

    async with Sink(ClosesAtSecondMail()) as sink:
        c = courier(sink.port)
        [first] = await c.deliver("a@example.org", ["b@example.net"], MSG)
        [second] = await c.deliver("a@example.org", ["c@example.net"], MSG)
        await c.close()
    assert first.result is Result.OK
    assert second.result is Result.OK, second.reply
    assert sink.connections == 2
    assert [m.rcpt_tos for m in sink.handler.messages] == [["b@example.net"], ["c@example.net"]]
    assert "RSET" not in sink.handler.verbs()


async def test_pool_bounds_concurrent_connections() -> None:
    async with Sink() as sink:
        c = courier(sink.port, pool_size=2)
        results = await with_timeout(
            asyncio.gather(*(c.deliver("a@example.org", [f"r{n}@x.net"], MSG) for n in range(8)))
        )
        await c.close()
    assert all(r.result is Result.OK for [r] in results)
    assert 1 <= sink.connections <= 2
    assert len(sink.handler.messages) == 8


async def test_per_recipient_outcomes_in_one_transaction() -> None:
    handler = Handler(
        rcpt_replies={
            "busy@example.net": "450 4.2.1 Mailbox busy",
            "nobody@example.net": "550 5.1.1 User unknown",
        }
    )
    async with Sink(handler) as sink:
        c = courier(sink.port)
        rcpts = ["ok@example.net", "busy@example.net", "nobody@example.net", "ok2@example.net"]
        results = await c.deliver("a@example.org", rcpts, MSG)
        await c.close()
    assert [r.recipient for r in results] == rcpts
    assert [r.result for r in results] == [
        Result.OK,
        Result.TEMPORARY,
        Result.PERMANENT,
        Result.OK,
    ]
    assert (results[1].reply.code, results[1].reply.enhanced) == (450, "4.2.1")
    assert results[2].reply.text == "User unknown"
    [got] = sink.handler.messages
    assert got.rcpt_tos == ["ok@example.net", "ok2@example.net"]
    assert sink.handler.verbs().count("DATA") == 1


async def test_no_data_when_every_recipient_is_refused() -> None:
    handler = Handler(
        rcpt_replies={"x@example.net": "550 5.1.1 no", "y@example.net": "451 4.3.0 later"}
    )
    async with Sink(handler) as sink:
        c = courier(sink.port)
        results = await c.deliver("a@example.org", ["x@example.net", "y@example.net"], MSG)
        [again] = await c.deliver("a@example.org", ["z@example.net"], MSG)
        await c.close()
    assert [r.result for r in results] == [Result.PERMANENT, Result.TEMPORARY]
    assert "DATA" in sink.handler.verbs()  # only for the second message
    assert sink.handler.verbs().count("DATA") == 1
    assert again.result is Result.OK
    assert sink.connections == 1


@pytest.mark.parametrize(
    ("where", "reply", "expected"),
    [
        ("mail", "550 5.7.1 Sender rejected", Result.PERMANENT),
        ("mail", "451 4.3.0 Try later", Result.TEMPORARY),
        ("data", "554 5.6.0 Content rejected", Result.PERMANENT),
        ("data", "452 4.3.1 Insufficient storage", Result.TEMPORARY),
    ],
)
async def test_mail_and_data_replies_classify(where: str, reply: str, expected: Result) -> None:
    handler = Handler(mail_reply=reply if where == "mail" else None)
    handler.data_reply = reply if where == "data" else None
    async with Sink(handler) as sink:
        c = courier(sink.port)
        results = await c.deliver("a@example.org", ["b@example.net", "c@example.net"], MSG)
        await c.close()
    assert [r.result for r in results] == [expected, expected]
    code, _, rest = reply.partition(" ")
    assert results[0].reply.code == int(code)
    assert results[0].reply.enhanced == rest.split()[0]


async def test_upstream_down_is_temporary_with_connect_reply() -> None:
    port = free_port()
    res = await deliver_once(port)
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (451, "4.4.1")
    assert res.reply.text == f"connect to {HOST}[{HOST}]:{port}: Connection refused"
    assert res.relay == f"{HOST}[{HOST}]:{port}"


async def test_silent_server_times_out_as_temporary() -> None:
    async with RawServer(greeting=None) as raw:
        c = courier(raw.port, timeout=0.3)
        [res] = await with_timeout(c.deliver("a@example.org", ["b@example.net"], MSG))
        await c.close()
    assert res.result is Result.TEMPORARY
    assert "timed out" in res.reply.text


async def test_greeting_refusal_is_temporary() -> None:
    raw = RawServer(greeting=b"554 5.3.2 go away\r\n")
    async with raw:
        res = await deliver_once(raw.port)
    assert res.result is Result.TEMPORARY
    assert "554 5.3.2 go away" in res.reply.text


async def test_starttls_injection_cannot_steer_the_client(certs: Certs) -> None:
    """CVE-2011-0411 class, client side: lines after the 220 to STARTTLS are discarded.

    If the client kept the injected ``250`` it would take it for the reply to its EHLO
    after TLS, read every later reply one command late, and see the server's 550 to RCPT
    as something else.
    """
    raw = RawServer(
        ehlo=["STARTTLS", "8BITMIME"],
        tls=certs.server,
        inject_after_starttls=b"250 injected\r\n250 injected too\r\n",
        rcpt_reply=b"550 5.1.1 real reply to RCPT\r\n",
    )
    async with raw:
        c = courier(raw.port, tls="encrypt", ca_file=certs.ca_file)
        [res] = await with_timeout(c.deliver("a@example.org", ["b@example.net"], MSG))
        await c.close()
    assert res.result is Result.PERMANENT, res.reply
    assert res.reply.text == "real reply to RCPT"
    verbs = [line.split()[0].upper() for line in raw.lines]
    assert verbs[:3] == [b"EHLO", b"STARTTLS", b"EHLO"]
    assert b"DATA" not in verbs


async def test_output_is_crlf_and_dot_stuffed() -> None:
    body = (
        b"Subject: dots\r\n\r\n"
        b".leading dot\r\n"
        b".\r\n"
        b"..two dots\r\n"
        b"bare lf then dot\n.\n"
        b"bare cr then dot\r.\r"
        b"end without newline"
    )
    async with RawServer() as raw:
        c = courier(raw.port)
        [res] = await c.deliver("a@example.org", ["b@example.net"], body)
        await c.close()
    assert res.result is Result.OK
    [wire] = raw.data_chunks
    # The only end-of-data on the wire is the final one; no bare CR or LF at all.
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\r\n.\r\n") == 1
    assert wire.replace(b"\r\n", b"").count(b"\n") == 0
    assert wire.replace(b"\r\n", b"").count(b"\r") == 0
    lines = wire[: -len(b".\r\n")].split(b"\r\n")
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)
    assert b"\r\n..leading dot\r\n..\r\n...two dots\r\n" in wire


async def test_8bitmime_and_smtputf8_parameters() -> None:
    eight_bit = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    async with Sink(smtputf8=True) as sink:
        c = courier(sink.port)
        [a] = await c.deliver("a@example.org", ["b@example.net"], MSG)
        [b] = await c.deliver("a@example.org", ["b@example.net"], eight_bit)
        [u] = await c.deliver("a@example.org", ["j\u00fcrgen@example.net"], MSG)
        await c.close()
    assert [r.result for r in (a, b, u)] == [Result.OK] * 3
    first, second, third = sink.handler.messages
    assert not any(o.startswith("BODY") for o in first.mail_options)
    assert "BODY=8BITMIME" in second.mail_options and "SMTPUTF8" in second.mail_options
    assert second.data == eight_bit
    assert "SMTPUTF8" in third.mail_options
    assert third.rcpt_tos == ["j\u00fcrgen@example.net"]


async def test_utf8_envelope_without_smtputf8_is_permanent() -> None:
    async with Sink() as sink:
        c = courier(sink.port)
        [res] = await c.deliver("a@example.org", ["j\u00fcrgen@example.net"], MSG)
        await c.close()
    assert res.result is Result.PERMANENT
    assert res.reply.enhanced == "5.6.7"
    assert "MAIL" not in sink.handler.verbs()


async def test_closed_courier_defers() -> None:
    c = courier(free_port())
    await c.close()
    [res] = await c.deliver("a@example.org", ["b@example.net"], MSG)
    assert res.result is Result.TEMPORARY
