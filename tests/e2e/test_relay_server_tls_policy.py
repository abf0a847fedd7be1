"""Transport policy through ``hato serve`` (``HATO_ROUTE=mx``): MTA-STS and DANE end to end.

The relay server is configured as an operator would for a private deployment:
``HATO_MX_TLS_CA_FILE`` (the test CA, added to the system's), ``HATO_MTA_STS_PORT`` (the
loopback HTTPS server serving the policies) and ``HATO_DNSSEC_RESOLVER`` (the test DNS,
which sets the AD bit for the zones the test calls signed, as a validating resolver does).
The MX hosts are recording aiosmtpd sinks offering STARTTLS, on one port:

* ``sts.example`` — MTA-STS ``enforce`` naming ``mx.sts.example``, whose certificate is
  from the test CA: delivered, ``verified=yes policy=mta-sts-enforce``.
* ``badname.example`` — the same policy, but its MX presents ``mx.sts.example``'s
  certificate: deferred with 4.7.5, never in plaintext.
* ``dane.example`` — a signed zone with a DANE-EE TLSA record for its MX, whose
  certificate is from a CA nobody trusts: delivered, ``verified=yes policy=dane``.
"""

from __future__ import annotations

import hashlib
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from peers import free_port
from peers.dns import TestDNS
from peers.mta_sts import PolicyServer
from peers.sinks import RecordingSink

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayFactory, RelayServer

SENDER = "postfix@dbmx.net"
HOSTS = {
    "mx.sts.example": "127.0.0.31",
    "mx.badname.example": "127.0.0.32",
    "mx.dane.example": "127.0.0.33",
}


def policy(mx: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"


@dataclass
class World:
    port: int
    sinks: dict[str, RecordingSink]
    web: PolicyServer
    ca_file: Path


def _context(ca: trustme.CA, name: str) -> tuple[ssl.SSLContext, bytes]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ca.issue_cert(name)
    leaf.configure_cert(context)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return context, hashlib.sha256(spki).digest()


@pytest.fixture
def world(dns_server: TestDNS, tmp_path: Path) -> Iterator[World]:
    ca = trustme.CA()
    ca_file = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sts_ctx, _ = _context(ca, "mx.sts.example")
    dane_ctx, dane_digest = _context(trustme.CA(), "mx.dane.example")
    contexts = {
        "mx.sts.example": sts_ctx,
        "mx.badname.example": sts_ctx,
        "mx.dane.example": dane_ctx,
    }
    for domain in ("sts.example", "badname.example", "dane.example"):
        dns_server.mx(domain, (10, f"mx.{domain}"))
        dns_server.a(f"mx.{domain}", HOSTS[f"mx.{domain}"])
    for domain in ("sts.example", "badname.example"):
        dns_server.txt(f"_mta-sts.{domain}", "v=STSv1; id=20261203;")
        dns_server.a(f"mta-sts.{domain}", "127.0.0.1")
    dns_server.tlsa("_25._tcp.mx.dane.example", 3, 1, 1, dane_digest)
    dns_server.signed("dane.example")
    # The policy server answers for both domains with one certificate naming both.
    web_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mta-sts.sts.example", "mta-sts.badname.example").configure_cert(web_ctx)
    with PolicyServer(web_ctx) as web:
        web.policy("sts.example", policy("mx.sts.example"))
        web.policy("badname.example", policy("mx.badname.example"))
        for _attempt in range(20):
            port = free_port()
            started: dict[str, RecordingSink] = {}
            try:
                for name, host in HOSTS.items():
                    started[name] = RecordingSink(
                        host=host, port=port, hostname=name, tls_context=contexts[name]
                    ).start()
            except Exception:  # the port is taken on one of the addresses: try another
                for sink in started.values():
                    sink.stop()
                continue
            try:
                yield World(port, started, web, ca_file)
            finally:
                for sink in started.values():
                    sink.stop()
            return
        raise RuntimeError("no port free on every loopback address")


@pytest.fixture
def relay(
    relay_server_factory: RelayFactory, world: World, dns_server: TestDNS
) -> Iterator[RelayServer]:
    server = relay_server_factory(
        world.port,
        HATO_MYNETWORKS="127.0.0.1/32",
        HATO_MX_TLS_CA_FILE=str(world.ca_file),
        HATO_MTA_STS_PORT=str(world.web.port),
        HATO_DNSSEC_RESOLVER=dns_server.server,
    )
    yield server
    # Stopped before the sinks: its pooled TLS sessions end with QUIT, not torn down.
    server.serve.stop()


def send(relay: RelayServer, recipient: str) -> None:
    message = f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: tls\r\n\r\nHello.\r\n".encode()
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=30) as client:
        client.ehlo("app.test")
        assert client.sendmail(SENDER, [recipient], message) == {}


def test_mta_sts_enforce_delivers_over_verified_tls(relay: RelayServer, world: World) -> None:
    send(relay, "user@sts.example")
    [msg] = world.sinks["mx.sts.example"].wait_for_count(1)
    assert msg.tls
    relay.serve.wait_for_log(
        r"to=<user@sts\.example>, relay=mx\.sts\.example\[127\.0\.0\.31\]:\d+, "
        r"tls=TLSv1\.[23] verified=yes policy=mta-sts-enforce, .*status=sent"
    )
    assert (relay.data_dir / "mta-sts" / "sts.example.json").exists()


def test_mta_sts_enforce_with_the_wrong_certificate_defers(
    relay: RelayServer, world: World
) -> None:
    send(relay, "user@badname.example")
    relay.serve.wait_for_log(
        r"to=<user@badname\.example>, relay=mx\.badname\.example\[127\.0\.0\.32\]:\d+, "
        r"tls=none verified=no policy=mta-sts-enforce, .*dsn=4\.7\.5, status=deferred "
        r"\(.*Hostname mismatch.*MTA-STS policy of badname\.example"
    )
    assert world.sinks["mx.badname.example"].messages == []


def test_dane_delivers_to_a_certificate_no_ca_vouches_for(relay: RelayServer, world: World) -> None:
    send(relay, "user@dane.example")
    [msg] = world.sinks["mx.dane.example"].wait_for_count(1)
    assert msg.tls
    relay.serve.wait_for_log(
        r"to=<user@dane\.example>, relay=mx\.dane\.example\[127\.0\.0\.33\]:\d+, "
        r"tls=TLSv1\.[23] verified=yes policy=dane, .*status=sent"
    )
