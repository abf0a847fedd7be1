"""The composition root: builds the queue, couriers, router, listeners and worker from Settings.

Nothing else in Hato constructs these pieces; everything else receives them.

``hato serve`` (:func:`serve`) and ``hato worker`` (:func:`work`) share one start/stop
skeleton, :class:`_Service`. Everything that can refuse the settings is read first,
before the queue is touched: certificates, the users file, DKIM keys, the smarthost's
secret files. Then the queue is opened and recovered (leases of an interrupted run are
reported), the role says what it is (serve binds its listeners), the worker runs until
SIGTERM or SIGINT (handlers installed for the run and removed after it), and the stop is
ordered: listeners first (no new mail), then the worker (in-flight deliveries finish or
are released), then the couriers' idle connections, then the queue.

The users file is loaded once here and shared: AUTH, sender ownership, DKIM's sender
check, the RCPT check and the Maildir courier (the last two through one
:class:`~hato.aliases.LocalRecipients`) read the same snapshot, which a
:class:`~hato.users.UserWatcher` keeps current off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

from hato.aliases import LocalRecipients, load_aliases
from hato.committer import CommitterClient, CommitterServer
from hato.config import Listener, Settings, Smarthost, parse_relayhost
from hato.delivery.base import Courier
from hato.delivery.bounce import BounceCourier
from hato.delivery.dane import DANEResolver
from hato.delivery.hold import HoldCourier
from hato.delivery.maildir import MaildirCourier
from hato.delivery.mta_sts import MTASTS
from hato.delivery.mx import MXCourier, MXTLSPolicy
from hato.delivery.router import RouteKind, Router
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.dkim import DKIMKeys, DKIMSigner, from_addresses, load_signers
from hato.dns import Resolver
from hato.errors import ConfigError, HatoError
from hato.events import DeliveryEvent
from hato.maillog import MailLog
from hato.message import Envelope
from hato.observe import NO_OBSERVER, Observer
from hato.queue import open_queue, redact_url
from hato.queue.base import MessageState, Queue, RecoveryReport
from hato.queue.retry import RetrySchedule
from hato.records import activate_published
from hato.smtp.auth import AuthThrottle
from hato.smtp.auth_share import AuthShare
from hato.smtp.flow import FlowGate
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.protocol import SessionConfig
from hato.smtp.server import FreeSpace, MessageTransform, SMTPListener, start_listener
from hato.smtp.shared import SharedCounts
from hato.smtp.tls import TLSContextProvider
from hato.stages import StageTrace
from hato.tlsrpt import (
    ReportConfig,
    SendOutcome,
    TLSReportStore,
    import_reports,
    maildir_files,
    seconds_until_next_run,
    send_reports,
)
from hato.tlsrpt_types import TLSReporter
from hato.users import UserAuthenticator, UserStore, UserWatcher
from hato.verp import Verp, load_secret
from hato.web.context import Role, WebContext
from hato.web.metrics import Metrics
from hato.web.process_metrics import IntakeReporter, IntakeSockets, IntakeView, ListenerState
from hato.web.security import Access
from hato.web.server import HttpServer, HttpSettings, build_asgi
from hato.worker import Worker

Say = Callable[[str], None]
ServeRole = Literal["all", "intake", "delivery"]
# The delivery process's longest idle wait when intake runs in other processes.
DELIVERY_POLL = 0.05
# What flow control counts as not yet delivered.
UNSENT_STATES = (MessageState.QUEUED, MessageState.SENDING, MessageState.DEFERRED)

# How often the users file and the TLS certificates are looked at for changes.
FILE_CHECK_INTERVAL = 2.0


# glibc's mallopt() parameter, from <malloc.h>.
_M_MMAP_THRESHOLD = -3
_LARGE_BLOCK = 1024 * 1024


def give_large_blocks_back() -> None:
    """Have the C allocator serve blocks of 1 MiB and more from mappings of their own,
    which go back to the system when freed.

    glibc raises this threshold each time it frees such a block (up to 32 MiB), after which
    the buffers of a 10 MiB message come from the heap, and the heap keeps them: after 20
    messages of 10 MiB the process stayed about 100 MiB larger. Setting the threshold once
    keeps it where it is; messages of ordinary size never come near it. Allocators
    without ``mallopt`` (or without this parameter) are left as they are.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK)


def build_queue(settings: Settings) -> Queue:
    return open_queue(settings.effective_queue_url, fsync=settings.fsync)


def build_log(settings: Settings, stream: TextIO | None = None) -> MailLog:
    return MailLog(stream, json=settings.log_format == "json")


def build_users(settings: Settings) -> UserStore:
    """The SASL user store (``hato user``), loaded now; see :class:`UserWatcher`."""
    return UserStore(settings.effective_users_file).load()


def build_local_recipients(settings: Settings, users: UserStore) -> LocalRecipients | None:
    """Who exists in our own domains (users, aliases); ``None`` without own domains."""
    if not settings.domains:
        return None
    return LocalRecipients(
        settings.domains,
        load_aliases(settings.effective_aliases_file),
        settings.recipient_delimiter,
        user_exists=users.has,
    )


