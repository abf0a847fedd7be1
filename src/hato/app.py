"""The composition root: builds the queue, couriers, router, listeners and worker from Settings.

Nothing else in Hato constructs these pieces; everything else receives them. ``serve``
runs them until SIGTERM/SIGINT and then stops in order: listeners first (no new mail),
then the worker (in-flight deliveries finish or are released), then the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from hato.aliases import load_aliases
from hato.config import Listener, Settings
from hato.delivery.base import Courier
from hato.delivery.hold import HoldCourier
from hato.delivery.maildir import MaildirCourier
from hato.delivery.mx import MXCourier, MXTLSPolicy
from hato.delivery.router import RouteKind, Router
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.dkim import DKIMSigner, from_addresses, load_signers
from hato.dns import Resolver
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue import open_queue, redact_url
from hato.queue.base import Queue
from hato.queue.retry import RetrySchedule
from hato.smtp.auth import AuthThrottle
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.protocol import SessionConfig
from hato.smtp.server import MessageTransform, SMTPListener, start_listener
from hato.smtp.tls import TLSContextProvider
from hato.users import UserAuthenticator, UserStore
from hato.worker import Worker


def build_queue(settings: Settings) -> Queue:
    return open_queue(settings.effective_queue_url, fsync=settings.fsync)


def build_log(settings: Settings, stream: TextIO | None = None) -> MailLog:
    return MailLog(stream, json=settings.log_format == "json")


def build_users(settings: Settings) -> UserStore:
    """The SASL user store (``hato user``); re-read when its file changes."""
    return UserStore(settings.effective_users_file).load()


def build_maildir(settings: Settings, queue: Queue, users: UserStore) -> MaildirCourier:
    """Local delivery for our own domains; external alias targets are queued again."""

    def user_exists(local: str, domain: str) -> bool:
        users.refresh()
        return users.get(f"{local}@{domain}") is not None

    async def forward(sender: str, recipients: Sequence[str], data: bytes, key: str) -> str:
        return await queue.enqueue(Envelope(sender, list(recipients)), data, idempotency_key=key)

    return MaildirCourier(
        settings.effective_maildir_root,
        load_aliases(settings.effective_aliases_file),
        settings.domains,
        settings.recipient_delimiter,
        user_exists=user_exists,
        forward=forward,
        hostname=settings.hostname,
        fsync=settings.fsync,
    )


def build_dkim_transform(settings: Settings, users: UserStore) -> MessageTransform | None:
    """DKIM-sign submitted mail once, before it is queued. Loading the keys here makes a
    missing or unreadable key a start-up error, never silently unsigned mail."""
    signer: DKIMSigner = load_signers(settings.effective_dkim_dir)
    if not signer:
        return None
    check = settings.sender_login_check

    async def sign(data: bytes, user: str) -> bytes:
        if user and check and not all(users.sender_allowed(user, a) for a in from_addresses(data)):
            return data  # a From the user does not own is not vouched for with our key
        return await asyncio.to_thread(signer.sign, data)

    return sign


def build_couriers(settings: Settings, local: Courier | None = None) -> dict[RouteKind, Courier]:
    couriers: dict[RouteKind, Courier] = {RouteKind.HOLD: HoldCourier()}
    if local is not None:
        couriers[RouteKind.LOCAL] = local
    address = settings.relay_address
    if address is not None:
        host, port = address
        couriers[RouteKind.RELAY] = SmarthostCourier(
            SmarthostConfig(
                host=host,
                port=port,
                tls=settings.effective_relay_tls,
                verify=settings.relay_tls_verify,
                ca_file=str(settings.relay_tls_ca_file) if settings.relay_tls_ca_file else None,
                username=settings.effective_relay_username,
                password=settings.effective_relay_password,
                helo_name=settings.hostname,
                timeout=settings.relay_timeout,
                pool_size=settings.relay_pool_size,
            )
        )
    if settings.effective_route == "mx":
        couriers[RouteKind.MX] = MXCourier(
            Resolver(settings.dns_servers),
            helo_name=settings.hostname,
            port=settings.outbound_port,
            allow_private=settings.allow_private_mx,
            tls_policy=MXTLSPolicy.parse(settings.mx_tls, settings.mx_tls_policy),
            concurrency=settings.mx_concurrency,
        )
    return couriers


def build_retry(settings: Settings) -> RetrySchedule:
    return RetrySchedule(
        min_delay=settings.retry_min_delay,
        max_delay=settings.retry_max_delay,
        max_lifetime=settings.max_queue_lifetime,
    )


def build_worker(
    settings: Settings,
    queue: Queue,
    log: MailLog,
    local: Courier | None = None,
    *,
    couriers: dict[RouteKind, Courier] | None = None,
    router: Router | None = None,
    bounces: bool = True,
) -> Worker:
    """The delivery worker of ``hato serve`` (or, with ``couriers``/``router``, of
    ``hato worker``)."""
    return Worker(
        queue,
        couriers if couriers is not None else build_couriers(settings, local),
        router if router is not None else Router(settings.domains, settings.effective_route),
        build_retry(settings),
        log,
        hostname=settings.hostname,
        concurrency=settings.worker_concurrency,
        batch_size=max(16, settings.worker_concurrency),
        lease_seconds=settings.lease_seconds,
        idle_wait=min(5.0, settings.retry_min_delay),
        bounces=bounces,
    )


def build_session_config(settings: Settings) -> SessionConfig:
    return SessionConfig(
        hostname=settings.hostname,
        max_message_size=settings.message_size_limit,
        max_recipients=settings.max_recipients,
        max_received_headers=settings.max_received_headers,
        idle_timeout=settings.idle_timeout,
        command_timeout=settings.command_timeout,
        max_connections=settings.max_connections,
        max_connections_per_client=settings.max_connections_per_client,
    )


def build_policy(
    settings: Settings,
    role: ListenerRole,
    users: UserStore | None = None,
    local: MaildirCourier | None = None,
) -> Policy:
    return Policy(
        role=role,
        mynetworks=parse_networks(settings.effective_mynetworks),
        domains=settings.domains,
        allowed_sender_domains=settings.allowed_sender_domains,
        allow_empty_sender_domains=settings.allow_empty_sender_domains,
        sender_allowed=(
            users.sender_allowed if users is not None and settings.sender_login_check else None
        ),
        local_recipient_exists=local.local_recipient_exists if local is not None else None,
    )


def build_tls(settings: Settings) -> TLSContextProvider | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return TLSContextProvider(
        settings.tls_cert_file, settings.tls_key_file, check_interval=2.0, notify=_say
    )


def _say(line: str) -> None:
    print(f"hato: {line}", file=sys.stderr, flush=True)


async def serve(
    settings: Settings, *, ready: Callable[[list[tuple[Listener, int]]], None] | None = None
) -> None:
    """Run ``hato serve`` until SIGTERM or SIGINT."""
    log = build_log(settings)
    # Everything that can refuse the settings comes first, before the queue is touched.
    tls = build_tls(settings)
    users = build_users(settings)
    submitted = build_dkim_transform(settings, users)
    authenticator = UserAuthenticator(users)
    throttle = AuthThrottle(settings.auth_failure_limit, settings.auth_failure_window)
    queue = build_queue(settings)
    await queue.open()
    try:
        report = await queue.recover()
        local = build_maildir(settings, queue, users) if settings.domains else None
        worker = build_worker(settings, queue, log, local)
    except BaseException:
        await queue.close()
        raise
    if report.integrity:  # what the check after an unclean stop found
        _say(f"queue: {report.integrity}")
        log.event("qmgr", "", status="checked", detail=report.integrity)
    if report.leases_expired:
        _say(f"recovered {report.leases_expired} message(s) whose delivery was interrupted")
    for message_id in report.quarantined:
        log.queue_event(message_id, "quarantined", detail="unreadable record kept aside")
    servers: list[SMTPListener] = []
    bound: list[tuple[Listener, int]] = []
    try:
        for listener in settings.listeners:
            role = ListenerRole(listener.role)
            server = await start_listener(
                ListenerConfig(host=listener.host, port=listener.port, role=role),
                queue=queue,
                policy=build_policy(settings, role, users, local),
                authenticator=authenticator,
                tls=tls,
                log=log,
                limits=build_session_config(settings),
                auth_throttle=throttle,
                submitted=submitted,
            )
            servers.append(server)
            port = server.port
            bound.append((listener, port))
            host = f"[{listener.host}]" if ":" in listener.host else listener.host
            _say(f"listener {listener.role} on {host}:{port}")
        route = settings.effective_route
        if route == "hold":
            _say(
                "route: hold — mail is kept in the queue and nothing leaves this machine "
                "(hato queue list; set RELAYHOST to relay)"
            )
        else:
            _say(f"route: {settings.role}")
        _say(f"queue: {redact_url(settings.effective_queue_url)}")
        worker_task = asyncio.create_task(worker.run(), name="hato-worker")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if tls is not None:
            loop.add_signal_handler(signal.SIGHUP, tls.reload)
        if ready is not None:
            ready(bound)
        _say("ready")
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stop_wait, worker_task}, return_when=asyncio.FIRST_COMPLETED)
        if worker_task in done:
            worker_task.result()  # the worker never returns on its own: surface why
        _say("stopping")
        for server in servers:
            server.close()
        worker.stop()
        await worker_task
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await server.aclose(timeout=5)
        for courier in worker.couriers.values():
            with contextlib.suppress(Exception):
                await courier.close()
        await queue.close()


# --- hato worker: the application's outbox worker ------------------------------------


def smtp_courier(settings: Settings) -> SmarthostCourier:
    """The courier to ``HATO_SMTP_HOST``: one pooled connection per concurrent delivery."""
    return SmarthostCourier(
        SmarthostConfig(
            host=settings.smtp_host,
            port=settings.smtp_port,
            tls=settings.effective_smtp_tls,
            verify=settings.smtp_tls_verify,
            ca_file=str(settings.smtp_tls_ca_file) if settings.smtp_tls_ca_file else None,
            username=settings.smtp_username,
            password=settings.effective_smtp_password,
            helo_name=settings.hostname,
            timeout=settings.relay_timeout,
            pool_size=max(settings.relay_pool_size, settings.worker_concurrency),
        )
    )


def build_outbox_worker(
    settings: Settings, queue: Queue, log: MailLog, *, bounces: bool = False
) -> Worker:
    """The worker of ``hato worker``: every recipient goes to ``HATO_SMTP_HOST``."""
    return build_worker(
        settings,
        queue,
        log,
        couriers={RouteKind.RELAY: smtp_courier(settings)},
        router=Router((), RouteKind.RELAY),
        bounces=bounces,
    )


async def work(
    settings: Settings,
    *,
    bounces: bool = False,
    stop: asyncio.Event | None = None,
    ready: Callable[[Worker], None] | None = None,
    say: Callable[[str], None] = _say,
) -> None:
    """Run ``hato worker`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    settings.validate_for_worker()
    url = settings.effective_queue_url
    log = MailLog(json=settings.log_format == "json")
    q = open_queue(url, fsync=settings.fsync)
    await q.open()
    worker = build_outbox_worker(settings, q, log, bounces=bounces)
    try:
        report = await q.recover()
        if report.integrity:  # what the check after an unclean stop found
            say(f"queue: {report.integrity}")
            log.event("qmgr", "", status="checked", detail=report.integrity)
        if report.leases_expired:
            say(f"recovered {report.leases_expired} message(s) whose delivery was interrupted")
        for message_id in report.quarantined:
            log.queue_event(message_id, "quarantined", detail="unreadable record kept aside")
        tls = settings.effective_smtp_tls
        verify = "verify" if settings.smtp_tls_verify else "no verify"
        auth = f", AUTH as {settings.smtp_username}" if settings.smtp_username else ""
        say(f"worker {worker.owner}")
        say(f"queue: {redact_url(url)}")
        say(f"delivering to {settings.smtp_host}:{settings.smtp_port} (tls {tls}, {verify}{auth})")
        say(
            f"concurrency {worker.concurrency}, lease {settings.lease_seconds:g}s, "
            f"bounces {'on' if bounces else 'off'}"
        )
        stopping = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if stop is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping.set)
                handled.append(sig)
        task = asyncio.create_task(worker.run(), name="hato-worker")
        if ready is not None:
            ready(worker)
        say("ready")
        waiter = asyncio.create_task(stopping.wait())
        try:
            done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # the loop never returns on its own: surface why
            say("stopping: no more claims; finishing deliveries in flight")
            worker.stop()
            await task
        finally:
            waiter.cancel()
            for sig in handled:
                loop.remove_signal_handler(sig)
        say("stopped")
    finally:
        for courier in worker.couriers.values():
            try:
                await courier.close()
            except Exception as exc:  # closing idle connections must not mask the exit
                say(f"closing {courier.name}: {type(exc).__name__}: {exc}")
        await q.close()
