"""The puller against a real events API (uvicorn on loopback): an upstream's events for
the ENVIDs this node relayed come home under the local message's envelope id, once, and
nobody else's do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from starlette.applications import Starlette

from hato.app import build_log
from hato.config import load_settings
from hato.event_pull import EventPuller
from hato.events import DeliveryEvent, new_event_id
from hato.message import META_AUTH_USER, META_ENVID, Envelope
from hato.queue import open_queue
from hato.queue.base import Queue
from hato.users import UserStore
from hato.web import events_api
from hato.web.context import WebContext
from peers.http import served

DATA = b"From: a@dbmx.net\r\nSubject: hi\r\n\r\nbody\r\n"
USER, PASSWORD = "relay@dbmx.net", "relay-Secret-1"


def event(name: str, queue_id: str, envid: str, node: str) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(),
        event=name,
        time=time.time(),
        node=node,
        queue_id=queue_id,
        recipient="someone@example.net",
        envid=envid,
        route="relay" if name == "relayed" else "mx",
        reply_code=250,
        reply_enhanced="2.0.0",
        reply_text="ok",
    )


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[str, Queue]]:
    settings = load_settings(data_dir=tmp_path, queue_url="memory://")
    users = UserStore(tmp_path / "users.json", hasher=PasswordHasher(1, 64, 1))
    users.add(USER, PASSWORD)
    users.add("other@dbmx.net", "other-Secret-2")
    users.load()
    queue = open_queue("memory://")
    await queue.open()
    ctx = WebContext(settings, queue, build_log(settings), time.time, "serve", "relay", users=users)
    try:
        async with served(Starlette(routes=events_api.routes(ctx))) as url:
            yield url + events_api.PATH, queue
    finally:
        await queue.close()


async def submit(queue: Queue, user: str, envid: str) -> str:
    meta = {META_AUTH_USER: user, META_ENVID: envid}
    envelope = Envelope("a@dbmx.net", ["someone@example.net"], auth_user=user, meta=meta)
    return await queue.enqueue(envelope, DATA, events=[event("accepted", "", envid, "relay")])


async def test_upstream_events_come_home_under_the_local_envelope_id(
    upstream: tuple[str, Queue],
) -> None:
    url, remote = upstream
    local = open_queue("memory://")
    await local.open()
    try:
        # Two local messages: one kept the outbox's ENVID, one had none and went upstream
        # with its own queue id as ENVID.
        kept = await local.enqueue(Envelope("a@dbmx.net", ["someone@example.net"]), DATA)
        bare = await local.enqueue(Envelope("a@dbmx.net", ["someone@example.net"]), DATA)
        await local.add_events(
            [
                event("relayed", kept, "OUTBOX-1", "local"),
                event("relayed", bare, "", "local"),
            ]
        )
        up_kept = await submit(remote, USER, "OUTBOX-1")
        up_bare = await submit(remote, USER, bare)
        await submit(remote, "other@dbmx.net", "OUTBOX-1")  # someone else's, same ENVID
        await remote.add_events(
            [
                event("delivered", up_kept, "OUTBOX-1", "relay"),
                event("bounced", up_bare, bare, "relay"),
            ]
        )
        puller = EventPuller(local, url, node="local", username=USER, password=PASSWORD)
        puller_task = asyncio.create_task(puller.run())
        puller.interval = 0.05
        deadline = time.monotonic() + 30
        while puller.pulled < 4:
            assert time.monotonic() < deadline, f"pulled {puller.pulled} of 4"
            await asyncio.sleep(0.05)
        puller_task.cancel()
        await asyncio.gather(puller_task, return_exceptions=True)
        kept_events = [
            e for e in (await local.events(envid="OUTBOX-1")).events if e.node != "local"
        ]
        assert [(e.node, e.event) for e in kept_events] == [
            ("relay", "accepted"),
            ("relay", "delivered"),
        ]
        assert {e.queue_id for e in kept_events} == {up_kept}  # not the other user's
        bare_events = [e for e in (await local.events(envid=bare)).events if e.node != "local"]
        assert [(e.node, e.event, e.queue_id) for e in bare_events] == [
            ("relay", "accepted", up_bare),
            ("relay", "bounced", up_bare),
        ]
        # Pulling again stores nothing twice; the cursor is in the local queue.
        assert await puller.pull_once() == 0
        assert await local.get_cursor(puller.cursor_name) != ""
        wrong = EventPuller(local, url, node="local", username=USER, password="wrong")
        with pytest.raises(Exception, match="HTTP 401"):
            await wrong.pull_once()
    finally:
        await local.close()


async def test_upstream_events_before_our_relayed_record_are_not_skipped(
    upstream: tuple[str, Queue],
) -> None:
    """The upstream records `accepted` before its 250, we record `relayed` after it: a
    pull in between sees an event of ours it cannot match yet. The cursor must not pass
    it for good; once `relayed` is recorded, the next pull brings it home."""
    url, remote = upstream
    local = open_queue("memory://")
    await local.open()
    try:
        mine = await local.enqueue(Envelope("a@dbmx.net", ["someone@example.net"]), DATA)
        # Some other message of ours is in flight, so the puller is pulling.
        other = await local.enqueue(Envelope("a@dbmx.net", ["someone@example.net"]), DATA)
        await local.add_events([event("relayed", other, "OUTBOX-0", "local")])
        up = await submit(remote, USER, "OUTBOX-2")  # upstream `accepted`, before our relayed
        puller = EventPuller(local, url, node="local", username=USER, password=PASSWORD)
        await puller._watch()
        assert await puller.pull_once() == 0  # nothing of ours it can match yet
        await local.add_events([event("relayed", mine, "OUTBOX-2", "local")])
        await puller._watch()
        assert await puller.pull_once() == 1
        home = [e for e in (await local.events(envid="OUTBOX-2")).events if e.node != "local"]
        assert [(e.event, e.queue_id) for e in home] == [("accepted", up)]
    finally:
        await local.close()
