"""DSN parameters (RFC 3461) are kept by every queue backend: RET and ENVID with the
message, NOTIFY and ORCPT per recipient, through claim and record, read back whole."""

from __future__ import annotations

from hato.dsn_params import (
    META_NOTIFY,
    META_RET,
    RecipientDsn,
    request_of,
    store_recipients,
)
from hato.message import META_ENVID, Envelope
from hato.queue.base import Outcome, Queue, RecipientState

DATA = b"From: a@example.org\r\nSubject: dsn\r\n\r\nbody\r\n"


async def test_dsn_parameters_survive_claim_and_record(queue: Queue) -> None:
    envelope = Envelope(sender="a@example.org", recipients=["b@example.net", "c@example.net"])
    envelope.meta[META_ENVID] = "Q 4711+x"
    envelope.meta[META_RET] = "HDRS"
    envelope.meta[META_NOTIFY] = "FAILURE,DELAY"
    store_recipients(
        envelope.meta,
        {"b@example.net": RecipientDsn(frozenset({"SUCCESS"}), "rfc822;B@example.net")},
    )
    mid = await queue.enqueue(envelope, DATA)
    (claimed,) = await queue.claim(owner="w1", limit=1, lease_seconds=60)
    assert claimed.meta == envelope.meta
    await queue.record(
        mid,
        [Outcome("b@example.net", RecipientState.SENT, "250 ok")],
        owner="w1",
        retry_at=claimed.next_attempt_at + 60,
    )
    stored = await queue.get(mid)
    assert stored.meta == envelope.meta
    request = request_of(stored.meta)
    assert request.envid == "Q 4711+x"
    assert request.ret == "HDRS"
    assert request.of("b@example.net") == RecipientDsn(
        frozenset({"SUCCESS"}), "rfc822;B@example.net"
    )
    assert request.of("c@example.net") == RecipientDsn(frozenset({"FAILURE", "DELAY"}))
