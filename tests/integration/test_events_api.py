"""``GET /api/v1/events`` served for real (uvicorn on loopback) over an SQLite queue.

The console token is web-core's middleware's business; here a stand-in middleware marks
requests with ``Authorization: Bearer console-token`` the way it does
(``scope["hato.authenticated"] = True``), so both ways in are exercised: the token sees
every event, a SASL user over HTTP Basic only those of the messages it submitted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from hato.app import build_log, build_queue
from hato.config import load_settings
from hato.events import DeliveryEvent, new_event_id
from hato.message import META_AUTH_USER, META_ENVID, Envelope
from hato.queue.base import Queue
from hato.users import UserStore
from hato.web import events_api
from hato.web.context import WebContext
from peers.http import served

DATA = b"From: a@dbmx.net\r\nSubject: hi\r\n\r\nbody\r\n"
TOKEN = "console-token"


class TokenStandIn:
    """What web-core's security middleware does for the console token, and no more."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"authorization") == f"Bearer {TOKEN}".encode():
                scope[events_api.AUTHENTICATED] = True
        await self.app(scope, receive, send)


def event(name: str, queue_id: str, envid: str, node: str = "relay.dbmx.net") -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(),
        event=name,
        time=time.time(),
        node=node,
        queue_id=queue_id,
        recipient="someone@example.net",
        envid=envid,
        reply_code=250,
        reply_enhanced="2.0.0",
        reply_text="ok",
    )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[str, Queue, dict[str, str]]]:
    settings = load_settings(data_dir=tmp_path, queue_url=f"sqlite:///{tmp_path / 'q.db'}")
    users = UserStore(
        tmp_path / "users.json", hasher=PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )
    users.add("alice@dbmx.net", "alice-Secret-1")
    users.add("bob@dbmx.net", "bob-Secret-22")
    users.load()
    queue = build_queue(settings)
    await queue.open()
    ids: dict[str, str] = {}
    for user, envid in (("alice@dbmx.net", "OUTBOX-A"), ("bob@dbmx.net", "OUTBOX-B"), ("", "")):
        meta = {META_ENVID: envid} if envid else {}
        if user:
            meta[META_AUTH_USER] = user
        envelope = Envelope("a@dbmx.net", ["someone@example.net"], auth_user=user, meta=meta)
        ids[user or "trusted"] = await queue.enqueue(
            envelope, DATA, events=[event("accepted", "", envid)]
        )
    # What the upstream reported for alice's message (pulled): its queue id is not ours.
    await queue.add_events([event("delivered", "UPSTREAM01", "OUTBOX-A", node="mx-relay")])
    ctx = WebContext(
        settings=settings,
        queue=queue,
        log=build_log(settings),
        clock=time.time,
        role="serve",
        node="relay.dbmx.net",
        users=users,
    )
    app = TokenStandIn(Starlette(routes=events_api.routes(ctx)))
    try:
        async with served(app) as url:
            yield url, queue, ids
    finally:
        await queue.close()