def build_maildir(
    settings: Settings, queue: Queue, recipients: LocalRecipients, users: UserStore
) -> MaildirCourier:
    """Local delivery for our own domains; external alias targets are queued again."""

    async def forward(sender: str, recipients: Sequence[str], data: bytes, key: str) -> str:
        return await queue.enqueue(Envelope(sender, list(recipients)), data, idempotency_key=key)

    async def refresh() -> bool:
        return await asyncio.to_thread(users.refresh)

    return MaildirCourier(
        settings.effective_maildir_root,
        recipients,
        forward=forward,
        refresh=refresh,
        hostname=settings.hostname,
        fsync=settings.fsync,
    )


def build_verp(settings: Settings) -> Verp | None:
    """VERP return paths for mail from our own domains (``HATO_VERP``); ``None`` when
    off or without own domains (bounces could not come back here). Reads or makes the
    secret now, so a bad one is a start-up error."""
    if not settings.verp or not settings.domains:
        return None
    if settings.verp_secret is not None:
        secret = settings.verp_secret.get_secret_value().encode()
    else:
        path = settings.data_dir / "verp.key"
        try:
            secret = load_secret(path)
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"cannot read or make the VERP key {path}: {exc}") from None
    try:
        return Verp(secret, settings.domains)
    except ValueError as exc:
        raise ConfigError(f"HATO_VERP_SECRET: {exc}") from None


def build_bounce_courier(
    settings: Settings, queue: Queue, local: Courier, verp: Verp | None, log: MailLog
) -> BounceCourier:
    """The local route's front: bounces for mail this node sent become events
    (:mod:`hato.delivery.bounce`); everything else goes on to ``local``."""
    return BounceCourier(
        local, queue, hostname=settings.hostname, verp=verp, keep=settings.bounce_keep, log=log
    )


def build_dkim_transform(
    settings: Settings, users: UserStore, keys: DKIMKeys | None = None
) -> MessageTransform | None:
    """DKIM-sign submitted mail once, before it is queued. Loading the keys here makes a
    missing or unreadable key a start-up error, never silently unsigned mail. ``keys``
    (kept current by :func:`build_dkim_rotation_task`) signs with its active keys."""
    current = keys if keys is not None else DKIMKeys(settings.effective_dkim_dir)
    if not current.keys:
        return None
    check = settings.sender_login_check

    async def sign(data: bytes, user: str) -> bytes:
        if user and check and not all(users.sender_allowed(user, a) for a in from_addresses(data)):
            return data  # a From the user does not own is not vouched for with our key
        signer: DKIMSigner = current.signer
        return await asyncio.to_thread(signer.sign, data)

    return sign


DKIM_DNS_CHECK_INTERVAL = 3600.0  # how often pending DKIM keys are looked for in DNS


def build_dkim_rotation_task(
    settings: Settings, keys: DKIMKeys, log: MailLog, say: Say, *, activate: bool = True
) -> Callable[[], Coroutine[Any, Any, None]]:
    """``hato serve``'s side of ``hato dkim rotate``: at start and hourly, a pending key
    that DNS publishes becomes active; changed key states (here or by ``hato dns
    check``) are loaded within seconds. Without ``activate`` (an intake process of
    several: the delivery process activates) it only loads the changes."""

    async def watch() -> None:
        next_dns = 0.0 if activate else float("inf")
        while True:
            if time.monotonic() >= next_dns:
                next_dns = time.monotonic() + DKIM_DNS_CHECK_INTERVAL
                for domain in keys.pending_domains():
                    try:
                        # Made here, not at start: only a rotation needs DNS.
                        resolver = Resolver(settings.dns_servers, cache=False)
                        changes = await activate_published(
                            resolver, keys.directory, domain, now=time.time()
                        )
                    except HatoError as exc:
                        say(f"dkim: checking {domain}'s pending key in DNS: {exc}")
                        continue
                    for change in changes:
                        say(f"dkim: {change}")
                        log.event("dkim", "", status="rotated", detail=change)
            try:
                if await asyncio.to_thread(keys.refresh):
                    active = ", ".join(f"{k.domain}/{k.selector}" for k in keys.signer.keys)
                    say(f"dkim: keys reloaded; signing with {active or 'none'}")
            except HatoError as exc:  # keep signing with the keys loaded before
                say(f"dkim: keys not reloaded: {exc}")
            await asyncio.sleep(FILE_CHECK_INTERVAL)

    return watch


def build_smarthost(smarthost: Smarthost, hostname: str) -> SmarthostCourier:
    """The courier to a smarthost, either role's: one pool of reused connections.
    Reads the smarthost's secret files now, unless they were resolved already."""
    resolved = smarthost.resolve()
    return SmarthostCourier(
        SmarthostConfig(
            host=resolved.host,
            port=resolved.port,
            tls=resolved.tls,
            verify=resolved.verify,
            ca_file=str(resolved.ca_file) if resolved.ca_file else None,
            username=resolved.username,
            password=resolved.password.get_secret_value() if resolved.password else None,
            helo_name=hostname,
            timeout=resolved.timeout,
            pool_size=resolved.pool_size,
            requiretls=resolved.requiretls,
            pipelining=resolved.pipelining,
        )
    )


