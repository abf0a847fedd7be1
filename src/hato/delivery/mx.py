"""The MX courier: delivers straight to the recipients' mail exchangers, found in DNS.

One message may name recipients in several domains; each domain is delivered on its own
(concurrently) and every recipient gets its own result. For one domain:

* The MX hosts come from :class:`hato.dns.Resolver` (by preference, random among equals;
  the implicit MX when there is none). A null MX bounces at once (556 5.1.10), a domain
  that does not exist too (5.1.2); a DNS failure defers (4.4.3).
* Each MX host's addresses are tried in turn, IPv4 then IPv6. Connection failures, a 4xx
  or 5xx greeting, EHLO/STARTTLS failures and a 4xx to MAIL move on to the next address
  and MX host (Postfix does the same; a 5xx greeting is one host's trouble, not a verdict
  on the mail). Once MAIL is accepted, the replies to RCPT and DATA are final for this
  attempt: 4xx temporary, 5xx permanent, per recipient.
* Addresses in loopback, private, link-local or otherwise non-public space are refused
  unless ``allow_private`` (``HATO_ALLOW_PRIVATE_MX``, for tests); if nothing else is
  left the mail bounces with 5.4.4 (see :mod:`hato.dns` for why).
* TLS per destination domain (``HATO_MX_TLS``, ``HATO_MX_TLS_POLICY``), as Postfix's
  ``smtp_tls_security_level``:

  ``may`` (default)
      STARTTLS when offered, the certificate not checked (most MX certificates would
      fail, and an unencrypted session is the alternative). When the TLS handshake
      itself fails, the address is tried again in plaintext on a new connection, as
      Postfix does, because refusing would make a broken TLS stack worse than none.
  ``encrypt``
      STARTTLS required, the certificate not checked; otherwise the next MX, then defer.
  ``verify``
      STARTTLS required with a certificate valid for the MX host name (the system's CAs,
      or ``ca_file``); otherwise the next MX, then defer.
  ``none``
      Never STARTTLS (for a peer whose TLS is broken).

* AUTH is never sent to an MX host. How sessions are opened, checked and pooled is
  :mod:`hato.delivery.session`'s; this module chooses the plan for each address.
* At most ``concurrency`` deliveries run at once per destination domain; sessions are
  kept open after a message (per MX host and address, up to ``concurrency`` idle ones) and
  reused, after RSET, for the next message to the same host, when their TLS satisfies
  the next destination's level.
* ``relay=`` in results is ``mx.host[ip]:port``; ``none`` for outcomes decided before any
  connection (DNS), as in Postfix's log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Literal

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.session import (
    FailureKind,
    Plan,
    Pool,
    Session,
    SessionFailure,
    Tls,
    client_context,
    send,
    shut_down,
)
from hato.dns import NO_RELAY, MXHost, NullMX, Resolver, is_private
from hato.dsn_params import DsnRequest
from hato.errors import ConfigError, DeliveryError
from hato.message import domain_of
from hato.reply import Reply

MXTLSLevel = Literal["none", "may", "encrypt", "verify"]
MX_TLS_LEVELS: tuple[MXTLSLevel, ...] = ("none", "may", "encrypt", "verify")
DEFAULT_PORT = 25


@dataclass(frozen=True, slots=True)
class MXTLSPolicy:
    """The TLS level for each destination domain.

    ``domains`` maps a domain to its level; a key starting with a dot (``.example.com``)
    covers every subdomain, as in Postfix's ``smtp_tls_policy_maps``. An exact entry wins
    over a subdomain entry, a longer one over a shorter one.
    """

    default: MXTLSLevel = "may"
    domains: Mapping[str, MXTLSLevel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for level in (self.default, *self.domains.values()):
            if level not in MX_TLS_LEVELS:
                raise ConfigError(f"MX TLS level {level!r}: use one of {', '.join(MX_TLS_LEVELS)}")

    @classmethod
    def parse(cls, default: str, items: Iterable[str] = ()) -> MXTLSPolicy:
        """From ``HATO_MX_TLS`` and ``HATO_MX_TLS_POLICY`` items (``domain=level``)."""
        domains: dict[str, MXTLSLevel] = {}
        for item in items:
            name, sep, level = item.partition("=")
            name, level = name.strip().lower().rstrip("."), level.strip().lower()
            if not sep or not name or name == ".":
                raise ConfigError(f"HATO_MX_TLS_POLICY: {item!r} is not DOMAIN=LEVEL")
            if level not in MX_TLS_LEVELS:
                raise ConfigError(
                    f"HATO_MX_TLS_POLICY: level {level!r} in {item!r}: "
                    f"use one of {', '.join(MX_TLS_LEVELS)}"
                )
            domains[name] = level
        if default not in MX_TLS_LEVELS:
            raise ConfigError(f"HATO_MX_TLS: {default!r}: use one of {', '.join(MX_TLS_LEVELS)}")
        return cls(default, domains)

    def level_for(self, domain: str) -> MXTLSLevel:
        domain = domain.lower().rstrip(".")
        if domain in self.domains:
            return self.domains[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            level = self.domains.get("." + ".".join(labels[i:]))
            if level is not None:
                return level
        return self.default


@dataclass(slots=True)
class _Next:
    """This address did not take the mail: try the next one. ``reply`` says why;
    ``answered`` is False when no SMTP server was reached (DNS, connect)."""

    reply: Reply
    relay: str
    answered: bool = True

    def worth_reporting_over(self, other: _Next | None) -> bool:
        # The last reason is reported, but "connection refused" from a later MX must not
        # hide what an earlier one said (a certificate problem, a 4xx).
        return other is None or self.answered or not other.answered


@dataclass(slots=True)
class _Tried:
    """What one domain's MX hosts came to when none of them took the mail."""

    domain: str
    failure: _Next | None = None
    refused: list[str] = field(default_factory=list)  # ``host[ip]`` in private space
    without_address: list[str] = field(default_factory=list)

    def note(self, outcome: _Next) -> None:
        if outcome.worth_reporting_over(self.failure):
            self.failure = outcome

    def verdict(self) -> tuple[Result, Reply, str]:
        """A failure defers; with none, only refused or missing addresses: bounce."""
        if self.failure is not None:
            return Result.TEMPORARY, self.failure.reply, self.failure.relay
        if self.refused:
            why = (
                f"mail for {self.domain} would go to a loopback, private or reserved address "
                f"({', '.join(self.refused)}); refusing to deliver there"
            )
        else:
            names = ", ".join(self.without_address) or self.domain
            why = (
                f"Host or domain name not found: no address for the mail exchanger(s) of "
                f"{self.domain} ({names})"
            )
        return Result.PERMANENT, Reply(550, "5.4.4", why), NO_RELAY


