"""``DeliveryEvent.to_json`` (the hot path encodes the events of every enqueue and
record): every field, in declaration order, plain values, the same as ``asdict``; and
``encode``/``decode`` give the event back."""

from __future__ import annotations

from dataclasses import asdict, fields

from hato.events import DeliveryEvent, decode, encode

FULL = DeliveryEvent(
    event_id="E1",
    event="delivered",
    time=1_700_000_000.25,
    node="mx.example.org",
    queue_id="18F3A2B4C5D6E7F8A",
    recipient="b@example.net",
    envid="Q 4711",
    message_id="<m@example.org>",
    attempt=2,
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


def test_to_json_is_asdict_in_field_order() -> None:
    for event in (FULL, DeliveryEvent("E2", "accepted", 1.0, "n", "", "r")):
        got = event.to_json()
        assert got == asdict(event)
        assert list(got) == [f.name for f in fields(DeliveryEvent)]


def test_every_field_is_a_plain_value() -> None:
    # to_json copies no nested values: a field of another type would need asdict again.
    assert all(isinstance(v, str | int | float | bool) for v in FULL.to_json().values())


def test_encode_decode_round_trip() -> None:
    assert decode(encode(FULL)) == FULL
