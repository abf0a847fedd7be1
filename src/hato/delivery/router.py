"""The router: which kind of delivery a recipient gets, as a pure function of config and address.

Own domains (Postfix's ``mydestination``) are delivered locally, to Maildirs or through
aliases (:mod:`hato.delivery.maildir`); every other recipient takes the configured route:
``hold`` (the default when no relay host is set: nothing leaves the machine), ``relay``
(the smarthost) or ``mx`` (direct delivery, only when chosen explicitly). Domains match
exactly (no subdomains), ignoring case, a trailing dot and the IDNA form.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from hato.errors import ConfigError
from hato.message import domain_of, normalize_domain


class RouteKind(StrEnum):
    LOCAL = "local"
    HOLD = "hold"
    RELAY = "relay"
    MX = "mx"


_ROUTES = frozenset({RouteKind.HOLD, RouteKind.RELAY, RouteKind.MX})


class Router:
    """Maps a recipient address to a :class:`RouteKind`."""

    def __init__(self, domains: Iterable[str] = frozenset(), route: str = RouteKind.HOLD) -> None:
        try:
            kind = RouteKind(route)
        except ValueError:
            raise ConfigError(f"unknown route {route!r}: use hold, relay or mx") from None
        if kind not in _ROUTES:
            raise ConfigError(f"route {route!r} is not a default route: use hold, relay or mx")
        self.route_kind = kind
        self.domains = frozenset(normalize_domain(d) for d in domains if d.strip())

    def route(self, recipient: str) -> RouteKind:
        if self.domains and normalize_domain(domain_of(recipient)) in self.domains:
            return RouteKind.LOCAL
        return self.route_kind

    def __repr__(self) -> str:
        return f"Router(domains={sorted(self.domains)!r}, route={self.route_kind.value!r})"
