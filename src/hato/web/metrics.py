"""Prometheus metrics of one process, and ``GET /metrics``.

:class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` (nothing is
put into prometheus-client's global default registry) and is the
:class:`~hato.observe.Observer` that ``app.py`` hands to the SMTP listeners and the
worker: their calls only bump counters. The queue gauges are read at scrape time from
``Queue.counts()`` and ``Queue.oldest()``, at most once per :data:`QUEUE_CACHE` seconds.

Names (label values are bounded: states, listener names from ``HATO_LISTEN``, routes,
statuses):

* ``hato_queue_messages{state}``, ``hato_queue_oldest_age_seconds{state}``
* ``hato_smtp_connections_active{listener}``, ``hato_smtp_connections_total{listener}``
* ``hato_smtp_messages_total{listener,result}`` (accepted, rejected)
* ``hato_smtp_auth_failures_total{listener}``
* ``hato_deliveries_total{route,status}`` (sent, deferred, bounced, held)
* ``hato_delivery_seconds{route}``: queued → delivered, a histogram
* ``hato_last_delivery_timestamp_seconds``: when a recipient was last delivered
* ``hato_events_total{event}``: delivery events recorded (accepted, relayed, delivered,
  deferred, bounced, expired, held)
* ``hato_ready``: 1 when the checks of ``/readyz`` pass, else 0
* ``hato_http_auth_failures_total``: wrong tokens on the HTTP listener
* ``hato_build_info{version,role}``: always 1

With several processes (``HATO_PROCESSES``) the delivery process serves ``/metrics`` for
all of them: :mod:`hato.web.process_metrics` adds the intake processes' counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from hato import __version__
from hato.observe import Observer
from hato.queue.base import MessageState
from hato.web.context import WebContext
from hato.web.health import Readiness

QUEUE_CACHE = 1.0
# queued → delivered: from a second (a relay next door) to days (a remote host retried).
DELIVERY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
# The states whose oldest message says something is stuck.
WAITING = (MessageState.QUEUED, MessageState.SENDING, MessageState.DEFERRED, MessageState.HELD)


class Metrics(Observer):
    """The metrics of one process; see the module docstring for the names."""

    def __init__(self, *, role: str, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        self.queue_messages = Gauge(
            "hato_queue_messages", "Messages in the queue, by state.", ["state"], registry=r
        )
        self.queue_oldest = Gauge(
            "hato_queue_oldest_age_seconds",
            "Age of the oldest message in each state not yet delivered (0: none).",
            ["state"],
            registry=r,
        )
        self.connections_active = Gauge(
            "hato_smtp_connections_active", "Open SMTP connections.", ["listener"], registry=r
        )
        self.connections = Counter(
            "hato_smtp_connections_total", "SMTP connections made.", ["listener"], registry=r
        )
        self.messages = Counter(
            "hato_smtp_messages_total",
            "Messages whose end of data was answered, by result (accepted, rejected).",
            ["listener", "result"],
            registry=r,
        )
        self.auth_failures = Counter(
            "hato_smtp_auth_failures_total", "Failed SMTP AUTH attempts.", ["listener"], registry=r
        )
        self.deliveries = Counter(
            "hato_deliveries_total",
            "Recipients' delivery attempts, by route and status (sent, deferred, bounced, held).",
            ["route", "status"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "hato_delivery_seconds",
            "Time from queueing to delivery of a recipient.",
            ["route"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.last_delivery = Gauge(
            "hato_last_delivery_timestamp_seconds",
            "When a recipient was last delivered (Unix time; 0: not since start).",
            registry=r,
        )
        self.events = Counter(
            "hato_events_total", "Delivery events recorded, by event.", ["event"], registry=r
        )
        self.ready = Gauge("hato_ready", "1 when the checks of /readyz pass.", registry=r)
        self.http_auth_failures = Counter(
            "hato_http_auth_failures_total", "Wrong tokens on the HTTP listener.", registry=r
        )
        build = Gauge(
            "hato_build_info", "The running Hato, always 1.", ["version", "role"], registry=r
        )
        build.labels(__version__, role).set(1)
        for state in MessageState:
            self.queue_messages.labels(state.value)
        for state in WAITING:
            self.queue_oldest.labels(state.value)
        self._queue_read = -QUEUE_CACHE
        # Children per label value, so that the hot path skips labels()' lock and lookup.
        self._conn: dict[str, Counter] = {}
        self._msg: dict[tuple[str, bool], Counter] = {}
        self._auth: dict[str, Counter] = {}
        self._deliv: dict[tuple[str, str], Counter] = {}
        self._secs: dict[str, Histogram] = {}
        self._events: dict[str, Counter] = {}

    # Observer: called on the hot path.

    def smtp_connected(self, listener: str) -> None:
        child = self._conn.get(listener)
        if child is None:
            child = self._conn[listener] = self.connections.labels(listener)
        child.inc()

    def smtp_message(self, listener: str, accepted: bool) -> None:
        child = self._msg.get((listener, accepted))
        if child is None:
            result = "accepted" if accepted else "rejected"
            child = self._msg[(listener, accepted)] = self.messages.labels(listener, result)
        child.inc()

    def smtp_auth_failed(self, listener: str) -> None:
        child = self._auth.get(listener)
        if child is None:
            child = self._auth[listener] = self.auth_failures.labels(listener)
        child.inc()

    def event(self, name: str, count: int = 1) -> None:
        child = self._events.get(name)
        if child is None:
            child = self._events[name] = self.events.labels(name)
        child.inc(count)

    def delivery(self, route: str, status: str, seconds: float) -> None:
        child = self._deliv.get((route, status))
        if child is None:
            child = self._deliv[(route, status)] = self.deliveries.labels(route, status)
        child.inc()
        if status == "sent":
            hist = self._secs.get(route)
            if hist is None:
                hist = self._secs[route] = self.delivery_seconds.labels(route)
            hist.observe(seconds)
            self.last_delivery.set(self._clock())

    def listeners_known(self, names: list[str]) -> None:
        """Create the series of each SMTP listener at 0, so rates work from the start."""
        for name in names:
            self.connections.labels(name)
            self.connections_active.labels(name)
            self.auth_failures.labels(name)
            for result in ("accepted", "rejected"):
                self.messages.labels(name, result)

    # Scrape time.

    async def refresh(self, ctx: WebContext, active: dict[str, int], ready: bool) -> None:
        """Read what is read at scrape time: the queue (cached), connections, readiness."""
        for name, count in active.items():
            self.connections_active.labels(name).set(count)
        self.ready.set(1 if ready else 0)
        now = self._clock()
        if now - self._queue_read < QUEUE_CACHE:
            return
        try:
            counts = await ctx.queue.counts()
            oldest = await ctx.queue.oldest()
        except Exception:  # the queue is down: hato_ready says so; the gauges keep their values
            return
        self._queue_read = now
        for state, n in counts.items():
            self.queue_messages.labels(state.value).set(n)
        for state in WAITING:
            created = oldest.get(state)
            self.queue_oldest.labels(state.value).set(
                max(0.0, now - created) if created is not None else 0
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def routes(ctx: WebContext, metrics: Metrics, readiness: Readiness) -> list[BaseRoute]:
    """``GET /metrics``: the Prometheus text format."""

    async def scrape(request: Request) -> Response:
        if ctx.intake is not None:
            await ctx.intake.poll()
        checks = await readiness.checks()
        ready = all(check.ok for check in checks.values())
        if ctx.intake is None:
            await metrics.refresh(ctx, ctx.active_connections(), ready)
            return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
        # Several processes: this one has no SMTP listener; the intake processes' counts
        # (connections open included) are added by the merge.
        await metrics.refresh(ctx, {}, ready)
        return Response(ctx.intake.render(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", scrape, methods=["GET"])]
