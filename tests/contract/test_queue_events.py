"""The delivery-event part of the queue contract, on every backend.

Events are stored with the step they describe (``enqueue(events=)``, ``record(events=)``)
or on their own (``add_events``), once per ``event_id``, and read back in store order by
cursor, message, envelope id and time.
"""

from __future__ import annotations

import pytest

from hato.errors import QueueError
from hato.events import DeliveryEvent, new_event_id
from hato.message import Envelope
from hato.queue.base import MessageState, Outcome, Queue, RecipientState
from hato.testing import FakeClock

from .conftest import Backend, OpenQueue

DATA = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def event(
    name: str,
    clock: FakeClock,
    *,
    queue_id: str = "",
    recipient: str = "b@example.net",
    envid: str = "",
    **attempt: object,
) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(clock),
        event=name,
        time=clock(),
        node="node-a",
        queue_id=queue_id,
        recipient=recipient,
        envid=envid,
        **attempt,  # type: ignore[arg-type]
    )


async def test_enqueue_stores_its_accepted_events_with_the_new_id(
    queue: Queue, clock: FakeClock
) -> None:
    accepted = [
        event("accepted", clock, recipient="b@example.net", envid="E1"),
        event("accepted", clock, recipient="c@example.net", envid="E1"),
    ]
    message_id = await queue.enqueue(
        Envelope("a@example.org", ["b@example.net", "c@example.net"]), DATA, events=accepted
    )
    page = await queue.events(queue_id=message_id)
    assert [(e.event, e.recipient, e.queue_id) for e in page.events] == [
        ("accepted", "b@example.net", message_id),
        ("accepted", "c@example.net", message_id),
    ]
    assert [e.event_id for e in page.events] == [e.event_id for e in accepted]


async def test_a_repeated_idempotency_key_stores_no_second_set_of_events(
    queue: Queue, clock: FakeClock
) -> None:
    envelope = Envelope("a@example.org", ["b@example.net"])
    first = await queue.enqueue(
        envelope, DATA, idempotency_key="k", events=[event("accepted", clock)]
    )
    again = await queue.enqueue(
        envelope, DATA, idempotency_key="k", events=[event("accepted", clock)]
    )
    assert again == first
    assert len((await queue.events(queue_id=first)).events) == 1


async def test_record_stores_the_attempts_events_only_while_owning_the_lease(
    queue: Queue, clock: FakeClock
) -> None:
    message_id = await queue.enqueue(Envelope("a@example.org", ["b@example.net"]), DATA)
    [msg] = await queue.claim(owner="w1", limit=1, lease_seconds=60)
    delivered = event(
        "delivered",
        clock,
        queue_id=message_id,
        attempt=1,
        route="mx",
        relay_host="mx.example.net",
        relay_ip="192.0.2.25",
        reply_code=250,
        reply_enhanced="2.0.0",
        reply_text="ok",
        tls_version="TLSv1.3",
        tls_verified=True,
        tls_policy="dane",
    )
    outcome = Outcome("b@example.net", RecipientState.SENT, "250 2.0.0 ok")
    # Not the owner: nothing changes, no event.
    assert (
        await queue.record(msg.id, [outcome], owner="w2", retry_at=None, events=[delivered]) is None
    )
    assert (await queue.events(queue_id=message_id)).events == []
    await queue.record(msg.id, [outcome], owner="w1", retry_at=None, events=[delivered])
    [stored] = (await queue.events(queue_id=message_id)).events
    assert stored == delivered  # every field, the attempt record included


async def test_add_events_keeps_one_copy_of_each_event_id(queue: Queue, clock: FakeClock) -> None:
    pulled = [event("relayed", clock, queue_id="REMOTE1", envid="OUTBOX1") for _ in range(3)]
    assert await queue.add_events(pulled) == 3
    assert await queue.add_events(pulled[1:]) == 0
    page = await queue.events(envid="OUTBOX1")
    assert [e.event_id for e in page.events] == [e.event_id for e in pulled]


