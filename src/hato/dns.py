"""The DNS seam: MX, address, TXT and PTR lookups on dnspython's async resolver.

A :class:`Resolver` asks the servers of ``HATO_DNS_SERVERS`` (``IP[:PORT]`` each) or,
when none are given, the system's (``/etc/resolv.conf``). Names are always absolute: no
search domains are appended. Its answers are in delivery terms:

* :meth:`Resolver.mx_hosts` — the MX hosts of a domain by preference, in random order
  among equal preferences (RFC 5321 5.1); the domain itself as an implicit MX when it
  has no MX record but has an A or AAAA record; :class:`NullMX` for RFC 7505's single
  ``0 .`` record (the courier bounces at once with 556 5.1.10).
* Failures are :mod:`hato.errors` values carrying the reply a bounce or the log shows:
  NXDOMAIN (the domain does not exist) is a :class:`~hato.errors.PermanentDeliveryError`
  with 5.1.2; SERVFAIL, timeouts and unreachable servers are
  :class:`~hato.errors.TemporaryDeliveryError` with 4.4.3. No dnspython exception leaves
  this module.

:func:`is_private` tells addresses that are not on the public internet (loopback,
private, link-local, unspecified, multicast, reserved and other special-purpose space).
The MX courier refuses to connect there unless ``HATO_ALLOW_PRIVATE_MX`` is set: a public
relay must not be steered by someone else's DNS into its own host or network. When every
address of every MX host of a domain is refused that way the mail is bounced, as Postfix
bounces "mail for X loops back to myself": the DNS of the recipient's domain is wrong,
and retrying for days would only delay the sender's notice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

from hato.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from hato.reply import Reply

DNS_PORT = 53
NO_RELAY = "none"  # the relay= of a result decided before any connection (as Postfix logs)


@dataclass(frozen=True, slots=True)
class MXHost:
    """One mail exchanger: its name (lower case, no trailing dot) and preference.

    ``implicit`` marks the domain itself standing in for a missing MX record.
    """

    name: str
    preference: int
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class NullMX:
    """The domain publishes RFC 7505's null MX: it accepts no mail at all."""

    domain: str

    @property
    def reply(self) -> Reply:
        return Reply(
            556,
            "5.1.10",
            f"Recipient address rejected: Domain {self.domain} does not accept mail (nullMX)",
        )


def parse_server(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address → (ip, port).

    Raises :class:`~hato.errors.ConfigError`: a resolver is named by address, never by
    a name that would itself need resolving.
    """
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1 :] and not value[end + 1 :].startswith(":")):
            raise ConfigError(f"HATO_DNS_SERVERS: {text!r} is not IP[:PORT]")
        host, port_text = value[1:end], value[end + 2 :]
        if value[end + 1 :] == ":":
            raise ConfigError(f"HATO_DNS_SERVERS: {text!r} has an empty port")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        if not port_text:
            raise ConfigError(f"HATO_DNS_SERVERS: {text!r} has an empty port")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"HATO_DNS_SERVERS: {text!r} is not an IP address") from None
    port = DNS_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"HATO_DNS_SERVERS: bad port in {text!r}")
        port = int(port_text)
    return ip, port


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[MXHost] | NullMX:
    """MX records (preference, target) → hosts by preference, shuffled among equals.

    A lone ``0 .`` is a null MX. A ``.`` next to real exchangers is a misconfiguration
    RFC 7505 forbids; the real ones are used and the ``.`` ignored. Duplicate targets keep
    their best preference.
    """
    best: dict[str, int] = {}
    saw_root = False
    for preference, target in records:
        name = target.strip().lower().rstrip(".")
        if not name:
            saw_root = True
            continue
        if name not in best or preference < best[name]:
            best[name] = preference
    if not best:
        return NullMX("") if saw_root else []
    groups: dict[int, list[str]] = {}
    for name, preference in best.items():
        groups.setdefault(preference, []).append(name)
    hosts: list[MXHost] = []
    for preference in sorted(groups):
        names = sorted(groups[preference])
        rng.shuffle(names)
        hosts.extend(MXHost(name, preference) for name in names)
    return hosts


def is_private(ip: str) -> bool:
    """Whether ``ip`` is outside the public internet (mail must not be sent there)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return True  # not an address at all: never a public destination
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None and is_private(str(mapped)):
            return True
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or not address.is_global
    )


@dataclass(frozen=True, slots=True)
class _Answer:
    exists: bool  # False: NXDOMAIN
    records: list[Any]


