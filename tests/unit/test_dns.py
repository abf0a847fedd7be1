"""The DNS seam's pure parts: resolver addresses, MX ordering, null MX, private space."""

from __future__ import annotations

import random

import pytest

from hato.dns import MXHost, NullMX, Resolver, is_private, order_mx, parse_server
from hato.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 9.9.9.9 ", ("9.9.9.9", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:DB8::53]", ("2001:db8::53", 53)),
    ],
)
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize(
    "text",
    ["dns.google", "dns.google:53", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "[::1",
     "[::1]x", "[::1]:", "1.2.3.4:x", ""],
)  # fmt: skip
def test_parse_server_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="HATO_DNS_SERVERS"):
        parse_server(text)


def test_resolver_from_servers_lists_them() -> None:
    resolver = Resolver(["127.0.0.1:5353", "[::1]:53"])
    assert resolver.servers == ["127.0.0.1:5353", "[::1]:53"]


def test_resolver_with_a_bad_server_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Resolver(["resolver.example"])


def names(hosts: list[MXHost] | NullMX) -> list[tuple[int, str]]:
    assert isinstance(hosts, list)
    return [(h.preference, h.name) for h in hosts]


def test_order_mx_by_preference() -> None:
    records = [(20, "mx2.example."), (10, "MX1.Example."), (30, "mx3.example")]
    assert names(order_mx(records, random.Random(1))) == [
        (10, "mx1.example"),
        (20, "mx2.example"),
        (30, "mx3.example"),
    ]


def test_order_mx_shuffles_equal_preferences_only() -> None:
    records = [(10, "a.example"), (10, "b.example"), (10, "c.example"), (5, "first.example")]
    orders = set()
    for seed in range(40):
        ordered = names(order_mx(records, random.Random(seed)))
        assert ordered[0] == (5, "first.example")
        orders.add(tuple(name for _, name in ordered[1:]))
    assert len(orders) > 1  # not always the same order
    assert all(sorted(o) == ["a.example", "b.example", "c.example"] for o in orders)


def test_order_mx_duplicates_keep_the_best_preference() -> None:
    records = [(20, "mx.example."), (10, "mx.example."), (15, "other.example.")]
    assert names(order_mx(records, random.Random(0))) == [(10, "mx.example"), (15, "other.example")]


def test_null_mx() -> None:
    assert isinstance(order_mx([(0, ".")], random.Random(0)), NullMX)
    assert isinstance(order_mx([(0, "")], random.Random(0)), NullMX)


def test_null_mx_next_to_real_ones_is_ignored() -> None:
    assert names(order_mx([(0, "."), (10, "mx.example.")], random.Random(0))) == [
        (10, "mx.example")
    ]


def test_no_mx_records() -> None:
    assert order_mx([], random.Random(0)) == []


def test_null_mx_reply() -> None:
    reply = NullMX("nomail.example").reply
    assert (reply.code, reply.enhanced) == (556, "5.1.10")
    assert "nomail.example does not accept mail" in reply.text


@pytest.mark.parametrize(
    ("ip", "private"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.1.1", True),
        ("169.254.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("100.64.0.1", True),  # carrier-grade NAT: not global
        ("192.0.2.1", True),  # TEST-NET
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", True),
        ("2002:7f00:1::1", True),  # 6to4 of 127.0.0.1
        ("2001:db8::1", True),  # documentation
        ("not an ip", True),
        ("8.8.8.8", False),
        ("93.184.216.34", False),
        ("2606:4700::1111", False),
        ("::ffff:8.8.8.8", True),  # mapped addresses are not global in themselves
    ],
)
def test_is_private(ip: str, private: bool) -> None:
    assert is_private(ip) is private
