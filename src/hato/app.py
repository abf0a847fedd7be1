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
from collections.abc import Callable
from typing import TextIO

from hato.config import Listener, Settings
from hato.delivery.base import Courier
from hato.delivery.hold import HoldCourier
from hato.delivery.router import RouteKind, Router
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.maillog import MailLog
from hato.queue.base import Queue, open_queue
from hato.queue.retry import RetrySchedule
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.protocol import SessionConfig
from hato.smtp.server import SMTPListener, start_listener
from hato.smtp.tls import TLSContextProvider
from hato.worker import Worker


def build_queue(settings: Settings) -> Queue:
    return open_queue(settings.effective_queue_url, fsync=settings.fsync)


def build_log(settings: Settings, stream: TextIO | None = None) -> MailLog:
    return MailLog(stream, json=settings.log_format == "json")


def build_couriers(settings: Settings) -> dict[RouteKind, Courier]:
    couriers: dict[RouteKind, Courier] = {RouteKind.HOLD: HoldCourier()}
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
    return couriers


def build_worker(settings: Settings, queue: Queue, log: MailLog) -> Worker:
    return Worker(
        queue,
        build_couriers(settings),
        Router(settings.domains, settings.effective_route),
        RetrySchedule(
            min_delay=settings.retry_min_delay,
            max_delay=settings.retry_max_delay,
            max_lifetime=settings.max_queue_lifetime,
        ),
        log,
        hostname=settings.hostname,
        concurrency=settings.worker_concurrency,
        batch_size=max(16, settings.worker_concurrency),
        lease_seconds=settings.lease_seconds,
        idle_wait=min(5.0, settings.retry_min_delay),
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


def build_policy(settings: Settings, role: ListenerRole) -> Policy:
    return Policy(
        role=role,
        mynetworks=parse_networks(settings.effective_mynetworks),
        domains=settings.domains,
        allowed_sender_domains=settings.allowed_sender_domains,
        allow_empty_sender_domains=settings.allow_empty_sender_domains,
    )


def build_tls(settings: Settings) -> TLSContextProvider | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return TLSContextProvider(settings.tls_cert_file, settings.tls_key_file)


def _say(line: str) -> None:
    print(f"hato: {line}", file=sys.stderr, flush=True)


async def serve(settings: Settings, *, ready: Callable[[list[tuple[Listener, int]]], None] | None = None) -> None:
    """Run ``hato serve`` until SIGTERM or SIGINT."""
    log = build_log(settings)
    queue = build_queue(settings)
    await queue.open()
    report = await queue.recover()
    if report.leases_expired:
        _say(f"recovered {report.leases_expired} message(s) whose delivery was interrupted")
    for message_id in report.quarantined:
        log.queue_event(message_id, "quarantined", detail="unreadable record kept aside")
    tls = build_tls(settings)
    worker = build_worker(settings, queue, log)
    servers: list[SMTPListener] = []
    bound: list[tuple[Listener, int]] = []
    try:
        for listener in settings.listeners:
            role = ListenerRole(listener.role)
            server = await start_listener(
                ListenerConfig(host=listener.host, port=listener.port, role=role),
                queue=queue,
                policy=build_policy(settings, role),
                authenticator=None,
                tls=tls,
                log=log,
                limits=build_session_config(settings),
            )
            servers.append(server)
            port = server.port
            bound.append((listener, port))
            host = f"[{listener.host}]" if ":" in listener.host else listener.host
            _say(f"listener {listener.role} on {host}:{port}")
        route = settings.effective_route
        if route == "hold":
            _say("route: hold — mail is kept in the queue and nothing leaves this machine "
                 "(hato queue list; set RELAYHOST to relay)")
        else:
            _say(f"route: {settings.role}")
        _say(f"queue: {settings.effective_queue_url}")
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
