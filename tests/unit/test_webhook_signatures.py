"""Webhook signatures: what verify() accepts and refuses (pure, by table)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from hato.errors import HatoError, SignatureError
from hato.events import DeliveryEvent
from hato.webhooks import parse_events, sign, verify

BODY = b'{"event_id":"x","event":"delivered"}'
NOW = 1_764_763_200


def test_the_signature_is_the_hmac_of_time_dot_body() -> None:
    header = sign(BODY, "s3cret", NOW)
    expected = hmac.new(b"s3cret", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={NOW},v1={expected}"
    assert verify(BODY, header, "s3cret", now=NOW) == NOW


def test_a_rotation_signs_with_every_secret_and_either_verifies() -> None:
    header = sign(BODY, ["new", "old"], NOW)
    assert header.count("v1=") == 2
    assert verify(BODY, header, "old", now=NOW) == NOW
    assert verify(BODY, header, ["other", "new"], now=NOW) == NOW
    # A receiver already on the new secret takes what a sender still on the old one signs
    # only if it lists the old one too.
    assert verify(BODY, sign(BODY, "old", NOW), ["new", "old"], now=NOW) == NOW


@pytest.mark.parametrize(
    ("header", "secrets", "now", "says"),
    [
        (None, "s3cret", NOW, "no Hato-Signature"),
        ("", "s3cret", NOW, "no Hato-Signature"),
        ("v1=abc", "s3cret", NOW, "needs t="),
        (f"t={NOW}", "s3cret", NOW, "needs t="),
        ("t=soon,v1=abc", "s3cret", NOW, "not a Unix time"),
        (sign(BODY, "other", NOW), "s3cret", NOW, "no signature matches"),
        (sign(BODY + b" ", "s3cret", NOW), "s3cret", NOW, "no signature matches"),
        (sign(BODY, "s3cret", NOW), "s3cret", NOW + 301, "outside the 300 s window"),
        (sign(BODY, "s3cret", NOW), "s3cret", NOW - 301, "outside the 300 s window"),
        (sign(BODY, "s3cret", NOW), [], NOW, "no webhook secret"),
    ],
)
def test_forged_stale_and_malformed_signatures_are_refused(
    header: str | None, secrets: str | list[str], now: int, says: str
) -> None:
    with pytest.raises(SignatureError, match=says):
        verify(BODY, header, secrets, now=now)


def test_the_error_is_a_hato_error_and_the_window_is_a_parameter() -> None:
    header = sign(BODY, "s3cret", NOW)
    assert verify(BODY, header, "s3cret", tolerance=3600, now=NOW + 3000) == NOW
    with pytest.raises(HatoError):
        verify(BODY, header, "s3cret", tolerance=10, now=NOW + 11)


def test_a_body_is_one_event_or_a_list() -> None:
    event = DeliveryEvent("e1", "delivered", 1.0, "relay", "Q1", "a@example.net", envid="E")
    import json

    one = json.dumps(event.to_json()).encode()
    assert parse_events(one) == [event]
    assert parse_events(b"[" + one + b"," + one + b"]") == [event, event]
    for bad in (b"nope", b"[1]", b'{"event": "delivered"}', b'{"event":"x"}'):
        with pytest.raises(ValueError):
            parse_events(bad)