def build_release_courier(settings: Settings) -> Callable[[str | None], Courier | None]:
    """What a console or API release of a held message sends it through: a one-off
    smarthost at ``"host:port"`` (STARTTLS when offered, like ``RELAYHOST``'s default),
    or, given ``None``, the configured relay (``None`` without one). Raises ConfigError
    for a relay that does not parse."""

    def courier(relay: str | None) -> Courier | None:
        if relay is None:
            configured = settings.relay
            return build_smarthost(configured, settings.hostname) if configured else None
        host, port = parse_relayhost(relay)
        return SmarthostCourier(
            SmarthostConfig(host=host, port=port, tls="may", helo_name=settings.hostname)
        )

    return courier


def build_couriers(
    settings: Settings, local: Courier | None = None, tls_reporter: TLSReporter | None = None
) -> dict[RouteKind, Courier]:
    """The couriers of ``hato serve``'s routes (reads the relay's secret files).
    ``tls_reporter`` receives the MX courier's per-attempt TLS results (TLS-RPT)."""
    couriers: dict[RouteKind, Courier] = {RouteKind.HOLD: HoldCourier()}
    if local is not None:
        couriers[RouteKind.LOCAL] = local
    relay = settings.relay
    if relay is not None:
        couriers[RouteKind.RELAY] = build_smarthost(relay, settings.hostname)
    if settings.effective_route == "mx":
        resolver = Resolver(settings.dns_servers)
        ca_file = str(settings.mx_tls_ca_file) if settings.mx_tls_ca_file else None
        try:
            mta_sts = MTASTS(
                resolver,
                cache_dir=settings.data_dir / "mta-sts",
                port=settings.mta_sts_port,
                ca_file=ca_file,
                allow_private=settings.allow_private_mx,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"HATO_MX_TLS_CA_FILE {ca_file!r}: {exc}") from exc
        couriers[RouteKind.MX] = MXCourier(
            resolver,
            helo_name=settings.hostname,
            port=settings.outbound_port,
            allow_private=settings.allow_private_mx,
            tls_policy=MXTLSPolicy.parse(settings.mx_tls, settings.mx_tls_policy),
            ca_file=ca_file,
            mta_sts=mta_sts,
            dane=DANEResolver(settings.dnssec_resolver) if settings.dnssec_resolver else None,
            tls_reporter=tls_reporter,
            concurrency=settings.mx_concurrency,
            pipelining=settings.relay_pipelining,
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
    envid_from_id: bool = False,
    verp: Verp | None = None,
    observer: Observer = NO_OBSERVER,
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
        delay_warning=settings.delay_warning,
        envid_from_id=envid_from_id,
        return_path=verp.return_path if verp is not None else None,
        # Only a queue several nodes share has one (PostgresQueue.take_over_dead).
        take_over=getattr(queue, "take_over_dead", None),
        take_over_every=settings.node_liveness_interval,
        observer=observer,
    )


def build_event_companions(
    settings: Settings, queue: Queue, *, pull_from: str | None, upstream: Smarthost | None
) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """What runs beside the worker for delivery events: the webhook sender
    (``HATO_WEBHOOK_URL``) and the puller of an upstream's events (``pull_from``, with
    the credentials of ``upstream``, resolved)."""
    from hato.config import settings_webhook_secrets

    companions: list[Callable[[], Coroutine[Any, Any, None]]] = []
    if settings.webhook_url:
        from hato.webhooks import WebhookSender

        secrets = settings_webhook_secrets(settings)
        if not secrets:
            raise ConfigError("HATO_WEBHOOK_URL needs HATO_WEBHOOK_SECRET (or _FILE)")
        companions.append(WebhookSender(queue, settings.webhook_url, secrets).run)
    if pull_from:
        from hato.event_pull import EventPuller

        username = upstream.username if upstream is not None else None
        password = upstream.password if upstream is not None else None
        companions.append(
            EventPuller(
                queue,
                pull_from,
                node=settings.hostname,
                username=username,
                password=password.get_secret_value() if password is not None else None,
                interval=settings.events_poll_interval,
            ).run
        )
    return companions


def queue_directory(settings: Settings) -> Path | None:
    """The directory SQLite writes the database and its WAL to (as open_queue reads
    it); ``None`` for the other backends."""
    queue_url = settings.effective_queue_url
    if queue_url.split(":", 1)[0].lower() != "sqlite":
        return None
    return Path(os.path.expanduser(queue_url.removeprefix("sqlite://"))).parent


def queue_min_free(settings: Settings) -> int:
    """HATO_QUEUE_MINFREE, or what Postfix advises: 1.5 × the message size limit (with no
    size limit, as much as for the default limit)."""
    if settings.queue_minfree is not None:
        return settings.queue_minfree
    return (settings.message_size_limit or 10 * 1024 * 1024) * 3 // 2


def build_session_config(settings: Settings) -> SessionConfig:
    directory = queue_directory(settings)
    free_space = FreeSpace(directory) if directory is not None else None
    min_free = queue_min_free(settings)
    reserve = settings.trusted_connection_reserve
    if reserve is None:
        reserve = settings.max_connections // 10
    return SessionConfig(
        hostname=settings.hostname,
        max_message_size=settings.message_size_limit,
        max_recipients=settings.max_recipients,
        max_received_headers=settings.max_received_headers,
        max_junk_commands=settings.junk_command_limit,
        queue_free_space=free_space,
        queue_min_free=min_free,
        idle_timeout=settings.idle_timeout,
        command_timeout=settings.command_timeout,
        greet_delay=settings.greet_delay,
        max_connections=settings.max_connections,
        max_connections_per_client=settings.max_connections_per_client,
        trusted_connection_reserve=reserve,
    )