@dataclass(slots=True)
class _Limit:
    semaphore: asyncio.Semaphore
    users: int = 0


def _domain_literal(domain: str) -> str | None:
    """The address of a domain literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _every(
    items: list[tuple[int, str]], result: Result, reply: Reply, relay: str
) -> dict[int, DeliveryResult]:
    return {i: DeliveryResult(rcpt, result, reply, relay) for i, rcpt in items}


class MXCourier:
    """Delivers each recipient to the MX hosts of its domain."""

    name = "mx"

    def __init__(
        self,
        resolver: Resolver,
        *,
        helo_name: str,
        port: int = DEFAULT_PORT,
        allow_private: bool = False,
        tls_policy: MXTLSPolicy | None = None,
        ca_file: str | None = None,
        concurrency: int = 10,
        timeout: float = 300.0,
        connect_timeout: float = 30.0,
        idle_seconds: float = 30.0,
        max_age_seconds: float = 300.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < port < 65536:
            raise ConfigError(f"outbound port {port} out of range")
        if concurrency < 1:
            raise ConfigError("MX concurrency must be at least 1")
        if timeout <= 0 or connect_timeout <= 0:
            raise ConfigError("MX timeouts must be positive")
        if not helo_name or any(c.isspace() for c in helo_name):
            raise ConfigError(f"bad HELO name {helo_name!r}")
        self.resolver = resolver
        self.helo_name = helo_name
        self.port = port
        self.allow_private = allow_private
        self.tls_policy = tls_policy or MXTLSPolicy()
        self.concurrency = concurrency
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self.max_age_seconds = max_age_seconds
        what = "MX TLS CA file"
        self._opportunistic = client_context(verify=False, ca_file=None, what=what)
        self._verifying = client_context(verify=True, ca_file=ca_file, what=what)
        self._pool = Pool(
            max_idle=concurrency,
            idle_seconds=idle_seconds,
            max_age_seconds=max_age_seconds,
            monotonic=monotonic,
        )
        self._limits: dict[str, _Limit] = {}

    # The Courier protocol.

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: DsnRequest | None = None,
    ) -> list[DeliveryResult]:
        if self._pool.closed or not recipients:
            return shut_down("MX", recipients, NO_RELAY)
        self._pool.prune()
        by_domain: dict[str, list[tuple[int, str]]] = {}
        for i, rcpt in enumerate(recipients):
            by_domain.setdefault(domain_of(rcpt), []).append((i, rcpt))
        outcomes = await asyncio.gather(
            *(
                self._guarded(domain, sender, items, data, dsn)
                for domain, items in by_domain.items()
            )
        )
        results: dict[int, DeliveryResult] = {}
        for outcome in outcomes:
            results.update(outcome)
        return [results[i] for i in range(len(recipients))]

    async def close(self) -> None:
        await self._pool.close(min(self.timeout, 5.0))

    # One destination domain.

    async def _guarded(
        self,
        domain: str,
        sender: str,
        items: list[tuple[int, str]],
        data: bytes,
        dsn: DsnRequest | None = None,
    ) -> dict[int, DeliveryResult]:
        try:
            return await self._deliver_domain(domain, sender, items, data, dsn)
        except Exception as exc:  # a bug must defer the mail, never lose it
            reply = Reply(
                451, "4.3.0", f"internal error delivering to {domain}: {type(exc).__name__}: {exc}"
            )
            return _every(items, Result.TEMPORARY, reply, NO_RELAY)

    async def _deliver_domain(
        self,
        domain: str,
        sender: str,
        items: list[tuple[int, str]],
        data: bytes,
        dsn: DsnRequest | None = None,
    ) -> dict[int, DeliveryResult]:
        hosts = await self._mx_hosts(domain)
        if isinstance(hosts, tuple):
            return _every(items, *hosts)
        level = self.tls_policy.level_for(domain)
        tried = _Tried(domain)
        async with self._limit(domain), aclosing(self._addresses(domain, hosts, tried)) as each:
            async for host, ip in each:
                outcome = await self._attempt(host, ip, level, sender, items, data, dsn)
                if not isinstance(outcome, _Next):
                    return outcome
                tried.note(outcome)
        return _every(items, *tried.verdict())

    async def _mx_hosts(self, domain: str) -> list[MXHost] | tuple[Result, Reply, str]:
        """Where mail for ``domain`` goes, or the verdict when it goes nowhere."""
        literal = _domain_literal(domain)
        if literal is not None:
            return [MXHost(literal, 0, implicit=True)]
        if not domain:
            return Result.PERMANENT, Reply(550, "5.1.3", "recipient has no domain"), NO_RELAY
        try:
            found = await self.resolver.mx_hosts(domain)
        except DeliveryError as exc:
            result = Result.TEMPORARY if exc.temporary else Result.PERMANENT
            return result, exc.reply, NO_RELAY
        if isinstance(found, NullMX):
            return Result.PERMANENT, NullMX(domain).reply, NO_RELAY
        return found

    async def _addresses(
        self, domain: str, hosts: list[MXHost], tried: _Tried
    ) -> AsyncGenerator[tuple[str, str], None]:
        """``(host, ip)`` to try, in order: each MX host's addresses in turn, those in
        private space left out (and noted in ``tried``) unless allowed."""
        literal = _domain_literal(domain)
        for host in hosts:
            addresses = [literal] if literal is not None else await self._lookup(host, tried)
            for ip in addresses:
                if self.allow_private or not is_private(ip):
                    yield host.name, ip
                else:
                    tried.refused.append(f"{host.name}[{ip}]")

    async def _lookup(self, host: MXHost, tried: _Tried) -> list[str]:
        try:
            addresses = await self.resolver.addresses(host.name)
        except DeliveryError as exc:
            if exc.temporary:
                tried.note(_Next(exc.reply, NO_RELAY, answered=False))
            else:
                tried.without_address.append(host.name)
            return []
        if not addresses:
            tried.without_address.append(host.name)
        return addresses

    def _limit(self, domain: str) -> _DomainSlot:
        limit = self._limits.get(domain)
        if limit is None:
            limit = self._limits[domain] = _Limit(asyncio.Semaphore(self.concurrency))
        return _DomainSlot(self._limits, domain, limit)

    # One address.

    async def _attempt(
        self,
        host: str,
        ip: str,
        level: MXTLSLevel,
        sender: str,
        items: list[tuple[int, str]],
        data: bytes,
        dsn: DsnRequest | None = None,
    ) -> dict[int, DeliveryResult] | _Next:
        key = (host, ip)
        try:
            session = await self._session(key, self._plan(host, ip, level))
        except SessionFailure as failure:
            answered = failure.kind is not FailureKind.UNREACHABLE
            return _Next(failure.reply, failure.relay, answered=answered)
        transaction = await send(session, sender, [rcpt for _, rcpt in items], data, dsn=dsn)
        self._pool.release(key, session)
        if transaction.deferred_at_mail is not None:
            return _Next(transaction.deferred_at_mail, session.relay)
        return {i: result for (i, _), result in zip(items, transaction.results, strict=True)}

    async def _session(self, key: tuple[str, str], plan: Plan) -> Session:
        """A session as ``plan`` says; under ``may``, a failed TLS handshake is followed
        by one plaintext connection to the same address."""
        try:
            return await self._pool.session(key, plan)
        except SessionFailure as failure:
            if failure.kind is not FailureKind.HANDSHAKE or plan.tls is not Tls.MAY:
                raise
        return await self._pool.open(plan.in_plaintext())

    def _plan(self, host: str, ip: str, level: MXTLSLevel) -> Plan:
        return Plan(
            host=host,
            address=ip,
            port=self.port,
            helo_name=self.helo_name,
            tls=Tls(level),
            context=self._verifying if level == "verify" else self._opportunistic,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
        )

    @property
    def connections_opened(self) -> int:
        return self._pool.opened


class _DomainSlot:
    """Holds one of a destination's concurrency slots; forgets idle destinations."""

    def __init__(self, limits: dict[str, _Limit], domain: str, limit: _Limit) -> None:
        self._limits = limits
        self._domain = domain
        self._limit = limit

    async def __aenter__(self) -> None:
        self._limit.users += 1
        try:
            await self._limit.semaphore.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._limit.semaphore.release()
        self._release_user()

    def _release_user(self) -> None:
        self._limit.users -= 1
        if self._limit.users == 0 and self._limits.get(self._domain) is self._limit:
            del self._limits[self._domain]
