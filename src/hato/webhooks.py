"""Signed webhooks: each delivery event POSTed as JSON, and the receiver's side.

Sending (``HATO_WEBHOOK_URL``, ``HATO_WEBHOOK_SECRET``): :class:`WebhookSender` reads the
queue's event log with one cursor per URL, stored in the queue (``set_cursor``), and POSTs
every event, one per request, in log order. A failed POST (no connection, a timeout, any
answer but 2xx) is retried with backoff (1 s doubling to 5 min) until the receiver takes
it; the cursor moves only past events a receiver answered with 2xx. So delivery is at
least once: a receiver down for an hour gets every event when it is back, and one that
crashed after answering may see an event twice (``event_id`` tells). A URL seen for the
first time starts with the events of the last day.

The header::

    Hato-Signature: t=1764763200,v1=5257a869e7ec...[,v1=...]

``t`` is the Unix time of signing, each ``v1`` the hex HMAC-SHA256 of ``"<t>.<body>"``
under one secret: during a rotation (``HATO_WEBHOOK_SECRET=new,old``) every secret signs.

Receiving: :func:`verify` checks one header against one secret or a list (any may match)
and the time window (``tolerance`` seconds either way, so a captured request cannot be
replayed later); it raises :class:`hato.errors.SignatureError`. :data:`app` is an ASGI
application (``uvicorn hato.webhooks:app``) that verifies each POST and records its event
on the outbox (``HATO_QUEUE_URL``), where ``Mailer.status`` reads it;
:func:`receiver` builds the same for a given mailer and secrets.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from hato.clock import Clock
from hato.errors import HatoError, QueueError, SignatureError
from hato.events import DeliveryEvent, EventPage

if TYPE_CHECKING:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import Receive, Scope, Send

    from hato.mailer.async_mailer import AsyncMailer
    from hato.queue.base import Queue

__all__ = [
    "HEADER",
    "WebhookSender",
    "app",
    "parse_events",
    "receiver",
    "sign",
    "verify",
]

_debug = logging.getLogger(__name__)

HEADER = "Hato-Signature"
DEFAULT_TOLERANCE = 300
# A URL seen for the first time starts this far back in the event log.
FIRST_LOOKBACK = 86400.0
# The largest webhook body a receiver reads (an event is well under 4 KiB).
MAX_BODY = 256 * 1024


def _secrets_of(secrets: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    items = [secrets] if isinstance(secrets, str | bytes) else list(secrets)
    keys = [s.encode() if isinstance(s, str) else bytes(s) for s in items]
    return [k for k in keys if k]


def _mac(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secrets: str | bytes | Sequence[str | bytes], timestamp: int) -> str:
    """The ``Hato-Signature`` value for ``body`` signed at ``timestamp`` with each secret."""
    keys = _secrets_of(secrets)
    if not keys:
        raise ValueError("no webhook secret to sign with")
    return ",".join([f"t={timestamp}", *(f"v1={_mac(k, timestamp, body)}" for k in keys)])


def verify(
    body: bytes,
    header: str | None,
    secrets: str | bytes | Sequence[str | bytes],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    now: float | None = None,
) -> int:
    """Check a ``Hato-Signature`` header against ``body``: one ``v1`` must be the HMAC
    under one of ``secrets`` (one secret or a list, during a rotation), and ``t`` within
    ``tolerance`` seconds of now (replay protection). Returns ``t``; raises
    :class:`~hato.errors.SignatureError` saying what is wrong."""
    keys = _secrets_of(secrets)
    if not keys:
        raise SignatureError("no webhook secret configured to verify with")
    if not header:
        raise SignatureError(f"no {HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError(f"{HEADER}: t is not a Unix time") from None
        elif name == "v1":
            candidates.append(value.strip().lower())
    if timestamp is None or not candidates:
        raise SignatureError(f"{HEADER}: needs t= and at least one v1=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(
            f"{HEADER}: signed {int(current - timestamp)} s from now, outside the"
            f" {tolerance:g} s window (a replay, or a clock off)"
        )
    for key in keys:
        expected = _mac(key, timestamp, body)
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return timestamp
    raise SignatureError(f"{HEADER}: no signature matches (forged, or another secret)")


def parse_events(body: bytes) -> list[DeliveryEvent]:
    """The events of a verified webhook body: one event object, or a list of them.
    Raises ``ValueError`` for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    events = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("an event is a JSON object")
        events.append(DeliveryEvent.from_json(item))
    return events


# --- sending --------------------------------------------------------------------------