class Resolver:
    """DNS lookups for delivery and for ``hato dns check``.

    ``servers``: ``IP[:PORT]`` strings; empty means the system's resolvers. ``timeout``
    bounds each query to one server, ``lifetime`` a whole lookup. ``rng`` orders MX hosts
    of equal preference (tests pass a seeded one).
    """

    def __init__(
        self,
        servers: Sequence[str] = (),
        *,
        timeout: float = 5.0,
        lifetime: float = 15.0,
        rng: random.Random | None = None,
        cache: bool = True,
    ) -> None:
        self._rng = rng or random.Random()
        parsed = [parse_server(s) for s in servers if s.strip()]
        try:
            if parsed:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(ip, port) for ip, port in parsed
                ]
            else:
                resolver = dns.asyncresolver.Resolver(configure=True)
        except (dns.exception.DNSException, OSError) as exc:
            raise ConfigError(f"no DNS resolver configured (set HATO_DNS_SERVERS): {exc}") from exc
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        resolver.use_search_by_default = False
        if cache:
            resolver.cache = dns.resolver.LRUCache(4096)
        self._resolver = resolver

    @property
    def servers(self) -> list[str]:
        """The resolvers asked, as ``IP:PORT`` (for messages)."""
        out = []
        for server in self._resolver.nameservers:
            if isinstance(server, dns.nameserver.AddressAndPortNameserver):
                host = f"[{server.address}]" if ":" in server.address else server.address
                out.append(f"{host}:{server.port}")
            else:
                out.append(str(server))
        return out

    async def _lookup(self, name: str, rdtype: str) -> _Answer:
        """One query; NXDOMAIN and NODATA are answers, everything else that fails raises."""
        what = f"name={name} type={rdtype}"
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".")
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return _Answer(False, [])
        except dns.exception.Timeout as exc:
            raise TemporaryDeliveryError(
                Reply(451, "4.4.3", f"DNS lookup timed out: {what}"), relay=NO_RELAY
            ) from exc
        except dns.resolver.NoNameservers as exc:
            raise TemporaryDeliveryError(
                Reply(
                    451,
                    "4.4.3",
                    f"Host or domain name not found. Name service error for {what}: "
                    "Host not found, try again",
                ),
                relay=NO_RELAY,
            ) from exc
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel) as exc:
            raise PermanentDeliveryError(
                Reply(550, "5.1.2", f"bad domain name {name!r}: {exc}"), relay=NO_RELAY
            ) from exc
        except (dns.exception.DNSException, OSError, UnicodeError, ValueError) as exc:
            raise TemporaryDeliveryError(
                Reply(451, "4.4.3", f"DNS lookup failed: {what}: {type(exc).__name__}: {exc}"),
                relay=NO_RELAY,
            ) from exc
        return _Answer(True, list(answer.rrset) if answer.rrset is not None else [])

    async def mx_hosts(self, domain: str) -> list[MXHost] | NullMX:
        """Where mail for ``domain`` goes: MX hosts by preference, the implicit MX, or
        :class:`NullMX`. Raises Permanent- (NXDOMAIN, no MX and no address) or
        TemporaryDeliveryError (DNS failure)."""
        domain = domain.strip().lower().rstrip(".")
        answer = await self._lookup(domain, "MX")
        if not answer.exists:
            raise PermanentDeliveryError(_not_found(domain, "MX"), relay=NO_RELAY)
        records = [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in answer.records
        ]
        ordered = order_mx(records, self._rng)
        if isinstance(ordered, NullMX):
            return NullMX(domain)
        if ordered:
            return ordered
        # RFC 5321 5.1: no MX at all, so the domain's own address is the implicit MX.
        if await self.addresses(domain):
            return [MXHost(domain, 0, implicit=True)]
        raise PermanentDeliveryError(
            Reply(
                550,
                "5.1.2",
                f"Host or domain name not found. Name service error for name={domain} "
                "type=A: Host found but no data record of requested type",
            ),
            relay=NO_RELAY,
        )

    async def mx_records(self, domain: str) -> list[tuple[int, str]]:
        """The MX records as published (no implicit MX); empty when there are none."""
        answer = await self._lookup(domain, "MX")
        return sorted(
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())
            for r in answer.records
        )

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; empty when it has none. Raises
        TemporaryDeliveryError only when no address was found and a lookup failed."""
        results = await asyncio.gather(
            self._lookup(host, "A"), self._lookup(host, "AAAA"), return_exceptions=True
        )
        found: list[str] = []
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, _Answer):
                found.extend(r.address for r in result.records)
            else:
                failure = result
        if not found and failure is not None:
            raise failure
        return found

    async def exists(self, name: str) -> bool:
        """Whether ``name`` exists at all (any record type)."""
        answer = await self._lookup(name, "A")
        return answer.exists

    async def txt(self, name: str) -> list[str]:
        """Each TXT record of ``name`` as one string (its character-strings joined)."""
        answer = await self._lookup(name, "TXT")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.records]

    async def ptr(self, ip: str) -> list[str]:
        """The PTR names of an address (lower case, no trailing dot)."""
        try:
            name = dns.reversename.from_address(ip).to_text()
        except (dns.exception.DNSException, ValueError) as exc:
            raise ConfigError(f"{ip!r} is not an IP address") from exc
        answer = await self._lookup(name, "PTR")
        return [r.target.to_text(omit_final_dot=True).lower() for r in answer.records]

    async def tlsa_records(self, name: str) -> list[str]:
        """The TLSA records of ``name`` in presentation form: ``3 1 1 <hex>`` (lower case)."""
        answer = await self._lookup(name, "TLSA")
        return [
            f"{int(r.usage)} {int(r.selector)} {int(r.mtype)} {r.cert.hex()}"
            for r in answer.records
        ]


def _not_found(name: str, rdtype: str) -> Reply:
    return Reply(
        550,
        "5.1.2",
        f"Host or domain name not found. Name service error for name={name} "
        f"type={rdtype}: Host not found",
    )
