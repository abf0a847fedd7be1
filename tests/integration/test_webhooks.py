"""Signed webhooks end to end: Hato's sender against ``uvicorn hato.webhooks:app`` (a
real process reading HATO_QUEUE_URL and HATO_WEBHOOK_SECRET), the receiver down and up
again, and forged or replayed requests refused."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hato.events import DeliveryEvent, new_event_id
from hato.mailer import AsyncMailer
from hato.queue import open_queue
from hato.queue.base import Queue
from hato.webhooks import HEADER, WebhookSender, sign
from peers import free_port
from peers.http import UvicornProcess

SECRET = "whsec-new"
OLD_SECRET = "whsec-old"


def event(name: str, envid: str, n: int) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(),
        event=name,
        time=time.time(),
        node="relay.dbmx.net",
        queue_id=f"UPSTREAM{n:04d}",
        recipient="someone@example.net",
        envid=envid,
        route="mx",
        relay_host="mx.example.net",
        relay_ip="127.0.0.1",
        reply_code=250,
        reply_enhanced="2.0.0",
        reply_text=f"Ok: queued as MX{n}",
        tls_version="TLSv1.3",
        attempt=1,
    )


async def wait_until(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[UvicornProcess]:
    # The app's side: its outbox, and the secrets of a rotation in progress.
    env = {
        "HATO_QUEUE_URL": f"sqlite:///{tmp_path / 'outbox.db'}",
        "HATO_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}",
    }
    process = UvicornProcess("hato.webhooks:app", free_port(), env)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def relay_queue(tmp_path: Path) -> AsyncIterator[Queue]:
    queue = open_queue(f"sqlite:///{tmp_path / 'relay.db'}")
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


async def test_a_receiver_down_then_up_gets_every_event_and_status_shows_them(
    tmp_path: Path, receiver: UvicornProcess, relay_queue: Queue
) -> None:
    mailer = AsyncMailer(f"sqlite:///{tmp_path / 'outbox.db'}", default_from="a@dbmx.net")
    message_id = await mailer.send("someone@example.net", "Hi", text="hello")
    sender = WebhookSender(relay_queue, [receiver.url + "/hooks/hato"], [SECRET], interval=0.05)
    sender.max_backoff = 0.5
    task = asyncio.create_task(sender.run())
    try:
        # The receiver is down: the first events wait, retried.
        first = [event("relayed", message_id, 1), event("delivered", message_id, 2)]
        await relay_queue.add_events(first)
        await wait_until(lambda: sender.failures >= 3, "failed POSTs while the receiver is down")
        assert sender.sent == 0
        receiver.start()
        await wait_until(lambda: sender.sent >= 2, "the events once the receiver is up")
        # Down again in the middle of a stream of events, then up: nothing lost.
        receiver.stop()
        more = [event("delivered", message_id, n) for n in range(3, 13)]
        await relay_queue.add_events(more)
        failures = sender.failures
        await wait_until(lambda: sender.failures > failures, "a failed POST")
        receiver.start()
        await wait_until(lambda: sender.sent >= 12, "every event")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    status = await mailer.status(message_id)
    got = {e.event_id for e in status.events}
    assert {e.event_id for e in [*first, *more]} <= got
    [mine] = [e for e in status.events if e.event_id == first[1].event_id]
    assert mine == first[1]  # every field as sent
    # The cursor is in the relay's queue: a new sender goes on from there.
    assert await relay_queue.get_cursor(f"webhook:{receiver.url}/hooks/hato") != ""
    await mailer.aclose()


async def test_forged_and_replayed_webhooks_are_refused_and_record_nothing(
    tmp_path: Path, receiver: UvicornProcess
) -> None:
    receiver.start()
    mailer = AsyncMailer(f"sqlite:///{tmp_path / 'outbox.db'}", default_from="a@dbmx.net")
    message_id = await mailer.send("someone@example.net", "Hi", text="hello")
    body = json.dumps(event("bounced", message_id, 1).to_json()).encode()
    now = int(time.time())
    attempts = {
        "forged": sign(body, "guessed-secret", now),
        "replayed": sign(body, SECRET, now - 3600),
        "from the future": sign(body, SECRET, now + 3600),
        "unsigned": None,
    }
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        for what, header in attempts.items():
            headers = {"Content-Type": "application/json"}
            if header is not None:
                headers[HEADER] = header
            response = await client.post(receiver.url + "/", content=body, headers=headers)
            assert response.status_code == 401, what
        tampered = body.replace(b"bounced", b"delivered")
        response = await client.post(
            receiver.url + "/", content=tampered, headers={HEADER: sign(body, SECRET, now)}
        )
        assert response.status_code == 401
        assert (await mailer.status(message_id)).events == ()
        # The same body, signed now with the old secret of the rotation: taken, once.
        for _ in range(2):
            ok = await client.post(
                receiver.url + "/", content=body, headers={HEADER: sign(body, OLD_SECRET, now)}
            )
            assert ok.status_code == 204
        bad = await client.post(
            receiver.url + "/", content=b"{}", headers={HEADER: sign(b"{}", SECRET, now)}
        )
        assert bad.status_code == 400
    status = await mailer.status(message_id)
    assert [e.event for e in status.events] == ["bounced"]
    await mailer.aclose()