async def get(url: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        return await client.get(url + "/api/v1/events", **kwargs)  # type: ignore[arg-type]


async def test_no_credentials_or_wrong_ones_get_401_with_basic_offered(
    world: tuple[str, Queue, dict[str, str]],
) -> None:
    url, _, _ = world
    for kwargs in ({}, {"auth": ("alice@dbmx.net", "wrong")}, {"auth": ("nobody", "x")}):
        response = await get(url, **kwargs)
        assert response.status_code == 401, kwargs
        assert response.headers["www-authenticate"].startswith("Basic")
    bearer = await get(url, headers={"Authorization": "Bearer not-the-token"})
    assert bearer.status_code == 401


async def test_the_console_token_sees_every_event_with_the_exact_fields(
    world: tuple[str, Queue, dict[str, str]],
) -> None:
    url, _, ids = world
    response = await get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"events", "cursor"}
    assert [e["event"] for e in body["events"]] == ["accepted"] * 3 + ["delivered"]
    assert {e["queue_id"] for e in body["events"][:3]} == set(ids.values())
    assert set(body["events"][0]) >= {
        "event_id", "event", "time", "node", "queue_id", "envid", "message_id", "recipient",
        "route", "relay_host", "relay_ip", "reply_code", "reply_enhanced", "reply_text",
        "tls_version", "tls_verified", "attempt",
    }  # fmt: skip
    # The cursor continues: nothing new yet.
    again = await get(
        url, params={"after": body["cursor"]}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert again.json() == {"events": [], "cursor": body["cursor"]}


async def test_a_sasl_user_sees_only_the_events_of_the_messages_it_submitted(
    world: tuple[str, Queue, dict[str, str]],
) -> None:
    url, _, ids = world
    alice = (await get(url, auth=("alice@dbmx.net", "alice-Secret-1"))).json()["events"]
    assert [(e["event"], e["queue_id"]) for e in alice] == [
        ("accepted", ids["alice@dbmx.net"]),
        ("delivered", "UPSTREAM01"),  # the upstream's report, found by its envid
    ]
    bob = (await get(url, auth=("bob@dbmx.net", "bob-Secret-22"))).json()["events"]
    assert [(e["event"], e["queue_id"]) for e in bob] == [("accepted", ids["bob@dbmx.net"])]
    filtered = await get(
        url, params={"envid": "OUTBOX-A", "limit": "1"}, auth=("alice@dbmx.net", "alice-Secret-1")
    )
    assert [e["event"] for e in filtered.json()["events"]] == ["accepted"]
    assert (await get(url, params={"since": "yesterday"}, auth=("bob@dbmx.net", "bob-Secret-22"))).status_code == 400  # fmt: skip
    assert (await get(url, params={"limit": "0"}, auth=("bob@dbmx.net", "bob-Secret-22"))).status_code == 400  # fmt: skip
    future = await get(url, params={"since": "2999-01-01T00:00:00Z"}, auth=("bob@dbmx.net", "bob-Secret-22"))  # fmt: skip
    assert future.json()["events"] == []


async def read_sse(lines: AsyncIterator[str], count: int) -> list[dict[str, str]]:
    """The next ``count`` events of an SSE stream (fields of each block)."""
    blocks: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    async for line in lines:
        if not line:
            if fields:
                blocks.append(fields)
                fields = {}
                if len(blocks) == count:
                    return blocks
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")
    raise AssertionError(f"the stream ended after {len(blocks)} events")


async def test_the_stream_sends_stored_then_new_events_and_resumes_at_last_event_id(
    world: tuple[str, Queue, dict[str, str]],
) -> None:
    url, queue, ids = world
    headers = {"Accept": "text/event-stream"}
    auth = ("alice@dbmx.net", "alice-Secret-1")
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        async with client.stream("GET", url + "/api/v1/events", headers=headers, auth=auth) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            first = await asyncio.wait_for(read_sse(lines, 2), 30)
            assert [b["event"] for b in first] == ["accepted", "delivered"]
            assert json.loads(first[1]["data"])["queue_id"] == "UPSTREAM01"
            last_id = first[1]["id"]
            late = event("bounced", "UPSTREAM01", "OUTBOX-A", node="mx-relay")
            await queue.add_events([event("accepted", ids["bob@dbmx.net"], "OUTBOX-B"), late])
            [arrived] = await asyncio.wait_for(read_sse(lines, 1), 30)
            assert arrived["event"] == "bounced"  # bob's event is not alice's to see
            assert json.loads(arrived["data"])["event_id"] == late.event_id
        resumed_headers = {**headers, "Last-Event-ID": last_id}
        async with client.stream("GET", url + "/api/v1/events", headers=resumed_headers, auth=auth) as r:  # fmt: skip
            [again] = await asyncio.wait_for(read_sse(r.aiter_lines(), 1), 30)
            assert json.loads(again["data"])["event_id"] == late.event_id
