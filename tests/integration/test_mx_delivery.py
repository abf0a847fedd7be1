"""The MX courier against aiosmtpd sinks on loopback, found through the test DNS.

Every MX host is a sink on its own loopback address (127.0.0.2, 127.0.0.3, …) and all
listen on one port, the courier's outbound port, as real MX hosts all listen on 25. An
address with no sink on it refuses connections. Names resolve only through
:class:`peers.dns.TestDNS`; ``allow_private`` lets the courier connect to loopback.

Other MX test modules import the helpers from here (``from test_mx_delivery import …``).
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.mx import MXCourier, MXTLSPolicy
from hato.dns import Resolver
from peers.asyncsinks import Handler, Sink, wait_until
from peers.dns import TestDNS

MSG = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
SENDER = "a@sender.test"


class MXSink(Sink):
    """The smarthost tests' recording aiosmtpd sink, on any loopback address."""

    def __init__(self, host: str, handler: Handler | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.host = host

    async def start(self, port: int = 0) -> MXSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.host, port, ssl=self.implicit)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def messages(self) -> list[Any]:
        return self.handler.messages


class Fleet:
    """Sinks on several loopback addresses, all on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.sinks: list[MXSink] = []

    async def start(
        self,
        hosts: Sequence[str],
        *,
        starttls: Sequence[ssl.SSLContext | None] | None = None,
        handlers: Sequence[Handler | None] | None = None,
    ) -> list[MXSink]:
        for _attempt in range(20):
            started: list[MXSink] = []
            try:
                for k, host in enumerate(hosts):
                    sink = MXSink(
                        host,
                        handlers[k] if handlers else None,
                        starttls=starttls[k] if starttls else None,
                    )
                    await sink.start(started[0].port if started else 0)
                    started.append(sink)
            except OSError as exc:
                for sink in started:
                    await sink.stop()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue  # the port of the first sink is taken on another address
            self.port = started[0].port if started else _free_port()
            self.sinks.extend(started)
            return started
        raise RuntimeError("no port free on every address")

    async def stop(self) -> None:
        for sink in self.sinks:
            await sink.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def test_dns() -> Iterator[TestDNS]:
    with TestDNS() as server:
        yield server


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        await f.stop()


def resolver(dns: TestDNS, *, lifetime: float = 3.0) -> Resolver:
    return Resolver(
        [dns.server], timeout=min(1.0, lifetime), lifetime=lifetime, rng=random.Random(7)
    )


def courier(
    dns: TestDNS,
    port: int,
    *,
    allow_private: bool = True,
    tls: str = "may",
    policy: Sequence[str] = (),
    lifetime: float = 3.0,
    **kwargs: Any,
) -> MXCourier:
    return MXCourier(
        resolver(dns, lifetime=lifetime),
        helo_name="relay.sender.test",
        port=port,
        allow_private=allow_private,
        tls_policy=MXTLSPolicy.parse(tls, policy),
        timeout=5.0,
        connect_timeout=5.0,
        **kwargs,
    )


async def deliver(
    c: MXCourier, recipients: Sequence[str], data: bytes = MSG
) -> list[DeliveryResult]:
    async with asyncio.timeout(20):
        try:
            return await c.deliver(SENDER, recipients, data)
        finally:
            await c.close()


def two_mx(dns: TestDNS, domain: str = "example.test") -> None:
    dns.mx(domain, (10, "mx1.example.test"), (20, "mx2.example.test"))
    dns.a("mx1.example.test", "127.0.0.2")
    dns.a("mx2.example.test", "127.0.0.3")


# Preference and fallback.


async def test_lowest_preference_gets_the_mail(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert res.relay == f"mx1.example.test[127.0.0.2]:{fleet.port}"
    assert (res.reply.code, res.reply.enhanced) == (250, "2.0.0")
    [got] = mx1.messages
    assert (got.mail_from, got.rcpt_tos, got.data) == (SENDER, ["b@example.test"], MSG)
    assert mx2.connections == 0
    # Our HELO name, and never AUTH.
    assert mx1.handler.commands[0].arg == "relay.sender.test"
    assert "AUTH" not in mx1.handler.verbs()


async def test_refused_connection_falls_back_to_the_next_mx(
    test_dns: TestDNS, fleet: Fleet
) -> None:
    two_mx(test_dns)
    [mx2] = await fleet.start(["127.0.0.3"])  # nothing listens on 127.0.0.2
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert res.relay == f"mx2.example.test[127.0.0.3]:{fleet.port}"
    assert len(mx2.messages) == 1


async def test_4xx_at_mail_from_first_mx_then_success_on_second(
    test_dns: TestDNS, fleet: Fleet
) -> None:
    two_mx(test_dns)
    busy = Handler(mail_reply="451 4.3.2 greylisted, try again later")
    mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"], handlers=[busy, None])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert res.relay.startswith("mx2.example.test[127.0.0.3]")
    assert "MAIL" in mx1.handler.verbs() and not mx1.messages
    assert len(mx2.messages) == 1


async def test_every_mx_failing_defers_with_the_last_reason(
    test_dns: TestDNS, fleet: Fleet
) -> None:
    two_mx(test_dns)
    busy1 = Handler(mail_reply="451 4.3.2 mx1 busy")
    busy2 = Handler(mail_reply="452 4.3.1 mx2 full")
    await fleet.start(["127.0.0.2", "127.0.0.3"], handlers=[busy1, busy2])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (452, "4.3.1")
    assert res.relay.startswith("mx2.example.test[127.0.0.3]")


async def test_no_mx_listening_defers(test_dns: TestDNS) -> None:
    two_mx(test_dns)
    [res] = await deliver(courier(test_dns, _free_port()), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (451, "4.4.1")
    assert "Connection refused" in res.reply.text


async def test_5xx_at_mail_is_final_and_not_retried_elsewhere(
    test_dns: TestDNS, fleet: Fleet
) -> None:
    two_mx(test_dns)
    refusing = Handler(mail_reply="550 5.7.1 sender blocked")
    _mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"], handlers=[refusing, None])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.PERMANENT
    assert (res.reply.code, res.reply.enhanced) == (550, "5.7.1")
    assert mx2.connections == 0


async def test_rcpt_replies_are_per_recipient_and_final(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    handler = Handler(
        rcpt_replies={
            "gone@example.test": "550 5.1.1 no such user",
            "full@example.test": "452 4.2.2 mailbox full",
        }
    )
    _mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"], handlers=[handler, None])
    results = await deliver(
        courier(test_dns, fleet.port),
        ["ok@example.test", "gone@example.test", "full@example.test"],
    )
    assert [r.recipient for r in results] == [
        "ok@example.test",
        "gone@example.test",
        "full@example.test",
    ]
    assert [r.result for r in results] == [Result.OK, Result.PERMANENT, Result.TEMPORARY]
    assert results[1].reply.enhanced == "5.1.1"
    assert results[2].reply.enhanced == "4.2.2"
    assert handler.messages[0].rcpt_tos == ["ok@example.test"]
    assert mx2.connections == 0  # a RCPT 4xx does not move to the next MX


async def test_equal_preferences_are_all_used(test_dns: TestDNS, fleet: Fleet) -> None:
    test_dns.mx("example.test", (10, "mx1.example.test"), (10, "mx2.example.test"))
    test_dns.a("mx1.example.test", "127.0.0.2")
    test_dns.a("mx2.example.test", "127.0.0.3")
    mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"])
    for _ in range(12):
        c = MXCourier(
            Resolver([test_dns.server], cache=False),  # a fresh random order each time
            helo_name="relay.sender.test",
            port=fleet.port,
            allow_private=True,
        )
        [res] = await deliver(c, ["b@example.test"])
        assert res.result is Result.OK
        if mx1.messages and mx2.messages:
            break
    assert mx1.messages and mx2.messages


# DNS outcomes.


async def test_null_mx_bounces_at_once(test_dns: TestDNS) -> None:
    test_dns.null_mx("nomail.test")
    [res] = await deliver(courier(test_dns, _free_port()), ["b@nomail.test"])
    assert res.result is Result.PERMANENT
    assert (res.reply.code, res.reply.enhanced) == (556, "5.1.10")
    assert "nomail.test does not accept mail" in res.reply.text
    assert res.relay == "none"
    assert ("nomail.test", "A") not in test_dns.queries


async def test_no_mx_uses_the_domain_address(test_dns: TestDNS, fleet: Fleet) -> None:
    test_dns.a("plain.test", "127.0.0.2")
    [sink] = await fleet.start(["127.0.0.2"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@plain.test"])
    assert res.result is Result.OK, res.reply
    assert res.relay == f"plain.test[127.0.0.2]:{fleet.port}"
    assert sink.messages[0].rcpt_tos == ["b@plain.test"]


async def test_no_mx_and_no_address_bounces(test_dns: TestDNS) -> None:
    test_dns.txt("textonly.test", "v=spf1 -all")
    [res] = await deliver(courier(test_dns, _free_port()), ["b@textonly.test"])
    assert res.result is Result.PERMANENT
    assert res.reply.enhanced == "5.1.2"


async def test_mx_in_loopback_space_is_refused_by_default(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"])
    [res] = await deliver(courier(test_dns, fleet.port, allow_private=False), ["b@example.test"])
    assert res.result is Result.PERMANENT
    assert (res.reply.code, res.reply.enhanced) == (550, "5.4.4")
    assert "mx1.example.test[127.0.0.2]" in res.reply.text
    assert mx1.connections == mx2.connections == 0


async def test_private_and_reserved_space_is_refused(test_dns: TestDNS) -> None:
    test_dns.mx("inside.test", (10, "a.inside.test"), (20, "b.inside.test"))
    test_dns.a("a.inside.test", "10.1.2.3")
    test_dns.a("b.inside.test", "192.0.2.10")  # TEST-NET: not global either
    test_dns.aaaa("b.inside.test", "fe80::1")
    [res] = await deliver(courier(test_dns, _free_port(), allow_private=False), ["b@inside.test"])
    assert res.result is Result.PERMANENT
    assert res.reply.enhanced == "5.4.4"
    for shown in ("a.inside.test[10.1.2.3]", "b.inside.test[192.0.2.10]", "b.inside.test[fe80::1]"):
        assert shown in res.reply.text


async def test_refused_private_mx_and_a_dns_failure_defers(test_dns: TestDNS) -> None:
    # The other MX might be reachable once its DNS answers: defer, do not bounce.
    two_mx(test_dns)
    test_dns.servfail("mx2.example.test")
    [res] = await deliver(courier(test_dns, _free_port(), allow_private=False), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert res.reply.enhanced == "4.4.3"


async def test_nxdomain_bounces(test_dns: TestDNS) -> None:
    [res] = await deliver(courier(test_dns, _free_port()), ["b@nowhere.test"])
    assert res.result is Result.PERMANENT
    assert (res.reply.code, res.reply.enhanced) == (550, "5.1.2")
    assert "name=nowhere.test type=MX" in res.reply.text
    assert res.relay == "none"


async def test_servfail_defers(test_dns: TestDNS) -> None:
    test_dns.servfail("broken.test")
    [res] = await deliver(courier(test_dns, _free_port()), ["b@broken.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (451, "4.4.3")


async def test_dns_timeout_defers(test_dns: TestDNS) -> None:
    test_dns.drop("slow.test")
    [res] = await deliver(courier(test_dns, _free_port(), lifetime=1.0), ["b@slow.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (451, "4.4.3")
    assert "timed out" in res.reply.text


async def test_mx_host_without_address_falls_through(test_dns: TestDNS, fleet: Fleet) -> None:
    test_dns.mx("example.test", (10, "ghost.example.test"), (20, "mx2.example.test"))
    test_dns.a("mx2.example.test", "127.0.0.3")
    [mx2] = await fleet.start(["127.0.0.3"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK
    assert len(mx2.messages) == 1


async def test_mx_host_address_servfail_then_next(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    test_dns.servfail("mx1.example.test")
    [mx2] = await fleet.start(["127.0.0.3"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK
    assert len(mx2.messages) == 1


# IPv6.


async def test_ipv6_mx(test_dns: TestDNS, fleet: Fleet) -> None:
    if not ipv6_available():
        pytest.skip("no IPv6 loopback here")
    test_dns.mx("six.test", (10, "mx6.six.test"))
    test_dns.aaaa("mx6.six.test", "::1")
    [sink] = await fleet.start(["::1"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@six.test"])
    assert res.result is Result.OK, res.reply
    assert res.relay == f"mx6.six.test[::1]:{fleet.port}"
    assert len(sink.messages) == 1


async def test_ipv4_unreachable_then_ipv6(test_dns: TestDNS, fleet: Fleet) -> None:
    if not ipv6_available():
        pytest.skip("no IPv6 loopback here")
    test_dns.mx("dual.test", (10, "mx.dual.test"))
    test_dns.a("mx.dual.test", "127.0.0.9")  # nothing listens there
    test_dns.aaaa("mx.dual.test", "::1")
    [sink] = await fleet.start(["::1"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@dual.test"])
    assert res.result is Result.OK, res.reply
    assert "[::1]" in res.relay
    assert len(sink.messages) == 1


# Several domains, reuse, concurrency.


async def test_mixed_domains_in_one_message(test_dns: TestDNS, fleet: Fleet) -> None:
    test_dns.mx("one.test", (10, "mx.one.test"))
    test_dns.a("mx.one.test", "127.0.0.2")
    test_dns.mx("two.test", (10, "mx.two.test"))
    test_dns.a("mx.two.test", "127.0.0.3")
    test_dns.null_mx("none.test")
    one, two = await fleet.start(["127.0.0.2", "127.0.0.3"])
    recipients = ["a@one.test", "b@two.test", "c@none.test", "d@ONE.test", "e@nx.test"]
    results = await deliver(courier(test_dns, fleet.port), recipients)
    assert [r.recipient for r in results] == recipients
    assert [r.result for r in results] == [
        Result.OK,
        Result.OK,
        Result.PERMANENT,
        Result.OK,
        Result.PERMANENT,
    ]
    assert results[2].reply.enhanced == "5.1.10"
    assert results[4].reply.enhanced == "5.1.2"
    assert results[0].relay.startswith("mx.one.test[127.0.0.2]")
    assert results[1].relay.startswith("mx.two.test[127.0.0.3]")
    [got_one] = one.messages  # one transaction for both recipients of one.test
    assert got_one.rcpt_tos == ["a@one.test", "d@ONE.test"]
    assert [m.rcpt_tos for m in two.messages] == [["b@two.test"]]


async def test_connection_reuse_across_messages(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"])
    c = courier(test_dns, fleet.port)
    try:
        [first] = await c.deliver(SENDER, ["b@example.test"], MSG)
        [second] = await c.deliver(SENDER, ["c@example.test"], MSG)
    finally:
        await c.close()
    assert first.ok and second.ok
    assert mx1.connections == 1
    assert c.connections_opened == 1
    assert mx1.handler.verbs().count("RSET") == 0  # a clean transaction needs no reset
    assert [m.rcpt_tos for m in mx1.messages] == [["b@example.test"], ["c@example.test"]]


async def test_dropped_idle_connection_is_replaced(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"])
    c = courier(test_dns, fleet.port)
    try:
        [first] = await c.deliver(SENDER, ["b@example.test"], MSG)
        mx1.drop_connections()
        [second] = await c.deliver(SENDER, ["c@example.test"], MSG)
    finally:
        await c.close()
    assert first.ok and second.ok, second.reply
    assert mx1.connections == 2


async def test_an_idle_connection_past_idle_seconds_is_not_reused(
    test_dns: TestDNS, fleet: Fleet
) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"])
    now = [0.0]
    c = courier(test_dns, fleet.port, idle_seconds=30.0, monotonic=lambda: now[0])
    try:
        [first] = await c.deliver(SENDER, ["b@example.test"], MSG)
        now[0] += 30.0
        [second] = await c.deliver(SENDER, ["c@example.test"], MSG)
    finally:
        await c.close()
    assert first.ok and second.ok, second.reply
    assert c.connections_opened == mx1.connections == 2


async def test_a_connection_past_its_max_age_is_not_reused(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"])
    now = [0.0]
    c = courier(
        test_dns, fleet.port, idle_seconds=30.0, max_age_seconds=60.0, monotonic=lambda: now[0]
    )
    results = []
    try:
        for _ in range(4):  # used every 29 s: never idle too long, too old at 87 s
            results += await c.deliver(SENDER, ["b@example.test"], MSG)
            now[0] += 29.0
    finally:
        await c.close()
    assert all(r.ok for r in results), results
    assert c.connections_opened == mx1.connections == 2
    assert len(mx1.messages) == 4


async def test_concurrency_per_destination(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    gate = asyncio.Event()
    handler = Handler(data_gate=gate)
    [mx1] = await fleet.start(["127.0.0.2"], handlers=[handler])
    c = courier(test_dns, fleet.port, concurrency=1)
    try:
        tasks = [
            asyncio.create_task(c.deliver(SENDER, [f"r{k}@example.test"], MSG)) for k in range(3)
        ]
        await wait_until(lambda: handler.verbs().count("DATA") == 1)
        await asyncio.sleep(0)  # let the others run up to the slot
        assert mx1.connections == 1
        assert handler.verbs().count("MAIL") == 1
        gate.set()
        async with asyncio.timeout(20):
            results = await asyncio.gather(*tasks)
    finally:
        await c.close()
    assert all(r.ok for [r] in results)
    assert mx1.connections == 1  # one slot, one connection, reused
    assert len(mx1.messages) == 3


async def test_domains_do_not_share_a_slot(test_dns: TestDNS, fleet: Fleet) -> None:
    test_dns.mx("one.test", (10, "mx.one.test"))
    test_dns.a("mx.one.test", "127.0.0.2")
    test_dns.mx("two.test", (10, "mx.two.test"))
    test_dns.a("mx.two.test", "127.0.0.3")
    gate = asyncio.Event()
    slow = Handler(data_gate=gate)
    _one, two = await fleet.start(["127.0.0.2", "127.0.0.3"], handlers=[slow, None])
    c = courier(test_dns, fleet.port, concurrency=1)
    try:
        stuck = asyncio.create_task(c.deliver(SENDER, ["a@one.test"], MSG))
        await wait_until(lambda: slow.verbs().count("DATA") == 1)
        async with asyncio.timeout(10):
            [res] = await c.deliver(SENDER, ["b@two.test"], MSG)
        assert res.ok
        gate.set()
        async with asyncio.timeout(10):
            [first] = await stuck
        assert first.ok
    finally:
        gate.set()
        await c.close()
    assert len(two.messages) == 1


async def test_closed_courier_defers(test_dns: TestDNS) -> None:
    c = courier(test_dns, _free_port())
    await c.close()
    [res] = await c.deliver(SENDER, ["b@example.test"], MSG)
    assert res.result is Result.TEMPORARY


async def test_domain_literal(test_dns: TestDNS, fleet: Fleet) -> None:
    [sink] = await fleet.start(["127.0.0.2"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@[127.0.0.2]"])
    assert res.result is Result.OK, res.reply
    assert len(sink.messages) == 1
    assert test_dns.queries == []
