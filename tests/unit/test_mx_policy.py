"""The MX courier's pure parts: TLS levels per destination, constructor checks."""

from __future__ import annotations

import pytest

from hato.delivery.mx import MXCourier, MXTLSPolicy
from hato.dns import Resolver
from hato.errors import ConfigError


def test_default_is_may() -> None:
    assert MXTLSPolicy().level_for("example.org") == "may"


@pytest.mark.parametrize(
    ("domain", "level"),
    [
        ("bank.example", "verify"),
        ("BANK.example.", "verify"),
        ("mail.bank.example", "encrypt"),  # .bank.example covers subdomains only
        ("deep.mail.bank.example", "encrypt"),
        ("partner.example", "encrypt"),
        ("sub.partner.example", "may"),  # an exact entry does not cover subdomains
        ("broken.example", "none"),
        ("other.example", "may"),
    ],
)
def test_level_for(domain: str, level: str) -> None:
    policy = MXTLSPolicy.parse(
        "may",
        ["bank.example=verify", ".bank.example=encrypt", "Partner.Example=ENCRYPT",
         "broken.example=none"],
    )  # fmt: skip
    assert policy.level_for(domain) == level


def test_longer_subdomain_entry_wins() -> None:
    policy = MXTLSPolicy.parse("may", [".example=encrypt", ".corp.example=verify"])
    assert policy.level_for("mx.corp.example") == "verify"
    assert policy.level_for("mx.other.example") == "encrypt"


def test_default_level() -> None:
    assert MXTLSPolicy.parse("encrypt").level_for("x.example") == "encrypt"


@pytest.mark.parametrize(
    ("default", "items"),
    [
        ("secure", []),
        ("may", ["example.org"]),
        ("may", ["example.org=dane"]),
        ("may", ["=verify"]),
        ("may", [".=verify"]),
    ],
)
def test_bad_policy(default: str, items: list[str]) -> None:
    with pytest.raises(ConfigError):
        MXTLSPolicy.parse(default, items)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},
        {"port": 70000},
        {"concurrency": 0},
        {"timeout": 0},
        {"connect_timeout": -1},
        {"helo_name": ""},
        {"helo_name": "bad name"},
        {"ca_file": "/nonexistent/ca.pem"},
    ],
)
def test_courier_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"helo_name": "relay.example", **kwargs}
    with pytest.raises(ConfigError):
        MXCourier(Resolver(["127.0.0.1:53"]), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("strict.test", "verify"),
        ("mail.sub.test", "encrypt"),
        ("sub.test", None),  # ".sub.test" covers the subdomains only
        ("other.test", None),  # the default is no operator entry
    ],
)
def test_an_explicit_entry_is_the_operators_word(domain: str, expected: str | None) -> None:
    policy = MXTLSPolicy.parse("may", ["strict.test=verify", ".sub.test=encrypt"])
    assert policy.explicit(domain) == expected
    assert policy.level_for(domain) == (expected or "may")
