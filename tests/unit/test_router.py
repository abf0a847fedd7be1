"""The router: a table of (domains, route, recipient) → route kind."""

from __future__ import annotations

import pytest

from hato.delivery.router import RouteKind, Router
from hato.errors import ConfigError

OWN = frozenset({"example.org", "Mail.Example.NET.", "bücher.example"})


@pytest.mark.parametrize(
    ("domains", "route", "recipient", "expected"),
    [
        # Nothing configured: everything is held, nothing leaves the machine.
        (frozenset(), "hold", "user@example.com", RouteKind.HOLD),
        (frozenset(), "relay", "user@example.com", RouteKind.RELAY),
        (frozenset(), "mx", "user@example.com", RouteKind.MX),
        # Own domains are local whatever the route; comparison ignores case and a trailing dot.
        (OWN, "relay", "user@example.org", RouteKind.LOCAL),
        (OWN, "relay", "USER@EXAMPLE.ORG", RouteKind.LOCAL),
        (OWN, "relay", "user@example.org.", RouteKind.LOCAL),
        (OWN, "mx", "user@mail.example.net", RouteKind.LOCAL),
        (OWN, "hold", "user@example.org", RouteKind.LOCAL),
        # IDNA: the U-label and the A-label name the same domain.
        (OWN, "relay", "user@xn--bcher-kva.example", RouteKind.LOCAL),
        (OWN, "relay", "user@BÜCHER.example", RouteKind.LOCAL),
        # Not ours: subdomains, parent domains, look-alikes, literals.
        (OWN, "relay", "user@sub.example.org", RouteKind.RELAY),
        (OWN, "relay", "user@example.net", RouteKind.RELAY),
        (OWN, "relay", "user@example.org.evil.test", RouteKind.RELAY),
        (OWN, "relay", "user@[127.0.0.1]", RouteKind.RELAY),
        (OWN, "mx", '"user@example.org"@evil.test', RouteKind.MX),
        (OWN, "mx", "user%example.org@evil.test", RouteKind.MX),
        (OWN, "hold", "user@elsewhere.test", RouteKind.HOLD),
        # Every default route, for own and foreign domains alike.
        (OWN, "hold", "postmaster@example.org", RouteKind.LOCAL),
        (OWN, "relay", "postmaster@example.org", RouteKind.LOCAL),
        (OWN, "mx", "postmaster@example.org", RouteKind.LOCAL),
        (OWN, "hold", "user@gmail.test", RouteKind.HOLD),
        (OWN, "relay", "user@gmail.test", RouteKind.RELAY),
        (OWN, "mx", "user@gmail.test", RouteKind.MX),
        # Mixed case in the configured domains and in the address; extensions and
        # unusual local parts do not change the route.
        (OWN, "mx", "User+Tag@Mail.Example.Net", RouteKind.LOCAL),
        (OWN, "mx", "user@MAIL.EXAMPLE.NET.", RouteKind.LOCAL),
        (frozenset({"EXAMPLE.ORG"}), "mx", "a@example.org", RouteKind.LOCAL),
        (OWN, "relay", '"quoted local"@example.org', RouteKind.LOCAL),
        # Subdomains and parents of own domains are not own domains.
        (OWN, "mx", "user@mail.example.org", RouteKind.MX),
        (OWN, "mx", "user@a.b.example.org", RouteKind.MX),
        (OWN, "hold", "user@example.net", RouteKind.HOLD),
        (OWN, "hold", "user@net", RouteKind.HOLD),
        (OWN, "relay", "user@xample.org", RouteKind.RELAY),
        (OWN, "relay", "user@example.org.example", RouteKind.RELAY),
        (OWN, "mx", "user@sub.bücher.example", RouteKind.MX),
        # IDN both ways round: an A-label configured, a U-label in the address.
        (frozenset({"xn--bcher-kva.example"}), "mx", "a@bücher.example", RouteKind.LOCAL),
        (frozenset({"xn--bcher-kva.example"}), "mx", "a@XN--BCHER-KVA.EXAMPLE", RouteKind.LOCAL),
        (frozenset({"日本.example"}), "relay", "a@xn--wgv71a.example", RouteKind.LOCAL),
        (frozenset({"日本.example"}), "relay", "a@日本.example", RouteKind.LOCAL),
        (frozenset({"日本.example"}), "relay", "a@日本語.example", RouteKind.RELAY),
        (OWN, "mx", "user@bucher.example", RouteKind.MX),
    ],
)
def test_route_table(
    domains: frozenset[str], route: str, recipient: str, expected: RouteKind
) -> None:
    assert Router(domains, route).route(recipient) is expected


def test_default_is_hold() -> None:
    assert Router().route("a@b.example") is RouteKind.HOLD


@pytest.mark.parametrize("route", ["local", "smtp", "", "RELAY "])
def test_unknown_route_is_a_config_error(route: str) -> None:
    with pytest.raises(ConfigError):
        Router(frozenset(), route)


def test_blank_domains_are_ignored() -> None:
    router = Router(["", "  ", "example.org"], "relay")
    assert router.domains == frozenset({"example.org"})
    assert router.route("a@example.org") is RouteKind.LOCAL
