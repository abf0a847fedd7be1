"""Outbound SMTP sessions (aiosmtplib) and their idle pool, shared by the smarthost and MX couriers.

A courier says how to reach a destination in a :class:`Plan` (host and port, which TLS,
the SSL context, AUTH or not) and gets back a connected :class:`Session` ready for MAIL,
or a :class:`SessionFailure` carrying a temporary reply. The TLS rules hold for both
couriers because they exist only here:

* ``none`` never sends STARTTLS; ``may`` sends it when offered and goes on in plaintext
  when the server declines it (a 4xx/5xx to STARTTLS); ``encrypt`` and ``verify``
  require it (not offered: 454 4.7.4; declined: 454 4.7.5), and ``verify`` marks the
  session as checked against the host name, so a pooled session is only reused for a
  destination whose level it meets; ``implicit`` is TLS from the first byte (port 465).
* Whether a certificate is checked is the SSL context's business (:func:`client_context`):
  the smarthost checks by default, MX levels other than ``verify`` do not (as Postfix).
* Anything sent after the server's ``220`` to STARTTLS is discarded (aiosmtplib drops the
  plaintext buffer before the handshake), so it cannot steer the encrypted session; EHLO
  is sent again after the handshake (RFC 3207 4.2).
* AUTH (PLAIN, else LOGIN) is never sent on an unencrypted session: credentials without
  TLS defer the mail. A refused password defers too (an operator's mistake: keep the mail);
  the password is never logged.

A failure says what kind it was, for the MX courier's fallback rules: ``unreachable`` (no
SMTP server answered: refused, timed out, no route), ``handshake`` (the TLS handshake
itself failed; ``may`` towards an MX retries in plaintext) or ``answered`` (a server
answered and then would not go on: a 4xx/5xx greeting, a refused EHLO, TLS required but
missing, AUTH). ``relay`` is ``host[ip]:port`` as in Postfix's log (``[unknown]`` before a
smarthost's name is resolved by the connection).

The :class:`Pool` keeps idle sessions by destination, closes those idle or open for too
long, and hands one out again only when its TLS meets the level asked for: at once when
its last transaction ended cleanly (the server's final reply to the body was 250, so it
holds no transaction state: RFC 5321 4.1.1.4) and the connection is still open, else
after RSET. Such a session is marked ``unchecked``: a courier whose first MAIL on it
finds the connection gone (nothing was accepted) tries once more on a new one. :func:`send` runs a mail transaction (MAIL, one RCPT per recipient, DATA; more on
the same connection when the server's recipient limit leaves some over) and records a
per-recipient result as each reply comes, so a connection lost half-way keeps what was
already decided. A server without 8BITMIME gets 8-bit mail converted to 7 bit,
or none of it (5.6.3, see :mod:`hato.mime7bit`). The body goes out with CRLF line
endings and dot-stuffing (aiosmtplib's ``data``), so no end-of-data sequence other than
the final ``CRLF.CRLF`` can leave Hato. A server that offers CHUNKING gets it with BDAT
instead (RFC 3030; :data:`CHUNKING` turns that off): CRLF line endings, no stuffing, one
``BDAT n LAST`` for a message up to :data:`BDAT_CHUNK_SIZE`, several chunks above.

A server that offers PIPELINING (RFC 2920; :attr:`Plan.pipelining`, ``HATO_RELAY_PIPELINING``)
gets MAIL, every RCPT and DATA in one write, their replies read in order, then the body:
two round trips instead of four (with CHUNKING: MAIL and the RCPTs as a group, then BDAT).
The replies are read by our own :class:`Pipe`, installed only once EHLO, STARTTLS, the
EHLO after it and AUTH are done; a reply to no command closes the connection (see
:class:`Pipe`). Outcomes are those of the lock-step exchange, which every other server
gets.

REQUIRETLS (RFC 8689): a message that requires it goes only on a session whose
certificate was verified, to a server that offers REQUIRETLS, and the parameter is passed
on; otherwise every recipient fails with ``5.7.30`` (not offered) or ``5.7.10`` (no
verified TLS), permanently. A ``trusted_hop`` (Hato's own relay server on a trusted
network, ``HATO_SMTP_REQUIRETLS=trusted``) gets the parameter without those checks and
enforces it from there on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from hato.delivery.base import DeliveryResult, Result, all_results
from hato.dsn_params import DsnRequest
from hato.errors import ConfigError
from hato.mime7bit import NotConvertible, to_7bit
from hato.reply import Reply

_MAX_REPLY_TEXT = 2000
_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:[ \t]+|$)")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Characters that would break the MAIL/RCPT command line; intake never queues them, but
# a courier is a boundary and refuses them on its own.
_BAD_PATH_RE = re.compile(r"[\x00-\x20\x7f<>]")
_QUOTED_LOCAL_RE = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')
_SENDING_MAIL = "sending MAIL FROM"
# A 452 to RCPT with one of these enhanced codes is the server's recipient limit; with
# another (4.2.2 mailbox full, 4.3.1 no space) it is about that recipient alone.
_TOO_MANY_RECIPIENTS = ("4.5.3", "")
CHUNKING = True
"""Send with BDAT where the next hop offers CHUNKING (False: always DATA)."""
BDAT_CHUNK_SIZE = 1 << 20
"""The largest BDAT chunk: most messages go in one ``BDAT n LAST``."""
_LINE_ENDINGS_RE = re.compile(rb"\r\n|\n|\r(?!\n)")


def reply_from_response(code: int, message: str) -> Reply:
    """A remote reply as a :class:`Reply`: the enhanced code split off, control
    characters dropped, the text bounded (it goes into logs and bounces)."""
    lines = [_CONTROL_RE.sub("", line).strip() for line in message.split("\n")]
    enhanced = ""
    m = _ENHANCED_RE.match(lines[0]) if lines else None
    if m is not None and m.group(1) == str(code)[:1]:
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        lines = [
            line[len(enhanced) :].strip() if line.startswith(enhanced) else line for line in lines
        ]
    text = "\n".join(lines)[:_MAX_REPLY_TEXT]
    return Reply(code, enhanced, text)


def classify(reply: Reply) -> Result:
    """4xx temporary, 5xx permanent; anything else where a success was due is temporary."""
    if reply.is_permanent:
        return Result.PERMANENT
    return Result.TEMPORARY


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bad_path(address: str) -> bool:
    """Whether ``address`` cannot be put between ``<`` and ``>`` on a command line."""
    return bool(_BAD_PATH_RE.search(_QUOTED_LOCAL_RE.sub("", address, count=1))) or any(
        c in address for c in "\r\n\0"
    )


def header_section(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[:end]
    return data


# What to ask for.


class Tls(StrEnum):
    """What to do about TLS on a new session (see the module docstring)."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"
    IMPLICIT = "implicit"


