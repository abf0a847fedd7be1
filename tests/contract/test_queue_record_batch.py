"""Records arriving together (a worker finishing many deliveries at once) may share one
statement and one commit (PostgreSQL groups them, SQLite's writer folds them into one
transaction); each still stands alone: its own compare-and-set on the lease, its own
events, its own refusal (issue 11)."""

from __future__ import annotations

import asyncio

from hato.events import DeliveryEvent, new_event_id
from hato.message import Envelope
from hato.queue.base import MessageState, Outcome, Queue, RecipientState
from hato.testing import FakeClock

DATA = b"From: a@example.org\r\nSubject: batch\r\n\r\nbody\r\n"
LEASE = 300.0


def delivered(clock: FakeClock, queue_id: str) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(clock),
        event="delivered",
        time=clock(),
        node="node-a",
        queue_id=queue_id,
        recipient="b@example.net",
        attempt=1,
        reply_code=250,
    )


async def test_concurrent_records_each_stand_alone(queue: Queue, clock: FakeClock) -> None:
    envelope = Envelope("a@example.org", ["b@example.net"])
    plain = [await queue.enqueue(envelope, DATA + b"%d\r\n" % i) for i in range(30)]
    claimed = await queue.claim(owner="w1", limit=30, lease_seconds=LEASE)
    assert sorted(m.id for m in claimed) == sorted(plain)
    leased = [
        await queue.enqueue(envelope, DATA, lease_owner="w1", lease_seconds=LEASE)
        for _ in range(10)
    ]
    ids = plain + leased
    sent = Outcome("b@example.net", RecipientState.SENT, "250 ok")
    later = Outcome("b@example.net", RecipientState.PENDING, "451 later")

    async def record(i: int, message_id: str) -> MessageState | None:
        # Every third is deferred, every fifth comes from an owner without the lease.
        owner = "w2" if i % 5 == 0 else "w1"
        outcome, retry_at = (later, clock.now + 60) if i % 3 == 0 else (sent, None)
        return await queue.record(
            message_id,
            [outcome],
            owner=owner,
            retry_at=retry_at,
            events=[delivered(clock, message_id)],
        )

    states = await asyncio.wait_for(asyncio.gather(*(record(i, m) for i, m in enumerate(ids))), 30)
    for i, (message_id, state) in enumerate(zip(ids, states, strict=True)):
        msg = await queue.get(message_id)
        stored = (await queue.events(queue_id=message_id)).events
        if i % 5 == 0:
            assert state is None, i
            assert (msg.state, msg.lease_owner, msg.attempts) == (MessageState.SENDING, "w1", 0)
            assert stored == []
        else:
            expected = MessageState.DEFERRED if i % 3 == 0 else MessageState.SENT
            assert state is expected, i
            assert (msg.state, msg.lease_owner, msg.attempts) == (expected, "", 1)
            assert [e.event_id for e in stored] != [] and len(stored) == 1
    # A second record of a recorded message is refused: the lease is gone.
    again = await queue.record(ids[1], [sent], owner="w1", retry_at=None)
    assert again is None
