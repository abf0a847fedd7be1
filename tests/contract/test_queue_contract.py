"""The queue contract: every backend of ``hato.queue`` passes this same suite.

The backends come from ``BACKENDS`` in ``conftest.py``; each test gets a fresh, open
queue on a fake clock (``clock.advance`` moves time; nothing here sleeps).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from hato.errors import MessageNotFound, QueueError
from hato.message import Envelope
from hato.queue.base import (
    MessageState,
    Outcome,
    Queue,
    RecipientState,
    StoredMessage,
)
from hato.testing import FakeClock

OpenQueue = Callable[[], Awaitable[Queue]]

DATA = (
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\n"
    b"body line\r\n.leading dot\r\n\x00\xff\xfe 8-bit \xe9\r\n"
)
LEASE = 300.0

SENT = RecipientState.SENT
FAILED = RecipientState.FAILED
PENDING = RecipientState.PENDING


def env(*recipients: str, sender: str = "a@example.org") -> Envelope:
    return Envelope(sender=sender, recipients=list(recipients or ["b@example.net"]))


async def claim_one(queue: Queue, owner: str = "w1") -> StoredMessage:
    claimed = await queue.claim(owner=owner, limit=1, lease_seconds=LEASE)
    assert len(claimed) == 1, claimed
    return claimed[0]


async def within(awaitable: Awaitable[object], seconds: float = 5.0) -> object:
    return await asyncio.wait_for(awaitable, seconds)


# -- enqueue and get -------------------------------------------------------------------


async def test_enqueue_get_round_trip(queue: Queue, clock: FakeClock) -> None:
    envelope = Envelope(
        sender="a@example.org",
        recipients=["b@example.net", "c@example.com"],
        meta={"source": "smtp", "both": "envelope"},
    )
    mid = await queue.enqueue(envelope, DATA, meta={"both": "argument", "x": "1"})
    msg = await queue.get(mid)
    assert msg.id == mid
    assert msg.data == DATA
    assert msg.size == len(DATA)
    assert msg.sender == "a@example.org"
    assert [r.address for r in msg.recipients] == ["b@example.net", "c@example.com"]
    assert all(r.state is PENDING and r.attempts == 0 and not r.reply for r in msg.recipients)
    assert msg.pending == ["b@example.net", "c@example.com"]
    assert msg.meta == {"source": "smtp", "both": "argument", "x": "1"}
    assert msg.state is MessageState.QUEUED
    assert msg.created_at == clock.now
    assert msg.next_attempt_at == clock.now
    assert msg.attempts == 0
    assert msg.lease_owner == ""
    assert msg.idempotency_key is None


async def test_round_trip_null_sender_utf8_and_large(queue: Queue) -> None:
    big = b"".join(b"%06d abcdefghijklmnopqrstuvwxyz\r\n" % i for i in range(40_000))
    mid = await queue.enqueue(env("ü@bücher.example", "b@example.net", sender=""), big)
    msg = await queue.get(mid)
    assert msg.sender == ""
    assert [r.address for r in msg.recipients] == ["ü@bücher.example", "b@example.net"]
    assert msg.data == big


async def test_empty_data_round_trip(queue: Queue) -> None:
    mid = await queue.enqueue(env(), b"")
    assert (await queue.get(mid)).data == b""


async def test_ids_are_unique_even_on_a_frozen_clock(queue: Queue) -> None:
    ids = [await queue.enqueue(env(), DATA) for _ in range(300)]
    assert len(set(ids)) == 300
    assert all(isinstance(i, str) and i for i in ids)


async def test_get_missing_raises(queue: Queue) -> None:
    with pytest.raises(MessageNotFound):
        await queue.get("0000000000000000")


async def test_returned_messages_are_copies(queue: Queue) -> None:
    mid = await queue.enqueue(env(), DATA, meta={"k": "v"})
    msg = await queue.get(mid)
    msg.recipients[0].state = SENT
    msg.meta["k"] = "changed"
    again = await queue.get(mid)
    assert again.recipients[0].state is PENDING
    assert again.meta == {"k": "v"}


# -- idempotency -----------------------------------------------------------------------


async def test_idempotency_key_stores_once(queue: Queue) -> None:
    first = await queue.enqueue(env(), DATA, idempotency_key="order-42")
    second = await queue.enqueue(env("other@example.net"), b"different", idempotency_key="order-42")
    assert second == first
    assert await queue.find("order-42") == first
    assert await queue.find("order-43") is None
    msg = await queue.get(first)
    assert msg.data == DATA
    assert msg.idempotency_key == "order-42"
    assert (await queue.counts())[MessageState.QUEUED] == 1


async def test_concurrent_enqueues_with_one_key_store_once(queue: Queue) -> None:
    ids = await asyncio.gather(
        *(queue.enqueue(env(), DATA, idempotency_key="same") for _ in range(20))
    )
    assert len(set(ids)) == 1
    assert (await queue.counts())[MessageState.QUEUED] == 1


async def test_deleting_frees_the_idempotency_key(queue: Queue) -> None:
    first = await queue.enqueue(env(), DATA, idempotency_key="k")
    await queue.delete(first)
    assert await queue.find("k") is None
    second = await queue.enqueue(env(), DATA, idempotency_key="k")
    assert second != first


# -- claim -----------------------------------------------------------------------------


async def test_claim_hands_out_oldest_due_first(queue: Queue, clock: FakeClock) -> None:
    now = clock.now
    late = await queue.enqueue(env(), DATA, not_before=now - 10)
    early = await queue.enqueue(env(), DATA, not_before=now - 30)
    middle = await queue.enqueue(env(), DATA, not_before=now - 20)
    plain = await queue.enqueue(env(), DATA)
    claimed = await queue.claim(owner="w1", limit=3, lease_seconds=LEASE)
    assert [m.id for m in claimed] == [early, middle, late]
    assert [m.id for m in await queue.claim(owner="w1", limit=10, lease_seconds=LEASE)] == [plain]


async def test_claim_returns_full_messages_and_sets_the_lease(
    queue: Queue, clock: FakeClock
) -> None:
    mid = await queue.enqueue(env("b@example.net", "c@example.net"), DATA, meta={"k": "v"})
    msg = await claim_one(queue)
    assert msg.id == mid
    assert msg.data == DATA
    assert msg.sender == "a@example.org"
    assert msg.pending == ["b@example.net", "c@example.net"]
    assert msg.meta == {"k": "v"}
    assert msg.state is MessageState.SENDING
    assert msg.lease_owner == "w1"
    assert msg.lease_until == clock.now + LEASE
    stored = await queue.get(mid)
    assert stored.state is MessageState.SENDING
    assert stored.lease_owner == "w1"
    assert stored.lease_until == clock.now + LEASE
    assert stored.attempts == 0


async def test_claim_respects_not_before(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA, not_before=clock.now + 60)
    assert (await queue.get(mid)).next_attempt_at == clock.now + 60
    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []
    clock.advance(59.9)
    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []
    clock.advance(0.1)
    assert (await claim_one(queue)).id == mid


async def test_held_messages_are_never_claimed(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA, held=True)
    assert (await queue.get(mid)).state is MessageState.HELD
    clock.advance(10 * 86400)
    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []


async def test_claim_limit_and_empty_queue(queue: Queue) -> None:
    assert await queue.claim(owner="w1", limit=5, lease_seconds=LEASE) == []
    for _ in range(7):
        await queue.enqueue(env(), DATA)
    assert len(await queue.claim(owner="w1", limit=5, lease_seconds=LEASE)) == 5
    assert len(await queue.claim(owner="w1", limit=5, lease_seconds=LEASE)) == 2
    assert await queue.claim(owner="w1", limit=5, lease_seconds=LEASE) == []


async def test_a_lease_has_one_owner_until_it_expires(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue, "w1")
    assert await queue.claim(owner="w2", limit=10, lease_seconds=LEASE) == []
    clock.advance(LEASE - 1)
    assert await queue.claim(owner="w2", limit=10, lease_seconds=LEASE) == []
    clock.advance(1)
    taken = await claim_one(queue, "w2")
    assert taken.id == mid
    assert taken.lease_owner == "w2"
    assert taken.attempts == 0
    assert (await queue.get(mid)).lease_owner == "w2"


# -- record ----------------------------------------------------------------------------


async def test_record_all_sent(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env("b@example.net", "c@example.net"), DATA)
    await claim_one(queue)
    state = await queue.record(
        mid,
        [
            Outcome("b@example.net", SENT, "250 2.0.0 ok b", "relay[127.0.0.1]:25"),
            Outcome("c@example.net", SENT, "250 2.0.0 ok c", "relay[127.0.0.1]:25"),
        ],
        owner="w1",
        retry_at=None,
    )
    assert state is MessageState.SENT
    msg = await queue.get(mid)
    assert msg.state is MessageState.SENT
    assert msg.attempts == 1
    assert msg.lease_owner == ""
    assert msg.pending == []
    assert [(r.state, r.reply, r.relay, r.attempts) for r in msg.recipients] == [
        (SENT, "250 2.0.0 ok b", "relay[127.0.0.1]:25", 1),
        (SENT, "250 2.0.0 ok c", "relay[127.0.0.1]:25", 1),
    ]
    clock.advance(10 * 86400)
    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []


async def test_record_mixed_outcomes_then_finish(queue: Queue, clock: FakeClock) -> None:
    rcpts = ("ok@example.net", "bad@example.net", "later@example.net")
    mid = await queue.enqueue(env(*rcpts), DATA)
    await claim_one(queue)
    retry_at = clock.now + 120
    state = await queue.record(
        mid,
        [
            Outcome("ok@example.net", SENT, "250 2.0.0 ok"),
            Outcome("bad@example.net", FAILED, "550 5.1.1 no such user"),
            Outcome("later@example.net", PENDING, "451 4.3.0 try later"),
        ],
        owner="w1",
        retry_at=retry_at,
    )
    assert state is MessageState.DEFERRED
    msg = await queue.get(mid)
    assert msg.state is MessageState.DEFERRED
    assert msg.next_attempt_at == retry_at
    assert msg.attempts == 1
    assert msg.pending == ["later@example.net"]
    assert msg.last_reply in ("550 5.1.1 no such user", "451 4.3.0 try later")
    assert [r.state for r in msg.recipients] == [SENT, FAILED, PENDING]

    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []
    clock.advance(120)
    again = await claim_one(queue, "w2")
    assert again.id == mid
    assert again.attempts == 1
    assert again.pending == ["later@example.net"]
    state = await queue.record(
        mid,
        [Outcome("later@example.net", SENT, "250 2.0.0 ok at last")],
        owner="w2",
        retry_at=None,
    )
    # One recipient bounced, so the message as a whole failed.
    assert state is MessageState.FAILED
    msg = await queue.get(mid)
    assert msg.state is MessageState.FAILED
    assert msg.attempts == 2
    assert [(r.address, r.state, r.attempts) for r in msg.recipients] == [
        ("ok@example.net", SENT, 1),
        ("bad@example.net", FAILED, 1),
        ("later@example.net", SENT, 2),
    ]


async def test_recipients_not_named_keep_their_state(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env("b@example.net", "c@example.net"), DATA)
    await claim_one(queue)
    state = await queue.record(
        mid,
        [Outcome("b@example.net", SENT, "250 ok")],
        owner="w1",
        retry_at=clock.now + 60,
    )
    assert state is MessageState.DEFERRED
    msg = await queue.get(mid)
    assert [(r.state, r.attempts) for r in msg.recipients] == [(SENT, 1), (PENDING, 0)]


async def test_record_all_failed(queue: Queue) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    state = await queue.record(
        mid, [Outcome("b@example.net", FAILED, "554 5.7.1 no")], owner="w1", retry_at=None
    )
    assert state is MessageState.FAILED
    assert (await queue.get(mid)).last_reply == "554 5.7.1 no"


async def test_record_held_keeps_the_message(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    state = await queue.record(
        mid,
        [Outcome("b@example.net", PENDING, "held: no relay configured")],
        owner="w1",
        retry_at=None,
        held=True,
    )
    assert state is MessageState.HELD
    clock.advance(10 * 86400)
    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []
    assert (await queue.get(mid)).state is MessageState.HELD


async def test_record_from_a_stale_owner_is_refused(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue, "slow")
    clock.advance(LEASE + 1)
    await claim_one(queue, "fast")
    stale = await queue.record(
        mid, [Outcome("b@example.net", FAILED, "550 stale")], owner="slow", retry_at=None
    )
    assert stale is None
    msg = await queue.get(mid)
    assert msg.state is MessageState.SENDING
    assert msg.lease_owner == "fast"
    assert msg.attempts == 0
    assert msg.recipients[0].state is PENDING
    fresh = await queue.record(
        mid, [Outcome("b@example.net", SENT, "250 ok")], owner="fast", retry_at=None
    )
    assert fresh is MessageState.SENT
    # Once recorded, the lease is gone: a second record by the same owner is refused too.
    assert (
        await queue.record(
            mid, [Outcome("b@example.net", SENT, "250 ok")], owner="fast", retry_at=None
        )
        is None
    )


async def test_record_without_a_lease_is_refused(queue: Queue) -> None:
    mid = await queue.enqueue(env(), DATA)
    outcome = [Outcome("b@example.net", SENT, "250 ok")]
    assert await queue.record(mid, outcome, owner="w1", retry_at=None) is None
    assert (await queue.get(mid)).state is MessageState.QUEUED
    assert await queue.record("0000000000000000", outcome, owner="w1", retry_at=None) is None


async def test_record_on_a_deleted_message_is_refused(queue: Queue) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    await queue.delete(mid)
    outcome = [Outcome("b@example.net", SENT, "250 ok")]
    assert await queue.record(mid, outcome, owner="w1", retry_at=None) is None


async def test_record_needs_retry_at_while_pending(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    with pytest.raises(ValueError):
        await queue.record(
            mid, [Outcome("b@example.net", PENDING, "451 later")], owner="w1", retry_at=None
        )
    # Nothing changed: the owner can still record properly.
    msg = await queue.get(mid)
    assert (msg.state, msg.attempts, msg.lease_owner) == (MessageState.SENDING, 0, "w1")
    state = await queue.record(
        mid, [Outcome("b@example.net", PENDING, "451 later")], owner="w1", retry_at=clock.now + 5
    )
    assert state is MessageState.DEFERRED


async def test_record_for_an_unknown_recipient_changes_nothing(queue: Queue) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    with pytest.raises(ValueError):
        await queue.record(
            mid, [Outcome("stranger@example.net", SENT, "250 ok")], owner="w1", retry_at=None
        )
    msg = await queue.get(mid)
    assert (msg.state, msg.attempts, msg.recipients[0].state) == (
        MessageState.SENDING,
        0,
        PENDING,
    )


# -- release, requeue, delete ----------------------------------------------------------


async def test_release_makes_the_message_due_now(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue, "w1")
    await queue.release(mid, owner="someone-else")
    assert (await queue.get(mid)).lease_owner == "w1"
    clock.advance(5)
    await queue.release(mid, owner="w1")
    msg = await queue.get(mid)
    assert msg.state is MessageState.QUEUED
    assert msg.lease_owner == ""
    assert msg.attempts == 0
    assert msg.next_attempt_at == clock.now
    assert (await claim_one(queue, "w2")).id == mid


async def test_release_of_a_retried_message_is_deferred(queue: Queue, clock: FakeClock) -> None:
    mid = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    await queue.record(
        mid, [Outcome("b@example.net", PENDING, "451")], owner="w1", retry_at=clock.now
    )
    await claim_one(queue)
    await queue.release(mid, owner="w1")
    msg = await queue.get(mid)
    assert (msg.state, msg.attempts) == (MessageState.DEFERRED, 1)


async def test_release_of_unknown_message_is_harmless(queue: Queue) -> None:
    await queue.release("0000000000000000", owner="w1")


async def test_requeue_held_and_deferred(queue: Queue, clock: FakeClock) -> None:
    held = await queue.enqueue(env(), DATA, held=True)
    deferred = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    await queue.record(
        deferred,
        [Outcome("b@example.net", PENDING, "451")],
        owner="w1",
        retry_at=clock.now + 3600,
    )
    assert await queue.claim(owner="w1", limit=10, lease_seconds=LEASE) == []
    clock.advance(1)
    await queue.requeue(held)
    await queue.requeue(deferred)
    assert (await queue.get(held)).state is MessageState.QUEUED
    msg = await queue.get(deferred)
    assert (msg.state, msg.next_attempt_at) == (MessageState.DEFERRED, clock.now)
    claimed = await queue.claim(owner="w1", limit=10, lease_seconds=LEASE)
    assert sorted(m.id for m in claimed) == sorted([held, deferred])


async def test_requeue_leaves_sending_and_finished_alone(queue: Queue, clock: FakeClock) -> None:
    done = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    await queue.record(done, [Outcome("b@example.net", SENT, "250")], owner="w1", retry_at=None)
    busy = await queue.enqueue(env(), DATA)
    await claim_one(queue)
    await queue.requeue(done)
    await queue.requeue(busy)
    assert (await queue.get(done)).state is MessageState.SENT
    msg = await queue.get(busy)
    assert (msg.state, msg.lease_owner) == (MessageState.SENDING, "w1")
    with pytest.raises(MessageNotFound):
        await queue.requeue("0000000000000000")


async def test_delete(queue: Queue) -> None:
    keep = await queue.enqueue(env(), DATA)
    drop = await queue.enqueue(env(), DATA)
    await queue.delete(drop)
    with pytest.raises(MessageNotFound):
        await queue.get(drop)
    with pytest.raises(MessageNotFound):
        await queue.delete(drop)
    assert [m.id for m in await queue.list()] == [keep]
    assert [m.id for m in await queue.claim(owner="w1", limit=10, lease_seconds=LEASE)] == [keep]


# -- list and counts -------------------------------------------------------------------


async def test_list_newest_first_with_filters(queue: Queue, clock: FakeClock) -> None:
    ids = []
    for i in range(5):
        clock.advance(1)
        ids.append(await queue.enqueue(env(f"r{i}@example.net"), DATA, held=(i % 2 == 1)))
    listed = await queue.list()
    assert [m.id for m in listed] == ids[::-1]
    assert [m.recipients[0].address for m in listed] == [f"r{i}@example.net" for i in range(5)][
        ::-1
    ]
    assert all(m.sender == "a@example.org" and m.data in (b"", DATA) for m in listed)
    assert [m.id for m in await queue.list(limit=2)] == ids[:2:-1]
    assert [m.id for m in await queue.list(states=[MessageState.HELD])] == [ids[3], ids[1]]
    both = await queue.list(states=[MessageState.HELD, MessageState.QUEUED], limit=3)
    assert [m.id for m in both] == [ids[4], ids[3], ids[2]]
    assert await queue.list(states=[MessageState.SENT]) == []
    assert await queue.list(states=[]) == []


async def test_counts(queue: Queue, clock: FakeClock) -> None:
    counts = await queue.counts()
    assert set(counts) == set(MessageState)
    assert all(n == 0 for n in counts.values())
    for _ in range(3):
        await queue.enqueue(env(), DATA)
    await queue.enqueue(env(), DATA, held=True)
    sent, deferred, _ = await queue.claim(owner="w1", limit=3, lease_seconds=LEASE)
    await queue.record(sent.id, [Outcome("b@example.net", SENT, "250")], owner="w1", retry_at=None)
    await queue.record(
        deferred.id, [Outcome("b@example.net", PENDING, "4")], owner="w1", retry_at=clock.now + 9
    )
    counts = await queue.counts()
    assert counts[MessageState.SENT] == 1
    assert counts[MessageState.DEFERRED] == 1
    assert counts[MessageState.SENDING] == 1
    assert counts[MessageState.HELD] == 1
    assert counts[MessageState.QUEUED] == 0
    assert counts[MessageState.QUARANTINED] == 0
    assert sum(counts.values()) == 4


async def test_oldest_per_state(queue: Queue, clock: FakeClock) -> None:
    assert await queue.oldest() == {}
    first_at = clock.now
    first = await queue.enqueue(env(), DATA)
    clock.now += 60
    await queue.enqueue(env(), DATA)
    clock.now += 60
    held_at = clock.now
    await queue.enqueue(env(), DATA, held=True)
    oldest = await queue.oldest()
    assert oldest[MessageState.QUEUED] == pytest.approx(first_at, abs=1e-3)
    assert oldest[MessageState.HELD] == pytest.approx(held_at, abs=1e-3)
    assert MessageState.SENT not in oldest
    await queue.delete(first)
    assert (await queue.oldest())[MessageState.QUEUED] == pytest.approx(first_at + 60, abs=1e-3)


async def test_ping_writes_and_changes_no_message(queue: Queue) -> None:
    kept = await queue.enqueue(env(), DATA)
    before = await queue.counts()
    await queue.ping()
    await queue.ping()
    assert await queue.counts() == before
    assert (await queue.get(kept)).data == DATA


async def test_ping_on_a_closed_queue_raises_queue_error(queue: Queue) -> None:
    await queue.close()
    try:
        with pytest.raises(QueueError):
            await queue.ping()
    finally:
        await queue.open()


# -- recovery --------------------------------------------------------------------------


async def test_recover_returns_expired_leases(queue: Queue, clock: FakeClock) -> None:
    fresh = await queue.enqueue(env(), DATA)
    retried = await queue.enqueue(env(), DATA)
    await queue.claim(owner="w1", limit=2, lease_seconds=LEASE)
    await queue.record(
        retried, [Outcome("b@example.net", PENDING, "4")], owner="w1", retry_at=clock.now
    )
    await claim_one(queue)
    clock.advance(LEASE / 2)
    still = await queue.enqueue(env(), DATA)
    await claim_one(queue, "w2")
    clock.advance(LEASE / 2)
    report = await queue.recover()
    assert report.leases_expired == 2
    assert report.quarantined == []
    assert (await queue.get(fresh)).state is MessageState.QUEUED
    assert (await queue.get(retried)).state is MessageState.DEFERRED
    assert (await queue.get(fresh)).lease_owner == ""
    msg = await queue.get(still)
    assert (msg.state, msg.lease_owner) == (MessageState.SENDING, "w2")
    claimed = await queue.claim(owner="w3", limit=10, lease_seconds=LEASE)
    assert sorted(m.id for m in claimed) == sorted([fresh, retried])
    assert (await queue.recover()).leases_expired == 0


# -- durability ------------------------------------------------------------------------


@pytest.mark.durable_only
async def test_state_survives_close_and_reopen(
    queue: Queue, open_new: OpenQueue, clock: FakeClock
) -> None:
    a = await queue.enqueue(env("b@example.net", "c@example.net"), DATA, idempotency_key="k1")
    b = await queue.enqueue(env(), DATA + b"2", held=True)
    await claim_one(queue)
    await queue.record(
        a,
        [Outcome("b@example.net", SENT, "250 ok", "relay:25")],
        owner="w1",
        retry_at=clock.now + 60,
    )
    await queue.close()
    await queue.close()  # close is idempotent
    again = await open_new()
    msg = await again.get(a)
    assert msg.data == DATA
    assert (msg.state, msg.attempts, msg.next_attempt_at) == (
        MessageState.DEFERRED,
        1,
        clock.now + 60,
    )
    assert [(r.state, r.reply, r.relay) for r in msg.recipients] == [
        (SENT, "250 ok", "relay:25"),
        (PENDING, "", ""),
    ]
    assert await again.find("k1") == a
    assert (await again.get(b)).state is MessageState.HELD
    assert (await again.get(b)).data == DATA + b"2"


@pytest.mark.durable_only
async def test_two_instances_share_one_store(queue: Queue, open_new: OpenQueue) -> None:
    other = await open_new()
    mid = await queue.enqueue(env(), DATA)
    assert (await other.get(mid)).data == DATA
    assert [m.id for m in await other.claim(owner="w2", limit=5, lease_seconds=LEASE)] == [mid]
    assert await queue.claim(owner="w1", limit=5, lease_seconds=LEASE) == []


# -- concurrency -----------------------------------------------------------------------


async def test_many_concurrent_enqueues_all_land(queue: Queue) -> None:
    payloads = [DATA + b"%d\r\n" % i for i in range(250)]
    ids = await asyncio.gather(*(queue.enqueue(env(), p) for p in payloads))
    assert len(set(ids)) == 250
    for mid, payload in zip(ids, payloads, strict=True):
        assert (await queue.get(mid)).data == payload
    assert (await queue.counts())[MessageState.QUEUED] == 250


async def test_concurrent_claimers_never_share_a_message(queue: Queue) -> None:
    ids = set(await asyncio.gather(*(queue.enqueue(env(), DATA) for _ in range(120))))
    seen: list[str] = []

    async def worker(name: str) -> None:
        for _ in range(200):  # bounded: 120 messages need far fewer rounds
            claimed = await queue.claim(owner=name, limit=3, lease_seconds=LEASE)
            if not claimed:
                return
            for m in claimed:
                seen.append(m.id)
                state = await queue.record(
                    m.id, [Outcome("b@example.net", SENT, "250")], owner=name, retry_at=None
                )
                assert state is MessageState.SENT

    await within(asyncio.gather(*(worker(f"w{i}") for i in range(12))), 30)
    assert sorted(seen) == sorted(ids)
    assert (await queue.counts())[MessageState.SENT] == 120


async def test_concurrent_claims_and_enqueues(queue: Queue) -> None:
    claimed: list[str] = []
    enqueued: list[str] = []

    async def producer() -> None:
        for _ in range(100):
            enqueued.append(await queue.enqueue(env(), DATA))

    async def consumer(name: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(claimed) < 100:
            batch = await queue.claim(owner=name, limit=4, lease_seconds=LEASE)
            claimed.extend(m.id for m in batch)
            if not batch:
                await queue.wait_for_work(0.05)

    await within(asyncio.gather(producer(), *(consumer(f"c{i}") for i in range(4))), 30)
    assert sorted(claimed) == sorted(enqueued)


# -- wake-ups --------------------------------------------------------------------------


async def test_wait_for_work_wakes_on_enqueue(queue: Queue) -> None:
    waiter = asyncio.create_task(queue.wait_for_work(60))
    await asyncio.sleep(0)
    await queue.enqueue(env(), DATA)
    await within(waiter)


async def test_wait_for_work_wakes_on_release_and_requeue(queue: Queue) -> None:
    mid = await queue.enqueue(env(), DATA, held=True)
    await queue.wait_for_work(0)  # consume the enqueue's wake-up
    waiter = asyncio.create_task(queue.wait_for_work(60))
    await asyncio.sleep(0)
    await queue.requeue(mid)
    await within(waiter)
    await claim_one(queue)
    await queue.wait_for_work(0)
    waiter = asyncio.create_task(queue.wait_for_work(60))
    await asyncio.sleep(0)
    await queue.release(mid, owner="w1")
    await within(waiter)


async def test_wait_for_work_times_out(queue: Queue) -> None:
    started = time.monotonic()
    await within(queue.wait_for_work(0.05))
    assert time.monotonic() - started < 5