_STARTTLS = (Tls.MAY, Tls.ENCRYPT, Tls.VERIFY)
_REQUIRED = (Tls.ENCRYPT, Tls.VERIFY)


def client_context(*, verify: bool, ca_file: str | None, what: str) -> ssl.SSLContext:
    """A client context: the system's CAs (and ``ca_file``), or no checks at all.

    ``what`` names the CA file setting in the :class:`~hato.errors.ConfigError` raised
    when the file cannot be read.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what} {ca_file!r}: {exc}") from exc
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Plan:
    """How to open a session to one destination.

    ``host`` is the name in ``relay=`` and the one the certificate is checked against;
    the connection goes to ``address`` when given (an MX host's IP), else to ``host``.
    ``verify`` needs a context that checks the certificate and its name.
    ``connect_timeout`` bounds the TCP connect and greeting (default ``timeout``, which
    bounds every later reply). ``peer_check``, when given, authenticates the server
    after the TLS handshake in a way the context does not (DANE's TLSA match): it gets
    the TLS object and returns None (the session then counts as verified) or why the
    server is refused (454 4.7.5, no plaintext retry). ``pipelining``: send MAIL, RCPT
    and DATA as one group when the server offers PIPELINING (``HATO_RELAY_PIPELINING``).
    """

    host: str
    port: int
    helo_name: str
    tls: Tls
    context: ssl.SSLContext
    address: str | None = None
    auth: Credentials | None = None
    timeout: float = 60.0
    connect_timeout: float | None = None
    peer_check: Callable[[ssl.SSLObject], str | None] | None = None
    pipelining: bool = True

    def __post_init__(self) -> None:
        if self.tls is Tls.IMPLICIT and self.address is not None:
            raise ValueError("implicit TLS connects to the host by name, not to an address")
        if self.tls is Tls.VERIFY and not _checks_name(self.context):
            raise ValueError("TLS level verify needs a context that checks the host name")

    @property
    def relay(self) -> str:
        """``host[ip]:port`` before connecting: the IP only when it is known already."""
        host = self.host
        ip = self.address or (host if is_ip(host) else "unknown")
        return f"{host}[{ip}]:{self.port}"

    def in_plaintext(self) -> Plan:
        return replace(self, tls=Tls.NONE)


# What comes back.


class FailureKind(StrEnum):
    """Why a session could not be set up, as far as the MX fallback rules care."""

    UNREACHABLE = "unreachable"
    HANDSHAKE = "handshake"
    ANSWERED = "answered"


class SessionFailure(Exception):
    """A session could not be set up; ``reply`` says why (always temporary).

    ``tls_error`` is the certificate problem when the TLS handshake or the peer check
    refused the server (OpenSSL's verify message, or ``peer_check``'s reason), for
    TLS reporting; empty otherwise.
    """

    def __init__(
        self,
        reply: Reply,
        relay: str,
        kind: FailureKind = FailureKind.ANSWERED,
        *,
        tls_error: str = "",
    ) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay
        self.kind = kind
        self.tls_error = tls_error


class Session:
    """One open SMTP connection, ready for MAIL.

    ``verified`` says the peer's certificate was checked against its name, so a pooled
    session can be matched with a destination that requires it.
    """

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        relay: str,
        encrypted: bool,
        now: float,
        *,
        verified: bool = False,
        host: str = "",
        ip: str = "",
    ) -> None:
        self.smtp = smtp
        self.relay = relay
        self.encrypted = encrypted
        self.verified = verified
        self.host = host
        self.ip = ip
        self.tls_version = _tls_version(smtp) if encrypted else ""
        self.opened_at = now
        self.last_used = now
        self.stage = _SENDING_MAIL
        self.messages = 0
        # The last transaction ended with 250 after the body: no RSET needed before the next.
        self.clean = False
        # Handed out again without RSET (see the module docstring).
        self.unchecked = False
        # Our reply reader, between the transport and aiosmtplib, when MAIL, RCPT and
        # DATA go pipelined on this session (:func:`open_session` installs it).
        self.pipe: Pipe | None = None

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def stamp(self, result: DeliveryResult) -> DeliveryResult:
        """``result`` with this session's hop for the attempt record."""
        return replace(
            result,
            relay_host=self.host,
            relay_ip=self.ip,
            tls_version=self.tls_version,
            tls_verified=self.verified,
        )

    def satisfies(self, tls: Tls) -> bool:
        """Whether this session may carry mail that asks for ``tls``."""
        if tls is Tls.VERIFY:
            return self.verified
        if tls in (Tls.ENCRYPT, Tls.IMPLICIT):
            return self.encrypted
        return True

    def close(self) -> None:
        self.smtp.close()

    async def quit(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.smtp.quit(), timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError):
            pass
        finally:
            self.smtp.close()

    async def reset(self) -> bool:
        """RSET before reuse; False when the peer dropped the idle connection."""
        try:
            response = await self.smtp.execute_command(b"RSET")
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return response.code == 250 and self.alive


def _tls_version(smtp: aiosmtplib.SMTP) -> str:
    """The negotiated TLS version (``TLSv1.3``) of a connected session, ``""`` if unknown."""
    if not smtp.is_connected:
        return ""
    ssl_object = smtp.get_transport_info("ssl_object")
    version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
    return version or ""


# Opening a session.


async def open_session(plan: Plan, *, monotonic: Callable[[], float] = time.monotonic) -> Session:
    """Connect, EHLO, STARTTLS and AUTH as ``plan`` says; raises :class:`SessionFailure`."""
    relay = plan.relay
    smtp = aiosmtplib.SMTP(
        hostname=plan.address or plan.host,
        port=plan.port,
        local_hostname=plan.helo_name,
        timeout=plan.timeout,
        use_tls=plan.tls is Tls.IMPLICIT,
        start_tls=False,
        tls_context=plan.context,
    )
    try:
        await smtp.connect(timeout=plan.connect_timeout or plan.timeout)
    except aiosmtplib.SMTPConnectResponseError as exc:
        smtp.close()
        remote = reply_from_response(exc.code, exc.message)
        enhanced = "4.4.0" if remote.is_permanent else (remote.enhanced or "4.4.0")
        raise SessionFailure(
            Reply(451, enhanced, f"host {relay} refused to talk to me: {remote}"), relay
        ) from exc
    except Exception as exc:
        smtp.close()
        raise _connect_failure(exc, relay) from exc
    ip = plan.address or ""
    if plan.address is None:
        peer = smtp.get_transport_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        relay = f"{plan.host}[{ip}]:{plan.port}"
    try:
        encrypted = await _handshake(smtp, plan, relay)
    except BaseException:
        smtp.close()
        raise
    verified = encrypted and (_checks_name(plan.context) or plan.peer_check is not None)
    session = Session(smtp, relay, encrypted, monotonic(), verified=verified, host=plan.host, ip=ip)
    if plan.pipelining and smtp.supports_extension("pipelining"):
        # Only now, after STARTTLS, the EHLO that follows it and AUTH: nothing is ever
        # pipelined before or across STARTTLS.
        session.pipe = Pipe.install(smtp)
    return session


def _checks_name(context: ssl.SSLContext) -> bool:
    return context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


async def _handshake(smtp: aiosmtplib.SMTP, plan: Plan, relay: str) -> bool:
    """EHLO, STARTTLS and AUTH on a fresh connection; whether the session is encrypted."""
    stage = "sending EHLO"
    encrypted = plan.tls is Tls.IMPLICIT
    try:
        await ehlo(smtp)
        if plan.tls in _STARTTLS and smtp.supports_extension("starttls"):
            stage = "sending STARTTLS"
            encrypted = await _starttls(smtp, plan, relay)
            if encrypted and plan.peer_check is not None:
                _check_peer(smtp, plan.peer_check, relay)
            if encrypted:
                stage = "sending EHLO after STARTTLS"
                await ehlo(smtp)
        if plan.tls in _REQUIRED and not encrypted:
            reply = Reply(454, "4.7.4", f"TLS is required, but was not offered by host {relay}")
            raise SessionFailure(reply, relay)
        if plan.auth is not None:
            stage = "sending AUTH"
            await _auth(smtp, plan, relay, encrypted=encrypted)
    except SessionFailure:
        raise
    except ssl.SSLError as exc:
        reply = Reply(454, "4.7.5", f"TLS with {relay} failed: {exc.reason or exc}")
        raise SessionFailure(reply, relay) from exc
    except aiosmtplib.SMTPResponseException as exc:
        remote = reply_from_response(exc.code, exc.message)
        reply = Reply(451, "4.4.0", f"host {relay} said: {remote} (while {stage})")
        raise SessionFailure(reply, relay) from exc
    except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
        reply = Reply(451, "4.4.2", f"conversation with {relay} timed out while {stage}")
        raise SessionFailure(reply, relay) from exc
    except Exception as exc:
        reply = Reply(451, "4.4.2", f"lost connection with {relay} while {stage}")
        raise SessionFailure(reply, relay) from exc
    return encrypted


def _check_peer(
    smtp: aiosmtplib.SMTP, check: Callable[[ssl.SSLObject], str | None], relay: str
) -> None:
    ssl_object = smtp.get_transport_info("ssl_object")
    why = check(ssl_object) if isinstance(ssl_object, ssl.SSLObject) else "no TLS session"
    if why is not None:
        reply = Reply(454, "4.7.5", f"TLS with {relay} refused: {why}")
        raise SessionFailure(reply, relay, tls_error=why)


async def ehlo(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO when the server refuses EHLO (but not when it is closing)."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not smtp.is_connected or exc.code == 421:
            raise
        await smtp.helo()


async def _starttls(smtp: aiosmtplib.SMTP, plan: Plan, relay: str) -> bool:
    """STARTTLS; False when the server declined it and ``plan`` allows plaintext."""
    try:
        # aiosmtplib drops any plaintext that follows the 220 before the handshake, so an
        # injected reply cannot steer the encrypted session.
        await smtp.starttls(server_hostname=plan.host, tls_context=plan.context)
    except aiosmtplib.SMTPResponseException as exc:
        if not smtp.is_connected:
            raise
        if plan.tls not in _REQUIRED:
            return False
        remote = reply_from_response(exc.code, exc.message)
        reply = Reply(454, "4.7.5", f"TLS is required, but host {relay} said: {remote}")
        raise SessionFailure(reply, relay) from exc
    except Exception as exc:
        reason, detail = _tls_reason(exc), _verify_message(exc)
        if detail and detail not in reason:
            reason = f"{reason} ({detail})"
        reply = Reply(454, "4.7.5", f"TLS with {relay} failed: {reason}")
        raise SessionFailure(reply, relay, FailureKind.HANDSHAKE, tls_error=detail) from exc
    return True


async def _auth(smtp: aiosmtplib.SMTP, plan: Plan, relay: str, *, encrypted: bool) -> None:
    assert plan.auth is not None
    if not encrypted:
        reply = Reply(
            454,
            "4.7.0",
            f"not sending AUTH to {relay} over an unencrypted session "
            f"(relay TLS mode is {plan.tls.value!r}); mail deferred",
        )
        raise SessionFailure(reply, relay)
    username, password = plan.auth.username, plan.auth.password
    offered = {m.upper() for m in smtp.server_auth_methods}
    try:
        if "PLAIN" in offered:
            await smtp.auth_plain(username, password)
        elif "LOGIN" in offered:
            await smtp.auth_login(username, password)
        else:
            what = ", ".join(sorted(offered)) or "no AUTH at all"
            reply = Reply(
                454,
                "4.7.0",
                f"relay credentials are set, but host {relay} offers {what} (need PLAIN or LOGIN)",
            )
            raise SessionFailure(reply, relay)
    except aiosmtplib.SMTPAuthenticationError as exc:
        remote = reply_from_response(exc.code, exc.message)
        enhanced = "4" + remote.enhanced[1:] if remote.enhanced else "4.7.0"
        reply = Reply(454, enhanced, f"SASL authentication failed; server {relay} said: {remote}")
        raise SessionFailure(reply, relay) from exc


def _tls_reason(exc: BaseException) -> str:
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, ssl.SSLError):
            return str(candidate.reason or candidate)
    return str(exc) or type(exc).__name__


def _verify_message(exc: BaseException) -> str:
    """OpenSSL's words for a refused certificate (``Hostname mismatch, ...``), else ``""``."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, ssl.SSLCertVerificationError):
            return str(candidate.verify_message or candidate.reason or "certificate verify failed")
    return ""


def _connect_failure(exc: BaseException, relay: str) -> SessionFailure:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLError):  # implicit TLS
        reply = Reply(454, "4.7.5", f"TLS with {relay} failed: {cause.reason or cause}")
        return SessionFailure(reply, relay, FailureKind.HANDSHAKE)
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or isinstance(cause, TimeoutError):
        why = "Connection timed out"
    elif isinstance(cause, OSError) and cause.errno:
        why = os.strerror(cause.errno)
    else:
        why = str(cause) or type(cause).__name__
    return SessionFailure(
        Reply(451, "4.4.1", f"connect to {relay}: {why}"), relay, FailureKind.UNREACHABLE
    )


# Keeping sessions.


class Pool:
    """Idle sessions by destination key, reused as they are after a clean transaction,
    else after RSET.

    At most ``max_idle`` idle sessions per key (the oldest is closed first); a session
    unused for ``idle_seconds`` or open for ``max_age_seconds`` is closed rather than
    reused (servers drop idle clients after a few minutes; the age bound is Postfix's
    ``smtp_connection_reuse_time_limit``). ``opened`` counts connection attempts.
    """

    def __init__(
        self,
        *,
        max_idle: int,
        idle_seconds: float,
        max_age_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self.max_age_seconds = max_age_seconds
        self._monotonic = monotonic
        self._idle: dict[Hashable, list[Session]] = {}
        self.closed = False
        self.opened = 0

    async def session(self, key: Hashable, plan: Plan) -> Session:
        """An idle session for ``key`` that meets ``plan.tls`` and is still open after a
        clean transaction (``unchecked``) or answers RSET, else a new one (one try: a
        dropped idle connection is replaced, not retried)."""
        session = self._take(key, plan.tls)
        if session is not None:
            if session.clean and session.alive:
                session.unchecked = True
                return session
            if await session.reset():
                session.unchecked = False
                return session
            session.close()
        return await self.open(plan)

    async def open(self, plan: Plan) -> Session:
        self.opened += 1
        return await open_session(plan, monotonic=self._monotonic)

    def release(self, key: Hashable, session: Session) -> None:
        """Keep ``session`` for the next message to ``key``, or close it when it is
        broken or the pool is closed."""
        if self.closed or not session.alive:
            session.close()
            return
        session.last_used = self._monotonic()
        session.messages += 1
        sessions = self._idle.setdefault(key, [])
        sessions.append(session)
        while len(sessions) > self.max_idle:
            sessions.pop(0).close()

    def prune(self) -> None:
        """Close every idle session that is too old to reuse."""
        for key in list(self._idle):
            self._fresh(key)

    async def close(self, timeout: float) -> None:
        """QUIT every idle session; sessions released later are closed."""
        self.closed = True
        idle = [s for sessions in self._idle.values() for s in sessions]
        self._idle.clear()
        await asyncio.gather(*(s.quit(timeout) for s in idle))

    def _take(self, key: Hashable, tls: Tls) -> Session | None:
        sessions = self._fresh(key)
        for k in range(len(sessions) - 1, -1, -1):
            if sessions[k].satisfies(tls):
                return sessions.pop(k)
        return None

    def _fresh(self, key: Hashable) -> list[Session]:
        """The sessions of ``key`` still fit for reuse; the others are closed."""
        now = self._monotonic()
        keep: list[Session] = []
        for session in self._idle.get(key, []):
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
            self._idle.pop(key, None)
        return keep


def shut_down(courier: str, recipients: Sequence[str], relay: str) -> list[DeliveryResult]:
    """Every recipient deferred: the courier is closed (the worker is stopping)."""
    reply = Reply(451, "4.3.0", f"{courier} courier is shut down")
    return all_results(recipients, Result.TEMPORARY, reply, relay)


# Pipelining (RFC 2920): our own reply reader.
#
# Hand-written because aiosmtplib (5.x) cannot read a pipelined group: its protocol keeps
# one reply waiter, drops bytes that arrive while no reply is awaited, and does not parse
# a second reply already in its buffer. So a session whose server offers PIPELINING gets
# a :class:`Pipe` between the transport and aiosmtplib's protocol once the handshake is
# over: outside a group it hands every byte to aiosmtplib (RSET, BDAT, QUIT work as
# before); inside a group it parses the replies itself with :class:`ReplyParser`.

MAX_REPLY_LINE = 8192
"""The longest reply line accepted (aiosmtplib's ``MAX_LINE_LENGTH``)."""
MAX_REPLY_BYTES = MAX_REPLY_LINE * 4
"""The longest reply accepted, continuation lines included (aiosmtplib's bound)."""
MAX_REPLY_LINES = 100
"""The most lines one reply may have (a reply to MAIL, RCPT or DATA has one or two)."""
_REPLY_LINE_RE = re.compile(rb"(\d{3})([ -]|\r?\n$)")
_COMMAND_INJECTION_RE = re.compile(rb"[\x00-\x1f\x7f]")
_PERIOD_RE = re.compile(rb"(?m)^\.")


class ProtocolViolation(Exception):
    """The server broke the reply stream: a malformed or over-long reply, a reply to no
    command, or more replies than commands. The connection is closed; undecided
    recipients are deferred."""


class ReplyParser:
    """Replies out of a byte stream, sans-IO: :meth:`feed` bytes as they come, get every
    reply completed by them, in order (code, and the lines' texts joined by ``\\n``, as
    aiosmtplib's :class:`~aiosmtplib.SMTPResponse`). Raises :class:`ProtocolViolation`
    for a line that is not ``NNN``, ``NNN text`` or ``NNN-text``, or one longer than
    :data:`MAX_REPLY_LINE`, or a reply longer than :data:`MAX_REPLY_BYTES` or
    :data:`MAX_REPLY_LINES`: memory stays bounded whatever the server sends."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._size = 0

    @property
    def partial(self) -> bool:
        """Whether part of a reply was received and not yet completed."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[aiosmtplib.SMTPResponse]:
        self._buffer += data
        replies: list[aiosmtplib.SMTPResponse] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)
        del self._buffer[:start]
        if len(self._buffer) > MAX_REPLY_LINE:
            raise ProtocolViolation("reply line too long")
        return replies

    def _line(self, line: bytes) -> aiosmtplib.SMTPResponse | None:
        if len(line) > MAX_REPLY_LINE:
            raise ProtocolViolation("reply line too long")
        m = _REPLY_LINE_RE.match(line)
        if m is None:
            shown = _CONTROL_RE.sub("", line.decode("utf-8", "replace"))[:100]
            raise ProtocolViolation(f"malformed reply line {shown!r}")
        self._size += len(line)
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if self._size > MAX_REPLY_BYTES or len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolViolation("reply too long")
        if m.group(2) == b"-":
            return None
        text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
        self._lines, self._size = [], 0
        return aiosmtplib.SMTPResponse(int(m.group(1)), text)


class Pipe(asyncio.Protocol):
    """The transport's protocol on a pipelining session; aiosmtplib's stays behind it.

    Outside a group (:meth:`begin` … :meth:`end`) bytes go to aiosmtplib while it awaits
    a reply; bytes that come when nobody awaits one (a reply to no command) close the
    connection. Inside a group they go to a :class:`ReplyParser`, and :meth:`read` takes
    the replies one by one, each within the session's timeout. Connection loss, EOF and
    write flow control are passed on to aiosmtplib, so its state (``is_connected``,
    ``quit``, ``close``) stays true.
    """

    def __init__(self, smtp: aiosmtplib.SMTP, inner: SMTPProtocol) -> None:
        self._smtp = smtp
        self._inner = inner
        self._parser = ReplyParser()
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._grouped = False
        self._expected = 0  # replies the commands sent in this group call for
        self._received = 0
        self.violation = ""

    @classmethod
    def install(cls, smtp: aiosmtplib.SMTP) -> Pipe | None:
        """Put a pipe in front of ``smtp``'s protocol; None when it is not connected."""
        inner = smtp.protocol
        transport = smtp.transport
        if inner is None or transport is None or transport.is_closing():
            return None
        pipe = cls(smtp, inner)
        transport.set_protocol(pipe)
        return pipe

    def begin(self, replies: int) -> None:
        """Start a group of commands calling for ``replies`` replies: anything aiosmtplib
        holds unread, or a stray reply seen while idle, means the stream is out of step
        and the connection cannot be used."""
        if self.violation:
            raise ProtocolViolation(self.violation)
        if self._inner._buffer:  # read by no command of aiosmtplib's
            self._violate("a reply to no command was received before the group was sent")
            raise ProtocolViolation(self.violation)
        self._parser = ReplyParser()
        self._replies.clear()
        self._error = None
        self._expected, self._received = replies, 0
        self._grouped = True

    def expect(self, replies: int) -> None:
        """More commands (the body) were sent in the group, calling for ``replies``."""
        self._expected += replies

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    async def read(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply of the group."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
            finally:
                self._waiter = None
        return self._replies.popleft()

    def expect_nothing(self) -> None:
        """Every reply expected so far was read: one more is a reply to no command."""
        if self._replies or self._parser.partial:
            self._violate("the server sent more replies than commands")
            raise ProtocolViolation(self.violation)

    def end(self) -> None:
        """Close the group (after :meth:`expect_nothing`): aiosmtplib reads again."""
        self._grouped = False

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._grouped:
            if self._error is not None:
                return
            try:
                replies = self._parser.feed(data)
                self._received += len(replies)
                if self._received > self._expected:
                    raise ProtocolViolation("the server sent more replies than commands")
            except ProtocolViolation as exc:
                self._violate(str(exc))
                self._fail(exc)
            else:
                self._replies.extend(replies)
            self._wake()
            return
        waiter = self._inner._response_waiter
        if self._inner._response_pending and waiter is not None and not waiter.done():
            self._inner.data_received(data)
        elif not self.violation:
            self._violate("a reply to no command was received")

    def eof_received(self) -> bool | None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _violate(self, why: str) -> None:
        self.violation = why
        self._smtp.close()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# One mail transaction.


@dataclass(frozen=True, slots=True)
class Transaction:
    """The outcome of :func:`send`: one result per recipient, in order.

    ``deferred_at_mail`` is set when no recipient was reached because MAIL got a 4xx or
    the session broke while sending it: the MX courier then tries the next host.
    """

    results: list[DeliveryResult]
    deferred_at_mail: Reply | None = None


async def send(
    session: Session,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    *,
    dsn: DsnRequest | None = None,
    require_tls: bool = False,
    trusted_hop: bool = False,
) -> Transaction:
    """Deliver to ``recipients`` on ``session`` (see :func:`_transact`); a session that
    broke, or was cancelled half-way, is closed.

    ``dsn`` goes on as MAIL and RCPT parameters when the server offers DSN (RFC 3461
    5.2); every result then says ``next_hop_dsn``. ``require_tls``: the message is
    REQUIRETLS (see the module docstring, and ``trusted_hop``)."""
    results: dict[int, DeliveryResult] = {}
    deferred_at_mail: Reply | None = None
    relay = session.relay
    session.clean = False
    offers_dsn = session.smtp.supports_extension("dsn")
    try:
        mail_reply = await _transact(
            session,
            sender,
            recipients,
            data,
            results,
            dsn if offers_dsn else None,
            require_tls=require_tls,
            trusted_hop=trusted_hop,
        )
        if mail_reply is not None and mail_reply.is_temporary:
            deferred_at_mail = mail_reply
    except asyncio.CancelledError:
        session.close()
        raise
    except Exception as exc:  # any failure mid-transaction: defer what is undecided
        session.close()
        reply = broken_reply(exc, session)
        if not results and session.stage == _SENDING_MAIL:
            deferred_at_mail = reply
        for i, rcpt in enumerate(recipients):
            results.setdefault(i, DeliveryResult(rcpt, Result.TEMPORARY, reply, relay))
    undecided = Reply(451, "4.3.0", f"no reply from {relay} for this recipient")
    return Transaction(
        [
            replace(
                session.stamp(
                    results.get(i) or DeliveryResult(rcpt, Result.TEMPORARY, undecided, relay)
                ),
                next_hop_dsn=offers_dsn,
            )
            for i, rcpt in enumerate(recipients)
        ],
        deferred_at_mail,
    )


async def _transact(
    session: Session,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    results: dict[int, DeliveryResult],
    dsn: DsnRequest | None = None,
    *,
    require_tls: bool = False,
    trusted_hop: bool = False,
) -> Reply | None:
    """MAIL, one RCPT per recipient, DATA if any was accepted; then the same again, on
    the same connection, for the recipients a server's recipient limit left over.

    A ``452`` (``4.5.3`` or no enhanced code) to RCPT after at least one recipient was
    accepted is that limit (RFC 5321 4.5.3.1.8 and 4.5.3.1.10): the accepted ones get the
    message, and the rest go at once in a further transaction, as Postfix does, rather
    than waiting for the next retry. Any other ``452``, and one to the first RCPT of a
    transaction, is that recipient's own temporary failure.

    8-bit data goes to a server without 8BITMIME converted to 7 bit
    (:mod:`hato.mime7bit`), or not at all: every recipient then fails with 5.6.3.

    Fills ``results`` (recipient index → result) as replies come. Returns the reply to
    the first MAIL when it was refused (then every recipient carries that reply and
    nothing else was sent), else None.
    """
    smtp, relay = session.smtp, session.relay

    def decide(indexes: Iterable[int], result: Result, reply: Reply) -> None:
        for i in indexes:
            results[i] = DeliveryResult(recipients[i], result, reply, relay)

    everyone = range(len(recipients))
    utf8_envelope = not (sender.isascii() and all(r.isascii() for r in recipients))
    refusal = _refusal(smtp, relay, sender, utf8_envelope=utf8_envelope)
    if refusal is None and require_tls and not trusted_hop:
        refusal = _requiretls_refusal(session)
    if refusal is None and not data.isascii() and not smtp.supports_extension("8bitmime"):
        try:
            data = to_7bit(data)
        except NotConvertible as exc:
            refusal = Reply(
                554,
                "5.6.3",
                f"host {relay} does not offer 8BITMIME, and the message cannot be "
                f"converted to 7 bit: {exc}",
            )
    if refusal is not None:
        decide(everyone, Result.PERMANENT, refusal)
        return None
    options = _mail_options(smtp, data, utf8_envelope=utf8_envelope)
    if dsn is not None:
        options += dsn.mail_options()
    if require_tls:
        options.append(b"REQUIRETLS")

    pending = list(everyone)
    while pending:
        first = not results
        session.clean = False
        session.stage = _SENDING_MAIL
        mail = (b"MAIL", b"FROM:<" + sender.encode("utf-8") + b">", *options)
        if session.pipe is not None:
            refused, pending = await _pipelined(
                session, session.pipe, mail, recipients, pending, data, decide, dsn
            )
        else:
            refused, pending = await _lockstep(
                session, mail, recipients, pending, data, decide, dsn
            )
        if refused is not None:
            return refused if first else None
        if pending and not session.clean:
            await smtp.execute_command(b"RSET")  # whatever the server kept of it goes
    return None


Decide = Callable[[Iterable[int], Result, Reply], None]


async def _lockstep(
    session: Session,
    mail: Sequence[bytes],
    recipients: Sequence[str],
    pending: list[int],
    data: bytes,
    decide: Decide,
    dsn: DsnRequest | None,
) -> tuple[Reply | None, list[int]]:
    """One transaction, each command waiting for the reply to the one before: MAIL's
    refusal (or None), and the recipients the server's limit left over."""
    smtp = session.smtp
    response = await smtp.execute_command(*mail)
    if response.code != 250:
        reply = reply_from_response(response.code, response.message)
        decide(pending, classify(reply), reply)
        return reply, []
    accepted, left = await _recipients(session, recipients, pending, decide, dsn)
    if not accepted or not smtp.is_connected:
        return None, []
    session.stage = "sending message body"
    session.clean = await _data(smtp, data, accepted, decide)
    return None, left


async def _pipelined(
    session: Session,
    pipe: Pipe,
    mail: Sequence[bytes],
    recipients: Sequence[str],
    pending: list[int],
    data: bytes,
    decide: Decide,
    dsn: DsnRequest | None,
) -> tuple[Reply | None, list[int]]:
    """:func:`_lockstep` in two round trips (RFC 2920): MAIL, every RCPT and DATA in one
    write, their replies read in order; then the body and its reply. With CHUNKING, MAIL
    and the RCPTs go as a group and the BDAT chunks follow as without pipelining.

    Outcomes are those of the lock-step exchange. MAIL refused: every recipient gets its
    reply. No recipient accepted but DATA answered 354 anyway: an empty message
    (``.``) ends it and its reply is ignored, as Postfix does. A 421 anywhere: the
    server is closing, so everyone not yet decided gets it and the connection is closed.
    A reply to no command (see :class:`Pipe`) raises :class:`ProtocolViolation`."""
    smtp, timeout = session.smtp, session.smtp.timeout
    chunking = CHUNKING and smtp.supports_extension("chunking")
    sent: list[int] = []
    bad: list[int] = []
    group = [_command_line(mail)]
    for i in pending:
        rcpt = recipients[i]
        if bad_path(rcpt):
            bad.append(i)
            continue
        sent.append(i)
        options = dsn.rcpt_options(rcpt) if dsn is not None else ()
        group.append(_command_line((b"RCPT", b"TO:<" + rcpt.encode("utf-8") + b">", *options)))
    with_data = bool(sent) and not chunking
    if with_data:
        group.append(b"DATA\r\n")
    pipe.begin(len(group))
    pipe.write(b"".join(group))

    response = await pipe.read(timeout)
    if response.code != 250:
        reply = reply_from_response(response.code, response.message)
        decide(pending, classify(reply), reply)
        if response.code == 421:
            smtp.close()
            return reply, []
        await _drain(session, pipe, len(sent), with_data)
        return reply, []
    for i in bad:
        rcpt = recipients[i]
        decide([i], Result.PERMANENT, Reply(553, "5.1.3", f"bad recipient address {rcpt!r}"))

    session.stage = "sending RCPT TO"
    accepted: list[int] = []
    left: list[int] = []
    for n, i in enumerate(sent):
        response = await pipe.read(timeout)
        if response.code in (250, 251):
            accepted.append(i)
            continue
        reply = reply_from_response(response.code, response.message)
        if response.code == 421:
            # The server is closing: whoever is not decided yet is deferred with its words.
            decide([*accepted, *left, *sent[n:]], Result.TEMPORARY, reply)
            smtp.close()
            return None, []
        if left or (accepted and reply.code == 452 and reply.enhanced in _TOO_MANY_RECIPIENTS):
            left.append(i)  # over the server's recipient limit: the next transaction
            continue
        decide([i], classify(reply), reply)

    if not with_data:
        pipe.expect_nothing()
        pipe.end()
        if not accepted or not smtp.is_connected:
            return None, []
        session.stage = "sending message body"
        session.clean = await _data(smtp, data, accepted, decide)
        return None, left

    session.stage = "sending message body"
    response = await pipe.read(timeout)
    pipe.expect_nothing()  # nothing may come before the body is sent
    if response.code == 354:
        pipe.expect(1)
        pipe.write(_dot_stuffed(data) if accepted else b".\r\n")
        response = await pipe.read(timeout)
        pipe.expect_nothing()
        if not accepted:
            pipe.end()
            return None, []
    pipe.end()
    if accepted:
        reply = reply_from_response(response.code, response.message)
        decide(accepted, Result.OK if response.code == 250 else classify(reply), reply)
        session.clean = response.code == 250
    if response.code == 421:
        smtp.close()
    return None, left


async def _drain(session: Session, pipe: Pipe, rcpts: int, with_data: bool) -> None:
    """Read the replies to a group whose MAIL was refused, ending an unexpected 354."""
    timeout = session.smtp.timeout
    for _ in range(rcpts):
        await pipe.read(timeout)
    if with_data and (await pipe.read(timeout)).code == 354:
        pipe.expect_nothing()
        pipe.expect(1)
        pipe.write(b".\r\n")
        await pipe.read(timeout)
    pipe.expect_nothing()
    pipe.end()


def _command_line(args: Sequence[bytes]) -> bytes:
    """``args`` as one command line; ValueError for a control character (as aiosmtplib)."""
    for arg in args:
        if _COMMAND_INJECTION_RE.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def _dot_stuffed(data: bytes) -> bytes:
    """The body as DATA sends it: CRLF line endings, dot-stuffed, ``.`` at the end."""
    data = _LINE_ENDINGS_RE.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _PERIOD_RE.sub(b"..", data) + b".\r\n"


def _refusal(
    smtp: aiosmtplib.SMTP, relay: str, sender: str, *, utf8_envelope: bool
) -> Reply | None:
    """Why no MAIL can be sent for this envelope (a permanent reply), or None."""
    if bad_path(sender):
        return Reply(553, "5.1.7", f"bad sender address {sender!r}")
    if utf8_envelope and not smtp.supports_extension("smtputf8"):
        return Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {relay}")
    return None


def _requiretls_refusal(session: Session) -> Reply | None:
    """Why a REQUIRETLS message cannot go on ``session`` (RFC 8689 4.2.1), or None."""
    if not session.verified:
        return Reply(
            550,
            "5.7.10",
            f"REQUIRETLS: the TLS session with host {session.relay} is not verified",
        )
    if not session.smtp.supports_extension("requiretls"):
        return Reply(
            550,
            "5.7.30",
            f"REQUIRETLS support required, but not offered by host {session.relay}",
        )
    return None


def _mail_options(smtp: aiosmtplib.SMTP, data: bytes, *, utf8_envelope: bool) -> list[bytes]:
    options: list[bytes] = []
    if smtp.supports_extension("size"):
        options.append(b"SIZE=%d" % len(data))
    if not data.isascii() and smtp.supports_extension("8bitmime"):
        options.append(b"BODY=8BITMIME")
    if smtp.supports_extension("smtputf8") and (
        utf8_envelope or not header_section(data).isascii()
    ):
        options.append(b"SMTPUTF8")
    return options


async def _recipients(
    session: Session,
    recipients: Sequence[str],
    pending: list[int],
    decide: Decide,
    dsn: DsnRequest | None = None,
) -> tuple[list[int], list[int]]:
    """RCPT for each pending recipient: (accepted, left over for another transaction)."""
    smtp = session.smtp
    session.stage = "sending RCPT TO"
    accepted: list[int] = []
    for n, i in enumerate(pending):
        rcpt = recipients[i]
        if bad_path(rcpt):
            decide([i], Result.PERMANENT, Reply(553, "5.1.3", f"bad recipient address {rcpt!r}"))
            continue
        response = await smtp.execute_command(
            b"RCPT",
            b"TO:<" + rcpt.encode("utf-8") + b">",
            *(dsn.rcpt_options(rcpt) if dsn is not None else ()),
        )
        if response.code in (250, 251):
            accepted.append(i)
            continue
        reply = reply_from_response(response.code, response.message)
        if accepted and reply.code == 452 and reply.enhanced in _TOO_MANY_RECIPIENTS:
            return accepted, pending[n:]
        decide([i], classify(reply), reply)
        if response.code == 421:
            # The server is closing: whoever was not asked yet is deferred with its words.
            decide(pending[n + 1 :], Result.TEMPORARY, reply)
            break
    return accepted, []


async def _data(
    smtp: aiosmtplib.SMTP,
    data: bytes,
    accepted: list[int],
    decide: Callable[[Iterable[int], Result, Reply], None],
) -> bool:
    """DATA (or BDAT) for the accepted recipients; whether the server took the message."""
    try:
        if CHUNKING and smtp.supports_extension("chunking"):
            response = await _bdat(smtp, data)
        else:
            response = await smtp.data(data)
    except aiosmtplib.SMTPDataError as exc:
        response = aiosmtplib.SMTPResponse(exc.code, exc.message)
    reply = reply_from_response(response.code, response.message)
    decide(accepted, Result.OK if response.code == 250 else classify(reply), reply)
    return response.code == 250


async def _bdat(smtp: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
    """The message in BDAT chunks (RFC 3030); the reply to the last chunk, or to the
    first one refused. aiosmtplib has no BDAT: each chunk is written on its protocol, and
    its one reply read before the next (a session serves one task at a time)."""
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    data = _LINE_ENDINGS_RE.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    offset = 0
    while True:
        chunk = data[offset : offset + BDAT_CHUNK_SIZE]
        offset += len(chunk)
        last = offset >= len(data)
        try:
            protocol.write(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b""))
            protocol.write(chunk)
            response = await protocol.read_response(timeout=smtp.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            smtp.close()  # a reply given up on would pair with the next command
            raise
        if last or response.code != 250:
            return response


def broken_reply(exc: Exception, session: Session) -> Reply:
    """The (temporary) reply for a session that failed mid-transaction."""
    relay, stage = session.relay, session.stage
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Reply(421, "4.4.2", f"conversation with {relay} timed out while {stage}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        return Reply(421, "4.4.2", f"lost connection with {relay} while {stage}")
    return Reply(
        451, "4.3.0", f"error talking to {relay} while {stage}: {type(exc).__name__}: {exc}"
    )