def build_policy(
    settings: Settings,
    role: ListenerRole,
    users: UserStore | None = None,
    recipients: LocalRecipients | None = None,
    watcher: UserWatcher | None = None,
    verp: Verp | None = None,
) -> Policy:
    """One listener's policy. ``recipients`` is the RCPT check of our own domains and
    ``watcher`` what keeps the users behind it current; a VERP address signed by
    ``verp`` is accepted too (the bounces it brings back are this node's)."""
    exists: Callable[[str], bool] | None = recipients.exists if recipients is not None else None
    if exists is not None and verp is not None:
        exists = _or_signed(exists, verp)
    return Policy(
        role=role,
        mynetworks=parse_networks(settings.effective_mynetworks),
        domains=settings.domains,
        allowed_sender_domains=settings.allowed_sender_domains,
        allow_empty_sender_domains=settings.allow_empty_sender_domains,
        allow_plaintext_auth=settings.allow_plaintext_auth,
        sender_allowed=(
            users.sender_allowed if users is not None and settings.sender_login_check else None
        ),
        local_recipient_exists=exists,
        recipients_pending=(
            watcher.pending if recipients is not None and watcher is not None else None
        ),
        route=settings.effective_route,
        allow_private_mx=settings.allow_private_mx,
    )


def _or_signed(exists: Callable[[str], bool], verp: Verp) -> Callable[[str], bool]:
    def check(address: str) -> bool:
        return verp.is_signed(address) or exists(address)

    return check


def build_tls(settings: Settings) -> TLSContextProvider | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return TLSContextProvider(
        settings.tls_cert_file,
        settings.tls_key_file,
        check_interval=FILE_CHECK_INTERVAL,
        notify=_say,
    )


def build_http(
    settings: Settings,
    http: HttpSettings,
    ctx: WebContext,
    throttle: AuthThrottle | None = None,
) -> HttpServer:
    """The HTTP listener (console, API, health, metrics) over ``ctx``; not bound yet."""
    metrics = ctx.metrics
    access = Access(
        token=http.token,
        bound_host=http.host,
        hosts=http.hosts,
        tls=http.tls,
        throttle=throttle,
        log=ctx.log,
        on_failure=metrics.http_auth_failures.inc if metrics is not None else None,
    )
    return HttpServer(build_asgi(ctx, access), http)


def web_context(
    settings: Settings,
    role: Role,
    queue: Queue,
    log: MailLog,
    worker: Worker,
    metrics: Metrics | None,
    *,
    relay: tuple[str, int] | None,
    users: UserStore | None = None,
    servers: Sequence[SMTPListener] = (),
) -> WebContext:
    """What the HTTP routes of ``role`` see."""
    return WebContext(
        settings=settings,
        queue=queue,
        log=log,
        clock=time.time,
        role=role,
        node=settings.hostname,
        users=users,
        listeners=[(s.listener.role.value, s.host, s.port) for s in servers],
        serving=lambda: [(s.name, s.server is not None and s.server.is_serving()) for s in servers],
        active_connections=lambda: {s.name: len(s.connections) for s in servers},
        relay=relay,
        worker_health=lambda: str(worker.health),
        disk=queue_directory(settings),
        disk_min_free=queue_min_free(settings),
        metrics=metrics,
        release_courier=build_release_courier(settings),
    )


def intake_reporter(
    sock: socket.socket, metrics: Metrics, servers: Sequence[SMTPListener]
) -> IntakeReporter:
    """What an intake process tells the delivery process: its metrics and listeners."""

    def listeners() -> list[ListenerState]:
        return [
            ListenerState(
                s.listener.role.value,
                s.host,
                s.port,
                s.name,
                s.server is not None and s.server.is_serving(),
                len(s.connections),
            )
            for s in servers
        ]

    return IntakeReporter(sock, metrics.registry, listeners)


def watch_intake(ctx: WebContext, reports: IntakeSockets, log: MailLog) -> None:
    """Make the delivery process's routes show every intake process (its listeners,
    connections and counters), asked at scrape time."""
    view = IntakeView(reports.addresses(), warn=lambda text: log.event("http", "", warning=text))
    ctx.intake = view
    ctx.serving = view.serving
    ctx.active_connections = view.active_connections


# --- TLS-RPT (RFC 8460): the reports we send, the reports we receive --------------------


def build_tlsrpt_store(settings: Settings) -> TLSReportStore:
    """The TLS results and reports of ``DATA_DIR/tlsrpt.sqlite3``; the MX courier records
    into it (its ``record(result)`` is the :class:`~hato.tlsrpt.TLSReporter`)."""
    return TLSReportStore.in_data_dir(settings.data_dir, clock=time.time)


def build_report_config(settings: Settings) -> ReportConfig:
    return ReportConfig(
        organization=settings.tlsrpt_org or settings.hostname,
        contact=settings.effective_tlsrpt_contact,
        submitter=settings.hostname,
        sender=settings.tlsrpt_from or f"noreply-smtp-tls-reporting@{settings.hostname}",
    )


