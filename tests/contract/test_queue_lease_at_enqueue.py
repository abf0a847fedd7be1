"""A message leased in the same commit as its enqueue (``enqueue(lease_owner=...)``): the
intake hands fresh mail to the in-process worker without a claim commit (issue 11). Such
a lease is one like any other, on every backend: only its owner records, it runs out,
and it comes back when its owner's process is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hato.message import Envelope
from hato.queue.base import MessageState, Outcome, Queue, RecipientState
from hato.testing import FakeClock

SRC = Path(__file__).resolve().parents[2] / "src"
DATA = b"From: a@example.org\r\nSubject: handoff\r\n\r\nbody\r\n"
LEASE = 300.0


def env(*recipients: str) -> Envelope:
    return Envelope(sender="a@example.org", recipients=list(recipients or ["b@example.net"]))


async def test_a_leased_enqueue_is_sending_to_its_owner(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA, lease_owner="w1", lease_seconds=LEASE)
    msg = await queue.get(mid)
    assert msg.state is MessageState.SENDING
    assert msg.lease_owner == "w1"
    assert msg.lease_until == clock.now + LEASE
    assert msg.next_attempt_at == clock.now + LEASE
    assert msg.attempts == 0
    assert msg.data == DATA
    # Nobody else may claim it while the lease runs.
    assert await queue.claim(owner="w2", limit=10, lease_seconds=LEASE) == []
    counts = await queue.counts()
    assert (counts[MessageState.SENDING], counts[MessageState.QUEUED]) == (1, 0)


async def test_the_owner_records_without_a_claim(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(
        env("b@example.net", "c@example.net"), DATA, lease_owner="w1", lease_seconds=LEASE
    )
    refused = await queue.record(
        mid, [Outcome("b@example.net", RecipientState.SENT, "250")], owner="w2", retry_at=None
    )
    assert refused is None
    state = await queue.record(
        mid,
        [
            Outcome("b@example.net", RecipientState.SENT, "250 ok", "relay:25"),
            Outcome("c@example.net", RecipientState.PENDING, "451 later", "relay:25"),
        ],
        owner="w1",
        retry_at=clock.now + 60,
    )
    assert state is MessageState.DEFERRED
    msg = await queue.get(mid)
    assert (msg.state, msg.attempts, msg.lease_owner) == (MessageState.DEFERRED, 1, "")
    assert [(r.state, r.reply) for r in msg.recipients] == [
        (RecipientState.SENT, "250 ok"),
        (RecipientState.PENDING, "451 later"),
    ]
    clock.advance(60)
    (again,) = await queue.claim(owner="w2", limit=10, lease_seconds=LEASE)
    assert (again.id, again.pending) == (mid, ["c@example.net"])


async def test_a_leased_enqueue_runs_out_like_a_claim(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA, lease_owner="w1", lease_seconds=LEASE)
    clock.advance(LEASE)
    (claimed,) = await queue.claim(owner="w2", limit=10, lease_seconds=LEASE)
    assert (claimed.id, claimed.lease_owner, claimed.data) == (mid, "w2", DATA)
    # The first owner's late record is refused: the lease moved on.
    late = await queue.record(
        mid, [Outcome("b@example.net", RecipientState.SENT, "250")], owner="w1", retry_at=None
    )
    assert late is None
    state = await queue.record(
        mid, [Outcome("b@example.net", RecipientState.SENT, "250")], owner="w2", retry_at=None
    )
    assert state is MessageState.SENT


async def test_leased_and_plain_enqueues_mix(queue: Queue) -> None:
    plain = await queue.enqueue(env(), DATA)
    leased = await queue.enqueue(env(), DATA, lease_owner="w1", lease_seconds=LEASE)
    claimed = await queue.claim(owner="w2", limit=10, lease_seconds=LEASE)
    assert [m.id for m in claimed] == [plain]
    assert (await queue.get(leased)).lease_owner == "w1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"held": True},
        {"not_before": 1.0},
        {"idempotency_key": "k"},
        {"lease_seconds": 0.0},
        {"lease_owner": ""},
    ],
    ids=["held", "not_before", "idempotency_key", "no_lease_time", "empty_owner"],
)
async def test_a_leased_enqueue_refuses_what_it_cannot_mean(
    queue: Queue, kwargs: dict[str, object]
) -> None:
    args: dict[str, object] = {"lease_owner": "w1", "lease_seconds": LEASE, **kwargs}
    with pytest.raises(ValueError):
        await queue.enqueue(env(), DATA, **args)  # type: ignore[arg-type]
    assert sum((await queue.counts()).values()) == 0


@pytest.mark.durable_only
async def test_the_lease_of_a_gone_owner_comes_back_at_recovery(
    queue: Queue, open_new: object
) -> None:
    """The owner's process ends (its queue closes: flock, advisory lock or heartbeat key
    go with it); recovery elsewhere gives the lease back at once, whatever it says."""
    assert callable(open_new)
    mid = await queue.enqueue(env(), DATA, lease_owner="gone-w1", lease_seconds=LEASE)
    other: Queue = await open_new()
    assert (await other.recover()).leases_expired == 0  # its owner still runs
    assert await other.claim(owner="w2", limit=10, lease_seconds=LEASE) == []
    await queue.close()
    # PostgreSQL drops a closed session's advisory locks when its backend exits, a moment
    # after the client closed: wait for that, with a deadline.
    returned, deadline = 0, time.monotonic() + 10
    while True:
        returned += (await other.recover()).leases_expired
        if returned or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert returned == 1
    (claimed,) = await other.claim(owner="w2", limit=10, lease_seconds=LEASE)
    assert (claimed.id, claimed.data) == (mid, DATA)


# -- kill -9 of the owner's process ----------------------------------------------------

LEASER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from hato.message import Envelope
    from hato.queue import open_queue
    from hato.queue.redis import RedisQueue

    async def main(url):
        if url.startswith("redis"):
            q = RedisQueue(url, clock=time.time, owner_ttl=1.0)
        else:
            q = open_queue(url, fsync=False)
        await q.open()
        mid = await q.enqueue(
            Envelope("a@example.org", ["b@example.net"]), b"leased\\r\\n",
            lease_owner=f"killed/{os.getpid()}", lease_seconds=3600,
        )
        print(mid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.durable_only
async def test_a_killed_owners_lease_at_enqueue_comes_back_at_recovery(
    queue: Queue, queue_url: str
) -> None:
    """kill -9 of the process that enqueued a message leased to itself: recovery in
    another process gives the lease back once the liveness signal ends (the flock with
    the process, the advisory lock with its session, the heartbeat key with its TTL),
    long before the lease (an hour) runs out."""
    child = subprocess.Popen(
        [sys.executable, "-c", LEASER, queue_url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        text=True,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
        assert line, f"the child died (rc={child.poll()})"
        mid = line.strip()
        assert (await queue.get(mid)).state is MessageState.SENDING
        assert (await queue.recover()).leases_expired == 0  # its owner runs
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 20
        while (await queue.recover()).leases_expired == 0:
            assert time.monotonic() < deadline, "the dead owner's lease never came back"
            await asyncio.sleep(0.05)
        (claimed,) = await queue.claim(owner="w2", limit=10, lease_seconds=LEASE)
        assert (claimed.id, claimed.data) == (mid, b"leased\r\n")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
