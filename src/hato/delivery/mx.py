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

* AUTH is never sent to an MX host.
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
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib

from hato.delivery.base import DeliveryResult, Result, all_results
from hato.delivery.session import (
    Session,
    SessionFailure,
    broken_reply,
    ehlo,
    reply_from_response,
    transact,
)
from hato.dns import NO_RELAY, MXHost, NullMX, Resolver, is_private
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


def _satisfies(session: Session, level: MXTLSLevel) -> bool:
    if level == "verify":
        return session.verified
    if level == "encrypt":
        return session.encrypted
    return True


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
        self._monotonic = monotonic
        self._opportunistic = self._build_context(verify=False, ca_file=None)
        self._verifying = self._build_context(verify=True, ca_file=ca_file)
        self._idle: dict[tuple[str, str], list[Session]] = {}
        self._limits: dict[str, _Limit] = {}
        self._closed = False
        self.connections_opened = 0

    @staticmethod
    def _build_context(*, verify: bool, ca_file: str | None) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if ca_file:
                context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"MX TLS CA file {ca_file!r}: {exc}") from exc
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # The Courier protocol.

    async def deliver(
        self, sender: str, recipients: Sequence[str], data: bytes, *, message_id: str = ""
    ) -> list[DeliveryResult]:
        if not recipients:
            return []
        if self._closed:
            return all_results(
                recipients,
                Result.TEMPORARY,
                Reply(451, "4.3.0", "MX courier is shut down"),
                NO_RELAY,
            )
        self._prune()
        by_domain: dict[str, list[int]] = {}
        for i, rcpt in enumerate(recipients):
            by_domain.setdefault(domain_of(rcpt), []).append(i)
        outcomes = await asyncio.gather(
            *(
                self._guarded(domain, sender, [(i, recipients[i]) for i in indexes], data)
                for domain, indexes in by_domain.items()
            )
        )
        results: dict[int, DeliveryResult] = {}
        for outcome in outcomes:
            results.update(outcome)
        return [results[i] for i in range(len(recipients))]

    async def close(self) -> None:
        self._closed = True
        idle = [s for sessions in self._idle.values() for s in sessions]
        self._idle.clear()
        await asyncio.gather(*(s.quit(min(self.timeout, 5.0)) for s in idle))

    # One destination domain.

    async def _guarded(
        self, domain: str, sender: str, items: list[tuple[int, str]], data: bytes
    ) -> dict[int, DeliveryResult]:
        try:
            return await self._deliver_domain(domain, sender, items, data)
        except Exception as exc:  # a bug must defer the mail, never lose it
            reply = Reply(
                451, "4.3.0", f"internal error delivering to {domain}: {type(exc).__name__}: {exc}"
            )
            return {i: DeliveryResult(r, Result.TEMPORARY, reply, NO_RELAY) for i, r in items}

    async def _deliver_domain(
        self, domain: str, sender: str, items: list[tuple[int, str]], data: bytes
    ) -> dict[int, DeliveryResult]:
        def every(result: Result, reply: Reply, relay: str) -> dict[int, DeliveryResult]:
            return {i: DeliveryResult(r, result, reply, relay) for i, r in items}

        literal = _domain_literal(domain)
        if literal is not None:
            hosts: list[MXHost] = [MXHost(literal, 0, implicit=True)]
        elif not domain:
            return every(Result.PERMANENT, Reply(550, "5.1.3", "recipient has no domain"), NO_RELAY)
        else:
            try:
                found = await self.resolver.mx_hosts(domain)
            except DeliveryError as exc:
                result = Result.TEMPORARY if exc.temporary else Result.PERMANENT
                return every(result, exc.reply, NO_RELAY)
            if isinstance(found, NullMX):
                return every(Result.PERMANENT, NullMX(domain).reply, NO_RELAY)
            hosts = found

        level = self.tls_policy.level_for(domain)
        async with self._limit(domain):
            failure: _Next | None = None
            refused: list[str] = []
            without_address: list[str] = []
            for host in hosts:
                if literal is not None:
                    addresses = [literal]
                else:
                    try:
                        addresses = await self.resolver.addresses(host.name)
                    except DeliveryError as exc:
                        if exc.temporary:
                            lookup = _Next(exc.reply, NO_RELAY, answered=False)
                            if lookup.worth_reporting_over(failure):
                                failure = lookup
                        else:
                            without_address.append(host.name)
                        continue
                if not addresses:
                    without_address.append(host.name)
                    continue
                for ip in addresses:
                    if not self.allow_private and is_private(ip):
                        refused.append(f"{host.name}[{ip}]")
                        continue
                    outcome = await self._attempt(host.name, ip, level, sender, items, data)
                    if isinstance(outcome, _Next):
                        if outcome.worth_reporting_over(failure):
                            failure = outcome
                        continue
                    return outcome
        if failure is not None:
            return every(Result.TEMPORARY, failure.reply, failure.relay)
        if refused:
            reply = Reply(
                550,
                "5.4.4",
                f"mail for {domain} would go to a loopback, private or reserved address "
                f"({', '.join(refused)}); refusing to deliver there",
            )
            return every(Result.PERMANENT, reply, NO_RELAY)
        names = ", ".join(without_address) or domain
        reply = Reply(
            550,
            "5.4.4",
            f"Host or domain name not found: no address for the mail exchanger(s) of "
            f"{domain} ({names})",
        )
        return every(Result.PERMANENT, reply, NO_RELAY)

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
    ) -> dict[int, DeliveryResult] | _Next:
        session = self._take_idle(host, ip, level)
        if session is not None and not await session.reset():
            session.close()
            session = None
        if session is None:
            try:
                session = await self._open(host, ip, level)
            except SessionFailure as failure:
                return _Next(
                    failure.reply, failure.relay, answered=not isinstance(failure, _Unreachable)
                )
        recipients = [rcpt for _, rcpt in items]
        results: dict[int, DeliveryResult] = {}
        keep = False
        try:
            mail_reply = await transact(session, sender, recipients, data, results)
            keep = session.alive
            if mail_reply is not None and mail_reply.is_temporary:
                return _Next(mail_reply, session.relay)
        except Exception as exc:  # anything mid-transaction: defer what is undecided
            reply = broken_reply(exc, session)
            if not results and session.stage == "sending MAIL FROM":
                return _Next(reply, session.relay)
            for j, rcpt in enumerate(recipients):
                if j not in results:
                    results[j] = DeliveryResult(rcpt, Result.TEMPORARY, reply, session.relay)
        finally:
            if keep and not self._closed:
                self._put_idle(host, ip, session)
            else:
                session.close()
        undecided = Reply(451, "4.3.0", f"no reply from {session.relay} for this recipient")
        return {
            i: results.get(j) or DeliveryResult(rcpt, Result.TEMPORARY, undecided, session.relay)
            for j, (i, rcpt) in enumerate(items)
        }

    # Connections.

    def _take_idle(self, host: str, ip: str, level: MXTLSLevel) -> Session | None:
        sessions = self._idle.get((host, ip))
        if not sessions:
            return None
        for k in range(len(sessions) - 1, -1, -1):
            if _satisfies(sessions[k], level):
                return sessions.pop(k)
        return None

    def _put_idle(self, host: str, ip: str, session: Session) -> None:
        session.last_used = self._monotonic()
        session.messages += 1
        sessions = self._idle.setdefault((host, ip), [])
        sessions.append(session)
        while len(sessions) > self.concurrency:
            sessions.pop(0).close()

    def _prune(self) -> None:
        now = self._monotonic()
        for key in list(self._idle):
            keep = []
            for session in self._idle[key]:
                if (
                    session.alive
                    and now - session.last_used < self.idle_seconds
                    and now - session.opened_at < self.max_age_seconds
                ):
                    keep.append(session)
                else:
                    session.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def _open(self, host: str, ip: str, level: MXTLSLevel) -> Session:
        """Connect, EHLO and STARTTLS as ``level`` says. For ``may``, a failed TLS
        handshake is followed by one plaintext connection to the same address."""
        try:
            return await self._connect(host, ip, level, plaintext=level == "none")
        except _HandshakeFailed as failed:
            if level != "may":
                raise SessionFailure(failed.reply, failed.relay) from failed
        return await self._connect(host, ip, level, plaintext=True)

    async def _connect(self, host: str, ip: str, level: MXTLSLevel, *, plaintext: bool) -> Session:
        relay = f"{host}[{ip}]:{self.port}"
        smtp = aiosmtplib.SMTP(
            hostname=ip,
            port=self.port,
            local_hostname=self.helo_name,
            timeout=self.timeout,
            use_tls=False,
            start_tls=False,
        )
        self.connections_opened += 1
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            remote = reply_from_response(exc.code, exc.message)
            raise SessionFailure(
                Reply(
                    451,
                    "4.4.0" if remote.is_permanent else (remote.enhanced or "4.4.0"),
                    f"host {relay} refused to talk to me: {remote}",
                ),
                relay,
            ) from exc
        except Exception as exc:
            smtp.close()
            raise _Unreachable(_connect_failure(exc, relay), relay) from exc
        try:
            return await self._handshake(smtp, host, relay, level, plaintext=plaintext)
        except BaseException:
            smtp.close()
            raise

    async def _handshake(
        self, smtp: aiosmtplib.SMTP, host: str, relay: str, level: MXTLSLevel, *, plaintext: bool
    ) -> Session:
        stage = "sending EHLO"
        encrypted = verified = False
        try:
            await ehlo(smtp)
            if not plaintext and smtp.supports_extension("starttls"):
                stage = "sending STARTTLS"
                context = self._verifying if level == "verify" else self._opportunistic
                try:
                    # aiosmtplib drops any plaintext that follows the 220 before the
                    # handshake, so an injected reply cannot steer the encrypted session.
                    await smtp.starttls(server_hostname=host, tls_context=context)
                except aiosmtplib.SMTPResponseException as exc:
                    if not smtp.is_connected:
                        raise
                    remote = reply_from_response(exc.code, exc.message)
                    if level in ("encrypt", "verify"):
                        raise SessionFailure(
                            Reply(
                                454, "4.7.5", f"TLS is required, but host {relay} said: {remote}"
                            ),
                            relay,
                        ) from exc
                    # ``may``: the server declined STARTTLS; go on in plaintext.
                except Exception as exc:
                    raise _HandshakeFailed(
                        Reply(454, "4.7.5", f"TLS with {relay} failed: {_tls_reason(exc)}"), relay
                    ) from exc
                else:
                    stage = "sending EHLO after STARTTLS"
                    await ehlo(smtp)
                    encrypted = True
                    verified = level == "verify"
            if level in ("encrypt", "verify") and not encrypted:
                raise SessionFailure(
                    Reply(454, "4.7.4", f"TLS is required, but was not offered by host {relay}"),
                    relay,
                )
        except (SessionFailure, _HandshakeFailed):
            raise
        except aiosmtplib.SMTPResponseException as exc:
            remote = reply_from_response(exc.code, exc.message)
            raise SessionFailure(
                Reply(451, "4.4.0", f"host {relay} said: {remote} (while {stage})"), relay
            ) from exc
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            raise SessionFailure(
                Reply(451, "4.4.2", f"conversation with {relay} timed out while {stage}"), relay
            ) from exc
        except Exception as exc:
            raise SessionFailure(
                Reply(451, "4.4.2", f"lost connection with {relay} while {stage}"), relay
            ) from exc
        return Session(smtp, relay, encrypted, self._monotonic(), verified=verified)


class _Unreachable(SessionFailure):
    """No SMTP server answered at that address (refused, timed out, no route)."""


class _HandshakeFailed(Exception):
    """The TLS handshake failed after STARTTLS was accepted (``may`` retries in plaintext)."""

    def __init__(self, reply: Reply, relay: str) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay


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


def _tls_reason(exc: BaseException) -> str:
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, ssl.SSLError):
            return str(candidate.reason or candidate)
    return str(exc) or type(exc).__name__


def _connect_failure(exc: BaseException, target: str) -> Reply:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or isinstance(cause, TimeoutError):
        return Reply(451, "4.4.1", f"connect to {target}: Connection timed out")
    if isinstance(cause, OSError) and cause.errno:
        return Reply(451, "4.4.1", f"connect to {target}: {os.strerror(cause.errno)}")
    return Reply(451, "4.4.1", f"connect to {target}: {str(cause) or type(cause).__name__}")