def tlsrpt_maildirs(settings: Settings) -> list[Path]:
    """The Maildirs our own rua addresses deliver to (those in HATO_DOMAINS)."""
    out: list[Path] = []
    for domain in settings.domains:
        for uri in settings.effective_tlsrpt_rua(domain):
            address = uri.removeprefix("mailto:")
            if uri.lower().startswith("https:") or "@" not in address:
                continue
            local, _, at = address.rpartition("@")
            if at.lower() not in {d.lower() for d in settings.domains}:
                continue
            if settings.recipient_delimiter:
                local = local.split(settings.recipient_delimiter, 1)[0]
            path = settings.effective_maildir_root / at.lower() / local.lower()
            if path not in out:
                out.append(path)
    return out


def import_tls_reports(settings: Settings, store: TLSReportStore) -> tuple[int, list[str]]:
    """Read new reports from our rua Maildirs into ``store``: (added, skipped files)."""
    files = [f for maildir in tlsrpt_maildirs(settings) for f in maildir_files(maildir)]
    outcome = import_reports(store, files)
    return outcome.added, outcome.skipped


async def send_tls_reports(
    settings: Settings,
    queue: Queue,
    store: TLSReportStore,
    *,
    day: datetime.date | None = None,
    force: bool = False,
    verify: ssl.SSLContext | bool = True,
) -> list[SendOutcome]:
    """Send the TLS-RPT reports that are due (or ``day``'s): mail through ``queue``,
    DKIM-signed with our keys when there are any, and HTTPS POSTs."""
    today = datetime.datetime.now(datetime.UTC).date()
    if day is None and not store.days_pending(today):
        return []  # the usual case: nothing due, no DNS, no keys read
    resolver = Resolver(settings.dns_servers)
    signer = load_signers(settings.effective_dkim_dir)

    async def sign(data: bytes) -> bytes:
        return await asyncio.to_thread(signer.sign, data)

    async def enqueue(envelope: Envelope, data: bytes, key: str) -> str:
        return await queue.enqueue(envelope, data, idempotency_key=key)

    return await send_reports(
        store,
        build_report_config(settings),
        txt=resolver.txt,
        enqueue=enqueue,
        sign=sign if signer else None,
        verify=verify,
        now=time.time(),
        day=day,
        force=force,
    )


TLSRPT_INTERVAL = 600.0  # how often received reports are read and due reports sent


def build_tlsrpt_task(
    settings: Settings, queue: Queue, store: TLSReportStore, log: MailLog, say: Say
) -> Callable[[], Coroutine[Any, Any, None]]:
    """``hato serve``'s TLS-RPT run, at start and every 10 minutes: read the reports
    received in our rua Maildirs, and send the reports due (each finished UTC day's, once
    per domain; so shortly after midnight, and days missed while stopped at start)."""

    async def daily() -> None:
        while True:
            try:
                added, _skipped = await asyncio.to_thread(import_tls_reports, settings, store)
                if added:
                    log.event("tlsrpt", "", status="received", detail=f"{added} report(s)")
                for outcome in await send_tls_reports(settings, queue, store):
                    log.event(
                        "tlsrpt",
                        "",
                        domain=outcome.domain,
                        day=outcome.day.isoformat(),
                        status=outcome.status,
                        detail=outcome.detail,
                    )
                await asyncio.to_thread(store.prune)
            except HatoError as exc:  # the next day tries again; delivery goes on
                say(f"tls reports: {exc}")
            await asyncio.sleep(min(TLSRPT_INTERVAL, seconds_until_next_run(time.time(), minute=1)))

    return daily


def unsent_counter(queue: Queue) -> Callable[[], Awaitable[int]]:
    """How many messages of ``queue`` are unsent (queued, sending, deferred)."""

    async def unsent() -> int:
        counts = await queue.counts()
        return sum(counts.get(state, 0) for state in UNSENT_STATES)

    return unsent


def build_flow(
    settings: Settings,
    queue: Queue,
    log: MailLog,
    *,
    unsent: Callable[[], Awaitable[int]] | None = None,
) -> FlowGate | None:
    """Intake's flow control (HATO_IN_FLOW_DELAY, HATO_QUEUE_HIGH_WATER), or None when off.
    ``unsent`` counts the backlog in place of asking ``queue`` (the committer's count, in
    an intake process that does not open the queue)."""
    if settings.in_flow_delay <= 0 or settings.queue_high_water <= 0:
        return None

    def changed(holding: bool, count: int) -> None:
        status = "slowing intake" if holding else "intake at full speed"
        log.event("smtpd", "", status=status, detail=f"{count} unsent messages")

    return FlowGate(
        unsent if unsent is not None else unsent_counter(queue),
        high_water=settings.queue_high_water,
        delay=settings.in_flow_delay,
        on_change=changed,
    )


def _say(line: str) -> None:
    print(f"hato: {line}", file=sys.stderr, flush=True)


def report_recovery(report: RecoveryReport, log: MailLog, say: Say) -> None:
    """Say and log what the queue's recovery at start-up found."""
    if report.integrity:  # what the check after an unclean stop found
        say(f"queue: {report.integrity}")
        log.event("qmgr", "", status="checked", detail=report.integrity)
    if report.leases_expired:
        say(f"recovered {report.leases_expired} message(s) whose delivery was interrupted")
    for message_id in report.quarantined:
        log.queue_event(message_id, "quarantined", detail="unreadable record kept aside")


