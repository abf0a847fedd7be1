"""The smarthost courier: relays every message to one upstream SMTP host (aiosmtplib).

This is the ``RELAYHOST`` of Postfix and the ``boky/postfix`` image: one host and port,
STARTTLS or implicit TLS, SASL AUTH PLAIN/LOGIN, and connections kept open and reused
across messages (at most ``pool_size`` at once). The session rules are those of
:mod:`hato.delivery.session`; for the upstream they mean:

* AUTH is never sent on an unencrypted session: credentials without TLS defer the mail.
* ``encrypt`` means STARTTLS or nothing: a server that does not offer it defers the mail,
  and no MAIL or AUTH is sent in clear.
* Certificates are verified by default (``verify=False`` for a self-signed upstream,
  ``ca_file`` for a private CA); ``may`` verifies too when ``verify`` is on, and a failed
  handshake defers the mail rather than falling back to plaintext.
* Outcomes are per recipient: 4xx temporary, 5xx permanent; connection failures,
  timeouts, TLS and AUTH failures and anything unexpected are temporary.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hato.config import DEFAULT_SMTP_PORT as DEFAULT_PORT
from hato.delivery.base import DeliveryResult, Result, all_results
from hato.delivery.session import (
    Credentials,
    Plan,
    Pool,
    SessionFailure,
    Tls,
    client_context,
    reply_from_response,
    send,
    shut_down,
)
from hato.dsn_params import DsnRequest
from hato.errors import ConfigError
from hato.stages import StageTrace

__all__ = [
    "DEFAULT_PORT",
    "TLS_MODES",
    "SmarthostConfig",
    "SmarthostCourier",
    "TlsMode",
    "reply_from_response",
]

TlsMode = Literal["none", "may", "encrypt", "implicit"]
TLS_MODES: tuple[TlsMode, ...] = ("none", "may", "encrypt", "implicit")
RequireTlsMode = Literal["verify", "trusted"]
REQUIRETLS_MODES: tuple[RequireTlsMode, ...] = ("verify", "trusted")


@dataclass(frozen=True, slots=True)
class SmarthostConfig:
    """How to reach and talk to the upstream relay.

    ``tls``: ``none`` (never encrypt), ``may`` (STARTTLS if offered), ``encrypt``
    (STARTTLS required) or ``implicit`` (TLS from the first byte, port 465).
    ``idle_seconds`` closes pooled connections unused for that long (servers drop idle
    clients after a few minutes); ``max_age_seconds`` bounds a connection's whole life,
    like Postfix's ``smtp_connection_reuse_time_limit``.
    """

    host: str
    port: int = DEFAULT_PORT
    tls: TlsMode = "may"
    verify: bool = True
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    helo_name: str = "localhost"
    timeout: float = 60.0
    pool_size: int = 2
    idle_seconds: float = 30.0
    max_age_seconds: float = 300.0
    # REQUIRETLS mail (RFC 8689): "verify" sends it only over verified TLS to a relay
    # that offers REQUIRETLS; "trusted" passes the parameter on to Hato's own relay server
    # on a trusted network, in plaintext too, which enforces it from there.
    requiretls: RequireTlsMode = "verify"
    # MAIL, RCPT and DATA as one group where the relay offers PIPELINING (RFC 2920).
    pipelining: bool = True

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError(f"relay TLS mode {self.tls!r}: use one of {', '.join(TLS_MODES)}")
        if self.requiretls not in REQUIRETLS_MODES:
            raise ConfigError(
                f"relay REQUIRETLS mode {self.requiretls!r}: use one of "
                + ", ".join(REQUIRETLS_MODES)
            )
        if not self.host:
            raise ConfigError("relay host is empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"relay port {self.port} out of range")
        if self.pool_size < 1:
            raise ConfigError("relay pool size must be at least 1")
        if self.timeout <= 0:
            raise ConfigError("relay timeout must be positive")
        if (self.username is None) != (self.password is None):
            raise ConfigError("relay username and password must be set together")
        if any(c in (self.username or "") + (self.password or "") for c in "\r\n\0"):
            raise ConfigError("relay credentials contain CR, LF or NUL")

    @property
    def has_credentials(self) -> bool:
        return self.username is not None


class SmarthostCourier:
    """Delivers every message to the one configured upstream relay."""

    name = "smarthost"

    def __init__(
        self,
        config: SmarthostConfig,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        context = tls_context if tls_context is not None else _context(config)
        credentials = (
            Credentials(config.username, config.password)
            if config.username is not None and config.password is not None
            else None
        )
        self._plan = Plan(
            host=config.host,
            port=config.port,
            helo_name=config.helo_name,
            tls=Tls(config.tls),
            context=context,
            auth=credentials,
            timeout=config.timeout,
            pipelining=config.pipelining,
        )
        self._pool = Pool(
            max_idle=config.pool_size,
            idle_seconds=config.idle_seconds,
            max_age_seconds=config.max_age_seconds,
            monotonic=monotonic,
        )
        self._slots = asyncio.Semaphore(config.pool_size)
        # HATO_TRACE_STAGES (hato.stages): set by the composition root, else None.
        self.stages: StageTrace | None = None

    @property
    def connections_opened(self) -> int:
        return self._pool.opened

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
            return shut_down("smarthost", recipients, self._plan.relay)
        async with self._slots:
            try:
                session = await self._pool.session((), self._plan)
            except SessionFailure as failure:
                return all_results(recipients, Result.TEMPORARY, failure.reply, failure.relay)
            if self.stages is not None and message_id:
                self.stages.mark(message_id, "connected")
            transaction = await send(
                session,
                sender,
                recipients,
                data,
                dsn=dsn,
                require_tls=require_tls,
                trusted_hop=self.config.requiretls == "trusted",
            )
            if transaction.deferred_at_mail is not None and session.unchecked and not session.alive:
                # A pooled connection reused without RSET was gone after all, before
                # anything was accepted: once more on a new one.
                try:
                    session = await self._pool.open(self._plan)
                except SessionFailure as failure:
                    return all_results(recipients, Result.TEMPORARY, failure.reply, failure.relay)
                transaction = await send(
                    session,
                    sender,
                    recipients,
                    data,
                    dsn=dsn,
                    require_tls=require_tls,
                    trusted_hop=self.config.requiretls == "trusted",
                )
            self._pool.release((), session)
            return transaction.results

    async def close(self) -> None:
        await self._pool.close(min(self.config.timeout, 5.0))


def _context(config: SmarthostConfig) -> ssl.SSLContext:
    return client_context(verify=config.verify, ca_file=config.ca_file, what="relay TLS CA file")
