"""The pure parts of the outbound session: plans, relay names, TLS levels a session meets."""

from __future__ import annotations

import re
import ssl

import aiosmtplib
import pytest

from hato.delivery.session import Plan, Session, Tls, client_context
from hato.errors import ConfigError

LAX = client_context(verify=False, ca_file=None, what="test CA file")
STRICT = client_context(verify=True, ca_file=None, what="test CA file")


@pytest.mark.parametrize(
    ("host", "address", "relay"),
    [
        ("relay.example.org", None, "relay.example.org[unknown]:25"),
        ("127.0.0.1", None, "127.0.0.1[127.0.0.1]:25"),
        ("mx1.example.org", "192.0.2.7", "mx1.example.org[192.0.2.7]:25"),
        ("mx1.example.org", "2001:db8::7", "mx1.example.org[2001:db8::7]:25"),
    ],
)
def test_relay_before_connecting(host: str, address: str | None, relay: str) -> None:
    plan = Plan(host=host, port=25, helo_name="h", tls=Tls.MAY, context=LAX, address=address)
    assert plan.relay == relay


def test_in_plaintext_keeps_everything_but_tls() -> None:
    plan = Plan(host="mx", port=25, helo_name="h", tls=Tls.MAY, context=LAX, address="192.0.2.1")
    plain = plan.in_plaintext()
    assert plain.tls is Tls.NONE
    assert (plain.host, plain.address, plain.context) == (plan.host, plan.address, plan.context)


@pytest.mark.parametrize(
    ("tls", "context", "address"),
    [(Tls.VERIFY, LAX, None), (Tls.IMPLICIT, STRICT, "192.0.2.1")],
)
def test_impossible_plans(tls: Tls, context: ssl.SSLContext, address: str | None) -> None:
    with pytest.raises(ValueError):
        Plan(host="mx", port=25, helo_name="h", tls=tls, context=context, address=address)


def test_unreadable_ca_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("relay TLS CA file '/nonexistent/ca.pem'")):
        client_context(verify=True, ca_file="/nonexistent/ca.pem", what="relay TLS CA file")


@pytest.mark.parametrize(
    ("encrypted", "verified", "meets"),
    [
        (False, False, {Tls.NONE, Tls.MAY}),
        (True, False, {Tls.NONE, Tls.MAY, Tls.ENCRYPT, Tls.IMPLICIT}),
        (True, True, set(Tls)),
    ],
)
def test_pooled_session_meets_a_level(encrypted: bool, verified: bool, meets: set[Tls]) -> None:
    session = Session(aiosmtplib.SMTP(), "mx[192.0.2.1]:25", encrypted, 0.0, verified=verified)
    assert {tls for tls in Tls if session.satisfies(tls)} == meets
