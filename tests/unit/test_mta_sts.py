"""MTA-STS's pure parts: the TXT record, the policy file, MX matching, the disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from hato.delivery.mta_sts import (
    MAX_AGE_LIMIT,
    PolicyCache,
    STSPolicy,
    _Cached,
    mx_matches,
    parse_policy,
    parse_record,
)
from hato.errors import TLSPolicyError

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=abc; ext=1"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc;"], "abc"),  # others discarded
        (["v=STSv1; id=a;", "v=STSv1; id=b;"], None),  # several: no policy
        ([], None),
        (["v=STSv1;"], None),  # no id
        (["v=STSv1; id=has-dash;"], None),  # id is alphanumeric
        (["v=STSv1; id=" + "a" * 33], None),  # at most 32
        (["id=abc; v=STSv1"], None),  # v= must come first
        (["v=STSv10; id=abc"], None),
        (["v=STSv1; id"], None),
    ],
)
def test_txt_record(values: list[str], expected: str | None) -> None:
    assert parse_record(values) == expected


def test_a_good_policy() -> None:
    policy = parse_policy(GOOD, "id1")
    assert policy == STSPolicy("enforce", ("mail.example.com", "*.example.net"), 86400, "id1", GOOD)
    assert policy.lines == (
        "version: STSv1",
        "mode: enforce",
        "mx: mail.example.com",
        "mx: *.example.net",
        "max_age: 86400",
    )


@pytest.mark.parametrize(
    ("text", "mode", "mx", "max_age"),
    [
        (
            "version: STSv1\nmode: testing\nmx: MX.Example.COM.\nmax_age: 0\n",
            "testing",
            ("mx.example.com",),
            0,
        ),
        ("version: STSv1\nmode: none\nmax_age: 10", "none", (), 10),
        (
            f"version: STSv1\nmode: enforce\nmx: a.b\nmax_age: {MAX_AGE_LIMIT}",
            "enforce",
            ("a.b",),
            MAX_AGE_LIMIT,
        ),
        ("mode: enforce\nversion: STSv1\nfuture: x\nmx: a.b\nmax_age: 5\n", "enforce", ("a.b",), 5),
        ("version:STSv1\nmode:enforce\nmx:a.b\nmax_age:5", "enforce", ("a.b",), 5),
    ],
)
def test_policies_that_parse(text: str, mode: str, mx: tuple[str, ...], max_age: int) -> None:
    policy = parse_policy(text)
    assert (policy.mode, policy.mx, policy.max_age) == (mode, mx, max_age)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.b\nmax_age: 5", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 5", "version"),
        ("version: STSv1\nmode: strict\nmx: a.b\nmax_age: 5", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.b", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1e3", "max_age"),
        (f"version: STSv1\nmode: enforce\nmx: a.b\nmax_age: {MAX_AGE_LIMIT + 1}", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 5", "no mx"),
        ("version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 5", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 5", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 5", "mx"),
        ("<html>not a policy</html>", "KEY: VALUE"),
    ],
)
def test_policies_that_do_not(text: str, why: str) -> None:
    with pytest.raises(TLSPolicyError, match=why):
        parse_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard is one label, never none
        ("*.example.com", "a.b.example.com", False),  # ... nor two (RFC 8461 §4.1)
        ("*.example.com", "mx1.example.com.evil", False),
        ("*.example.com", ".example.com", False),
        ("example.com", "mx.example.com", False),
    ],
)
def test_mx_matching(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_policy_matches_any_pattern() -> None:
    policy = parse_policy(GOOD)
    assert policy.matches("mail.example.com") and policy.matches("x.example.net")
    assert not policy.matches("mail.example.net.other")


def test_the_disk_cache_round_trips_and_survives_garbage(tmp_path: Path) -> None:
    cache = PolicyCache(tmp_path / "mta-sts")
    assert cache.load("example.com") is None
    cached = _Cached(parse_policy(GOOD, "id7"), 1000.0)
    cache.store("example.com", cached)
    again = cache.load("example.com")
    assert again == cached and again.expires_at == 1000.0 + 86400
    (tmp_path / "mta-sts" / "example.com.json").write_text("{not json")
    assert cache.load("example.com") is None
    with pytest.raises(ValueError):
        cache.store("../etc", cached)
