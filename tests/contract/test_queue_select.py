"""Filters and bulk actions (hato.queue.select) on every backend: what the API and the
CLI's bulk flags read through ``Queue.list`` must mean the same on each."""

from __future__ import annotations

from hato.message import Envelope
from hato.queue.base import MessageState, Queue
from hato.queue.select import MessageFilter, bulk, page, select
from hato.testing import FakeClock


async def test_select_page_and_bulk(queue: Queue, clock: FakeClock) -> None:
    ids = []
    for n in range(5):
        ids.append(
            await queue.enqueue(
                Envelope("app@example.org", [f"u{n}@{'example.net' if n % 2 else 'example.com'}"]),
                f"Subject: {n}\r\n\r\n{n}\r\n".encode(),
                held=n < 2,
            )
        )
        clock.advance(10)
    newest = await select(queue, MessageFilter(), now=clock())
    assert [m.id for m in newest] == ids[::-1]
    first, cursor = page(newest, limit=3)
    rest, end = page(newest, limit=3, cursor=cursor)
    assert [m.id for m in first + rest] == ids[::-1] and end == ""

    net = MessageFilter(domain="example.net")
    assert [m.id for m in await select(queue, net, now=clock())] == [ids[3], ids[1]]
    old = MessageFilter(older_than=25)
    assert {m.id for m in await select(queue, old, now=clock())} == {ids[0], ids[1], ids[2]}

    released = await bulk(queue, "release", MessageFilter(), node="n", clock=clock)
    assert released.to_json() == {"matched": 2, "done": 2}
    assert (await queue.get(ids[0])).state is MessageState.QUEUED
    assert [e.event for e in (await queue.events(queue_id=ids[0])).events] == ["released"]

    dry = await bulk(queue, "delete", net, dry_run=True, clock=clock)
    assert dry.to_json() == {"matched": 2}
    done = await bulk(queue, "delete", net, node="n", clock=clock)
    assert done.to_json() == {"matched": 2, "done": 2}
    left = {m.id for m in await queue.list(limit=100)}
    assert left == {ids[0], ids[2], ids[4]}
