"""DANE for SMTP (RFC 7672): TLSA records of an MX host, trusted only when DNSSEC-validated.

The TLSA records of ``_25._tcp.<mx host>`` are asked of the resolver the operator names
as validating (``HATO_DNSSEC_RESOLVER``, e.g. a local unbound) with the DO bit set, and
believed only when that resolver's answer carries the AD bit. Records without AD are
ignored (the MX gets whatever policy would apply without DANE); a lookup that fails
(SERVFAIL is how a validating resolver reports bogus data) defers that MX host. Without
``HATO_DNSSEC_RESOLVER`` there is no DANE at all: Hato never takes the AD bit from an
ordinary recursive resolver, which might set it without validating.

Validated, usable records make TLS mandatory (no plaintext fallback) and authenticate
the server by :func:`check_chain`:

* DANE-EE (3): the server's own certificate (selector 0) or public key (selector 1)
  matches, in full (0) or by SHA-256 (1) or SHA-512 (2). No name check and no
  validity dates (RFC 7672 §3.1.1).
* DANE-TA (2): a certificate of the chain the server sent matches; the chain from the
  server's certificate up to it is checked signature by signature, the server's
  certificate must be valid now and name the MX host (§3.1.2).
* PKIX-TA (0) and PKIX-EE (1) are unusable for SMTP (§3.1.3) and, like records with an
  unknown selector or matching type, are left out. When validated records exist but
  none is usable, TLS is still required but not authenticated (§2.2).

The matching functions are pure and tested by tables.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hato.dns import NO_RELAY, parse_server
from hato.errors import ConfigError, TemporaryDeliveryError
from hato.reply import Reply

_ENCODING_DER = 2  # _ssl.ENCODING_DER, which typeshed does not know
DANE_TA = 2
DANE_EE = 3
PKIX_TA = 0
PKIX_EE = 1


@dataclass(frozen=True, slots=True)
class TLSARecord:
    """One TLSA record: usage, selector, matching type and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Usable for SMTP: DANE-TA or DANE-EE, a known selector and matching type."""
        return (
            self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and self.mtype in (0, 1, 2)
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def tlsa_name(host: str, port: int = 25) -> str:
    """The TLSA base name of an MX host: ``_25._tcp.<host>``."""
    return f"_{port}._tcp.{host.lower().rstrip('.')}"


def _selected(selector: int, cert: x509.Certificate, der: bytes) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(record: TLSARecord, der: bytes) -> bool:
    """Whether the certificate ``der`` (DER) matches ``record``'s selector, matching type
    and data (usage aside)."""
    if not record.usable:
        return False
    try:
        cert = x509.load_der_x509_certificate(der)
        return _digest(record.mtype, _selected(record.selector, cert, der)) == record.data
    except ValueError:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [
            str(a.value).lower().rstrip(".")
            for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]


def name_matches(names: Sequence[str], host: str) -> bool:
    """Whether one of a certificate's DNS names covers ``host`` (``*.d`` covers one label)."""
    host = host.lower().rstrip(".")
    for name in names:
        if name == host:
            return True
        if name.startswith("*."):
            first, sep, rest = host.partition(".")
            if first and sep and rest == name[2:]:
                return True
    return False


def check_chain(
    records: Sequence[TLSARecord],
    chain: Sequence[bytes],
    host: str,
    now: datetime.datetime,
) -> str | None:
    """None when the chain the server sent (DER, its own certificate first) is
    authenticated by one of ``records`` for the MX ``host``; otherwise why not."""
    if not chain:
        return "the server sent no certificate"
    usable = [r for r in records if r.usable]
    if not usable:
        return "no usable TLSA record"
    if any(r.usage == DANE_EE and matches(r, chain[0]) for r in usable):
        return None
    anchors = [r for r in usable if r.usage == DANE_TA]
    if anchors:
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
        except ValueError:
            return "the server's certificate chain cannot be parsed"
        leaf = certs[0]
        for k, der in enumerate(chain):
            if not any(matches(r, der) for r in anchors):
                continue
            if not all(_issued_by(certs[i], certs[i + 1]) for i in range(k)):
                continue
            if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                return "the server's certificate is not valid now (DANE-TA)"
            if not name_matches(_names(leaf), host):
                return f"the server's certificate does not name {host} (DANE-TA)"
            return None
    return "the server's certificate matches none of the TLSA records"


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the peer sent, its own first (DER). Python before 3.13 has no
    public API for the chain; the private one is used where it exists, else the peer's
    own certificate alone (DANE-EE needs no more)."""
    sslobj = getattr(ssl_object, "_sslobj", None)
    get_chain = getattr(sslobj, "get_unverified_chain", None)
    if get_chain is not None:
        try:
            chain = get_chain() or []
            return [bytes(c.public_bytes(_ENCODING_DER)) for c in chain]
        except (ssl.SSLError, ValueError, AttributeError):
            pass
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


@dataclass(frozen=True, slots=True)
class TLSALookup:
    """The TLSA records of one MX host and whether the validating resolver vouched
    for them (AD)."""

    records: tuple[TLSARecord, ...]
    secure: bool

    @property
    def applies(self) -> bool:
        """DANE applies: validated records exist."""
        return self.secure and bool(self.records)


class DANEResolver:
    """TLSA lookups through the validating resolver ``server`` (``host[:port]``)."""

    def __init__(self, server: str, *, timeout: float = 5.0, lifetime: float = 15.0) -> None:
        try:
            ip, port = parse_server(server)
        except ConfigError as exc:
            raise ConfigError(f"HATO_DNSSEC_RESOLVER: {server!r} is not IP[:PORT]") from exc
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port)]
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        resolver.use_search_by_default = False
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver = resolver
        self.server = f"{ip}:{port}"

    async def tlsa(self, host: str, port: int = 25) -> TLSALookup:
        """The TLSA records of ``host``; raises TemporaryDeliveryError when the lookup
        fails (a validating resolver answers SERVFAIL for bogus data)."""
        name = tlsa_name(host, port)
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(name + "."), "TLSA", raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return TLSALookup((), False)
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            raise TemporaryDeliveryError(
                Reply(
                    451,
                    "4.7.5",
                    f"TLSA lookup for {name} at the validating resolver {self.server} "
                    f"failed: {type(exc).__name__}",
                ),
                relay=NO_RELAY,
            ) from exc
        secure = bool(answer.response.flags & dns.flags.AD)
        records = tuple(
            TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
            for r in (answer.rrset or [])
        )
        return TLSALookup(records, secure)