async def test_the_cursor_pages_through_events_in_store_order_and_follows_new_ones(
    queue: Queue, clock: FakeClock
) -> None:
    made = []
    for i in range(7):
        clock.advance(1)
        made.append(event("deferred", clock, queue_id=f"Q{i % 2}", attempt=i))
    await queue.add_events(made)
    seen, cursor = [], ""
    while True:
        page = await queue.events(after=cursor, limit=3)
        if not page.events:
            break
        seen += page.events
        cursor = page.cursor
    assert [e.event_id for e in seen] == [e.event_id for e in made]
    # Nothing new: the cursor stays; one more event: only it comes.
    assert (await queue.events(after=cursor)).events == []
    later = event("delivered", clock, queue_id="Q0")
    await queue.add_events([later])
    assert (await queue.events(after=cursor)).events == [later]


async def test_filters_select_by_message_envid_and_time(queue: Queue, clock: FakeClock) -> None:
    early = event("accepted", clock, queue_id="Q1", envid="E1")
    clock.advance(100)
    late_other = event("accepted", clock, queue_id="Q2", envid="E2")
    late_same = event("relayed", clock, queue_id="Q1", envid="E1")
    await queue.add_events([early, late_other, late_same])
    assert (await queue.events(queue_id="Q1")).events == [early, late_same]
    assert (await queue.events(envid="E2")).events == [late_other]
    assert (await queue.events(since=clock() - 1)).events == [late_other, late_same]
    # A filtered follower's cursor moves past what did not match.
    page = await queue.events(envid="E2")
    await queue.add_events([event("delivered", clock, queue_id="Q2", envid="E2")])
    assert [e.event for e in (await queue.events(after=page.cursor, envid="E2")).events] == [
        "delivered"
    ]


async def test_prune_forgets_old_events_only(queue: Queue, clock: FakeClock) -> None:
    old = event("accepted", clock, queue_id="Q1")
    clock.advance(3600)
    new = event("delivered", clock, queue_id="Q1")
    await queue.add_events([old, new])
    assert await queue.prune_events(clock() - 60) == 1
    assert (await queue.events(queue_id="Q1")).events == [new]


async def test_a_cursor_from_nowhere_is_refused(queue: Queue) -> None:
    with pytest.raises(QueueError):
        await queue.events(after="not a cursor")


async def test_cursors_are_kept_by_name_and_replaced(queue: Queue) -> None:
    assert await queue.get_cursor("webhook:https://a.example/hook") == ""
    await queue.set_cursor("webhook:https://a.example/hook", "12")
    await queue.set_cursor("pull:https://relay.example/api/v1/events", "1-0")
    await queue.set_cursor("webhook:https://a.example/hook", "15")
    assert await queue.get_cursor("webhook:https://a.example/hook") == "15"
    assert await queue.get_cursor("pull:https://relay.example/api/v1/events") == "1-0"
    assert await queue.get_cursor("webhook:https://b.example/hook") == ""


async def test_a_cursor_is_seen_by_another_opening_of_the_queue(
    queue: Queue, open_new: OpenQueue, backend: Backend
) -> None:
    await queue.set_cursor("webhook:https://a.example/hook", "42")
    # A memory queue is its process's own: there the same queue is the other reader.
    other = queue if backend.name == "memory" else await open_new()
    assert await other.get_cursor("webhook:https://a.example/hook") == "42"


