"""Pulling delivery events back along the chain, the way the mail went.

A node that hands messages to an upstream Hato (``hato serve`` relaying to a relay server
with ``HATO_RELAY_EVENTS_URL``; ``hato worker`` delivering to the local relay with
``HATO_SMTP_EVENTS_URL``) asks that upstream's ``GET /api/v1/events`` for what became of
them, authenticated as the SASL user it submits with, so the upstream shows it the events
of its own messages only. An event the upstream reports with ``envid=X`` belongs to the
local message whose envelope id or queue id is ``X`` (the ENVID it was sent upstream
with); it is stored here under that message's envelope id (its queue id when it has
none), keeping the upstream's ``event_id``, ``node`` and ``queue_id``, so it is stored
once however often it is pulled, and ``Mailer.status`` / ``hato events --envid`` find it.

The puller watches this node's own event log for ``relayed`` steps from the last
``lookback`` seconds (five days: the queue lifetime) and asks the upstream every
``interval`` seconds while one of those messages has a recipient not yet final
(delivered, bounced, expired), ten times less often while all are (a late bounce may
still come), and not at all when there are none. Its cursor in the upstream's log is
kept in the queue (``set_cursor``), so a restart neither misses nor repeats much.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hato.clock import Clock
from hato.errors import HatoError
from hato.event_reader import read_all
from hato.events import FINAL_EVENTS, RELAYED, DeliveryEvent

if TYPE_CHECKING:
    import httpx

    from hato.queue.base import Queue

_debug = logging.getLogger(__name__)

LOOKBACK = 5 * 86400.0
PAGE = 500
# How long an upstream event that matches none of our messages may yet be matched (our
# `relayed` record of its message not read yet) before the cursor passes it.
UNMATCHED_GRACE = 30.0


@dataclass
class _Watched:
    """One local message handed upstream: its key and its recipients not yet final."""

    key: str
    open: set[str] = field(default_factory=set)
    last: float = 0.0


class EventPuller:
    """Pulls ``url``'s events for the messages this node relayed there (see the module
    docstring); :meth:`run` runs until cancelled, :meth:`pull_once` is one round."""

    def __init__(
        self,
        queue: Queue,
        url: str,
        *,
        node: str,
        username: str | None = None,
        password: str | None = None,
        clock: Clock = time.time,
        interval: float = 5.0,
        lookback: float = LOOKBACK,
        timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        self.queue = queue
        self.url = url
        self.node = node
        self._auth = (username, password) if username and password is not None else None
        self._clock = clock
        self.interval = interval
        self.lookback = lookback
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = client
        self._own = client is None
        self._local_cursor = ""
        self._started = False
        self._by_id: dict[str, _Watched] = {}
        self.pulled = 0  # events stored from the upstream, for tests and metrics
        self.errors = 0

    @property
    def cursor_name(self) -> str:
        return f"pull:{self.url}"

    async def run(self) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        try:
            quiet, failing, last_error = 0, 0, ""
            while True:
                try:
                    pending, watched = await self._watch()
                    if pending or (watched and quiet >= 10):
                        quiet = 0
                        await self.pull_once()
                    else:
                        quiet += 1
                    failing = 0
                except HatoError as exc:
                    self.errors += 1
                    failing += 1
                    if str(exc) != last_error or failing % 20 == 1:
                        _debug.warning("events from %s: %s", self.url, exc)
                    last_error = str(exc)
                # Backoff while the upstream fails: up to a minute between tries.
                await asyncio.sleep(min(self.interval * 2 ** min(failing, 10), 60.0))
        finally:
            if self._own and self._client is not None:
                await self._client.aclose()
                self._client = None

    async def _watch(self) -> tuple[bool, bool]:
        """Read this node's new events; whether a watched message has a recipient not
        final, and whether any is watched at all."""
        now = self._clock()
        since = None if self._started else now - self.lookback
        page = await read_all(self.queue, after=self._local_cursor, since=since)
        self._started = True
        self._local_cursor = page.cursor
        for event in page.events:
            self._note(event)
        horizon = now - self.lookback
        for key in [k for k, w in self._by_id.items() if w.last < horizon]:
            del self._by_id[key]
        pending = any(w.open for w in self._by_id.values())
        return pending, bool(self._by_id)

    def _note(self, event: DeliveryEvent) -> None:
        if event.event == RELAYED and event.node == self.node:
            key = event.envid or event.queue_id
            watched = self._by_id.get(key) or self._by_id.get(event.queue_id) or _Watched(key)
            for name in (key, event.queue_id):
                if name:
                    self._by_id[name] = watched
            watched.open.add(event.recipient.lower())
            watched.last = max(watched.last, event.time)
            return
        seen = self._by_id.get(event.envid) if event.envid else None
        if seen is None:
            seen = self._by_id.get(event.queue_id)
        if seen is not None and event.event in FINAL_EVENTS:
            seen.open.discard(event.recipient.lower())

    async def pull_once(self) -> int:
        """One round: the upstream's events after the stored cursor, those of our messages
        stored here; how many were new. Raises HatoError when the upstream cannot be read."""
        import httpx

        if self._client is None:  # one round outside run(): a client of its own
            async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client:
                self._client = client
                try:
                    return await self.pull_once()
                finally:
                    self._client = None
        cursor = await self.queue.get_cursor(self.cursor_name)
        stored = 0
        for _ in range(100):  # a bounded catch-up; the next round goes on
            params: dict[str, str] = {"limit": str(PAGE)}
            if cursor:
                params["after"] = cursor
            else:
                params["since"] = str(self._clock() - self.lookback)
            try:
                response = await self._client.get(self.url, params=params, auth=self._auth)
            except httpx.HTTPError as exc:
                raise HatoError(f"{type(exc).__name__}: {exc}") from exc
            if response.status_code != 200:
                raise HatoError(f"HTTP {response.status_code}: {response.text[:200].strip()}")
            try:
                body = response.json()
                events = [DeliveryEvent.from_json(e) for e in body["events"]]
                next_cursor = str(body["cursor"])
            except (ValueError, KeyError, TypeError) as exc:
                raise HatoError(f"not an events page: {exc}") from exc
            ours = self.translate(events)
            if ours:
                stored += await self.queue.add_events(ours)
                for event in ours:
                    self._note(event)
            # An upstream event can come before our own `relayed` record of its message
            # (the upstream records `accepted` before its 250; we record `relayed` after
            # it): while a page holds unmatched events younger than UNMATCHED_GRACE the
            # cursor stays before it, and the page is read again next round (storing is
            # idempotent by event_id), so no event of ours is skipped for good.
            recent = self._clock() - UNMATCHED_GRACE
            matched = {e.event_id for e in ours}
            if any(e.event_id not in matched and e.time >= recent for e in events):
                break
            if next_cursor == cursor:
                break  # the upstream has nothing after it
            cursor = next_cursor
            await self.queue.set_cursor(self.cursor_name, cursor)
        self.pulled += stored
        return stored

    def translate(self, events: list[DeliveryEvent]) -> list[DeliveryEvent]:
        """The upstream's events that belong to our messages, under our envelope ids."""
        ours = []
        for event in events:
            watched = self._by_id.get(event.envid) if event.envid else None
            if watched is None:
                continue
            ours.append(event if event.envid == watched.key else replace(event, envid=watched.key))
        return ours