async def recover_queue(settings: Settings, say: Say = _say) -> None:
    """Open the queue, run its start-up recovery (the integrity check after an unclean
    stop, the leases of dead owners given back), say what it found and close it again.

    The supervisor of several processes runs this once before it forks: a damaged or
    unreachable queue is then one line and a refusal to start, as with one process,
    instead of a delivery child failing again and again; and the delivery child's own
    recovery finds the queue closed cleanly. The queue's threads are joined on close."""
    queue = build_queue(settings)
    await queue.open()
    try:
        report = await queue.recover()
    finally:
        await queue.close()
    report_recovery(report, build_log(settings), say)


# --- the start/stop skeleton of both roles -----------------------------------------------


class _Service:
    """One run of a role around its worker.

    ``async with _Service(queue, worker, log, say)`` opens the queue and reports what its
    recovery found; :meth:`run` runs the worker until stopped; leaving the block closes
    the worker's couriers, then the queue, whatever happened in between.
    """

    def __init__(
        self,
        queue: Queue,
        worker: Worker,
        log: MailLog,
        say: Say,
        *,
        deliver: bool = True,
        open_queue: bool = True,
    ) -> None:
        self.queue = queue
        # False in an intake process whose mail the delivery process commits: it never
        # touches the queue.
        self.open_queue = open_queue
        self.worker = worker
        self.log = log
        self.say = say
        # False in an intake process of the supervisor: no worker runs, and recovery
        # (taking back the leases of dead owners) is the delivery process's.
        self.deliver = deliver

    async def __aenter__(self) -> _Service:
        if not self.open_queue:
            return self
        await self.queue.open()
        if not self.deliver:
            return self
        try:
            report = await self.queue.recover()
        except BaseException:
            await self.queue.close()
            raise
        report_recovery(report, self.log, self.say)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            for courier in self.worker.couriers.values():
                try:
                    await courier.close()
                except Exception as error:  # closing idle connections must not mask the exit
                    self.say(f"closing {courier.name}: {type(error).__name__}: {error}")
        finally:
            if self.open_queue:
                await self.queue.close()

    async def run(
        self,
        *,
        stop: asyncio.Event | None,
        stopping: str,
        ready: Callable[[], None] | None = None,
        signals: Mapping[signal.Signals, Callable[[], None]] | None = None,
        companions: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
        stop_intake: Callable[[], None] | None = None,
    ) -> None:
        """Run the worker, and ``companions`` beside it, until ``stop`` is set (without
        one: until SIGTERM or SIGINT); say ``ready`` once they run. On a stop: say
        ``stopping``, ``stop_intake()``, then let the worker drain. A worker or companion
        that ends on its own ends the run with its exception. Every signal handler
        installed here (``signals`` too) is removed before returning, and the one it
        replaced put back (``asyncio.Runner``'s own SIGINT handler, say)."""
        loop = asyncio.get_running_loop()
        stopped = stop if stop is not None else asyncio.Event()
        handlers = dict(signals or {})
        if stop is None:
            handlers[signal.SIGTERM] = handlers[signal.SIGINT] = stopped.set
        replaced = {sig: signal.getsignal(sig) for sig in handlers}
        installed: list[signal.Signals] = []
        worker_task = asyncio.create_task(
            self.worker.run() if self.deliver else stopped.wait(), name="hato-worker"
        )
        beside = [asyncio.create_task(start()) for start in companions]
        waiter = asyncio.create_task(stopped.wait())
        try:
            for sig, handler in handlers.items():
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            if ready is not None:
                ready()
            self.say("ready")
            running = {worker_task, *beside}
            done, _ = await asyncio.wait({waiter, *running}, return_when=asyncio.FIRST_COMPLETED)
            for task in running & done:
                task.result()  # they never end on their own: surface why
            self.say(stopping)
            if stop_intake is not None:
                stop_intake()
            self.worker.stop()
            await worker_task
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
                if replaced[sig] is not None:
                    signal.signal(sig, replaced[sig])
            waiter.cancel()
            for task in beside:
                task.cancel()
            if not worker_task.done():  # the run failed: still release what is in flight
                self.worker.stop()
                if not self.deliver:
                    worker_task.cancel()
            await asyncio.gather(waiter, worker_task, *beside, return_exceptions=True)


# --- hato serve: the SMTP server and its delivery worker -----------------------------------


