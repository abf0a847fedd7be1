"""The pure parts of reading events: --since times and the text line."""

from __future__ import annotations

import pytest

from hato.events import DeliveryEvent, describe, parse_since, reply_of

NOW = 1_764_763_200.0  # 2025-12-03T12:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - 7200),
        ("30m", NOW - 1800),
        ("1d", NOW - 86400),
        ("90s", NOW - 90),
        ("1w", NOW - 604800),
        ("1.5h", NOW - 5400),
        ("2025-12-03T12:00:00Z", NOW),
        ("2025-12-03T12:00:00", NOW),
        ("2025-12-03T13:00:00+01:00", NOW),
        ("1764763200", NOW),
    ],
)
def test_since_takes_durations_iso_times_and_unix_seconds(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "yesterday", "2x", "h", "-2h", "2025-13-40"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text, NOW)


def test_the_text_line_says_when_where_what_and_the_reply() -> None:
    event = DeliveryEvent(
        event_id="e1",
        event="delivered",
        time=NOW,
        node="relay.dbmx.net",
        queue_id="18F2A",
        recipient="someone@example.net",
        envid="OUTBOX1",
        route="mx",
        relay_host="mx.example.net",
        relay_ip="127.0.0.1",
        reply_code=250,
        reply_enhanced="2.0.0",
        reply_text="Ok: queued as 4F2A",
        tls_version="TLSv1.3",
        attempt=1,
    )
    assert describe(event) == (
        "2025-12-03T12:00:00.000Z relay.dbmx.net 18F2A delivered to=<someone@example.net>"
        " envid=OUTBOX1 route=mx relay=mx.example.net[127.0.0.1] tls=TLSv1.3,unverified"
        " attempt=1 (250 2.0.0 Ok: queued as 4F2A)"
    )
    assert reply_of(event) == "250 2.0.0 Ok: queued as 4F2A"
