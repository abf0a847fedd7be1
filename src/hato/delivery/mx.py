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

* Which rule sets the TLS level, in this order (RFC 8461 §2, RFC 7672 §1.3); the rule's
  name is each result's ``tls_policy``:

  ``operator``
      an explicit ``HATO_MX_TLS_POLICY`` entry for the domain (or a global ``HATO_MX_TLS``
      of ``encrypt``/``verify``, once DANE and MTA-STS found nothing): the operator's
      word beats what DNS says.
  ``dane``
      the MX host has DNSSEC-validated TLSA records (:mod:`hato.delivery.dane`, only
      with ``HATO_DNSSEC_RESOLVER``): TLS required, the certificate matched against the
      records, not against the system's CAs. A TLSA lookup that fails defers that host.
  ``mta-sts-enforce``
      the domain's MTA-STS policy (:mod:`hato.delivery.mta_sts`) is in mode
      ``enforce``: only MX hosts its ``mx`` patterns match are used, each with
      ``verify`` (the system's CAs plus ``HATO_MX_TLS_CA_FILE``, the MX name); a host
      that does not match or fails is skipped, and with none left the mail is deferred
      (4.7.5, saying why).
  ``mta-sts-testing``
      mode ``testing``: ``verify`` is tried, and a failure is reported, then the mail
      goes as under ``may``.
  ``opportunistic`` / ``none``
      the default ``HATO_MX_TLS``: ``may`` or (per domain) ``none``.

  Under ``operator`` (above ``may``), ``dane`` and ``mta-sts-enforce`` a failed
  handshake is never followed by plaintext. Every attempt at an MX host is also given,
  as a :class:`~hato.tlsrpt_types.TLSResult`, to the ``tls_reporter`` (TLS-RPT).
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
import contextlib
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Literal

from hato import tlsrpt_types as rpt
from hato.delivery.base import DeliveryResult, Result
from hato.delivery.dane import DANEResolver, TLSALookup, check_chain, peer_chain
from hato.delivery.mta_sts import MTASTS, STSLookup
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
from hato.tlsrpt_types import NullTLSReporter, TLSReporter, TLSResult

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
        explicit = self.explicit(domain)
        return self.default if explicit is None else explicit

    def explicit(self, domain: str) -> MXTLSLevel | None:
        """The level of the domain's own entry (exact or a parent's ``.domain``), else None."""
        domain = domain.lower().rstrip(".")
        if domain in self.domains:
            return self.domains[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            level = self.domains.get("." + ".".join(labels[i:]))
            if level is not None:
                return level
        return None


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
    tls_policy: str = ""  # the rule of the last host tried

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
    items: list[tuple[int, str]], result: Result, reply: Reply, relay: str, tls_policy: str = ""
) -> dict[int, DeliveryResult]:
    return {
        i: DeliveryResult(rcpt, result, reply, relay, tls_policy=tls_policy) for i, rcpt in items
    }


@dataclass(frozen=True, slots=True)
class _Rule:
    """How to treat one MX host of one destination domain (see the module docstring)."""

    name: str  # the tls_policy
    level: MXTLSLevel
    policy_type: rpt.PolicyType = "no-policy-found"
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()
    refuse: Reply | None = None  # do not connect at all
    refuse_type: str = ""  # its TLS-RPT result type
    tlsa: TLSALookup | None = None
    testing: bool = False  # MTA-STS testing: try verify, report, then go on as may
    why: str = ""  # what demands TLS, for the reply of a failure (testing: the MX mismatch)


def _for_requiretls(rule: _Rule) -> _Rule:
    """``rule`` for a REQUIRETLS message (RFC 8689 4.2.1): DANE as it is, anything else
    with a certificate valid for the MX name (``verify``), testing mode included."""
    if rule.refuse is not None or (
        rule.tlsa is not None and any(r.usable for r in rule.tlsa.records)
    ):
        return rule
    return replace(rule, level="verify", testing=False)


def _result_type(failure: SessionFailure) -> str | None:
    """The TLS-RPT result type of a session failure; None when it was not about TLS."""
    error = failure.tls_error.lower()
    if failure.reply.enhanced == "4.7.4":
        return rpt.STARTTLS_NOT_SUPPORTED
    if "hostname mismatch" in error or "does not name" in error:
        return rpt.CERTIFICATE_HOST_MISMATCH
    if "expired" in error or "not valid now" in error:
        return rpt.CERTIFICATE_EXPIRED
    if "self-signed" in error or "self signed" in error or "issuer" in error:
        return rpt.CERTIFICATE_NOT_TRUSTED
    if error or failure.kind is FailureKind.HANDSHAKE or failure.reply.enhanced == "4.7.5":
        return rpt.VALIDATION_FAILURE
    return None


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
        mta_sts: MTASTS | None = None,
        dane: DANEResolver | None = None,
        tls_reporter: TLSReporter | None = None,
        concurrency: int = 10,
        timeout: float = 300.0,
        connect_timeout: float = 30.0,
        idle_seconds: float = 30.0,
        max_age_seconds: float = 300.0,
        pipelining: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
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
        self.pipelining = pipelining
        self.mta_sts = mta_sts
        self.dane = dane
        self.tls_reporter: TLSReporter = tls_reporter or NullTLSReporter()
        self._clock = clock
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
        require_tls: bool = False,
    ) -> list[DeliveryResult]:
        if self._pool.closed or not recipients:
            return shut_down("MX", recipients, NO_RELAY)
        self._pool.prune()
        by_domain: dict[str, list[tuple[int, str]]] = {}
        for i, rcpt in enumerate(recipients):
            by_domain.setdefault(domain_of(rcpt), []).append((i, rcpt))
        outcomes = await asyncio.gather(
            *(
                self._guarded(domain, sender, items, data, dsn, require_tls)
                for domain, items in by_domain.items()
            )
        )
        results: dict[int, DeliveryResult] = {}
        for outcome in outcomes:
            results.update(outcome)
        return [results[i] for i in range(len(recipients))]

    async def close(self) -> None:
        if self.mta_sts is not None:
            await self.mta_sts.close()
        await self._pool.close(min(self.timeout, 5.0))

    # One destination domain.

    async def _guarded(
        self,
        domain: str,
        sender: str,
        items: list[tuple[int, str]],
        data: bytes,
        dsn: DsnRequest | None = None,
        require_tls: bool = False,
    ) -> dict[int, DeliveryResult]:
        try:
            return await self._deliver_domain(domain, sender, items, data, dsn, require_tls)
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
        require_tls: bool = False,
    ) -> dict[int, DeliveryResult]:
        hosts = await self._mx_hosts(domain)
        if isinstance(hosts, tuple):
            return _every(items, *hosts)
        rules = _Rules(self, domain)
        tried = _Tried(domain)
        async with self._limit(domain), aclosing(self._addresses(domain, hosts, tried)) as each:
            async for host, ip in each:
                rule = await rules.for_host(host)
                if require_tls:
                    rule = _for_requiretls(rule)
                tried.tls_policy = rule.name
                outcome = await self._attempt(
                    domain, rule, host, ip, sender, items, data, dsn, require_tls
                )
                if not isinstance(outcome, _Next):
                    return outcome
                tried.note(outcome)
        return _every(items, *tried.verdict(), tls_policy=tried.tls_policy)

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
        domain: str,
        rule: _Rule,
        host: str,
        ip: str,
        sender: str,
        items: list[tuple[int, str]],
        data: bytes,
        dsn: DsnRequest | None = None,
        require_tls: bool = False,
    ) -> dict[int, DeliveryResult] | _Next:
        relay = f"{host}[{ip}]:{self.port}"
        if rule.refuse is not None:
            self._report(domain, rule, host, ip, rule.refuse_type, rule.refuse.text)
            return _Next(rule.refuse, relay)
        key: tuple[str, ...] = (host, ip, "dane") if rule.tlsa is not None else (host, ip)
        try:
            session = await self._open_for(domain, rule, key, host, ip)
        except SessionFailure as failure:
            reply = failure.reply
            result_type = _result_type(failure)
            if result_type is not None:
                self._report(domain, rule, host, ip, result_type, reply.text)
                if rule.why:
                    reply = Reply(reply.code, reply.enhanced, f"{reply.text}; {rule.why}")
            answered = failure.kind is not FailureKind.UNREACHABLE
            return _Next(reply, failure.relay, answered=answered)
        rcpts = [rcpt for _, rcpt in items]
        transaction = await send(session, sender, rcpts, data, dsn=dsn, require_tls=require_tls)
        if transaction.deferred_at_mail is not None and session.unchecked and not session.alive:
            # A pooled connection reused without RSET was gone after all, before anything
            # was accepted: once more on another.
            try:
                session = await self._open_for(domain, rule, key, host, ip)
            except SessionFailure as failure:
                unreachable = failure.kind is FailureKind.UNREACHABLE
                return _Next(failure.reply, failure.relay, answered=not unreachable)
            transaction = await send(session, sender, rcpts, data, dsn=dsn, require_tls=require_tls)
        self._pool.release(key, session)
        if transaction.deferred_at_mail is not None:
            return _Next(transaction.deferred_at_mail, session.relay)
        return {
            i: replace(result, tls_policy=rule.name)
            for (i, _), result in zip(items, transaction.results, strict=True)
        }

    async def _open_for(
        self, domain: str, rule: _Rule, key: tuple[str, ...], host: str, ip: str
    ) -> Session:
        """A session as ``rule`` says, reported to TLS-RPT when it is set up."""
        if rule.testing and rule.why:  # an MX the policy does not list: report, deliver
            self._report(domain, rule, host, ip, rpt.VALIDATION_FAILURE, rule.why)
            return await self._session(key, self._plan(host, ip, "may"))
        if rule.testing:
            try:
                session = await self._pool.session(key, self._plan(host, ip, "verify"))
            except SessionFailure as failure:
                result_type = _result_type(failure)
                if result_type is None:
                    raise
                self._report(domain, rule, host, ip, result_type, failure.reply.text)
                session = await self._session(key, self._plan(host, ip, "may"))
                return session  # delivered regardless, as testing mode asks
        else:
            session = await self._session(key, self._plan(host, ip, rule.level, rule, host))
        sockname = session.smtp.get_transport_info("sockname")
        sending_ip = str(sockname[0]) if isinstance(sockname, tuple) and sockname else ""
        self._report(domain, rule, host, ip, rpt.SUCCESS, "", sending_ip=sending_ip)
        return session

    def _report(
        self,
        domain: str,
        rule: _Rule,
        host: str,
        ip: str,
        result_type: str,
        reason: str,
        *,
        sending_ip: str = "",
    ) -> None:
        with contextlib.suppress(Exception):  # reporting must never cost a delivery
            self.tls_reporter.record(
                TLSResult(
                    policy_domain=domain,
                    policy_type=rule.policy_type,
                    mx_host=host,
                    result_type=result_type,
                    time=self._clock(),
                    policy_strings=rule.policy_strings,
                    mx_host_patterns=rule.mx_patterns,
                    sending_ip=sending_ip,
                    receiving_ip=ip,
                    failure_reason=reason,
                    tls_policy=rule.name,
                )
            )

    async def _session(self, key: tuple[str, ...], plan: Plan) -> Session:
        """A session as ``plan`` says; under ``may``, a failed TLS handshake is followed
        by one plaintext connection to the same address."""
        try:
            return await self._pool.session(key, plan)
        except SessionFailure as failure:
            if failure.kind is not FailureKind.HANDSHAKE or plan.tls is not Tls.MAY:
                raise
        return await self._pool.open(plan.in_plaintext())

    def _plan(
        self, host: str, ip: str, level: MXTLSLevel, rule: _Rule | None = None, name: str = ""
    ) -> Plan:
        tlsa = rule.tlsa if rule is not None else None
        check: Callable[[ssl.SSLObject], str | None] | None = None
        if tlsa is not None and any(r.usable for r in tlsa.records):
            records = tlsa.records

            def check(ssl_object: ssl.SSLObject) -> str | None:
                now = datetime.datetime.now(datetime.UTC)
                why = check_chain(records, peer_chain(ssl_object), name, now)
                return None if why is None else f"DANE: {why}"

        return Plan(
            host=host,
            address=ip,
            port=self.port,
            helo_name=self.helo_name,
            tls=Tls(level),
            context=self._verifying if level == "verify" else self._opportunistic,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            peer_check=check,
            pipelining=self.pipelining,
        )

    @property
    def connections_opened(self) -> int:
        return self._pool.opened