def check_serve(settings: Settings) -> None:
    """Build, once, what can refuse the settings of ``hato serve`` (certificates, users,
    DKIM keys, the relay's secret files, the VERP secret, the HTTP listener's settings)
    and raise its :class:`~hato.errors.ConfigError`. The supervisor calls it before it
    forks, so that a refusal is one line and one exit status 2, not one per child; the
    VERP secret, when it has to be made, is then made once for every child."""
    build_tls(settings)
    users = build_users(settings)
    build_dkim_transform(settings, users, DKIMKeys(settings.effective_dkim_dir))
    build_couriers(settings)
    build_local_recipients(settings, users)
    build_verp(settings)
    HttpSettings.read(settings, "serve")


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[list[tuple[Listener, int]]], None] | None = None,
    say: Say = _say,
    role: ServeRole = "all",
    sockets: Sequence[socket.socket] = (),
    shared: SharedCounts | None = None,
    auth_share: AuthShare | None = None,
    reports: IntakeSockets | None = None,
    committer_socket: socket.socket | None = None,
    committer_address: str | None = None,
) -> None:
    """Run ``hato serve`` until SIGTERM or SIGINT (or ``stop`` is set).

    ``role`` is for the children of :mod:`hato.supervisor`: ``intake`` serves the
    listeners on ``sockets`` (bound by the supervisor, one per ``settings.listeners``
    entry) and runs no worker; ``delivery`` runs the worker and its companions and
    listens on nothing. ``all`` (one process) does both. ``shared``: the per-client
    connection counts of all intake processes; ``auth_share`` tells their AUTH
    throttles each other's failures; ``reports``: where each intake process answers the
    delivery process's questions for its metrics and listeners. With HATO_INTAKE_COMMIT ``delivery`` the delivery
    process serves the committer (:mod:`hato.committer`) on ``committer_socket``, and an
    intake process sends its mail to ``committer_address`` and never opens the queue."""
    intake = role != "delivery"
    deliver = role != "intake"
    give_large_blocks_back()  # a process-wide allocator setting, so it is set here
    log = build_log(settings)
    # Everything that can refuse the settings comes first, before the queue is touched.
    tls = build_tls(settings)
    users = build_users(settings)
    dkim_keys = DKIMKeys(settings.effective_dkim_dir)
    submitted = build_dkim_transform(settings, users, dkim_keys)
    tlsrpt = build_tlsrpt_store(settings)  # the MX courier's TLS reporter (RFC 8460)
    couriers = build_couriers(settings, tls_reporter=tlsrpt)
    recipients = build_local_recipients(settings, users)
    verp = build_verp(settings)
    watcher = UserWatcher(users, interval=FILE_CHECK_INTERVAL)
    authenticator = UserAuthenticator(users)
    throttle = AuthThrottle(
        settings.auth_failure_limit,
        settings.auth_failure_window,
        user_limit=settings.auth_user_failure_limit,
        user_window=settings.auth_user_failure_window,
    )
    if auth_share is not None and intake:
        auth_share.start(throttle)
    http = HttpSettings.read(settings, "serve")
    metrics = Metrics(role="serve") if http is not None else None
    observer: Observer = metrics if metrics is not None else NO_OBSERVER
    queue = build_queue(settings)
    if recipients is not None:
        maildir = build_maildir(settings, queue, recipients, users)
        couriers[RouteKind.LOCAL] = build_bounce_courier(settings, queue, maildir, verp, log)
    worker = build_worker(settings, queue, log, couriers=couriers, verp=verp, observer=observer)
    stages = StageTrace(settings.trace_stages) if settings.trace_stages is not None else None
    worker.stages = stages
    for courier in worker.couriers.values():
        if isinstance(courier, SmarthostCourier):
            courier.stages = stages
    if role == "delivery" and committer_socket is None:
        # Intake commits in other processes and cannot wake this one: look often.
        worker.idle_wait = min(worker.idle_wait, DELIVERY_POLL)
    client = (
        CommitterClient(committer_address)
        if role == "intake" and committer_address is not None
        else None
    )
    committer: CommitterServer | None = None
    if role == "delivery" and committer_socket is not None:

        async def commit(
            envelope: Envelope, data: bytes, events: Sequence[DeliveryEvent], held: bool
        ) -> str:
            # HATO_TRACE_STAGES: the intake's accepted events carry its time; the
            # message's line is written here, where it is delivered.
            accepted = min((e.time for e in events), default=time.time())
            if held:
                queue_id = await queue.enqueue(envelope, data, held=True, events=events)
            else:
                queue_id = await worker.enqueue_fresh(envelope, data, events)
            if stages is not None:
                stages.mark(queue_id, "accepted", accepted)
                stages.mark(queue_id, "committed")
            return queue_id

        committer = CommitterServer(committer_socket, commit=commit, unsent=unsent_counter(queue))
    flow = build_flow(settings, queue, log, unsent=client.unsent if client is not None else None)
    companions = [watcher.run]
    if settings.tlsrpt_send and deliver:
        companions.append(build_tlsrpt_task(settings, queue, tlsrpt, log, say))
    if dkim_keys.keys:  # intake processes sign: they load what the delivery one activates
        companions.append(build_dkim_rotation_task(settings, dkim_keys, log, say, activate=deliver))
    relay = settings.relay
    events_companions = build_event_companions(
        settings,
        queue,
        pull_from=settings.relay_events_url,
        upstream=relay.resolve() if relay is not None and settings.relay_events_url else None,
    )
    servers: list[SMTPListener] = []
    bound: list[tuple[Listener, int]] = []

    def stop_intake() -> None:
        for server in servers:
            server.close()
        if committer is not None:
            committer.close()

    async with _Service(
        queue, worker, log, say, deliver=deliver, open_queue=client is None
    ) as service:
        try:
            if committer is not None:
                await committer.start()
            for index, listener in enumerate(settings.listeners if intake else ()):
                listener_role = ListenerRole(listener.role)
                server = await start_listener(
                    ListenerConfig(host=listener.host, port=listener.port, role=listener_role),
                    queue=queue,
                    policy=build_policy(settings, listener_role, users, recipients, watcher, verp),
                    authenticator=authenticator,
                    tls=tls,
                    log=log,
                    limits=build_session_config(settings),
                    auth_throttle=throttle,
                    submitted=submitted,
                    flow=flow,
                    sock=sockets[index] if index < len(sockets) else None,
                    shared=shared,
                    observer=observer,
                    # Only where the worker runs: an intake process has none to hand to.
                    handoff=worker.enqueue_fresh if deliver else None,
                    commit=client.commit if client is not None else None,
                )
                # An intake process that sends its mail to the committer never writes a
                # message's line (its GC pauses still are): the committer marks them.
                server.stages = stages if committer_address is None else None
                servers.append(server)
                bound.append((listener, server.port))
                host = f"[{listener.host}]" if ":" in listener.host else listener.host
                if role != "intake":  # the supervisor said where it listens, once
                    say(f"listener {listener.role} on {host}:{server.port}")
            if role != "intake":  # said once, by the one process or the delivery process
                if settings.effective_route == "hold":
                    say(
                        "route: hold — mail is kept in the queue and nothing leaves this "
                        "machine (hato queue list; set RELAYHOST to relay)"
                    )
                else:
                    say(f"route: {settings.role}")
                say(f"queue: {redact_url(settings.effective_queue_url)}")
            if http is not None and deliver:  # one console and /metrics: the delivery process's
                relay = settings.relay
                ctx = web_context(
                    settings,
                    "serve",
                    queue,
                    log,
                    worker,
                    metrics,
                    relay=(relay.host, relay.port) if relay is not None else None,
                    users=users,
                    servers=servers,
                )
                if metrics is not None:
                    metrics.listeners_known([s.name for s in servers])
                if reports is not None:
                    watch_intake(ctx, reports, log)
                web = build_http(settings, http, ctx, throttle)
                web.bind()
                companions.append(web.run)
                say(f"http on {web.shown()}")
            if metrics is not None and reports is not None and reports.mine is not None:
                metrics.listeners_known([s.name for s in servers])
                companions.append(intake_reporter(reports.mine, metrics, servers).run)
            await service.run(
                stop=stop,
                stopping="stopping",
                ready=(lambda: ready(bound)) if ready is not None else None,
                signals={signal.SIGHUP: tls.reload} if tls is not None else None,
                companions=[*companions, *(events_companions if deliver else ())],
                stop_intake=stop_intake,
            )
        finally:
            for server in servers:
                with contextlib.suppress(Exception):
                    await server.aclose(timeout=5)
            if committer is not None:
                await committer.aclose()
            if client is not None:
                await client.close()
            tlsrpt.close()
            if stages is not None:
                stages.close()


