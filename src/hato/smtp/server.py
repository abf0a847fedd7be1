"""The SMTP listener: a thin ``asyncio.Protocol`` that drives :class:`ServerSession`.

It owns everything the pure state machine does not: sockets, TLS (``loop.start_tls`` for
STARTTLS, TLS from the first byte for ``submissions``), timeouts, connection limits (with
a reserve for trusted networks), the greeting delay that catches early talkers, the
credential check and the AUTH failure throttle shared across connections, the free space
of the queue's filesystem, the queue and the operator log. ``250`` after DATA is written
only once ``await queue.enqueue(...)`` (or the committer of another process,
:mod:`hato.committer`) has returned, that is once the message is durable.

While the session waits for an answer (enqueue, credential check, TLS handshake) the
connection stops reading, so pipelined input waits in the kernel and in the session's
buffer and is processed in order afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from hato import reply
from hato.errors import ConfigError, HatoError, QueueError, QueueFullError
from hato.events import ACCEPTED, DeliveryEvent, new_event_id
from hato.maillog import MailLog
from hato.message import META_AUTH_USER, META_ENVID, Envelope, message_id_of
from hato.observe import NO_OBSERVER, Observer
from hato.queue.base import Queue
from hato.reply import Reply
from hato.smtp.auth import Authenticator, AuthThrottle
from hato.smtp.flow import FlowGate
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy
from hato.smtp.protocol import (
    Authenticate,
    Close,
    Event,
    MessageComplete,
    Rejected,
    Send,
    ServerSession,
    SessionConfig,
    StartTLS,
)
from hato.smtp.shared import SharedCounts
from hato.smtp.tls import TLSContextProvider
from hato.stages import StageTrace

_debug = logging.getLogger(__name__)

# Applied to a submitted message before it is queued (DKIM signing): given the bytes and
# the authenticated user ("" for a trusted network), returns the bytes to queue. Raising
# hato.errors.HatoError refuses the message with 554 5.6.0.
MessageTransform = Callable[[bytes, str], Awaitable[bytes]]

# Enqueues an accepted message in place of ``queue.enqueue`` (``Worker.enqueue_fresh``:
# leased to the in-process worker in the same commit): given the envelope, the bytes and
# the ``accepted`` events, returns the queue id once the message is durable.
Handoff = Callable[[Envelope, bytes, Sequence[DeliveryEvent]], Awaitable[str]]

# Commits an accepted message in another process in place of ``queue.enqueue`` (the
# committer of hato.committer: the delivery process of HATO_PROCESSES): given the
# envelope, the bytes, the ``accepted`` events and whether it is held, returns the queue
# id once the message is durable; raises what ``queue.enqueue`` raises.
Commit = Callable[[Envelope, bytes, Sequence[DeliveryEvent], bool], Awaitable[str]]

# Reasons for which reading is paused; reading resumes when none is left.
_ASYNC = "async"
_WRITE = "write"
_TLS = "tls"


@functools.lru_cache(maxsize=256)
def _wire(answer: Reply) -> bytes:
    return answer.to_bytes()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client_name(ip: str) -> str:
    # No reverse DNS on the hot path; Postfix writes "unknown[ip]" in that case.
    return f"unknown[{ip}]"


class FreeSpace:
    """Free bytes on the filesystem holding ``path``, for the check at MAIL
    (:attr:`SessionConfig.queue_free_space`).

    Asked on every MAIL, so the answer is cached: ``statvfs`` runs at most once per
    ``interval`` seconds, and every other MAIL only reads the clock. Counts the space an
    unprivileged process may use (``f_bavail``). ``None`` when the filesystem cannot be
    asked, and then the check is skipped: not knowing never refuses mail.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.path = os.fspath(path)
        self.interval = interval
        self._clock = clock
        self._statvfs = statvfs
        self._free: int | None = None
        self._next = float("-inf")

    def __call__(self) -> int | None:
        now = self._clock()
        if now >= self._next:
            self._next = now + self.interval
            try:
                st = self._statvfs(self.path)
            except OSError:
                self._free = None
            else:
                self._free = st.f_bavail * st.f_frsize
        return self._free


