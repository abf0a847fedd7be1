"""The web console at ``/``: the mail catcher of the development role, the operator's desk
of the relays.

Pages are Jinja2 templates (``templates/``) with one plain script and one style sheet
(``static/``), shipped in the wheel: no build step, no CDN. The list and the actions
talk to the JSON API (:mod:`hato.web.api`); the list follows ``GET /api/v1/events``
(server-sent events) and falls back to polling when that stream is not there.

A message's HTML is never part of a console page: it is served alone, from
``/messages/{id}/html``, into an ``<iframe sandbox="">`` with a Content-Security-Policy
that allows no script, no connection and no remote image (``?images=1``, after the user
asks, allows images only). Attachments are downloads (``Content-Disposition:
attachment``), never rendered in the console's origin.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hato.errors import MessageNotFound, QueueError
from hato.events import DEFERRED
from hato.queue.base import MessageState
from hato.queue.select import MessageFilter, select
from hato.web import mime
from hato.web.api import problem, timeline
from hato.web.context import WebContext

HERE = Path(__file__).resolve().parent
TABS = ("held", "queued", "deferred", "sent", "failed")
# The console's own pages: scripts and styles from this origin only.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
# A message's HTML: no script, nothing fetched, inline styles only; sandboxed even when
# opened outside its iframe.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; sandbox"
HTML_CSP_IMAGES = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https: http: data:; "
    "frame-ancestors 'self'; sandbox"
)
# How far back the status page looks for deferral reasons, and how many events it reads.
DEFERRALS_WINDOW = 24 * 3600.0
DEFERRALS_PAGES = 10

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)) if epoch else ""


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


_env.filters["when"] = _when
_env.filters["age"] = _age


def csrf_token(request: Request) -> str:
    """The CSRF token the console's scripts send on state changes (web-core's helper in
    :mod:`hato.web.security`; empty where that module is not installed)."""
    try:
        security = importlib.import_module("hato.web.security")
    except ImportError:
        return ""
    helper = getattr(security, "csrf_token", None)
    return str(helper(request)) if helper is not None else ""


def _page(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = _env.get_template(template).render(csrf=csrf_token(request), **values)
    return HTMLResponse(html, status_code=status, headers=_page_headers())


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": PAGE_CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def routes(ctx: WebContext) -> list[BaseRoute]:
    """The console's pages and files over ``ctx``."""

    async def message_list(request: Request) -> Response:
        state = request.query_params.get("state", "")
        if state not in TABS:
            state = ""
        return _page(
            request,
            "list.html",
            tabs=TABS,
            state=state,
            q=request.query_params.get("q", ""),
            active="list",
        )

    async def message_view(request: Request) -> Response:
        message_id = request.path_params["id"]
        try:
            message = await ctx.queue.get(message_id)
        except MessageNotFound:
            return _page(request, "missing.html", 404, message_id=message_id, active="list")
        parsed = mime.summarize(message.data)
        events = await timeline(ctx, message_id)
        recipients = [
            {
                "address": r.address,
                "state": str(r.state),
                "reply": r.reply,
                "relay": r.relay,
                "events": [e for e in events if e.recipient == r.address],
            }
            for r in message.recipients
        ]
        others = [e for e in events if e.recipient not in {r.address for r in message.recipients}]
        return _page(
            request,
            "message.html",
            m=message,
            parsed=parsed,
            recipients=recipients,
            others=others,
            relay_configured=ctx.settings.effective_route != "hold",
            can_release_copy=ctx.release_courier is not None,
            active="list",
        )

    async def message_html(request: Request) -> Response:
        try:
            message = await ctx.queue.get(request.path_params["id"])
        except MessageNotFound:
            return problem(404, "Not Found", "no such message")
        html = mime.summarize(message.data).html
        images = request.query_params.get("images") == "1"
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": HTML_CSP_IMAGES if images else HTML_CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    async def message_part(request: Request) -> Response:
        try:
            message = await ctx.queue.get(request.path_params["id"])
            index = int(request.path_params["index"])
        except MessageNotFound:
            return problem(404, "Not Found", "no such message")
        found = mime.part_bytes(message.data, index)
        if found is None:
            return problem(404, "Not Found", f"no attachment {index}")
        attachment, data = found
        safe_name = "".join(c if c.isalnum() or c in "._- " else "_" for c in attachment.filename)
        return Response(
            data,
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{safe_name or "attachment"}"',
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
            },
        )

    async def status(request: Request) -> Response:
        now = ctx.clock()
        processes = ""
        if ctx.intake is not None:  # several processes: the listeners are the intakes'
            await ctx.intake.poll()
            answering, total = ctx.intake.answering()
            processes = f"{answering} of {total} answering"
        listeners = ctx.intake.listeners() if ctx.intake is not None else ctx.listeners
        active = ctx.active_connections()
        try:
            counts = await ctx.queue.counts()
            waiting = await select(
                ctx.queue,
                MessageFilter(),
                now=now,
                states=[
                    MessageState.QUEUED,
                    MessageState.SENDING,
                    MessageState.DEFERRED,
                    MessageState.HELD,
                ],
            )
            reasons = await _deferral_reasons(ctx, now)
            queue_error = ""
        except QueueError as exc:
            counts, waiting, reasons, queue_error = {}, [], [], str(exc)
        oldest = waiting[-1] if waiting else None
        return _page(
            request,
            "status.html",
            listeners=[
                (lrole, host, port, active.get(_listener_name(lrole, host, port), 0))
                for lrole, host, port in listeners
            ],
            processes=processes,
            role=ctx.role,
            node=ctx.node,
            route=ctx.settings.effective_route,
            route_text=ctx.settings.role if ctx.role == "serve" else "outbox worker",
            relay=ctx.settings.relay_host or "",
            counts=[(str(s), counts.get(s, 0)) for s in MessageState],
            oldest=oldest,
            oldest_age=(now - oldest.created_at) if oldest else 0.0,
            reasons=reasons,
            queue_error=queue_error,
            active="status",
        )

    return [
        Route("/", message_list, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/messages/{id}", message_view, methods=["GET"]),
        Route("/messages/{id}/html", message_html, methods=["GET"]),
        Route("/messages/{id}/parts/{index:int}", message_part, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]


def _listener_name(role: str, host: str, port: int) -> str:
    """A listener's name in metrics and ``active_connections`` (``SMTPListener.label``)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{role}={shown}:{port}"


async def _deferral_reasons(ctx: WebContext, now: float) -> list[tuple[str, int]]:
    """The replies of the deferrals of the last day, most frequent first; without
    events, the last replies of the messages deferred now."""
    replies: Counter[str] = Counter()
    after = ""
    for _ in range(DEFERRALS_PAGES):
        got = await ctx.queue.events(after=after, since=now - DEFERRALS_WINDOW, limit=500)
        for e in got.events:
            if e.event == DEFERRED:
                reply = " ".join(
                    part
                    for part in (str(e.reply_code or ""), e.reply_enhanced, e.reply_text)
                    if part
                )
                replies[reply or "(no reply)"] += 1
        if not got.events or got.cursor == after:
            break
        after = got.cursor
    if not replies:
        for m in await ctx.queue.list(states=[MessageState.DEFERRED], limit=1000):
            replies[m.last_reply or "(no reply)"] += 1
    return replies.most_common(20)
