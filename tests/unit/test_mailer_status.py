"""The application's view of a stored message: five states, the reply that explains each."""

from __future__ import annotations

import pytest

from hato.events import DeliveryEvent
from hato.mailer import STATES, status_of
from hato.queue.base import MessageState, RecipientState, RecipientStatus, StoredMessage


def stored(state: MessageState, last_reply: str = "", *rcpts: RecipientStatus) -> StoredMessage:
    return StoredMessage(
        id="ABC",
        sender="noreply@app.example",
        recipients=list(rcpts) or [RecipientStatus("u@example.net")],
        data=b"",
        state=state,
        created_at=1.0,
        next_attempt_at=2.0,
        attempts=3,
        last_reply=last_reply,
    )


@pytest.mark.parametrize(
    ("queue_state", "state"),
    [
        (MessageState.QUEUED, "queued"),
        (MessageState.HELD, "queued"),
        (MessageState.SENDING, "sending"),
        (MessageState.DEFERRED, "deferred"),
        (MessageState.SENT, "sent"),
        (MessageState.FAILED, "failed"),
        (MessageState.QUARANTINED, "failed"),
    ],
)
def test_every_queue_state_maps_to_one_of_the_states(queue_state: MessageState, state: str) -> None:
    status = status_of(stored(queue_state, "x"))
    assert status.state == state
    assert status.state in STATES
    assert status.queue_state == queue_state.value
    assert status.id == "ABC" and status.attempts == 3


def test_sent_carries_the_relays_reply() -> None:
    reply = "250 2.0.0 Ok: queued as 4F2A"
    rcpt = RecipientStatus("u@example.net", RecipientState.SENT, reply, "relay[127.0.0.1]:25", 1)
    status = status_of(stored(MessageState.SENT, reply, rcpt))
    assert status.reply == reply
    assert status.done and status.reason == ""
    assert status.next_attempt_at is None
    assert status.recipients[0].reply == reply


def test_deferred_carries_the_last_temporary_reply() -> None:
    reply = "451 4.4.1 connection refused"
    status = status_of(stored(MessageState.DEFERRED, reply))
    assert (status.state, status.reply, status.reason) == ("deferred", reply, "")
    assert status.next_attempt_at == 2.0 and not status.done


def test_failed_gives_the_failed_recipients_reason() -> None:
    sent = RecipientStatus("a@x.org", RecipientState.SENT, "250 ok")
    failed = RecipientStatus("b@x.org", RecipientState.FAILED, "550 5.1.1 no such user")
    status = status_of(stored(MessageState.FAILED, "250 ok", sent, failed))
    assert status.reason == "550 5.1.1 no such user" == status.reply
    assert status.done


def test_quarantined_reads_as_failed_with_the_reason() -> None:
    status = status_of(stored(MessageState.QUARANTINED, "quarantined: checksum mismatch"))
    assert status.state == "failed"
    assert status.reason == "quarantined: checksum mismatch"
    assert status_of(stored(MessageState.QUARANTINED)).reason.startswith("quarantined: ")


def test_held_says_why_it_waits() -> None:
    assert "held" in status_of(stored(MessageState.HELD)).reply


def hop_event(name: str, recipient: str, time: float, code: int, text: str) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=f"{name}-{recipient}-{time}",
        event=name,
        time=time,
        node="relay.dbmx.net",
        queue_id="UPSTREAM1",
        recipient=recipient,
        envid="ABC",
        reply_code=code,
        reply_enhanced=f"{code // 100}.0.0",
        reply_text=text,
    )


def sent_to(*addresses: str) -> StoredMessage:
    rcpts = [
        RecipientStatus(a, RecipientState.SENT, "250 2.0.0 queued as L1", "local[127.0.0.1]", 1)
        for a in addresses
    ]
    return stored(MessageState.SENT, "250 2.0.0 queued as L1", *rcpts)


def test_sent_becomes_delivered_with_the_mx_reply_when_the_last_hop_says_so() -> None:
    events = [
        hop_event("relayed", "u@example.net", 10.0, 250, "queued as R1"),
        hop_event("delivered", "u@example.net", 11.0, 250, "Ok: queued as MX1"),
    ]
    status = status_of(sent_to("u@example.net"), events)
    assert (status.state, status.reply) == ("delivered", "250 2.0.0 Ok: queued as MX1")
    assert status.done and status.final and status.reason == ""
    assert status.events == tuple(events)
    assert [r.state for r in status.recipients] == ["delivered"]


def test_a_refusal_further_on_is_bounced_and_a_late_bounce_wins_over_delivered() -> None:
    events = [
        hop_event("delivered", "u@example.net", 11.0, 250, "Ok"),
        hop_event("bounced", "u@example.net", 99.0, 550, "mailbox full for good"),
    ]
    status = status_of(sent_to("u@example.net"), events)
    assert (status.state, status.reason) == ("bounced", "550 5.0.0 mailbox full for good")


def test_several_recipients_report_the_least_advanced_and_each_its_own() -> None:
    one = [hop_event("delivered", "a@example.net", 11.0, 250, "Ok")]
    status = status_of(sent_to("a@example.net", "b@example.net"), one)
    assert status.state == "sent" and status.done and not status.final
    assert [(r.address, r.state) for r in status.recipients] == [
        ("a@example.net", "delivered"),
        ("b@example.net", "sent"),
    ]
    both = [*one, hop_event("bounced", "B@example.net", 12.0, 550, "no such user")]
    status = status_of(sent_to("a@example.net", "b@example.net"), both)
    assert status.state == "bounced" and status.reply == "550 5.0.0 no such user"


def test_a_refusal_at_the_first_hop_stays_failed_whatever_else_arrives() -> None:
    failed = RecipientStatus("u@example.net", RecipientState.FAILED, "550 5.1.1 no", "r", 1)
    events = [hop_event("bounced", "u@example.net", 11.0, 550, "no")]
    status = status_of(stored(MessageState.FAILED, "550 5.1.1 no", failed), events)
    assert (status.state, status.reply) == ("failed", "550 5.1.1 no")
