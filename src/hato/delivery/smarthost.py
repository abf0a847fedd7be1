"""The smarthost courier: relays every message to one upstream SMTP host (aiosmtplib).

This is the ``RELAYHOST`` of Postfix and the ``boky/postfix`` image: one host and port,
STARTTLS or implicit TLS, SASL AUTH PLAIN/LOGIN, and connections kept open and reused
across messages. The rules it holds to:

* AUTH is never sent on an unencrypted session: credentials without TLS defer the mail.
* ``encrypt`` means STARTTLS or nothing: a server that does not offer it defers the mail,
  and no MAIL or AUTH is sent in clear.
* Certificates are verified by default (``verify=False`` for a self-signed upstream,
  ``ca_file`` for a private CA); ``may`` verifies too when ``verify`` is on.
* Anything sent after the server's ``220`` to STARTTLS is discarded (aiosmtplib drops the
  plaintext buffer before the handshake), so it cannot steer the encrypted session.
* Outcomes are per recipient: 4xx temporary, 5xx permanent; connection failures,
  timeouts, TLS and AUTH failures and anything unexpected are temporary.
* The body goes out with CRLF line endings and dot-stuffing (aiosmtplib's ``data``), so
  no end-of-data sequence other than the final ``CRLF.CRLF`` can leave this module.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib

from hato.config import DEFAULT_SMTP_PORT as DEFAULT_PORT
from hato.delivery.base import DeliveryResult, Result, all_results
from hato.delivery.session import (
    Session,
    SessionFailure,
    broken_reply,
    ehlo,
    is_ip,
    reply_from_response,
    transact,
)
from hato.errors import ConfigError
from hato.reply import Reply

TlsMode = Literal["none", "may", "encrypt", "implicit"]
TLS_MODES: tuple[TlsMode, ...] = ("none", "may", "encrypt", "implicit")


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

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError(f"relay TLS mode {self.tls!r}: use one of {', '.join(TLS_MODES)}")
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
        self._monotonic = monotonic
        self._context = tls_context if tls_context is not None else self._build_context()
        self._idle: list[Session] = []
        self._slots = asyncio.Semaphore(config.pool_size)
        self._closed = False
        self.connections_opened = 0

    def _build_context(self) -> ssl.SSLContext:
        cfg = self.config
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if cfg.ca_file:
                context.load_verify_locations(cafile=cfg.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"relay TLS CA file {cfg.ca_file!r}: {exc}") from exc
        if not cfg.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    @property
    def _unresolved_relay(self) -> str:
        host = self.config.host
        return f"{host}[{host if is_ip(host) else 'unknown'}]:{self.config.port}"

    async def deliver(
        self, sender: str, recipients: Sequence[str], data: bytes, *, message_id: str = ""
    ) -> list[DeliveryResult]:
        if not recipients:
            return []
        if self._closed:
            return all_results(
                recipients,
                Result.TEMPORARY,
                Reply(451, "4.3.0", "smarthost courier is shut down"),
                self._unresolved_relay,
            )
        async with self._slots:
            session = self._take_idle()
            if session is not None and not await session.reset():
                # The upstream dropped the idle connection: replace it, once.
                session.close()
                session = None
            if session is None:
                try:
                    session = await self._open()
                except SessionFailure as failure:
                    return all_results(
                        recipients,
                        Result.TEMPORARY,
                        failure.reply,
                        failure.relay or self._unresolved_relay,
                    )
                except Exception as exc:  # refused, timed out, TLS, or unknown: all temporary
                    return all_results(
                        recipients,
                        Result.TEMPORARY,
                        self._connect_failure(exc),
                        self._unresolved_relay,
                    )
            results: dict[int, DeliveryResult] = {}
            keep = False
            try:
                await transact(session, sender, recipients, data, results)
                keep = session.alive
            except Exception as exc:  # any failure mid-transaction: defer what is undecided
                reply = broken_reply(exc, session)
                for i, rcpt in enumerate(recipients):
                    if i not in results:
                        results[i] = DeliveryResult(rcpt, Result.TEMPORARY, reply, session.relay)
            finally:
                if keep and not self._closed:
                    session.last_used = self._monotonic()
                    session.messages += 1
                    self._idle.append(session)
                else:
                    session.close()
            undecided = Reply(451, "4.3.0", f"no reply from {session.relay} for this recipient")
            return [
                results.get(i) or DeliveryResult(rcpt, Result.TEMPORARY, undecided, session.relay)
                for i, rcpt in enumerate(recipients)
            ]

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(s.quit(min(self.config.timeout, 5.0)) for s in idle))

    # Connections.

    def _take_idle(self) -> Session | None:
        now = self._monotonic()
        while self._idle:
            session = self._idle.pop()
            if (
                session.alive
                and now - session.last_used < self.config.idle_seconds
                and now - session.opened_at < self.config.max_age_seconds
            ):
                return session
            session.close()
        return None

    async def _open(self) -> Session:
        cfg = self.config
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            local_hostname=cfg.helo_name,
            timeout=cfg.timeout,
            use_tls=cfg.tls == "implicit",
            start_tls=False,
            tls_context=self._context,
        )
        self.connections_opened += 1
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            remote = reply_from_response(exc.code, exc.message)
            raise SessionFailure(
                Reply(
                    451,
                    "4.4.0" if remote.is_permanent else (remote.enhanced or "4.4.0"),
                    f"host {self._unresolved_relay} refused to talk to me: {remote}",
                )
            ) from exc
        try:
            return await self._handshake(smtp)
        except BaseException:
            smtp.close()
            raise

    async def _handshake(self, smtp: aiosmtplib.SMTP) -> Session:
        """EHLO, STARTTLS and AUTH on a fresh connection, by the rules of the module."""
        cfg = self.config
        peer = smtp.get_transport_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        relay = f"{cfg.host}[{ip}]:{cfg.port}"
        stage = "sending EHLO"
        try:
            await ehlo(smtp)
            encrypted = cfg.tls == "implicit"
            if cfg.tls in ("may", "encrypt"):
                if smtp.supports_extension("starttls"):
                    stage = "sending STARTTLS"
                    try:
                        # aiosmtplib drops any plaintext that follows the 220 before
                        # the handshake, so an injected reply cannot steer us.
                        await smtp.starttls(server_hostname=cfg.host)
                    except aiosmtplib.SMTPResponseException as exc:
                        if not smtp.is_connected:
                            raise
                        if cfg.tls == "encrypt":
                            remote = reply_from_response(exc.code, exc.message)
                            raise SessionFailure(
                                Reply(
                                    454,
                                    "4.7.5",
                                    f"TLS is required, but host {relay} said: {remote}",
                                )
                            ) from exc
                    else:
                        stage = "sending EHLO after STARTTLS"
                        await ehlo(smtp)
                        encrypted = True
                elif cfg.tls == "encrypt":
                    raise SessionFailure(
                        Reply(454, "4.7.4", f"TLS is required, but was not offered by host {relay}")
                    )
            if cfg.has_credentials:
                if not encrypted:
                    raise SessionFailure(
                        Reply(
                            454,
                            "4.7.0",
                            f"not sending AUTH to {relay} over an unencrypted session "
                            f"(relay TLS mode is {cfg.tls!r}); mail deferred",
                        )
                    )
                stage = "sending AUTH"
                await self._auth(smtp, relay)
        except SessionFailure as failure:
            failure.relay = relay
            raise
        except ssl.SSLError as exc:
            raise SessionFailure(
                Reply(454, "4.7.5", f"TLS with {relay} failed: {exc.reason or exc}"),
                relay,
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            remote = reply_from_response(exc.code, exc.message)
            raise SessionFailure(
                Reply(451, "4.4.0", f"host {relay} said: {remote} (while {stage})"),
                relay,
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise SessionFailure(
                Reply(451, "4.4.2", f"conversation with {relay} timed out while {stage}"),
                relay,
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SessionFailure(
                Reply(451, "4.4.2", f"lost connection with {relay} while {stage}"),
                relay,
            ) from exc
        return Session(smtp, relay, encrypted, self._monotonic())

    async def _auth(self, smtp: aiosmtplib.SMTP, relay: str) -> None:
        cfg = self.config
        assert cfg.username is not None and cfg.password is not None
        offered = {m.upper() for m in smtp.server_auth_methods}
        try:
            if "PLAIN" in offered:
                await smtp.auth_plain(cfg.username, cfg.password)
            elif "LOGIN" in offered:
                await smtp.auth_login(cfg.username, cfg.password)
            else:
                what = ", ".join(sorted(offered)) or "no AUTH at all"
                raise SessionFailure(
                    Reply(
                        454,
                        "4.7.0",
                        f"relay credentials are set, but host {relay} offers {what} "
                        "(need PLAIN or LOGIN)",
                    )
                )
        except aiosmtplib.SMTPAuthenticationError as exc:
            # A wrong password is an operator's mistake: defer, keep the mail, and keep
            # the upstream's words for the log. The password itself is never logged.
            remote = reply_from_response(exc.code, exc.message)
            enhanced = "4" + remote.enhanced[1:] if remote.enhanced else "4.7.0"
            raise SessionFailure(
                Reply(454, enhanced, f"SASL authentication failed; server {relay} said: {remote}")
            ) from exc

    def _connect_failure(self, exc: BaseException) -> Reply:
        target = f"connect to {self._unresolved_relay}"
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if isinstance(cause, ssl.SSLError):
            return Reply(
                454, "4.7.5", f"TLS with {self._unresolved_relay} failed: {cause.reason or cause}"
            )
        if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or isinstance(cause, TimeoutError):
            return Reply(451, "4.4.1", f"{target}: Connection timed out")
        if isinstance(cause, OSError) and cause.errno:
            return Reply(451, "4.4.1", f"{target}: {os.strerror(cause.errno)}")
        return Reply(451, "4.4.1", f"{target}: {str(cause) or type(cause).__name__}")
