"""The MX courier passes the DSN parameters on to an MX that offers DSN (a Hato intake,
which stores them) and not to one that does not (aiosmtpd); found through the test DNS."""

from __future__ import annotations

import asyncio
import io

from test_mx_delivery import MSG, SENDER, MXSink, courier

from hato.delivery.base import Result
from hato.dsn_params import META_RCPT, META_RET, DsnRequest, RecipientDsn
from hato.maillog import MailLog
from hato.message import META_ENVID
from hato.queue.memory import MemoryQueue
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy
from hato.smtp.server import start_listener
from peers.dns import TestDNS

DSN = DsnRequest(
    ret="FULL",
    envid="relay-77",
    recipients={"b@example.test": RecipientDsn(frozenset({"FAILURE"}), "rfc822;B@example.test")},
)


async def test_mx_with_dsn_gets_the_parameters() -> None:
    with TestDNS() as dns:
        await _with_dsn(dns)


async def _with_dsn(test_dns: TestDNS) -> None:
    test_dns.mx("example.test", (10, "mx1.example.test"))
    test_dns.a("mx1.example.test", "127.0.0.2")
    queue = MemoryQueue()
    await queue.open()
    listener = await start_listener(
        ListenerConfig("127.0.0.2", 0, ListenerRole.SMTP),
        queue=queue,
        policy=Policy(role=ListenerRole.SMTP, domains=["example.test"]),
        log=MailLog(io.StringIO()),
        hostname="mx1.example.test",
    )
    try:
        c = courier(test_dns, listener.port)
        async with asyncio.timeout(20):
            try:
                [res] = await c.deliver(SENDER, ["b@example.test"], MSG, dsn=DSN)
            finally:
                await c.close()
        assert res.result is Result.OK, res.reply
        assert res.next_hop_dsn
        (listed,) = await queue.list()
        got = await queue.get(listed.id)
        assert got.meta[META_ENVID] == "relay-77"
        assert got.meta[META_RET] == "FULL"
        assert got.meta[META_RCPT] == (
            '{"b@example.test":{"notify":"FAILURE","orcpt":"rfc822;B@example.test"}}'
        )
    finally:
        await listener.aclose(timeout=2)
        await queue.close()


async def test_mx_without_dsn_gets_none() -> None:
    with TestDNS() as dns:
        await _without_dsn(dns)


async def _without_dsn(test_dns: TestDNS) -> None:
    test_dns.mx("example.test", (10, "mx1.example.test"))
    test_dns.a("mx1.example.test", "127.0.0.2")
    mx1 = await MXSink("127.0.0.2").start()
    c = courier(test_dns, mx1.port)
    async with asyncio.timeout(20):
        try:
            [res] = await c.deliver(SENDER, ["b@example.test"], MSG, dsn=DSN)
        finally:
            await c.close()
    # aiosmtpd would refuse NOTIFY/ORCPT with 555: the OK says none went.
    assert res.result is Result.OK and not res.next_hop_dsn
    await mx1.stop()
    [got] = mx1.messages
    assert got.mail_options == ["SIZE=64"]
