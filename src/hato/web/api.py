"""The JSON API under ``/api/v1/``: list, read and act on queued messages.

=========================================  ===============================================
``GET messages``                           newest first, filtered (the keys of
                                           :mod:`hato.queue.select`), ``limit``/``cursor``
                                           pages; items as ``hato queue list --json``
``POST messages/bulk``                     ``{"action", "filter", "dry_run"}`` →
                                           ``{"matched"}`` or ``{"matched", "done"}``
``GET messages/{id}``                      envelope, per-recipient state, headers and the
                                           timeline of attempts (delivery events)
``GET messages/{id}/raw``                  the stored bytes, ``message/rfc822``
``POST messages/{id}/release``             a held message: to the configured route, or a
                                           copy to a one-off ``relay`` or ``recipient``
``POST messages/{id}/retry``               a queued or deferred message: due now
``DELETE messages/{id}``                   gone
=========================================  ===============================================

Bad input answers a 4xx with an RFC 9457 problem body (``application/problem+json``),
an unknown id 404, a queue that cannot be reached 503; never a traceback.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hato.errors import ConfigError, MessageNotFound, QueueError
from hato.events import RELEASED, DeliveryEvent, new_event_id
from hato.queue.base import MessageState, RecipientState, StoredMessage
from hato.queue.select import (
    ACTIONS,
    MessageFilter,
    act,
    bulk,
    select_page,
    summary,
)
from hato.web import mime
from hato.web.context import WebContext

PREFIX = "/api/v1"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# How many events one message's timeline reads at most (pages of 500).
TIMELINE_PAGES = 20
# How many listed messages' subjects one process remembers.
SUBJECT_CACHE = 10_000

Handler = Callable[[Request], Awaitable[Response]]


class _Problem(Exception):
    """A request this API refuses: answered as an RFC 9457 problem body."""

    def __init__(self, status: int, title: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra


def problem(status: int, title: str, detail: str = "", **extra: Any) -> JSONResponse:
    """An RFC 9457 problem response (``type`` is ``about:blank``: the status says it all)."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _guarded(handler: Handler) -> Handler:
    """The handler with Hato's errors turned into problem bodies."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except _Problem as p:
            return problem(p.status, p.title, p.detail, **p.extra)
        except MessageNotFound as exc:
            name = exc.args[0] if exc.args else request.path_params.get("id", "")
            return problem(404, "Not Found", f"no message {name}")
        except ConfigError as exc:  # FilterError, a relay that does not parse
            return problem(400, "Bad Request", str(exc))
        except QueueError as exc:
            return problem(503, "Service Unavailable", f"queue: {exc}")

    return guarded


def _limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise _Problem(400, "Bad Request", "limit must be a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _Problem(400, "Bad Request", f"limit must be between 1 and {MAX_LIMIT}")
    return limit


async def _json_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise _Problem(400, "Bad Request", "a JSON object is required")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Problem(400, "Bad Request", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise _Problem(400, "Bad Request", "the body must be a JSON object")
    return data


class _Subjects:
    """The Subject of listed messages, read once per message: a message's bytes never
    change, and the list (polled by the console) would otherwise read them every time."""

    def __init__(self, size: int = SUBJECT_CACHE) -> None:
        self.size = size
        self.known: OrderedDict[str, str] = OrderedDict()

    async def of(self, ctx: WebContext, message: StoredMessage) -> str:
        if message.id in self.known:
            self.known.move_to_end(message.id)
            return self.known[message.id]
        data = message.data
        if not data:
            try:
                data = (await ctx.queue.get(message.id)).data
            except QueueError:  # quarantined or gone meanwhile: the list still shows it
                return ""
        subject = mime.subject_of(data)
        self.known[message.id] = subject
        if len(self.known) > self.size:
            self.known.popitem(last=False)
        return subject


async def timeline(ctx: WebContext, message_id: str) -> list[DeliveryEvent]:
    """Every delivery event stored for ``message_id``, in the order they were stored."""
    events: list[DeliveryEvent] = []
    after = ""
    for _ in range(TIMELINE_PAGES):
        got = await ctx.queue.events(after=after, queue_id=message_id, limit=500)
        events.extend(got.events)
        if not got.events or got.cursor == after:
            break
        after = got.cursor
    return events


def routes(ctx: WebContext) -> list[BaseRoute]:
    """The API's routes over ``ctx``."""
    subjects = _Subjects()

    async def list_messages(request: Request) -> Response:
        params = request.query_params
        keys = {k: params[k] for k in params if k not in ("limit", "cursor")}
        message_filter = MessageFilter.parse(keys)
        limit = _limit(params.get("limit"))
        chunk, cursor = await select_page(
            ctx.queue,
            message_filter,
            limit=limit,
            cursor=params.get("cursor", ""),
            now=ctx.clock(),
        )
        items = [{**summary(m), "subject": await subjects.of(ctx, m)} for m in chunk]
        counts = {str(state): n for state, n in (await ctx.queue.counts()).items()}
        return JSONResponse({"items": items, "next_cursor": cursor, "counts": counts})

    async def bulk_action(request: Request) -> Response:
        body = await _json_body(request)
        unknown = sorted(set(body) - {"action", "filter", "dry_run"})
        if unknown:
            raise _Problem(400, "Bad Request", f"unknown key: {', '.join(unknown)}")
        action = body.get("action")
        if action not in ACTIONS:
            raise _Problem(400, "Bad Request", f"action must be one of {', '.join(ACTIONS)}")
        raw_filter = body.get("filter", {})
        if not isinstance(raw_filter, dict):
            raise _Problem(400, "Bad Request", "filter must be a JSON object")
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise _Problem(400, "Bad Request", "dry_run must be true or false")
        result = await bulk(
            ctx.queue,
            action,
            MessageFilter.parse(raw_filter),
            dry_run=dry_run,
            node=ctx.node,
            clock=ctx.clock,
        )
        return JSONResponse(result.to_json())

    async def get_message(request: Request) -> Response:
        message_id = request.path_params["id"]
        message = await ctx.queue.get(message_id)
        parsed = mime.summarize(message.data)
        events = await timeline(ctx, message_id)
        recipients = []
        for r in message.recipients:
            recipients.append(
                {
                    "address": r.address,
                    "state": str(r.state),
                    "reply": r.reply,
                    "relay": r.relay,
                    "attempts": r.attempts,
                    "timeline": [e.to_json() for e in events if e.recipient == r.address],
                }
            )
        return JSONResponse(
            {
                **summary(message),
                "envelope": {
                    "sender": message.sender,
                    "recipients": [r.address for r in message.recipients],
                },
                "recipient_status": recipients,
                "subject": parsed.subject,
                "headers": [[k, v] for k, v in parsed.headers],
                "text": parsed.text,
                "html": parsed.html,
                "attachments": [
                    {
                        "index": a.index,
                        "filename": a.filename,
                        "content_type": a.content_type,
                        "size": a.size,
                    }
                    for a in parsed.attachments
                ],
                "timeline": [e.to_json() for e in events],
            }
        )

    async def raw_message(request: Request) -> Response:
        message = await ctx.queue.get(request.path_params["id"])
        # Never rendered in the console's origin, whatever a browser makes of it.
        return Response(
            message.data,
            media_type="message/rfc822",
            headers={
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
            },
        )

    async def release(request: Request) -> Response:
        message_id = request.path_params["id"]
        body = await _json_body(request, optional=True)
        unknown = sorted(set(body) - {"relay", "recipient"})
        if unknown:
            raise _Problem(400, "Bad Request", f"unknown key: {', '.join(unknown)}")
        relay, recipient = body.get("relay"), body.get("recipient")
        for key, value in (("relay", relay), ("recipient", recipient)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise _Problem(400, "Bad Request", f"{key} must be non-empty text")
        if isinstance(recipient, str) and (
            "@" not in recipient or any(c in recipient for c in "\r\n <>,")
        ):
            raise _Problem(400, "Bad Request", "recipient must be one address, like a@example.org")
        message = await ctx.queue.get(message_id)
        if message.state is not MessageState.HELD:
            raise _Problem(409, "Conflict", f"message {message_id} is {message.state}, not held")
        if relay is None and recipient is None:
            if ctx.settings.effective_route == "hold":
                raise _Problem(
                    409,
                    "Conflict",
                    'no relay is configured: name one ({"relay": "host:port"})',
                )
            await act(ctx.queue, "release", message, node=ctx.node, clock=ctx.clock)
            return JSONResponse({"id": message_id, "state": str(MessageState.QUEUED)})
        return await _release_copy(ctx, message, relay, recipient)

    async def retry(request: Request) -> Response:
        message_id = request.path_params["id"]
        message = await ctx.queue.get(message_id)
        if message.state not in (MessageState.QUEUED, MessageState.DEFERRED):
            raise _Problem(
                409, "Conflict", f"message {message_id} is {message.state}: nothing to retry"
            )
        await act(ctx.queue, "retry", message, node=ctx.node, clock=ctx.clock)
        return JSONResponse({"id": message_id, "state": str(MessageState.QUEUED)})

    async def delete(request: Request) -> Response:
        message_id = request.path_params["id"]
        message = await ctx.queue.get(message_id)
        await act(ctx.queue, "delete", message, node=ctx.node, clock=ctx.clock)
        return JSONResponse({"id": message_id, "deleted": True})

    return [
        Route(f"{PREFIX}/messages", _guarded(list_messages), methods=["GET"]),
        Route(f"{PREFIX}/messages/bulk", _guarded(bulk_action), methods=["POST"]),
        Route(f"{PREFIX}/messages/{{id}}", _guarded(get_message), methods=["GET"]),
        Route(f"{PREFIX}/messages/{{id}}", _guarded(delete), methods=["DELETE"]),
        Route(f"{PREFIX}/messages/{{id}}/raw", _guarded(raw_message), methods=["GET"]),
        Route(f"{PREFIX}/messages/{{id}}/release", _guarded(release), methods=["POST"]),
        Route(f"{PREFIX}/messages/{{id}}/retry", _guarded(retry), methods=["POST"]),
    ]


async def _release_copy(
    ctx: WebContext, message: StoredMessage, relay: str | None, recipient: str | None
) -> Response:
    """Send a copy of a held message through a one-off relay, or to a one-off recipient
    through the configured relay (Mailpit's release): the message itself stays held, and
    a ``released`` event per recipient records the attempt."""
    if ctx.release_courier is None:
        raise _Problem(409, "Conflict", "release to a relay is not available here")
    courier = ctx.release_courier(relay)
    if courier is None:
        raise _Problem(409, "Conflict", 'no relay is configured: name one ({"relay": "host:port"})')
    pending = [r.address for r in message.recipients if r.state is RecipientState.PENDING]
    recipients = [recipient] if recipient else pending or [r.address for r in message.recipients]
    try:
        results = await courier.deliver(
            message.sender, recipients, message.data, message_id=message.id
        )
    finally:
        await courier.close()
    now = ctx.clock()
    await ctx.queue.add_events(
        [
            DeliveryEvent(
                event_id=new_event_id(ctx.clock),
                event=RELEASED,
                time=now,
                node=ctx.node,
                queue_id=message.id,
                recipient=r.recipient,
                route="relay",
                relay_host=r.relay_host,
                relay_ip=r.relay_ip,
                reply_code=r.reply.code,
                reply_enhanced=r.reply.enhanced,
                reply_text=r.reply.text,
                tls_version=r.tls_version,
                tls_verified=r.tls_verified,
            )
            for r in results
        ]
    )
    shown = [
        {
            "recipient": r.recipient,
            "result": str(r.result),
            "relay": r.relay,
            "reply_code": r.reply.code,
            "reply_enhanced": r.reply.enhanced,
            "reply_text": r.reply.text,
            "tls_version": r.tls_version,
            "tls_verified": r.tls_verified,
        }
        for r in results
    ]
    if not all(r.ok for r in results):
        failed = next(r for r in results if not r.ok)
        raise _Problem(
            502,
            "Bad Gateway",
            f"{courier.name} answered {failed.reply.code} {failed.reply.text}".strip(),
            results=shown,
        )
    return JSONResponse({"id": message.id, "relay": courier.name, "results": shown})
