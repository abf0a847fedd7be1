"""PostgreSQL queue: a real server restart under a working loop (not a stand-in).

Starts a private throw-away cluster (``initdb`` + ``pg_ctl``, loopback, a free port) so
stopping it disturbs nobody else. Needs the PostgreSQL server binaries; as root the
cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from hato.errors import QueueError
from hato.message import Envelope
from hato.queue.base import Outcome, RecipientState
from hato.queue.postgres import PostgresQueue
from peers.datastores import PrivatePostgres, pg_bindir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    if pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    srv = PrivatePostgres()
    try:
        srv.init()
        srv.start()
        yield srv
    finally:
        srv.cleanup()


async def test_working_loop_carries_on_through_a_server_restart(server: PrivatePostgres) -> None:
    url = f"{server.url}?pool_timeout=1"
    queue, other = PostgresQueue(url), PostgresQueue(url)
    await queue.open()
    await other.open()
    enqueued: set[str] = set()
    delivered: set[str] = set()
    errors: list[str] = []
    stop = asyncio.Event()

    async def worker() -> None:
        """The shape of hato worker's loop: claim, record, wait; QueueError means later.

        A batch whose record failed stays leased: the short lease brings it back (at
        least once), as it would after a crash.
        """
        while not stop.is_set():
            try:
                batch = await queue.claim(owner="w", limit=5, lease_seconds=2)
                for m in batch:
                    done = [Outcome(a, RecipientState.SENT, "250 ok") for a in m.pending]
                    if await queue.record(m.id, done, owner="w", retry_at=None):
                        delivered.add(m.id)
                if not batch:
                    await queue.wait_for_work(0.5)
            except QueueError as exc:
                errors.append(str(exc))
                await queue.wait_for_work(0.1)

    async def enqueue_until_accepted(data: bytes) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                enqueued.add(
                    await other.enqueue(Envelope("a@example.org", ["b@example.net"]), data)
                )
                return
            except QueueError:
                assert time.monotonic() < deadline, "enqueue never recovered"
                await asyncio.sleep(0.05)

    task = asyncio.create_task(worker())
    try:
        for i in range(20):
            await enqueue_until_accepted(b"before %d" % i)
        await asyncio.to_thread(server.stop)
        with pytest.raises(QueueError):
            await other.enqueue(Envelope("a@example.org", ["b@example.net"]), b"while down")
        await asyncio.to_thread(server.start)
        for i in range(20):
            await enqueue_until_accepted(b"after %d" % i)
        deadline = time.monotonic() + 30
        while delivered != enqueued:
            if time.monotonic() > deadline:
                left = [await other.get(i) for i in enqueued - delivered]
                raise AssertionError(f"undelivered: {left} {errors}")
            await asyncio.sleep(0.05)
        # The listener is back: a NOTIFY wakes an idle waiter long before its timeout.
        await queue.wait_for_work(0)
        waiter = asyncio.create_task(queue.wait_for_work(60))
        await asyncio.sleep(0.05)
        await enqueue_until_accepted(b"wake")
        await asyncio.wait_for(waiter, 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await queue.close()
        await other.close()
    assert len(enqueued) == 41
