"""Reading a queue's delivery events: pages to the end, a message's events from every
hop, and following the log as it grows (``hato events --follow``, the API's stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hato.events import DeliveryEvent, EventPage
from hato.queue.base import Queue

PAGE = 500
# A message's events from every hop fit in far fewer; the bound keeps a read finite.
MESSAGE_EVENTS_LIMIT = 10_000


async def read_all(
    queue: Queue,
    *,
    after: str = "",
    envid: str | None = None,
    since: float | None = None,
    limit: int | None = None,
) -> EventPage:
    """The events after ``after`` up to the newest (at most ``limit``), and the cursor
    after them."""
    found: list[DeliveryEvent] = []
    cursor = after
    while limit is None or len(found) < limit:
        want = PAGE if limit is None else min(PAGE, limit - len(found))
        page = await queue.events(after=cursor, envid=envid, since=since, limit=want)
        found.extend(page.events)
        moved = page.cursor != cursor
        cursor = page.cursor
        if not page.events or not moved:
            break
    return EventPage(found, cursor)


async def follow(
    queue: Queue,
    *,
    after: str = "",
    envid: str | None = None,
    since: float | None = None,
    interval: float = 1.0,
) -> AsyncIterator[tuple[DeliveryEvent, str]]:
    """Each event after ``after`` with the cursor just past it, then each new one as it
    is stored (polled every ``interval`` seconds), for as long as the caller reads."""
    cursor = after
    while True:
        page = await queue.events(after=cursor, envid=envid, since=since, limit=PAGE)
        for index, event in enumerate(page.events):
            # A page's cursor is after its last event; between events only the last one
            # has a cursor of its own, so earlier ones resume at the previous cursor.
            yield event, page.cursor if index == len(page.events) - 1 else cursor
        cursor = page.cursor
        if not page.events:
            await asyncio.sleep(interval)


async def message_events(queue: Queue, message_id: str, envid: str = "") -> list[DeliveryEvent]:
    """The events of one message from every hop, oldest first: this node's (by queue id)
    and those other nodes reported for it (by its envelope id: ``envid``, else the id
    itself, which ``hato worker`` sends as ENVID)."""
    seen: dict[str, DeliveryEvent] = {}
    for key in ("queue_id", "envid"):
        cursor = ""
        while len(seen) < MESSAGE_EVENTS_LIMIT:
            if key == "queue_id":
                page = await queue.events(after=cursor, queue_id=message_id, limit=PAGE)
            else:
                page = await queue.events(after=cursor, envid=envid or message_id, limit=PAGE)
            for event in page.events:
                seen.setdefault(event.event_id, event)
            if not page.events or page.cursor == cursor:
                break
            cursor = page.cursor
    return sorted(seen.values(), key=lambda e: (e.time, e.event_id))