class WebhookSender:
    """POSTs the queue's events to each URL, at least once, in log order (module
    docstring). :meth:`run` runs until cancelled."""

    def __init__(
        self,
        queue: Queue,
        urls: Sequence[str],
        secrets: Sequence[str],
        *,
        clock: Clock = time.time,
        interval: float = 1.0,
        max_backoff: float = 300.0,
        timeout: float = 10.0,
        client: Callable[[], httpx.AsyncClient] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no webhook URL")
        if not _secrets_of(secrets):
            raise ValueError("no webhook secret")
        self.queue = queue
        self.urls = list(urls)
        self.secrets = list(secrets)
        self._clock = clock
        self.interval = interval
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._client = client
        self.sent = 0  # events answered 2xx, for tests and metrics
        self.failures = 0  # failed POSTs (each retried)

    async def run(self) -> None:
        await asyncio.gather(*(self._run_url(url) for url in self.urls))

    def _new_client(self) -> httpx.AsyncClient:
        import httpx

        if self._client is not None:
            return self._client()
        return httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, trust_env=False)

    async def _run_url(self, url: str) -> None:
        name = f"webhook:{url}"
        cursor: str = await self._retry(lambda: self.queue.get_cursor(name))
        since = None if cursor else self._clock() - FIRST_LOOKBACK

        async def page_after(after: str) -> EventPage:
            return await self.queue.events(after=after, since=since, limit=100)

        async with self._new_client() as client:
            while True:
                page: EventPage = await self._retry(functools.partial(page_after, cursor))
                for event in page.events:
                    await self._post(client, url, event)
                if page.cursor != cursor:
                    cursor = page.cursor
                    await self._retry(functools.partial(self.queue.set_cursor, name, cursor))
                if not page.events:
                    await asyncio.sleep(self.interval)

    async def _retry(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """``op()``, again after a pause while the queue is away."""
        delay = 1.0
        while True:
            try:
                return await op()
            except QueueError as exc:
                _debug.warning("webhooks: queue: %s; again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    async def _post(self, client: httpx.AsyncClient, url: str, event: DeliveryEvent) -> None:
        import httpx

        body = json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        delay = 1.0
        while True:
            headers = {
                "Content-Type": "application/json",
                HEADER: sign(body, self.secrets, int(self._clock())),
                "User-Agent": "hato-webhooks",
            }
            try:
                response = await client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    self.sent += 1
                    return
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            self.failures += 1
            _debug.warning(
                "webhook %s: event %s: %s; again in %.0f s", url, event.event_id, why, delay
            )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.max_backoff)


# --- receiving ------------------------------------------------------------------------


def receiver(
    mailer: Callable[[], Awaitable[AsyncMailer]],
    secrets: Callable[[], Sequence[str]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    on_event: Callable[[DeliveryEvent], None] | None = None,
) -> Starlette:
    """A Starlette app taking signed webhooks at any path (POST) and recording their
    events with ``mailer().record_events``: 204 when stored (also when stored already),
    401 for a bad or stale signature, 400 for a body that is not events, 503 when the
    outbox cannot store them (the sender retries)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def take(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return PlainTextResponse("body too large\n", status_code=413)
        try:
            verify(body, request.headers.get(HEADER), secrets(), tolerance)
        except SignatureError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=401)
        try:
            events = parse_events(body)
        except ValueError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        try:
            await (await mailer()).record_events(events)
        except HatoError as exc:
            _debug.warning("webhook: cannot record %d event(s): %s", len(events), exc)
            return PlainTextResponse("cannot store the events now\n", status_code=503)
        if on_event is not None:
            for event in events:
                on_event(event)
        return Response(status_code=204)

    return Starlette(
        routes=[Route("/{path:path}", take, methods=["POST"])],
    )


class _EnvironmentApp:
    """``hato.webhooks.app``: :func:`receiver` on the environment's outbox and secrets,
    read at startup (or the first request), so importing this module reads nothing."""

    def __init__(self) -> None:
        self._app: Starlette | None = None
        self._mailer: AsyncMailer | None = None
        self._secrets: list[str] = []

    def _build(self) -> Starlette:
        if self._app is None:
            from hato.config import webhook_environment
            from hato.mailer.async_mailer import AsyncMailer

            env = webhook_environment()
            self._secrets = env.secrets
            self._mailer = AsyncMailer(env.queue_url, default_from="", templates="")
            mailer = self._mailer

            async def get_mailer() -> AsyncMailer:
                return mailer

            self._app = receiver(get_mailer, lambda: self._secrets)
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._build()(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._build()
                    assert self._mailer is not None
                    await self._mailer.open()
                except Exception as exc:  # uvicorn prints it and exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._mailer is not None:
                    await self._mailer.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


app = _EnvironmentApp()
"""The ASGI receiver: ``uvicorn hato.webhooks:app`` (reads ``HATO_QUEUE_URL`` and
``HATO_WEBHOOK_SECRET`` or ``HATO_WEBHOOK_SECRET_FILE``)."""
