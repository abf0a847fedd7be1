"""The application's view of a stored message: five states, the reply that explains each."""

from __future__ import annotations

import pytest

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
def test_every_queue_state_maps_to_one_of_five(queue_state: MessageState, state: str) -> None:
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