class _Rules:
    """The TLS rule of each MX host of one destination domain, for one delivery: the
    domain's MTA-STS policy is looked up once, the TLSA records once per host."""

    def __init__(self, courier: MXCourier, domain: str) -> None:
        self._courier = courier
        self._domain = domain
        self._sts: STSLookup | None = None
        self._hosts: dict[str, _Rule] = {}

    async def for_host(self, host: str) -> _Rule:
        rule = self._hosts.get(host)
        if rule is None:
            rule = self._hosts[host] = await self._decide(host)
        return rule

    async def _decide(self, host: str) -> _Rule:
        courier, domain = self._courier, self._domain
        explicit = courier.tls_policy.explicit(domain)
        if explicit is not None:
            return _Rule("operator", explicit)
        if courier.dane is not None and not _domain_literal(domain):
            try:
                tlsa = await courier.dane.tlsa(host)
            except DeliveryError as exc:
                return _Rule(
                    "dane",
                    "encrypt",
                    "tlsa",
                    refuse=Reply(451, "4.7.5", f"{exc.reply.text}; not delivering to {host}"),
                    refuse_type=rpt.DNSSEC_INVALID,
                )
            if tlsa.applies:
                return _Rule(
                    "dane",
                    "encrypt",
                    "tlsa",
                    tuple(str(r) for r in tlsa.records),
                    tlsa=tlsa,
                    why=f"TLS required by the DNSSEC-signed TLSA records of {host} (DANE)",
                )
        sts = await self._sts_lookup()
        policy = sts.policy
        if policy is not None and policy.mode != "none":
            strings, patterns = policy.lines, policy.mx
            if policy.mode == "testing":
                mismatch = (
                    ""
                    if policy.matches(host)
                    else (
                        f"MX host {host} does not match the MTA-STS policy of {domain} "
                        f"(mode testing; mx: {', '.join(policy.mx)})"
                    )
                )
                return _Rule(
                    "mta-sts-testing", "may", "sts", strings, patterns, testing=True, why=mismatch
                )
            if not policy.matches(host):
                why = (
                    f"MX host {host} does not match the MTA-STS policy of {domain} "
                    f"(mode enforce; mx: {', '.join(policy.mx)}); not delivering there"
                )
                return _Rule(
                    "mta-sts-enforce",
                    "verify",
                    "sts",
                    strings,
                    patterns,
                    refuse=Reply(451, "4.7.5", why),
                    refuse_type=rpt.VALIDATION_FAILURE,
                )
            return _Rule(
                "mta-sts-enforce",
                "verify",
                "sts",
                strings,
                patterns,
                why=f"verified TLS required by the MTA-STS policy of {domain} (mode enforce)",
            )
        # No policy (or one announced that could not be had: reported by _sts_lookup).
        return self._default()

    def _default(self) -> _Rule:
        level = self._courier.tls_policy.default
        return _Rule({"may": "opportunistic", "none": "none"}.get(level, "operator"), level)

    async def _sts_lookup(self) -> STSLookup:
        if self._sts is None:
            mta_sts = self._courier.mta_sts
            if mta_sts is None or _domain_literal(self._domain):
                self._sts = STSLookup(None)
            else:
                try:
                    self._sts = await mta_sts.policy_for(self._domain)
                except Exception as exc:  # a bug in policy handling must not stop the mail
                    why = f"MTA-STS lookup failed: {type(exc).__name__}: {exc}"
                    self._sts = STSLookup(None, rpt.STS_POLICY_FETCH_ERROR, why)
                if self._sts.error:
                    self._courier._report(
                        self._domain,
                        replace(self._default(), policy_type="sts"),
                        "",
                        "",
                        self._sts.error,
                        self._sts.reason,
                    )
        return self._sts


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
