"""TLS towards MX hosts: opportunistic ``may``, ``encrypt``, ``verify`` and per-domain levels.

The sinks offer STARTTLS with certificates from a throw-away trustme CA that the system
does not trust: fine under ``may`` and ``encrypt`` (no verification, as Postfix), fatal
under ``verify`` unless the courier is given the CA.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import pytest
import trustme
from test_mx_delivery import MSG, SENDER, Fleet, courier, deliver, fleet, test_dns, two_mx

from hato.delivery.base import Result
from peers.asyncsinks import RawServer
from peers.dns import TestDNS

__all__ = ["fleet", "test_dns"]  # fixtures, re-exported so pytest finds them here


@dataclass
class MXCerts:
    ca_file: str
    mx1: ssl.SSLContext  # certificate for mx1.example.test
    mx2: ssl.SSLContext  # certificate for mx2.example.test
    broken: ssl.SSLContext  # no certificate at all: every handshake fails


@pytest.fixture(scope="module")
def mx_certs(tmp_path_factory: pytest.TempPathFactory) -> MXCerts:
    ca = trustme.CA()

    def server(name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        return context

    path = tmp_path_factory.mktemp("mx-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    broken = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    return MXCerts(str(path), server("mx1.example.test"), server("mx2.example.test"), broken)


async def test_may_uses_starttls_and_accepts_a_self_signed_cert(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.mx1])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert mx1.messages[0].tls
    # Nothing but EHLO before STARTTLS, EHLO again after it (RFC 3207 4.2).
    assert [(c.verb, c.tls) for c in mx1.handler.commands][:3] == [
        ("EHLO", False),
        ("EHLO", True),
        ("MAIL", True),
    ]


async def test_may_without_starttls_sends_in_clear(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"])
    [res] = await deliver(courier(test_dns, fleet.port), ["b@example.test"])
    assert res.result is Result.OK
    assert not mx1.messages[0].tls


async def test_may_retries_in_plaintext_when_the_handshake_fails(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.broken])
    c = courier(test_dns, fleet.port)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert not mx1.messages[0].tls
    assert mx1.connections == 2  # the failed handshake, then plaintext
    assert c.connections_opened == 2


async def test_encrypt_without_starttls_defers(test_dns: TestDNS, fleet: Fleet) -> None:
    two_mx(test_dns)
    mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"])
    [res] = await deliver(courier(test_dns, fleet.port, tls="encrypt"), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.4")
    assert "TLS is required, but was not offered" in res.reply.text
    # Both MX hosts were tried, and neither saw MAIL in clear.
    assert mx1.connections == mx2.connections == 1
    assert "MAIL" not in mx1.handler.verbs() + mx2.handler.verbs()


async def test_encrypt_accepts_a_self_signed_cert(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.mx1])
    [res] = await deliver(courier(test_dns, fleet.port, tls="encrypt"), ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert mx1.messages[0].tls


async def test_encrypt_with_a_broken_handshake_defers(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    test_dns.mx("example.test", (10, "mx1.example.test"))
    test_dns.a("mx1.example.test", "127.0.0.2")
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.broken])
    [res] = await deliver(courier(test_dns, fleet.port, tls="encrypt"), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
    assert mx1.connections == 1  # no plaintext retry under encrypt
    assert not mx1.messages


async def test_verify_with_an_untrusted_cert_defers(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    test_dns.mx("example.test", (10, "mx1.example.test"))
    test_dns.a("mx1.example.test", "127.0.0.2")
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.mx1])
    [res] = await deliver(courier(test_dns, fleet.port, tls="verify"), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
    assert "CERTIFICATE_VERIFY_FAILED" in res.reply.text
    assert "MAIL" not in mx1.handler.verbs()


async def test_verify_with_a_trusted_cert_for_the_mx_name(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    two_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.mx1])
    c = courier(test_dns, fleet.port, tls="verify", ca_file=mx_certs.ca_file)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert mx1.messages[0].tls


async def test_verify_checks_the_mx_host_name(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    # mx1 presents mx2's certificate: trusted CA, wrong name → next MX, which is right.
    two_mx(test_dns)
    mx1, mx2 = await fleet.start(["127.0.0.2", "127.0.0.3"], starttls=[mx_certs.mx2, mx_certs.mx2])
    c = courier(test_dns, fleet.port, tls="verify", ca_file=mx_certs.ca_file)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert res.relay.startswith("mx2.example.test[127.0.0.3]")
    assert not mx1.messages and mx2.messages[0].tls


async def test_per_domain_policy(test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts) -> None:
    two_mx(test_dns, "example.test")
    two_mx(test_dns, "strict.test")
    await fleet.start(["127.0.0.2"], starttls=[mx_certs.mx1])
    c = courier(test_dns, fleet.port, policy=["strict.test=verify"])
    results = await deliver(c, ["a@example.test", "b@strict.test"])
    assert [r.result for r in results] == [Result.OK, Result.TEMPORARY]
    assert results[1].reply.enhanced == "4.7.5"


async def test_pooled_session_must_meet_the_next_destinations_level(
    test_dns: TestDNS, fleet: Fleet, mx_certs: MXCerts
) -> None:
    two_mx(test_dns, "plain.test")
    two_mx(test_dns, "secure.test")
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[mx_certs.mx1])
    c = courier(test_dns, fleet.port, policy=["plain.test=none", "secure.test=encrypt"])
    try:
        [first] = await c.deliver(SENDER, ["a@plain.test"], MSG)
        [second] = await c.deliver(SENDER, ["b@secure.test"], MSG)
        [third] = await c.deliver(SENDER, ["c@plain.test"], MSG)
    finally:
        await c.close()
    assert first.ok and second.ok and third.ok
    assert [m.tls for m in mx1.messages] == [False, True, True]
    assert mx1.connections == 2  # the plain one could not serve secure.test


def one_mx_on_localhost(dns: TestDNS) -> None:
    dns.mx("example.test", (10, "mx1.example.test"))
    dns.a("mx1.example.test", "127.0.0.1")


async def test_starttls_injection_cannot_steer_the_client(
    test_dns: TestDNS, mx_certs: MXCerts
) -> None:
    """CVE-2011-0411 class, client side, towards an MX: lines after the 220 to STARTTLS
    are discarded, so the real 550 to RCPT is read as the reply to RCPT."""
    one_mx_on_localhost(test_dns)
    raw = RawServer(
        ehlo=["STARTTLS", "8BITMIME"],
        tls=mx_certs.mx1,
        inject_after_starttls=b"250 injected\r\n250 injected too\r\n",
        rcpt_reply=b"550 5.1.1 real reply to RCPT\r\n",
    )
    async with raw:
        [res] = await deliver(courier(test_dns, raw.port), ["b@example.test"])
    assert res.result is Result.PERMANENT, res.reply
    assert res.reply.text == "real reply to RCPT"
    verbs = [line.split()[0].upper() for line in raw.lines]
    assert verbs[:3] == [b"EHLO", b"STARTTLS", b"EHLO"]
    assert b"DATA" not in verbs


async def test_may_goes_on_in_clear_when_starttls_is_refused(test_dns: TestDNS) -> None:
    one_mx_on_localhost(test_dns)
    raw = RawServer(ehlo=["STARTTLS"])  # offers it, then answers 502 to it
    async with raw:
        [res] = await deliver(courier(test_dns, raw.port), ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert raw.connections == 1 and len(raw.data_chunks) == 1


async def test_encrypt_defers_when_starttls_is_refused(test_dns: TestDNS) -> None:
    one_mx_on_localhost(test_dns)
    raw = RawServer(ehlo=["STARTTLS"])
    async with raw:
        [res] = await deliver(courier(test_dns, raw.port, tls="encrypt"), ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
    assert "TLS is required, but host mx1.example.test[127.0.0.1]" in res.reply.text
    assert not raw.data_chunks
    assert b"MAIL" not in [line.split()[0].upper() for line in raw.lines]