class SMTPListener:
    """One listening socket with its role, policy and limits. Build with
    :func:`start_listener`."""

    def __init__(
        self,
        listener: ListenerConfig,
        *,
        queue: Queue,
        policy: Policy,
        authenticator: Authenticator | None,
        tls: TLSContextProvider | None,
        log: MailLog,
        limits: SessionConfig,
        hold: bool = False,
        reuse_port: bool = False,
        clock: Callable[[], float] = time.time,
        auth_throttle: AuthThrottle | None = None,
        submitted: MessageTransform | None = None,
        greet_delay: float | None = None,
        flow: FlowGate | None = None,
        sock: socket.socket | None = None,
        shared: SharedCounts | None = None,
        observer: Observer = NO_OBSERVER,
        handoff: Handoff | None = None,
        commit: Commit | None = None,
    ) -> None:
        self.listener = listener
        self.commit = commit
        self.observer = observer
        self.name = ""  # ``label`` once bound: the listener's name in metrics
        self.flow = flow
        self.sock = sock
        self.shared = shared
        self.handoff = handoff
        if greet_delay is None:
            # Only where strangers arrive and speak second: not on submission ports (465:
            # the client speaks first, in TLS), not on a listener bound to loopback.
            public = listener.role is ListenerRole.SMTP and not _is_loopback(listener.host)
            greet_delay = limits.greet_delay if public else 0.0
        self.greet_delay = greet_delay
        self.auth_throttle = auth_throttle
        self.submitted = submitted
        self.reuse_port = reuse_port
        self.queue = queue
        self.policy = policy
        self.authenticator = authenticator
        self.tls = tls
        self.log = log
        self.limits = limits
        self.hold = hold
        self.clock = clock
        self.server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self._per_client: dict[str, int] = {}
        self._strangers = 0  # connections from outside the trusted networks
        self._reserve_applies = listener.role is ListenerRole.SMTP
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        # HATO_TRACE_STAGES (hato.stages): set by the composition root, else None.
        self.stages: StageTrace | None = None

    async def start(self) -> None:
        role = self.listener.role
        if role is not ListenerRole.SMTP and self.tls is None:
            raise ConfigError(
                f"listener {self.address} ({role}) needs a TLS certificate "
                "(HATO_TLS_CERT_FILE and HATO_TLS_KEY_FILE)"
            )
        if role is not ListenerRole.SMTP and self.authenticator is None:
            raise ConfigError(f"listener {self.address} ({role}) needs a user store for AUTH")
        ssl_ctx = self.tls.listening_context() if self.listener.implicit_tls and self.tls else None
        loop = asyncio.get_running_loop()
        try:
            if self.sock is not None:  # bound by the supervisor, shared by its children
                self.server = await loop.create_server(
                    lambda: _Connection(self),
                    sock=self.sock,
                    ssl=ssl_ctx,
                    ssl_handshake_timeout=self.limits.idle_timeout if ssl_ctx else None,
                )
            else:
                self.server = await loop.create_server(
                    lambda: _Connection(self),
                    self.listener.host,
                    self.listener.port,
                    ssl=ssl_ctx,
                    ssl_handshake_timeout=self.limits.idle_timeout if ssl_ctx else None,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        self.name = self.label

    @property
    def address(self) -> str:
        return f"{self.listener.host}:{self.listener.port}"

    @property
    def port(self) -> int:
        """The bound port (useful when the listener was configured with port 0)."""
        if self.server is None or not self.server.sockets:
            return self.listener.port
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def label(self) -> str:
        """``role=host:port``, as in ``HATO_LISTEN``: the listener's name in counters."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.listener.role}={host}:{self.port}"

    @property
    def host(self) -> str:
        if self.server is None or not self.server.sockets:
            return self.listener.host
        return str(self.server.sockets[0].getsockname()[0])

    def admit(self, ip: str) -> bool:
        """Count a new connection; ``False`` if it is over a limit (then nothing counted).

        Trusted networks are exempt from the per-client limit, as in Postfix
        (``smtpd_client_event_limit_exceptions = $mynetworks``): an app server's
        connection pool must not be refused by its own relay. On an ``smtp`` listener
        clients outside them share at most ``max_connections -
        trusted_connection_reserve`` connections, so that idle strangers cannot lock the
        application's own mail out. Submission listeners keep their whole total for
        clients that will authenticate (connections are counted per listener, so
        port 25 never uses them up).
        """
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            return False
        count = self._per_client.get(ip, 0)
        stranger = not self.policy.is_trusted(ip)
        share = limits.max_connections - limits.trusted_connection_reserve
        if stranger:
            if count >= limits.max_connections_per_client:
                return False
            if self._reserve_applies and self._strangers >= share:
                return False
        # With several intake processes every limit counts the connections of all of
        # them: the kernel spreads one listener's connections over the processes.
        if self.shared is not None and not self._admit_shared(ip, stranger, share):
            return False
        if stranger:
            self._strangers += 1
        self._per_client[ip] = count + 1
        return True

    def _admit_shared(self, ip: str, stranger: bool, share: int) -> bool:
        """Take this connection's place in the counts of every intake process: the
        listener's total, its strangers' share and the client's own; none if one is full."""
        assert self.shared is not None
        limits = self.limits
        wanted = [(self._shared_key("*"), limits.max_connections)]
        if stranger:
            if self._reserve_applies:
                wanted.append((self._shared_key("strangers"), share))
            wanted.append((self._shared_key(ip), limits.max_connections_per_client))
        taken: list[str] = []
        for key, limit in wanted:
            if not self.shared.acquire(key, limit):
                for done in taken:
                    self.shared.release(done)
                return False
            taken.append(key)
        return True

    def _shared_key(self, ip: str) -> str:
        return f"{self.listener.role}={self.listener.host}:{self.listener.port}|{ip}"

    def release(self, ip: str) -> None:
        left = self._per_client.get(ip, 0) - 1
        if left > 0:
            self._per_client[ip] = left
        else:
            self._per_client.pop(ip, None)
        stranger = not self.policy.is_trusted(ip)
        if stranger:
            self._strangers -= 1
        if self.shared is not None:
            self.shared.release(self._shared_key("*"))
            if stranger:
                if self._reserve_applies:
                    self.shared.release(self._shared_key("strangers"))
                self.shared.release(self._shared_key(ip))

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets, like :attr:`asyncio.Server.sockets`."""
        return tuple(self.server.sockets) if self.server is not None else ()

    def close(self) -> None:
        """Stop accepting and say ``421 4.3.2`` to every session not waiting for the
        queue (those get it right after their answer), like :meth:`asyncio.Server.close`."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown()

    async def wait_closed(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout`` seconds) for messages being enqueued and for the
        sessions to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for conn in list(self.connections):
            conn.shutdown()
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), max(0.0, deadline - loop.time()))

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` then :meth:`wait_closed`."""
        self.close()
        await self.wait_closed(timeout)

    async def __aenter__(self) -> SMTPListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def start_listener(
    listener: ListenerConfig,
    *,
    queue: Queue,
    policy: Policy,
    authenticator: Authenticator | None = None,
    tls: TLSContextProvider | None = None,
    log: MailLog,
    hostname: str | None = None,
    limits: SessionConfig | None = None,
    hold: bool = False,
    reuse_port: bool = False,
    clock: Callable[[], float] = time.time,
    auth_throttle: AuthThrottle | None = None,
    submitted: MessageTransform | None = None,
    observer: Observer = NO_OBSERVER,
    max_connections: int | None = None,
    max_connections_per_client: int | None = None,
    idle_timeout: float | None = None,
    command_timeout: float | None = None,
    greet_delay: float | None = None,
    flow: FlowGate | None = None,
    sock: socket.socket | None = None,
    shared: SharedCounts | None = None,
    handoff: Handoff | None = None,
    commit: Commit | None = None,
) -> SMTPListener:
    """Bind and start one listener. ``hostname`` overrides ``limits.hostname``;
    ``hold`` enqueues messages as held (no relay configured); ``reuse_port`` lets
    several processes share the port (SO_REUSEPORT) to use every core;
    ``auth_throttle`` is the AUTH failure tracker shared by all listeners;
    ``submitted`` transforms mail from authenticated or trusted clients before it is
    queued (DKIM signing), never mail from anyone else. ``greet_delay``: seconds to hold
    the greeting back from untrusted clients (the pregreet test); by default
    ``limits.greet_delay`` on an ``smtp`` listener not bound to loopback, none elsewhere.
    ``flow`` holds the reply to DATA back while delivery falls behind; ``sock`` is an
    already bound listening socket to serve (the supervisor's, shared by its children);
    ``shared`` counts each client's connections across those children.
    ``observer`` is told of connections, messages and AUTH failures (metrics).
    ``handoff`` enqueues accepted mail in place of ``queue.enqueue`` (not when ``hold``);
    ``commit`` has it committed by another process instead (held mail too).
    The other keywords, when given, override the same fields of ``limits``. Raises
    :class:`~hato.errors.ConfigError` if the address cannot be bound."""
    config = limits if limits is not None else SessionConfig()
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("hostname", hostname),
            ("max_connections", max_connections),
            ("max_connections_per_client", max_connections_per_client),
            ("idle_timeout", idle_timeout),
            ("command_timeout", command_timeout),
        )
        if value is not None
    }
    if overrides:
        config = dataclasses.replace(config, **overrides)
    smtp = SMTPListener(
        listener,
        queue=queue,
        policy=policy,
        authenticator=authenticator,
        tls=tls,
        log=log,
        limits=config,
        hold=hold,
        reuse_port=reuse_port,
        clock=clock,
        auth_throttle=auth_throttle,
        submitted=submitted,
        greet_delay=greet_delay,
        flow=flow,
        sock=sock,
        shared=shared,
        observer=observer,
        handoff=handoff,
        commit=commit,
    )
    await smtp.start()
    return smtp


class _Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, listener: SMTPListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.session: ServerSession | None = None
        self.ip = ""
        self.client = ""
        self.lost = False
        self._admitted = False
        self._paused: set[str] = set()
        # Set once loop.start_tls has taken the socket over: from then on data_received
        # carries decrypted bytes, which may come before start_tls returns.
        self._tls_upgrading = False
        self._tls_early = bytearray()
        self._last_reply = 0.0
        self._last_input = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Set while the greeting is held back: its last line, and the timer that sends it.
        self._greeting = b""
        self._greet_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        listener = self.listener
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.client = _client_name(self.ip)
        listener.observer.smtp_connected(listener.name)
        throttle = listener.auth_throttle
        if throttle is not None and throttle.blocked(self.ip):
            # A password guesser: not even a greeting until its failures expire.
            listener.log.rejected(self.client, "CONNECT", reply.TOO_MANY_AUTH_FAILURES)
            transport.write(_wire(reply.TOO_MANY_AUTH_FAILURES))
            transport.close()
            return
        if listener.closing or not listener.admit(self.ip):
            answer = reply.SHUTTING_DOWN if listener.closing else reply.TOO_MANY_CONNECTIONS
            listener.log.rejected(self.client, "CONNECT", answer)
            transport.write(_wire(answer))
            transport.close()
            return
        self._admitted = True
        listener.connections.add(self)
        listener.log.connect(self.client)
        tls_active = transport.get_extra_info("sslcontext") is not None
        self.session = ServerSession(
            listener.limits,
            listener.policy,
            client_ip=self.ip,
            tls_active=tls_active,
            tls_available=listener.tls is not None,
            auth_available=listener.authenticator is not None,
            clock=listener.clock,
        )
        greeting = _wire(self.session.greeting())
        if listener.greet_delay > 0 and not self.session.facts.trusted:
            # Postfix postscreen's pregreet test: the first line of a multi-line greeting
            # now, the last one later. A client must wait for the last line; bots that
            # talk before it are refused.
            transport.write(b"220-" + greeting[4:])
            self._greeting = greeting
            self._greet_timer = self._loop.call_later(listener.greet_delay, self._greet)
            return
        transport.write(greeting)
        self._arm()

    def _greet(self) -> None:
        self._greet_timer = None
        if self.lost or self.transport is None:
            return
        self.transport.write(self._greeting)
        self._greeting = b""
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            return
        if self._greeting:
            self._refuse_early_talker()
            return
        self._last_input = self._loop.time()
        if self._tls_upgrading:
            self._tls_early += data
            return
        self._handle(self.session.receive(data))

    def _refuse_early_talker(self) -> None:
        assert self.transport is not None
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
        self._greeting = b""
        self.session = None  # nothing the client said is ever acted upon
        self.listener.log.rejected(self.client, "CONNECT", reply.PREGREET)
        self.transport.write(_wire(reply.PREGREET))
        self.transport.close()

    def eof_received(self) -> bool | None:
        return False  # close our side too; a half-open SMTP session is useless

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
        if self._admitted:
            self._admitted = False
            self.listener.release(self.ip)
            self.listener.connections.discard(self)
            session = self.session
            self.listener.log.disconnect(
                self.client,
                messages=session.messages if session else 0,
                errors=session.errors if session else 0,
            )

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands.
        self._pause(_WRITE)

    def resume_writing(self) -> None:
        self._resume(_WRITE)

    # Driving the session ---------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        transport = self.transport
        session = self.session
        if transport is None or session is None or self.lost:
            return
        out = bytearray()
        wrote = False
        for event in events:
            if isinstance(event, Send):
                out += _wire(event.reply)
                wrote = True
            elif isinstance(event, Rejected):
                self._log_rejected(event)
            elif isinstance(event, MessageComplete):
                self._flush(out)
                self._pause(_ASYNC)
                self.listener.spawn(self._enqueue(event.envelope, event.data))
            elif isinstance(event, Authenticate):
                self._flush(out)
                self._pause(_ASYNC)
                self.listener.spawn(self._authenticate(event))
            elif isinstance(event, StartTLS):
                self._flush(out)
                self._pause(_TLS)
                self.listener.spawn(self._start_tls())
            elif isinstance(event, Close):
                self._flush(out)
                self._cancel_timer()
                transport.close()
                return
        self._flush(out)
        if wrote and not session.waiting:
            self._arm()

    def _flush(self, out: bytearray) -> None:
        if out and self.transport is not None and not self.lost:
            self.transport.write(bytes(out))
            out.clear()

    def _log_rejected(self, event: Rejected) -> None:
        if event.command in ("END-OF-MESSAGE", "DATA"):  # the message itself refused
            self.listener.observer.smtp_message(self.listener.name, False)
        fields: dict[str, object] = {}
        if event.sender is not None:
            fields["from"] = event.sender
        if event.recipient is not None:
            fields["to"] = event.recipient
        self.listener.log.rejected(self.client, event.command, event.reply, **fields)

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._paused.add(reason)
        if reason != _WRITE:
            self._cancel_timer()

    def _resume(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()

    # Asynchronous answers --------------------------------------------------------

    async def _enqueue(self, envelope: Envelope, data: bytes) -> None:
        session = self.session
        assert session is not None
        listener = self.listener
        accepted = listener.clock() if listener.stages is not None else 0.0
        try:
            if listener.flow is not None:
                await listener.flow.wait()  # before the commit: the 250 still follows it
            if listener.submitted is not None and (envelope.auth_user or session.facts.trusted):
                data = await listener.submitted(data, envelope.auth_user)
            if envelope.auth_user:  # who may read this message's events (hato.web.events_api)
                envelope.meta.setdefault(META_AUTH_USER, envelope.auth_user)
            if listener.commit is not None:
                queue_id = await listener.commit(
                    envelope, data, self._accepted(envelope, data), listener.hold
                )
            elif listener.handoff is not None and not listener.hold:
                queue_id = await listener.handoff(envelope, data, self._accepted(envelope, data))
            else:
                queue_id = await listener.queue.enqueue(
                    envelope, data, held=listener.hold, events=self._accepted(envelope, data)
                )
        except QueueFullError as exc:
            _debug.warning("queue full: %s", exc)
            events = session.message_rejected(reply.STORAGE_FULL)
        except QueueError as exc:
            _debug.warning("queue error: %s", exc)
            events = session.message_rejected(reply.QUEUE_ERROR)
        except HatoError as exc:  # the submission transform (DKIM) refused the message
            listener.log.rejected(self.client, "DATA", reply.MESSAGE_REFUSED, detail=str(exc))
            events = session.message_rejected(reply.MESSAGE_REFUSED)
        except Exception:  # a bug in a backend must not take the listener down
            _debug.exception("unexpected error while enqueueing")
            events = session.message_rejected(reply.LOCAL_ERROR)
        else:
            listener.observer.smtp_message(listener.name, True)
            listener.observer.event(ACCEPTED, len(envelope.recipients))
            if listener.stages is not None:
                listener.stages.mark(queue_id, "accepted", accepted)
                listener.stages.mark(queue_id, "committed")
            listener.log.received(
                queue_id,
                client=self.client,
                sender=envelope.sender,
                size=len(data),
                nrcpt=len(envelope.recipients),
                sasl_username=envelope.auth_user or None,
                envid=envelope.meta.get(META_ENVID) or None,
            )
            events = session.message_accepted(queue_id)
        self._resume(_ASYNC)
        self._handle(events)
        if listener.closing:
            self.shutdown()

    def _accepted(self, envelope: Envelope, data: bytes) -> list[DeliveryEvent]:
        """The ``accepted`` delivery events, one per recipient, stored with the message;
        the attempt record names the client (the previous hop)."""
        listener = self.listener
        now = listener.clock()
        envid = envelope.meta.get(META_ENVID, "")
        message_id = message_id_of(data)
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        tls_version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
        return [
            DeliveryEvent(
                event_id=new_event_id(listener.clock),
                event=ACCEPTED,
                time=now,
                node=listener.limits.hostname,
                queue_id="",
                recipient=rcpt,
                envid=envid,
                message_id=message_id,
                route=listener.listener.role.value,
                relay_host=envelope.client_helo[:255],
                relay_ip=self.ip,
                reply_code=250,
                reply_enhanced="2.0.0",
                reply_text="queued",
                tls_version=tls_version or "",
            )
            for rcpt in envelope.recipients
        ]

    async def _authenticate(self, event: Authenticate) -> None:
        session = self.session
        listener = self.listener
        authenticator = listener.authenticator
        throttle = listener.auth_throttle
        assert session is not None and authenticator is not None
        if throttle is not None and throttle.blocked(self.ip):
            # Blocked by failures on other connections since this one began: no check.
            listener.log.rejected(self.client, "AUTH", reply.TOO_MANY_AUTH_FAILURES)
            events = session.auth_result(None, close=True)
            self._resume(_ASYNC)
            self._handle(events)
            return
        trusted = session.facts.trusted
        locked = throttle is not None and throttle.locked(event.username, self.ip, trusted=trusted)
        user: str | None = None
        if not locked:
            try:
                user = await authenticator.authenticate(
                    event.username, event.password, authzid=event.authzid
                )
            except Exception:  # a broken user store refuses, it does not crash the session
                _debug.exception("authenticator failed")
        close = False
        if user is not None:
            if throttle is not None:
                throttle.succeeded(self.ip, event.username)
        else:
            listener.observer.smtp_auth_failed(listener.name)
            listener.log.auth_failed(self.client, event.username, event.mechanism)
            if throttle is not None:
                locks = throttle.user_locks
                delay = throttle.failed(
                    self.ip, event.username, trusted=trusted, listener=listener.label, locked=locked
                )
                if throttle.user_locks != locks:
                    listener.log.auth_locked(event.username, throttle.user_window)
                if delay is None:
                    listener.log.rejected(self.client, "AUTH", reply.TOO_MANY_AUTH_FAILURES)
                    close = True
                elif delay > 0:
                    await asyncio.sleep(delay)
        refusal = reply.AUTH_TEMPORARY_FAILURE if locked else reply.AUTH_FAILED
        events = session.auth_result(user, close=close, refusal=refusal)
        self._resume(_ASYNC)
        self._handle(events)

    async def _start_tls(self) -> None:
        transport = self.transport
        tls = self.listener.tls
        session = self.session
        assert transport is not None and tls is not None and session is not None
        if self.lost:
            return
        self._tls_upgrading = True
        try:
            new_transport = await self._loop.start_tls(
                transport,
                self,
                tls.context(),
                server_side=True,
                ssl_handshake_timeout=self.listener.limits.idle_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as exc:
            _debug.info("TLS handshake with %s failed: %s", self.client, exc)
            transport.abort()
            return
        if new_transport is None:  # pragma: no cover - only for protocols that close
            transport.abort()
            return
        self.transport = new_transport
        self._tls_upgrading = False
        session.tls_started()
        self._paused.discard(_TLS)
        self._arm()
        if self._tls_early:
            early = bytes(self._tls_early)
            self._tls_early.clear()
            self._handle(session.receive(early))
        if not self._paused:
            new_transport.resume_reading()

    # Timeouts --------------------------------------------------------------------

    def _deadline(self) -> float:
        limits = self.listener.limits
        return min(
            max(self._last_input, self._last_reply) + limits.idle_timeout,
            self._last_reply + limits.command_timeout,
        )

    def _arm(self) -> None:
        """A reply went out: both clocks restart."""
        if self.session is None or self.lost:
            return
        self._last_reply = self._last_input = self._loop.time()
        deadline = self._deadline()
        if self._timer is not None and self._timer.when() > deadline:
            self._cancel_timer()
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.lost or self.transport is None:
            return
        deadline = self._deadline()
        if self._loop.time() < deadline:
            # Input moved the deadline on since the timer was set: sleep until then.
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self.listener.log.rejected(self.client, "TIMEOUT", reply.TIMEOUT)
        self.transport.write(_wire(reply.TIMEOUT))
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def shutdown(self) -> None:
        """Server stop: say 421 and close (sessions waiting for the queue finish first)."""
        session = self.session
        if self.lost or self.transport is None:
            return
        if session is not None and session.waiting:
            return
        self._cancel_timer()
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
        self.transport.write(_wire(reply.SHUTTING_DOWN))
        self.transport.close()
