"""Placeholder: the routes of this part of the HTTP side (filled in by its own change)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from hato.web.context import WebContext


def routes(ctx: WebContext) -> list[BaseRoute]:
    """No routes yet."""
    return []