# --- hato worker: the application's outbox worker ------------------------------------


def build_outbox_worker(
    settings: Settings,
    queue: Queue,
    log: MailLog,
    *,
    bounces: bool = False,
    smarthost: Smarthost | None = None,
    observer: Observer = NO_OBSERVER,
) -> Worker:
    """The worker of ``hato worker``: every recipient goes to ``HATO_SMTP_HOST``
    (``smarthost``, when given, is ``settings.smtp`` with its secrets resolved)."""
    return build_worker(
        settings,
        queue,
        log,
        couriers={RouteKind.RELAY: build_smarthost(smarthost or settings.smtp, settings.hostname)},
        router=Router((), RouteKind.RELAY),
        bounces=bounces,
        envid_from_id=True,
        observer=observer,
    )


async def work(
    settings: Settings,
    *,
    bounces: bool = False,
    stop: asyncio.Event | None = None,
    ready: Callable[[Worker], None] | None = None,
    say: Say = _say,
) -> None:
    """Run ``hato worker`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    settings.validate_for_worker()
    smarthost = settings.smtp.resolve()
    http = HttpSettings.read(settings, "worker")
    metrics = Metrics(role="worker") if http is not None else None
    log = build_log(settings)
    queue = build_queue(settings)
    worker = build_outbox_worker(
        settings,
        queue,
        log,
        bounces=bounces,
        smarthost=smarthost,
        observer=metrics if metrics is not None else NO_OBSERVER,
    )
    companions: list[Callable[[], Coroutine[Any, Any, None]]] = build_event_companions(
        settings, queue, pull_from=settings.smtp_events_url, upstream=smarthost
    )
    async with _Service(queue, worker, log, say) as service:
        say(f"worker {worker.owner}")
        say(f"queue: {redact_url(settings.effective_queue_url)}")
        say(f"delivering to {smarthost.host}:{smarthost.port} ({smarthost.describe()})")
        say(
            f"concurrency {worker.concurrency}, lease {settings.lease_seconds:g}s, "
            f"bounces {'on' if bounces else 'off'}"
        )
        if http is not None:
            ctx = web_context(
                settings,
                "worker",
                queue,
                log,
                worker,
                metrics,
                relay=(smarthost.host, smarthost.port),
            )
            web = build_http(settings, http, ctx)
            web.bind()
            companions.append(web.run)
            say(f"http on {web.shown()}")
        await service.run(
            stop=stop,
            stopping="stopping: no more claims; finishing deliveries in flight",
            ready=(lambda: ready(worker)) if ready is not None else None,
            companions=companions,
        )
        say("stopped")
