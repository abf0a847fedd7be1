"""Transport policy towards MX hosts: MTA-STS (RFC 8461), DANE (RFC 7672) and their precedence.

Real peers on loopback: aiosmtpd MX sinks offering STARTTLS with certificates of a
trustme CA, the test DNS (which serves TXT, MX, A and TLSA, and sets the AD bit for the
zones a test calls signed, as a validating resolver would), and an HTTPS server serving
the MTA-STS policies with a certificate of the same CA. The courier trusts that CA
through ``ca_file`` (``HATO_MX_TLS_CA_FILE``), on top of the system's.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_mx_delivery import MSG, SENDER, Fleet, deliver, fleet, test_dns

from hato import tlsrpt_types as rpt
from hato.delivery.base import Result
from hato.delivery.dane import DANEResolver
from hato.delivery.mta_sts import MTASTS
from hato.delivery.mx import MXCourier, MXTLSPolicy
from hato.dns import Resolver
from hato.tlsrpt_types import CollectingTLSReporter
from peers.dns import TestDNS
from peers.mta_sts import PolicyServer

__all__ = ["fleet", "test_dns"]  # fixtures, re-exported so pytest finds them here

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.backup.test\nmax_age: 86400\n"
TESTING = ENFORCE.replace("enforce", "testing")


def resolver(dns: TestDNS) -> Resolver:
    # No cache: the tests change records between lookups.
    return Resolver([dns.server], timeout=1.0, lifetime=3.0, cache=False)


@dataclass
class Certs:
    ca_file: str
    mx1: ssl.SSLContext  # a certificate for mx1.example.test
    mx2_on_mx1: ssl.SSLContext  # mx2's certificate (the wrong name for mx1)
    stranger: ssl.SSLContext  # mx1.example.test, but from a CA nobody trusts
    mx1_spki_sha256: bytes
    web: ssl.SSLContext  # mta-sts.* of the test domains


def _server(ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, bytes]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ca.issue_cert(*names)
    leaf.configure_cert(context)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return context, hashlib.sha256(spki).digest()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    mx1, digest = _server(ca, "mx1.example.test")
    mx2, _ = _server(ca, "mx2.example.test")
    stranger, _ = _server(trustme.CA(), "mx1.example.test")
    web, _ = _server(ca, "mta-sts.example.test", "mta-sts.other.test")
    return Certs(str(path), mx1, mx2, stranger, digest, web)


@pytest.fixture
def web(certs: Certs) -> Iterator[PolicyServer]:
    with PolicyServer(certs.web) as server:
        yield server


def one_mx(dns: TestDNS, domain: str = "example.test", host: str = "mx1.example.test") -> None:
    dns.mx(domain, (10, host))
    dns.a(host, "127.0.0.2")


def publish_sts(
    dns: TestDNS, web: PolicyServer, text: str, *, domain: str = "example.test", id: str = "1"
) -> None:
    dns.txt(f"_mta-sts.{domain}", f"v=STSv1; id={id};")
    dns.a(f"mta-sts.{domain}", "127.0.0.1")
    web.policy(domain, text)


def courier(
    dns: TestDNS,
    fleet: Fleet,
    web: PolicyServer,
    certs: Certs,
    cache: Path,
    reporter: CollectingTLSReporter | None = None,
    *,
    dnssec: bool = False,
    policy: tuple[str, ...] = (),
    **kwargs: Any,
) -> MXCourier:
    r = resolver(dns)
    return MXCourier(
        r,
        helo_name="relay.sender.test",
        port=fleet.port,
        allow_private=True,
        tls_policy=MXTLSPolicy.parse("may", policy),
        ca_file=certs.ca_file,
        mta_sts=MTASTS(
            r, cache_dir=cache, port=web.port, ca_file=certs.ca_file, allow_private=True, timeout=5
        ),
        dane=DANEResolver(dns.server, timeout=1, lifetime=3) if dnssec else None,
        tls_reporter=reporter,
        timeout=5.0,
        connect_timeout=5.0,
        **kwargs,
    )


# MTA-STS.


async def test_enforce_with_a_matching_mx_delivers_over_verified_tls(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, ENFORCE)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.OK, res.reply
    assert (res.tls_policy, res.tls_verified) == ("mta-sts-enforce", True)
    assert res.tls_version.startswith("TLSv1")
    assert mx1.messages[0].tls
    [report] = reporter.results
    assert (report.policy_domain, report.policy_type, report.result_type) == (
        "example.test",
        "sts",
        rpt.SUCCESS,
    )
    assert report.mx_host == "mx1.example.test" and report.receiving_ip == "127.0.0.2"
    assert report.sending_ip.startswith("127.")
    assert "mode: enforce" in report.policy_strings
    assert report.mx_host_patterns == ("mx1.example.test", "*.backup.test")
    assert web.requests("example.test") == 1
    # The policy is on disk, with its id and max_age.
    assert (tmp_path / "example.test.json").exists()


async def test_enforce_with_a_non_matching_mx_defers_without_connecting(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns, host="mx2.example.test")
    publish_sts(test_dns, web, ENFORCE)
    [mx2] = await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (451, "4.7.5")
    assert "does not match the MTA-STS policy of example.test" in res.reply.text
    assert res.tls_policy == "mta-sts-enforce"
    assert mx2.connections == 0
    [report] = reporter.results
    assert report.result_type == rpt.VALIDATION_FAILURE and report.mx_host == "mx2.example.test"


async def test_enforce_with_a_certificate_for_another_name_defers(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, ENFORCE)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.mx2_on_mx1])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
    assert not mx1.messages and mx1.connections == 1  # no plaintext retry
    [report] = reporter.results
    assert report.result_type == rpt.CERTIFICATE_HOST_MISMATCH


async def test_enforce_with_an_untrusted_certificate_defers(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, ENFORCE)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.stranger])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.TEMPORARY and res.reply.enhanced == "4.7.5"
    assert not mx1.messages
    assert [r.result_type for r in reporter.results] == [rpt.CERTIFICATE_NOT_TRUSTED]


async def test_enforce_without_starttls_defers(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, ENFORCE)
    [mx1] = await fleet.start(["127.0.0.2"])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.TEMPORARY and res.reply.enhanced == "4.7.4"
    assert "MAIL" not in mx1.handler.verbs()
    assert [r.result_type for r in reporter.results] == [rpt.STARTTLS_NOT_SUPPORTED]


async def test_testing_mode_delivers_and_reports(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, TESTING)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.mx2_on_mx1])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.OK, res.reply
    assert (res.tls_policy, res.tls_verified) == ("mta-sts-testing", False)
    assert mx1.messages[0].tls
    [report] = reporter.results
    assert (report.policy_type, report.result_type) == ("sts", rpt.CERTIFICATE_HOST_MISMATCH)


async def test_testing_mode_with_a_good_certificate_is_verified(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, TESTING)
    await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.OK
    assert (res.tls_policy, res.tls_verified) == ("mta-sts-testing", True)
    assert [r.result_type for r in reporter.results] == [rpt.SUCCESS]


async def test_a_policy_that_cannot_be_fetched_is_reported_and_the_default_applies(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    test_dns.txt("_mta-sts.example.test", "v=STSv1; id=1;")
    test_dns.a("mta-sts.example.test", "127.0.0.1")
    web.respond("example.test", 302, "text/plain", b"", location="https://elsewhere.test/")
    await fleet.start(["127.0.0.2"], starttls=[certs.mx2_on_mx1])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.result is Result.OK and res.tls_policy == "opportunistic"
    fetch = [r for r in reporter.results if r.result_type != rpt.SUCCESS]
    assert [r.result_type for r in fetch] == [rpt.STS_POLICY_FETCH_ERROR]
    assert "HTTP 302" in fetch[0].failure_reason


@pytest.mark.parametrize(
    ("status", "kind", "body", "expected"),
    [
        (200, "text/html", ENFORCE.encode(), rpt.STS_POLICY_INVALID),
        (
            200,
            "text/plain",
            b"version: STSv1\nmode: enforce\n" + b"x" * 70000,
            rpt.STS_POLICY_INVALID,
        ),
        (200, "text/plain", b"version: STSv9\n", rpt.STS_POLICY_INVALID),
        (404, "text/plain", b"", rpt.STS_POLICY_FETCH_ERROR),
    ],
)
async def test_bad_policy_answers(
    test_dns: TestDNS,
    web: PolicyServer,
    certs: Certs,
    tmp_path: Path,
    status: int,
    kind: str,
    body: bytes,
    expected: str,
) -> None:
    test_dns.txt("_mta-sts.example.test", "v=STSv1; id=1;")
    test_dns.a("mta-sts.example.test", "127.0.0.1")
    web.respond("example.test", status, kind, body)
    sts = MTASTS(
        resolver(test_dns),
        cache_dir=tmp_path,
        port=web.port,
        ca_file=certs.ca_file,
        allow_private=True,
    )
    lookup = await sts.policy_for("example.test")
    assert lookup.policy is None and lookup.error == expected, lookup.reason


async def test_the_policy_server_certificate_is_verified(
    test_dns: TestDNS, certs: Certs, tmp_path: Path
) -> None:
    test_dns.txt("_mta-sts.example.test", "v=STSv1; id=1;")
    test_dns.a("mta-sts.example.test", "127.0.0.1")
    with PolicyServer(certs.stranger) as web:
        web.policy("example.test", ENFORCE)
        sts = MTASTS(
            resolver(test_dns),
            cache_dir=tmp_path,
            port=web.port,
            ca_file=certs.ca_file,
            allow_private=True,
        )
        lookup = await sts.policy_for("example.test")
    assert lookup.policy is None and lookup.error == rpt.STS_WEBPKI_INVALID


async def test_policy_hosts_in_private_space_are_refused_unless_allowed(
    test_dns: TestDNS, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    publish_sts(test_dns, web, ENFORCE)
    sts = MTASTS(resolver(test_dns), cache_dir=tmp_path, port=web.port, ca_file=certs.ca_file)
    lookup = await sts.policy_for("example.test")
    assert lookup.policy is None and "private" in lookup.reason
    assert web.requests("example.test") == 0


async def test_a_cached_policy_survives_a_dns_outage(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, ENFORCE)
    await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    [first] = await deliver(courier(test_dns, fleet, web, certs, tmp_path), ["b@example.test"])
    assert first.ok and first.tls_policy == "mta-sts-enforce"
    # The policy's DNS and its web server are gone; the MX now presents a wrong name.
    test_dns.servfail("_mta-sts.example.test", "mta-sts.example.test")
    web.respond("example.test", 500, "text/plain", b"")
    fleet2 = Fleet()
    try:
        test_dns.remove("mx1.example.test")
        test_dns.a("mx1.example.test", "127.0.0.3")
        await fleet2.start(["127.0.0.3"], starttls=[certs.mx2_on_mx1])
        # A new courier (a restart): the policy comes from the disk cache.
        c = courier(test_dns, fleet2, web, certs, tmp_path)
        [second] = await deliver(c, ["b@example.test"])
    finally:
        await fleet2.stop()
    assert second.result is Result.TEMPORARY and second.reply.enhanced == "4.7.5"
    assert second.tls_policy == "mta-sts-enforce"
    assert web.requests("example.test") == 1


async def test_a_new_policy_id_fetches_again(
    test_dns: TestDNS, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    publish_sts(test_dns, web, ENFORCE, id="1")
    sts = MTASTS(
        resolver(test_dns),
        cache_dir=tmp_path,
        port=web.port,
        ca_file=certs.ca_file,
        allow_private=True,
    )
    assert (await sts.policy_for("example.test")).policy is not None
    assert (await sts.policy_for("example.test")).policy is not None
    assert web.requests("example.test") == 1  # same id: the cache answers
    test_dns.remove("_mta-sts.example.test")
    publish_sts(test_dns, web, TESTING, id="2")
    lookup = await sts.policy_for("example.test")
    assert lookup.policy is not None and (lookup.policy.mode, lookup.policy.id) == ("testing", "2")
    assert web.requests("example.test") == 2


async def test_a_policy_past_half_its_max_age_is_refreshed_in_the_background(
    test_dns: TestDNS, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    now = [1_000_000.0]
    publish_sts(test_dns, web, ENFORCE, id="1")
    sts = MTASTS(
        resolver(test_dns),
        cache_dir=tmp_path,
        port=web.port,
        ca_file=certs.ca_file,
        allow_private=True,
        clock=lambda: now[0],
    )
    await sts.policy_for("example.test")
    web.policy("example.test", ENFORCE.replace("mx1.example.test", "mx9.example.test"))
    now[0] += 86400 * 0.6  # same id, but past half of max_age
    lookup = await sts.policy_for("example.test")
    assert lookup.policy is not None and lookup.policy.matches("mx1.example.test")  # the cached one
    await sts.refreshed()
    assert web.requests("example.test") == 2
    fresh = await sts.policy_for("example.test")
    assert fresh.policy is not None and fresh.policy.matches("mx9.example.test")
    now[0] += 86400 * 2  # expired, and now unreachable: no policy at all
    test_dns.servfail("_mta-sts.example.test")
    assert (await sts.policy_for("example.test")).policy is None


# DANE.


def publish_tlsa(dns: TestDNS, digest: bytes, *, signed: bool = True) -> None:
    dns.tlsa("_25._tcp.mx1.example.test", 3, 1, 1, digest)
    if signed:
        dns.signed("example.test")


async def test_dane_ee_match_delivers_without_any_ca(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_tlsa(test_dns, certs.mx1_spki_sha256)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    reporter = CollectingTLSReporter()
    c = courier(test_dns, fleet, web, certs, tmp_path, reporter, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert (res.tls_policy, res.tls_verified) == ("dane", True)
    assert mx1.messages[0].tls
    [report] = reporter.results
    assert (report.policy_type, report.result_type) == ("tlsa", rpt.SUCCESS)
    assert report.policy_strings == (f"3 1 1 {certs.mx1_spki_sha256.hex()}",)
    assert ("_25._tcp.mx1.example.test", "TLSA") in test_dns.queries


async def test_dane_ee_mismatch_defers_and_never_falls_back_to_plaintext(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_tlsa(test_dns, certs.mx1_spki_sha256)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.stranger])
    reporter = CollectingTLSReporter()
    c = courier(test_dns, fleet, web, certs, tmp_path, reporter, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.TEMPORARY
    assert (res.reply.code, res.reply.enhanced) == (454, "4.7.5")
    assert "DANE" in res.reply.text and res.tls_policy == "dane"
    assert mx1.connections == 1 and not mx1.messages
    assert [r.result_type for r in reporter.results] == [rpt.VALIDATION_FAILURE]


async def test_dane_without_starttls_defers(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_tlsa(test_dns, certs.mx1_spki_sha256)
    [mx1] = await fleet.start(["127.0.0.2"])
    c = courier(test_dns, fleet, web, certs, tmp_path, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.TEMPORARY and res.reply.enhanced == "4.7.4"
    assert not mx1.messages


async def test_tlsa_without_the_ad_bit_is_ignored(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_tlsa(test_dns, b"\0" * 32, signed=False)  # would never match
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.stranger])
    c = courier(test_dns, fleet, web, certs, tmp_path, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert (res.tls_policy, res.tls_verified) == ("opportunistic", False)
    assert mx1.messages[0].tls


async def test_without_a_dnssec_resolver_tlsa_is_not_even_asked(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_tlsa(test_dns, b"\0" * 32)
    await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    [res] = await deliver(courier(test_dns, fleet, web, certs, tmp_path), ["b@example.test"])
    assert res.ok and res.tls_policy == "opportunistic"
    assert not [q for q in test_dns.queries if q[1] == "TLSA"]


async def test_a_failing_tlsa_lookup_defers_that_mx(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    test_dns.servfail("_25._tcp.mx1.example.test")  # how a validating resolver says "bogus"
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    reporter = CollectingTLSReporter()
    c = courier(test_dns, fleet, web, certs, tmp_path, reporter, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.TEMPORARY and res.reply.enhanced == "4.7.5"
    assert res.tls_policy == "dane" and mx1.connections == 0
    assert [r.result_type for r in reporter.results] == [rpt.DNSSEC_INVALID]


# Precedence.


async def test_dane_wins_over_mta_sts(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    publish_sts(test_dns, web, ENFORCE)
    publish_tlsa(test_dns, certs.mx1_spki_sha256)
    await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    c = courier(test_dns, fleet, web, certs, tmp_path, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.ok and res.tls_policy == "dane"


async def test_the_operators_entry_wins_over_dane_and_mta_sts(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns, host="mx2.example.test")  # not in the policy's mx list
    publish_sts(test_dns, web, ENFORCE)
    test_dns.tlsa("_25._tcp.mx2.example.test", 3, 1, 1, b"\0" * 32)  # would never match
    test_dns.signed("example.test")
    [mx2] = await fleet.start(["127.0.0.2"], starttls=[certs.stranger])
    c = courier(
        test_dns, fleet, web, certs, tmp_path, dnssec=True, policy=("example.test=encrypt",)
    )
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK, res.reply
    assert (res.tls_policy, res.tls_verified) == ("operator", False)
    assert mx2.messages[0].tls
    assert web.requests("example.test") == 0
    assert not [q for q in test_dns.queries if q[1] == "TLSA"]


async def test_no_policy_is_opportunistic(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    [mx1] = await fleet.start(["127.0.0.2"])
    reporter = CollectingTLSReporter()
    c = courier(test_dns, fleet, web, certs, tmp_path, reporter)
    [res] = await deliver(c, ["b@example.test"])
    assert res.ok and (res.tls_policy, res.tls_version, res.tls_verified) == (
        "opportunistic",
        "",
        False,
    )
    assert not mx1.messages[0].tls
    [report] = reporter.results
    assert (report.policy_type, report.result_type) == ("no-policy-found", rpt.SUCCESS)


async def test_a_message_to_two_domains_records_each_domains_policy(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns)
    test_dns.mx("other.test", (10, "mx1.example.test"))
    publish_sts(test_dns, web, ENFORCE)
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[certs.mx1])
    c = courier(test_dns, fleet, web, certs, tmp_path)
    try:
        results = await c.deliver(SENDER, ["a@example.test", "b@other.test"], MSG)
    finally:
        await c.close()
    assert [(r.result, r.tls_policy) for r in results] == [
        (Result.OK, "mta-sts-enforce"),
        (Result.OK, "opportunistic"),
    ]
    assert len(mx1.messages) == 2 and all(m.tls for m in mx1.messages)


async def test_testing_mode_with_an_mx_the_policy_does_not_list_delivers_and_reports(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns, host="mx2.example.test")
    publish_sts(test_dns, web, TESTING)
    [mx2] = await fleet.start(["127.0.0.2"], starttls=[certs.mx2_on_mx1])
    reporter = CollectingTLSReporter()
    c = courier(test_dns, fleet, web, certs, tmp_path, reporter)
    [res] = await deliver(c, ["b@example.test"])
    assert res.result is Result.OK and res.tls_policy == "mta-sts-testing"
    assert mx2.messages[0].tls
    [report] = reporter.results
    assert report.result_type == rpt.VALIDATION_FAILURE
    assert "does not match the MTA-STS policy" in report.failure_reason


@pytest.mark.parametrize(("name", "ok"), [("mx1.example.test", True), ("mx9.example.test", False)])
async def test_dane_ta_matches_a_ca_of_the_chain_the_server_sends(
    test_dns: TestDNS,
    fleet: Fleet,
    web: PolicyServer,
    certs: Certs,
    tmp_path: Path,
    name: str,
    ok: bool,
) -> None:
    root = trustme.CA()
    child = root.create_child_ca()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    child.issue_cert(name).configure_cert(context)  # sends its own and the child CA's
    child_der = x509.load_pem_x509_certificate(child.cert_pem.bytes())
    spki = child_der.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    one_mx(test_dns)
    test_dns.tlsa("_25._tcp.mx1.example.test", 2, 1, 1, hashlib.sha256(spki).digest())
    test_dns.signed("example.test")
    [mx1] = await fleet.start(["127.0.0.2"], starttls=[context])
    c = courier(test_dns, fleet, web, certs, tmp_path, dnssec=True)
    [res] = await deliver(c, ["b@example.test"])
    assert res.tls_policy == "dane"
    if ok:
        assert res.result is Result.OK and res.tls_verified, res.reply
        assert mx1.messages[0].tls
    else:
        assert res.result is Result.TEMPORARY and "does not name mx1.example.test" in res.reply.text
        assert not mx1.messages


async def test_mode_none_is_no_policy(
    test_dns: TestDNS, fleet: Fleet, web: PolicyServer, certs: Certs, tmp_path: Path
) -> None:
    one_mx(test_dns, host="mx2.example.test")
    publish_sts(test_dns, web, "version: STSv1\nmode: none\nmax_age: 86400\n")
    [mx2] = await fleet.start(["127.0.0.2"])
    reporter = CollectingTLSReporter()
    [res] = await deliver(
        courier(test_dns, fleet, web, certs, tmp_path, reporter), ["b@example.test"]
    )
    assert res.ok and res.tls_policy == "opportunistic"
    assert len(mx2.messages) == 1 and web.requests("example.test") == 1
    assert [(r.policy_type, r.result_type) for r in reporter.results] == [
        ("no-policy-found", rpt.SUCCESS)
    ]