async def test_record_bounce_fails_delivered_recipients_after_the_fact(
    queue: Queue, clock: FakeClock
) -> None:
    envelope = Envelope("a@example.org", ["b@example.net", "c@example.net", "d@example.net"])
    message_id = await queue.enqueue(envelope, DATA)
    [msg] = await queue.claim(owner="w1", limit=1, lease_seconds=60)
    sent = [
        Outcome(r, RecipientState.SENT, "250 2.0.0 ok", "mx[192.0.2.1]:25") for r in msg.pending
    ]
    assert await queue.record(message_id, sent, owner="w1", retry_at=None) is MessageState.SENT
    before = await queue.get(message_id)

    bounced = event("bounced", clock, queue_id=message_id, reply_code=550)
    state = await queue.record_bounce(
        message_id,
        [
            Outcome("b@example.net", RecipientState.FAILED, "550 5.1.1 unknown", "bounce"),
            Outcome("c@example.net", RecipientState.PENDING, "451 later", "bounce"),  # ignored
            Outcome("x@example.net", RecipientState.FAILED, "550 not ours", "bounce"),  # ignored
        ],
        events=[bounced],
    )
    assert state is MessageState.FAILED
    after = await queue.get(message_id)
    assert after.state is MessageState.FAILED
    assert [(r.address, r.state, r.reply, r.relay) for r in after.recipients] == [
        ("b@example.net", RecipientState.FAILED, "550 5.1.1 unknown", "bounce"),
        ("c@example.net", RecipientState.SENT, "250 2.0.0 ok", "mx[192.0.2.1]:25"),
        ("d@example.net", RecipientState.SENT, "250 2.0.0 ok", "mx[192.0.2.1]:25"),
    ]
    assert after.attempts == before.attempts
    assert [r.attempts for r in after.recipients] == [r.attempts for r in before.recipients]
    assert [e.event_id for e in (await queue.events(queue_id=message_id)).events] == [
        bounced.event_id
    ]
    assert message_id in [m.id for m in await queue.list(states=[MessageState.FAILED])]
    assert message_id not in [m.id for m in await queue.list(states=[MessageState.SENT])]
    assert await queue.claim(owner="w2", limit=5, lease_seconds=60) == []

    # Told twice (a bounce delivered again): nothing changes, the event is kept once.
    again = await queue.record_bounce(
        message_id,
        [Outcome("b@example.net", RecipientState.FAILED, "550 5.1.1 unknown", "bounce")],
        events=[bounced],
    )
    assert again is MessageState.FAILED
    assert len((await queue.events(queue_id=message_id)).events) == 1


async def test_record_bounce_leaves_a_pending_message_to_its_attempts(
    queue: Queue, clock: FakeClock
) -> None:
    envelope = Envelope("a@example.org", ["b@example.net", "c@example.net"])
    message_id = await queue.enqueue(envelope, DATA)
    await queue.claim(owner="w1", limit=1, lease_seconds=60)
    outcomes = [
        Outcome("b@example.net", RecipientState.SENT, "250 ok"),
        Outcome("c@example.net", RecipientState.PENDING, "451 later"),
    ]
    retry_at = clock() + 60
    assert (
        await queue.record(message_id, outcomes, owner="w1", retry_at=retry_at)
        is MessageState.DEFERRED
    )
    state = await queue.record_bounce(
        message_id,
        [
            Outcome("b@example.net", RecipientState.FAILED, "550 gone"),
            Outcome("c@example.net", RecipientState.FAILED, "550 gone"),  # still pending here
        ],
    )
    assert state is MessageState.DEFERRED
    after = await queue.get(message_id)
    assert [(r.address, r.state) for r in after.recipients] == [
        ("b@example.net", RecipientState.FAILED),
        ("c@example.net", RecipientState.PENDING),
    ]
    assert after.next_attempt_at == retry_at
    clock.advance(61)
    [again] = await queue.claim(owner="w2", limit=1, lease_seconds=60)
    assert again.pending == ["c@example.net"]


async def test_record_bounce_for_a_message_not_in_the_queue(queue: Queue, clock: FakeClock) -> None:
    bounced = event("bounced", clock, queue_id="0000000000000DEADBEEF")
    outcome = Outcome("b@example.net", RecipientState.FAILED, "550 gone")
    assert await queue.record_bounce("0000000000000DEADBEEF", [outcome], events=[bounced]) is None
    assert (await queue.events(queue_id="0000000000000DEADBEEF")).events == []
