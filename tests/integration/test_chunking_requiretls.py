"""CHUNKING (RFC 3030) and REQUIRETLS (RFC 8689) between real peers.

* Hato's SMTP client sends BDAT to Hato's intake (in-process, :mod:`peers.relay_intake`)
  when it offers CHUNKING, in one ``BDAT n LAST`` or in several chunks, and DATA when
  CHUNKING is turned off; a wire tap (:mod:`peers.tap`) between them shows which.
* Postfix's smtpd (a private ``plain_relay``) takes Hato's BDAT; Postfix's smtp client
  sends DATA even to Hato's intake, which offers CHUNKING.
* REQUIRETLS: delivered over verified STARTTLS to Hato's intake, which offers it, with the
  parameter passed on (the intake stores it with the message); refused with 5.7.30 by an
  aiosmtpd next hop that does not offer it, with 5.7.10 in plaintext, and passed on in
  plaintext to a trusted first hop (``requiretls="trusted"``).
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
from pathlib import Path

import pytest

from hato.delivery import session as client_session
from hato.delivery.base import Result
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.message import META_REQUIRETLS
from hato.queue.base import StoredMessage
from hato.smtp.policy import ListenerRole
from peers.asyncsinks import Certs, Sink, certs, wait_until, with_timeout
from peers.postfix import plain_relay, running
from peers.relay_intake import USER, RelayServer, relay
from peers.tap import Tap

__all__ = ["certs", "relay"]  # the fixtures, re-exported so pytest finds them here

SENDER = "app@example.org"
MESSAGE = (
    b"From: app@example.org\r\n"
    b"To: postfix@dbmx.net\r\n"
    b"Subject: chunks\r\n"
    b"\r\n"
    b".a line starting with a dot\r\n"
    b".\r\n"
    b"QUIT\r\n"
    b"the end\r\n"
)


async def stored(relay: RelayServer, count: int = 1) -> list[StoredMessage]:
    async def enough() -> bool:
        return len(await relay.queue.list()) >= count

    deadline = time.monotonic() + 10
    while not await enough():
        assert time.monotonic() < deadline, "nothing stored by the intake within 10s"
        await asyncio.sleep(0.02)
    return await relay.queue.list()


def courier(port: int, **config: object) -> SmarthostCourier:
    options: dict[str, object] = {"tls": "none", "helo_name": "worker.test", "timeout": 10.0}
    options.update(config)
    return SmarthostCourier(SmarthostConfig(host="127.0.0.1", port=port, **options))  # type: ignore[arg-type]


async def test_courier_sends_one_bdat_last_to_hato(relay: RelayServer) -> None:
    async with Tap(relay.port(ListenerRole.SMTP)) as tap:
        c = courier(tap.port)
        try:
            [result] = await with_timeout(c.deliver(SENDER, [USER], MESSAGE))
        finally:
            await c.close()
    assert result.result is Result.OK, result.reply
    [msg] = await stored(relay)
    assert msg.data.endswith(b"+0000\r\n" + MESSAGE)
    assert b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE in tap.wire
    assert b"\r\nDATA\r\n" not in tap.wire


async def test_courier_sends_a_large_message_in_several_chunks(
    relay: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_session, "BDAT_CHUNK_SIZE", 1000)
    body = MESSAGE + b"".join(b"line %04d " % i + b"x" * 60 + b"\r\n" for i in range(60))
    async with Tap(relay.port(ListenerRole.SMTP)) as tap:
        c = courier(tap.port)
        try:
            [result] = await with_timeout(c.deliver(SENDER, [USER], body))
        finally:
            await c.close()
    assert result.result is Result.OK, result.reply
    [msg] = await stored(relay)
    assert msg.data.endswith(b"+0000\r\n" + body)
    sizes = [int(n) for n in re.findall(rb"BDAT (\d+)\r\n", tap.wire)]
    last = [int(n) for n in re.findall(rb"BDAT (\d+) LAST\r\n", tap.wire)]
    assert sizes == [1000] * (len(body) // 1000)
    assert last == [len(body) % 1000]


async def test_courier_sends_data_when_chunking_is_off(
    relay: RelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_session, "CHUNKING", False)
    async with Tap(relay.port(ListenerRole.SMTP)) as tap:
        c = courier(tap.port)
        try:
            [result] = await with_timeout(c.deliver(SENDER, [USER], MESSAGE))
        finally:
            await c.close()
    assert result.result is Result.OK, result.reply
    [msg] = await stored(relay)
    assert msg.data.endswith(b"+0000\r\n" + MESSAGE)
    assert b"\r\nDATA\r\n" in tap.wire and b"BDAT" not in tap.wire


async def test_courier_sends_bdat_to_postfix_smtpd() -> None:
    # Postfix's smtpd is an independent CHUNKING server: it must read our chunks exactly.
    async with Sink() as sink:
        instance = plain_relay(("127.0.0.1", sink.port))
        with running(instance):
            async with Tap(instance.listeners["smtp"]) as tap:
                c = courier(tap.port)
                try:
                    [result] = await with_timeout(c.deliver(SENDER, [USER], MESSAGE), 30)
                finally:
                    await c.close()
            assert result.result is Result.OK, result.reply
            await wait_until(lambda: bool(sink.handler.messages), 60)
    assert b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE in tap.wire
    [msg] = sink.handler.messages
    assert msg.data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
    assert b"Subject: chunks\r\n" in msg.data


async def test_postfix_smtp_client_delivers_to_hato_offering_chunking(
    relay: RelayServer,
) -> None:
    # Postfix's smtp client (3.7) sends DATA even when CHUNKING is offered (only its
    # smtpd speaks BDAT); the message must arrive intact all the same.
    with Tap(relay.port(ListenerRole.SMTP)) as tap:
        instance = plain_relay(("127.0.0.1", tap.port))
        with running(instance):

            def submit() -> None:
                with smtplib.SMTP("127.0.0.1", instance.listeners["smtp"], timeout=30) as client:
                    client.sendmail(SENDER, [USER], MESSAGE)

            await asyncio.to_thread(submit)
            [msg] = await stored(relay)
    assert b"EHLO " in tap.wire
    # Postfix adds its own headers in front; the message itself arrives intact.
    assert msg.data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
    assert [r.address for r in msg.recipients] == [USER]


# REQUIRETLS.


async def test_requiretls_goes_over_verified_tls_to_a_hop_that_offers_it(
    relay: RelayServer,
) -> None:
    async with Tap(relay.port(ListenerRole.SMTP)) as tap:
        c = courier(tap.port, tls="encrypt", ca_file=str(relay.cert_file))
        try:
            [result] = await with_timeout(c.deliver(SENDER, [USER], MESSAGE, require_tls=True))
        finally:
            await c.close()
    assert result.result is Result.OK, result.reply
    assert result.tls_verified
    [msg] = await stored(relay)
    assert msg.meta.get(META_REQUIRETLS) == "yes"
    assert b"STARTTLS\r\n" in tap.wire  # and the rest, REQUIRETLS included, encrypted


async def test_requiretls_to_a_hop_without_it_bounces_with_5730(certs: Certs) -> None:
    async with Sink(starttls=certs.server) as sink:
        c = courier(sink.port, tls="encrypt", ca_file=certs.ca_file)
        try:
            [result] = await with_timeout(
                c.deliver(SENDER, ["b@example.net"], MESSAGE, require_tls=True)
            )
        finally:
            await c.close()
    assert result.result is Result.PERMANENT
    assert (result.reply.code, result.reply.enhanced) == (550, "5.7.30")
    assert "REQUIRETLS support required" in result.reply.text
    assert "MAIL" not in sink.handler.verbs() and not sink.handler.messages


async def test_requiretls_in_plaintext_bounces_with_5710(relay: RelayServer) -> None:
    c = courier(relay.port(ListenerRole.SMTP))
    try:
        [result] = await with_timeout(c.deliver(SENDER, [USER], MESSAGE, require_tls=True))
    finally:
        await c.close()
    assert result.result is Result.PERMANENT
    assert (result.reply.code, result.reply.enhanced) == (550, "5.7.10")
    assert await relay.queue.list() == []


async def test_requiretls_passes_to_a_trusted_first_hop_in_plaintext(tmp_path: Path) -> None:
    server = await RelayServer(tmp_path, mynetworks=("127.0.0.0/8",)).start()
    try:
        async with Tap(server.port(ListenerRole.SMTP)) as tap:
            c = courier(tap.port, requiretls="trusted")
            try:
                [result] = await with_timeout(
                    c.deliver(SENDER, ["someone@example.net"], MESSAGE, require_tls=True)
                )
            finally:
                await c.close()
        assert result.result is Result.OK, result.reply
        assert not result.tls_verified
        [msg] = await stored(server)
        assert msg.meta.get(META_REQUIRETLS) == "yes"
        assert re.search(rb"MAIL FROM:<app@example\.org>[^\r]* REQUIRETLS\r\n", tap.wire)
    finally:
        await server.aclose()
