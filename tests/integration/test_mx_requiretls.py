"""REQUIRETLS (RFC 8689) through the MX courier, with MX hosts from the test DNS.

A REQUIRETLS message asks for a certificate valid for the MX name whatever the domain's
TLS level, goes only to an MX host that offers REQUIRETLS (Hato's own intake, which
stores the flag with the message), and bounces with 5.7.30 from one that does not
(aiosmtpd).
"""

from __future__ import annotations

import asyncio
import io
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from test_mx_delivery import MSG, SENDER, Fleet, courier, fleet, test_dns

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.mx import MXCourier
from hato.maillog import MailLog
from hato.message import META_REQUIRETLS
from hato.queue.memory import MemoryQueue
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy
from hato.smtp.server import SMTPListener, start_listener
from hato.smtp.tls import TLSContextProvider
from peers.dns import TestDNS

__all__ = ["fleet", "test_dns"]  # fixtures, re-exported so pytest finds them here


@dataclass
class CA:
    ca: trustme.CA
    ca_file: str
    directory: Path

    def provider(self, name: str) -> TLSContextProvider:
        leaf = self.ca.issue_cert(name)
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        leaf.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return TLSContextProvider(cert, key)

    def server_context(self, name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(name).configure_cert(context)
        return context


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return CA(authority, str(path), tmp_path)


@pytest.fixture
async def hato_mx(ca: CA, fleet: Fleet) -> AsyncIterator[tuple[SMTPListener, MemoryQueue]]:
    """Hato's intake as mx1.example.test (127.0.0.2), on the fleet's port."""
    queue = MemoryQueue()
    await queue.open()
    await fleet.start([])  # picks the port
    listener = await start_listener(
        ListenerConfig("127.0.0.2", fleet.port, ListenerRole.SMTP),
        queue=queue,
        policy=Policy(role=ListenerRole.SMTP, domains=["example.test"]),
        tls=ca.provider("mx1.example.test"),
        log=MailLog(io.StringIO()),
        hostname="mx1.example.test",
    )
    yield listener, queue
    await listener.aclose(timeout=2)
    await queue.close()


def one_mx(dns: TestDNS) -> None:
    dns.mx("example.test", (10, "mx1.example.test"))
    dns.a("mx1.example.test", "127.0.0.2")


async def deliver_requiretls(c: MXCourier) -> DeliveryResult:
    async with asyncio.timeout(20):
        try:
            [res] = await c.deliver(SENDER, ["b@example.test"], MSG, require_tls=True)
            return res
        finally:
            await c.close()


async def test_requiretls_to_hato_as_mx_over_verified_tls(
    test_dns: TestDNS, ca: CA, hato_mx: tuple[SMTPListener, MemoryQueue]
) -> None:
    one_mx(test_dns)
    listener, queue = hato_mx
    # The domain's level is "may": REQUIRETLS asks for verify all the same.
    res = await deliver_requiretls(courier(test_dns, listener.port, ca_file=ca.ca_file))
    assert res.result is Result.OK, res.reply
    assert res.tls_verified
    [msg] = await queue.list()
    assert msg.meta.get(META_REQUIRETLS) == "yes"


async def test_requiretls_needs_a_certificate_valid_for_the_mx_name(
    test_dns: TestDNS, hato_mx: tuple[SMTPListener, MemoryQueue]
) -> None:
    one_mx(test_dns)
    listener, queue = hato_mx
    # The CA is not given to the courier: under "may" this would go, unverified.
    res = await deliver_requiretls(courier(test_dns, listener.port))
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
    assert await queue.list() == []


async def test_requiretls_to_an_mx_without_it_bounces_with_5730(
    test_dns: TestDNS, fleet: Fleet, ca: CA
) -> None:
    one_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[ca.server_context("mx1.example.test")])
    res = await deliver_requiretls(courier(test_dns, fleet.port, ca_file=ca.ca_file))
    assert res.result is Result.PERMANENT
    assert (res.reply.code, res.reply.enhanced) == (550, "5.7.30")
    assert "MAIL" not in mx1.handler.verbs()
