"""Table tests for SASL decoding (PLAIN, LOGIN), the static authenticator and the per-user
AUTH throttle."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from hato.smtp.auth import (
    AuthThrottle,
    Credentials,
    StaticAuthenticator,
    decode_response,
    encode_plain,
    parse_login_text,
    parse_plain,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"=", b""),
        (b"YWxpY2U=", b"alice"),
        (b"AGFsaWNlAHMzY3JldA==", b"\0alice\0s3cret"),
        (b"", None),
        (b"*", None),
        (b"YWxpY2U", None),  # missing padding
        (b"YWx pY2U=", None),
        (b"YWxpY2U=YWxp", None),  # data after padding
        (b"!!!!", None),
        (b"A" * 12292, None),  # over RFC 4954's 12288
    ],
)
def test_decode_response(line: bytes, expected: bytes | None) -> None:
    assert decode_response(line) == expected


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"\0alice\0s3cret", Credentials("", "alice", "s3cret")),
        (b"bob\0alice\0s3cret", Credentials("bob", "alice", "s3cret")),
        ("\0jörg\0pässword".encode(), Credentials("", "jörg", "pässword")),
        (b"\0alice\0", Credentials("", "alice", "")),
        (b"\0\0s3cret", None),  # no user
        (b"alice\0s3cret", None),  # two fields
        (b"\0a\0b\0c", None),  # four fields
        (b"\0alice\0\xff", None),  # not UTF-8
        (b"", None),
    ],
)
def test_parse_plain(blob: bytes, expected: Credentials | None) -> None:
    assert parse_plain(blob) == expected


def test_parse_login_text() -> None:
    assert parse_login_text(b"alice") == "alice"
    assert parse_login_text(b"a\0b") is None
    assert parse_login_text(b"\xc3") is None


def test_password_never_in_repr() -> None:
    assert "s3cret" not in repr(Credentials("", "alice", "s3cret"))


def test_encode_plain_roundtrip() -> None:
    text = encode_plain("alice", "s3cret", authzid="bob")
    assert base64.b64decode(text) == b"bob\0alice\0s3cret"
    blob = decode_response(text.encode())
    assert blob is not None
    assert parse_plain(blob) == Credentials("bob", "alice", "s3cret")


async def test_static_authenticator() -> None:
    auth = StaticAuthenticator({"alice": "s3cret"})
    assert await auth.authenticate("alice", "s3cret") == "alice"
    assert await auth.authenticate("alice", "s3cret", authzid="alice") == "alice"
    assert await auth.authenticate("alice", "s3cret", authzid="root") is None
    assert await auth.authenticate("alice", "S3cret") is None
    assert await auth.authenticate("mallory", "s3cret") is None
    assert await auth.authenticate("mallory", "\0unknown") is None


# The per-user part of the AUTH throttle (the per-address part: tests/unit/test_users.py).


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(clock: FakeClock, **kw: float) -> AuthThrottle:
    args: dict[str, Any] = {
        "limit": 5,
        "window": 60,
        "user_limit": 4,
        "user_window": 100,
        "base_delay": 1,
        "max_delay": 8,
        "clock": clock,
    }
    args.update(kw)
    return AuthThrottle(**args)


def test_user_failures_from_many_addresses_grow_the_delay_then_lock() -> None:
    clock = FakeClock()
    t = _throttle(clock)
    delays = [t.failed(f"192.0.2.{n}", "alice") for n in range(4)]
    # Each address failed once, but the name's count sets the delay.
    assert delays == [1, 2, 4, 8]
    assert t.user_locks == 1
    for n in range(10):
        assert t.locked("alice", f"198.51.100.{n}")
    assert not t.locked("bob", "198.51.100.1")
    assert t.user_failures("ALICE ") == 4  # one name, whatever its case
    # The lock ends when the failures leave the window.
    clock.now += 101
    assert not t.locked("alice", "198.51.100.1")
    assert t.user_failures("alice") == 0


def test_names_that_exist_and_names_that_do_not_are_alike() -> None:
    # The throttle never asks the user store: any name is counted and locked alike.
    clock = FakeClock()
    t = _throttle(clock)
    real = [t.failed(f"192.0.2.{n}", "postfix@dbmx.net") for n in range(5)]
    ghost = [t.failed(f"198.51.100.{n}", "nobody@dbmx.net") for n in range(5)]
    assert real == ghost
    assert t.locked("postfix@dbmx.net", "203.0.113.1") == t.locked("nobody@dbmx.net", "203.0.113.1")


def test_trusted_clients_and_recent_logins_are_not_locked_out() -> None:
    clock = FakeClock()
    t = _throttle(clock)
    t.succeeded("203.0.113.7", "Alice")
    for n in range(6):
        t.failed(f"192.0.2.{n}", "alice")
    assert t.locked("alice", "203.0.113.8")
    assert not t.locked("alice", "203.0.113.7")  # logged in within the window
    assert not t.locked("alice", "10.0.0.1", trusted=True)
    # Their own failures are slowed by their own address's count, not by the guessers'.
    assert t.failed("203.0.113.7", "alice") == 1
    assert t.failed("10.0.0.1", "alice", trusted=True) == 1
    # The exemption ends with the window, like the lock.
    clock.now += 101
    t.failed("192.0.2.9", "alice")
    assert not t.locked("alice", "203.0.113.7")


def test_attempts_refused_by_the_lock_count_for_the_address_not_the_name() -> None:
    clock = FakeClock()
    t = _throttle(clock)
    for n in range(4):
        t.failed(f"192.0.2.{n}", "alice")
    clock.now += 50
    for _ in range(4):
        assert t.failed("198.51.100.1", "alice", locked=True) is not None
    assert t.failed("198.51.100.1", "alice", locked=True) is None  # the address's limit
    assert t.blocked("198.51.100.1")
    assert t.user_failures("alice") == 4
    assert t.locked_refusals == 5
    assert t.client_blocks == 1
    clock.now += 51  # the name's failures are 101 s old: the lock is over
    assert not t.locked("alice", "203.0.113.1")


def test_failures_are_counted_per_listener() -> None:
    t = _throttle(FakeClock())
    t.failed("192.0.2.1", "a", listener="submission=0.0.0.0:587")
    t.failed("192.0.2.2", "b", listener="submission=0.0.0.0:587")
    t.failed("192.0.2.3", listener="smtp=0.0.0.0:25")
    assert t.failure_counts == {"submission=0.0.0.0:587": 2, "smtp=0.0.0.0:25": 1}


def test_names_and_logins_are_bounded() -> None:
    clock = FakeClock()
    t = _throttle(clock, max_clients=10, limit=1000)
    for n in range(50):
        clock.now += 1
        t.failed("192.0.2.1", f"user{n}")
        t.succeeded(f"192.0.2.{n}", f"user{n}")
    assert len(t._user_failures) <= 10 and len(t._logins) <= 10
    assert t.user_failures("user49") == 1  # the newest are kept
    assert len(AuthThrottle.user_key("x" * 100_000)) <= 320
    with pytest.raises(ValueError):
        AuthThrottle(user_limit=0)
