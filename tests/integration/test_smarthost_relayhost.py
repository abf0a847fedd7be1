"""``parse_relayhost`` and ``SmarthostConfig`` checks: the Postfix/boky relay host forms (pure)."""

from __future__ import annotations

import pytest

from hato.config import parse_relayhost
from hato.delivery.smarthost import SmarthostConfig, reply_from_response
from hato.errors import ConfigError
from hato.reply import Reply


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[relay.example.org]:587", ("relay.example.org", 587)),
        ("relay.example.org:587", ("relay.example.org", 587)),
        ("[relay.example.org]", ("relay.example.org", 25)),
        ("relay.example.org", ("relay.example.org", 25)),
        ("  [relay.example.org]:465 ", ("relay.example.org", 465)),
        ("[192.0.2.7]:2525", ("192.0.2.7", 2525)),
        ("192.0.2.7", ("192.0.2.7", 25)),
        ("[::1]:2525", ("::1", 2525)),
        ("[::1]", ("::1", 25)),
        ("[ipv6:2001:db8::1]:587", ("2001:db8::1", 587)),
        ("2001:db8::1", ("2001:db8::1", 25)),
    ],
)
def test_relayhost_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_relayhost(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "[relay.example.org",
        "[relay.example.org]587",
        "[relay.example.org]:",
        "relay.example.org:",
        "relay.example.org:0",
        "relay.example.org:65536",
        "relay.example.org:smtp",
        "[]:25",
        "relay example.org",
        "user@relay.example.org",
    ],
)
def test_bad_relayhost(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_relayhost(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tls": "starttls"},
        {"port": 0},
        {"pool_size": 0},
        {"timeout": 0},
        {"username": "u"},
        {"password": "p"},
        {"username": "u\r\nMAIL FROM:<x>", "password": "p"},
        {"ca_file": "/nonexistent/ca.pem"},
    ],
)
def test_bad_config(kwargs: dict[str, object]) -> None:
    from hato.delivery.smarthost import SmarthostCourier

    with pytest.raises(ConfigError):
        SmarthostCourier(SmarthostConfig(host="relay.example.org", **kwargs))  # type: ignore[arg-type]


def test_password_not_in_repr() -> None:
    cfg = SmarthostConfig(host="relay.example.org", username="u", password="hunter2")
    assert "hunter2" not in repr(cfg)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 Ok: queued as X", Reply(250, "2.0.0", "Ok: queued as X")),
        (550, "5.1.1 <b@x>: User unknown", Reply(550, "5.1.1", "<b@x>: User unknown")),
        (550, "User unknown", Reply(550, "", "User unknown")),
        (451, "5.1.1 class mismatch", Reply(451, "", "5.1.1 class mismatch")),
        (550, "5.7.1 first\n5.7.1 second", Reply(550, "5.7.1", "first\nsecond")),
        (421, "4.3.2 bye\x1b[31m\x00", Reply(421, "4.3.2", "bye[31m")),
    ],
)
def test_reply_from_response(code: int, message: str, expected: Reply) -> None:
    assert reply_from_response(code, message) == expected
