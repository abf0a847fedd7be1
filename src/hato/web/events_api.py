"""``GET /api/v1/events``: this node's delivery events, as JSON pages or a live stream.

Query: ``envid=`` (one envelope id), ``since=`` (ISO 8601, Unix seconds, or a duration
back from now such as ``2h``), ``after=`` (the cursor of the previous page), ``limit=``
(1 to 1000, default 100). The answer is ``{"events": [...], "cursor": "..."}``; ask again
with ``after=<cursor>`` for what came since. With ``Accept: text/event-stream`` the answer
is a Server-Sent Events stream instead: one ``event: <name>`` / ``id: <cursor>`` /
``data: <event JSON>`` block per event, as they are stored; a client that reconnects with
``Last-Event-ID`` resumes there (it may see an event twice, never misses one).

Who may read what:

* HTTP Basic with a SASL user's name and password (``hato user add``), as a relay that
  submitted mail here uses (``HATO_RELAY_EVENTS_URL``): only the events of messages that
  user submitted (intake records the user on each message), wherever the request comes
  from. The password check (argon2) runs off the event loop. The security middleware
  lets requests to this path that carry ``Authorization: Basic`` through to here.
* without Basic, a request the security middleware let in with the console token or
  cookie, or on a loopback listener (``scope["hato.auth"]`` is ``bearer``, ``cookie`` or
  ``loopback``; or ``scope["hato.authenticated"] = True``): every event.
* anything else: ``401`` with ``WWW-Authenticate: Basic``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from hato.errors import MessageNotFound, QueueError
from hato.events import DeliveryEvent, parse_since
from hato.message import META_AUTH_USER
from hato.queue.base import Queue
from hato.web.context import WebContext

AUTHENTICATED = "hato.authenticated"
"""The ``scope`` key the security middleware sets (to ``True``) on a request it
authenticated with the console token or cookie."""

AUTH = "hato.auth"
"""The ``scope`` key in which the security middleware (:mod:`hato.web.security`) says how
it let a request in: ``loopback``, ``bearer`` or ``cookie`` see every event (:data:`FULL`);
``public`` and ``basic`` (a request to this path it let through for its
``Authorization: Basic``) only what Basic credentials allow."""
FULL = frozenset({"loopback", "bearer", "cookie"})

PATH = "/api/v1/events"
MAX_LIMIT = 1000
WRONG = "wrong user name or password"
# An idle stream sends a comment this often, so proxies and clients keep it open.
KEEPALIVE = 15.0
# The owners of this many messages are remembered between requests.
_OWNER_CACHE = 10_000


@dataclass
class _Owners:
    """Who submitted the message an event belongs to, looked up once per id."""

    queue: Queue
    known: dict[str, str] = field(default_factory=dict)

    async def _of_message(self, message_id: str) -> str | None:
        """The submitting user of a local message; ``None`` if there is no such one."""
        try:
            msg = await self.queue.get(message_id)
        except MessageNotFound:
            return None
        return msg.meta.get(META_AUTH_USER, "")

    async def owner(self, event: DeliveryEvent) -> str:
        """The SASL user whose message ``event`` describes; ``""`` for none (or several)."""
        if event.queue_id:
            found = await self._cached(event.queue_id, self._of_message)
            if found is not None:
                return found
        if event.envid:
            # An event another node reported for one of ours: the message is the local
            # one travelling with that envelope id (or whose queue id it is).
            return await self._cached("envid:" + event.envid, self._of_envid) or ""
        return ""

    async def _of_envid(self, envid: str) -> str | None:
        envid = envid.removeprefix("envid:")
        owners: set[str] = set()
        direct = await self._of_message(envid)
        if direct is not None:
            owners.add(direct)
        page = await self.queue.events(envid=envid, limit=50)
        for e in page.events:
            if e.queue_id:
                found = await self._cached(e.queue_id, self._of_message)
                if found is not None:
                    owners.add(found)
        return owners.pop() if len(owners) == 1 else ""

    async def _cached(self, key: str, look: Callable[[str], Awaitable[str | None]]) -> str | None:
        if key in self.known:
            return self.known[key]
        found = await look(key)
        if found is not None:
            if len(self.known) >= _OWNER_CACHE:
                self.known.clear()
            self.known[key] = found
        return found


def _unauthorized(detail: str) -> Response:
    return JSONResponse(
        {"error": detail},
        status_code=401,
        headers={"WWW-Authenticate": 'Basic realm="hato", charset="UTF-8"'},
    )


def _bad(detail: str) -> Response:
    return JSONResponse({"error": detail}, status_code=400)


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep and name else None


def routes(ctx: WebContext) -> list[BaseRoute]:
    """``GET /api/v1/events`` (see the module docstring)."""
    owners = _Owners(ctx.queue)

    async def who(request: Request) -> tuple[bool, str | None]:
        """``(True, None)`` for full access, ``(True, user)`` for one user's events,
        ``(False, reason)`` for none."""
        credentials = _basic(request.headers.get("authorization", ""))
        if credentials is None:
            # Basic credentials always narrow the view to their user's messages; without
            # them, what the security middleware let in sees everything.
            if request.scope.get(AUTHENTICATED) is True or request.scope.get(AUTH) in FULL:
                return True, None
            return False, "authentication required"
        if ctx.users is None:
            return False, "no SASL users on this node"
        name, password = credentials
        user = await asyncio.to_thread(ctx.users.verify, name, password)
        if user is None:
            return False, WRONG
        return True, user.name

    async def visible(events: list[DeliveryEvent], user: str | None) -> list[DeliveryEvent]:
        if user is None:
            return events
        return [e for e in events if await owners.owner(e) == user]

    async def endpoint(request: Request) -> Response:
        allowed, user = await who(request)
        if not allowed:
            if user == WRONG:
                # Counted with the listener's wrong tokens (hato.web.security's Access in
                # scope["hato.access"]): a password guesser is slowed down, then blocked.
                access = request.scope.get("hato.access")
                failed = getattr(access, "failed", None)
                if failed is not None:
                    client = request.client
                    answer = await failed(client.host if client else "", "basic")
                    if isinstance(answer, Response) and answer.status_code == 429:
                        return answer
            return _unauthorized(user or "authentication required")
        params = request.query_params
        envid = params.get("envid") or None
        since: float | None = None
        if params.get("since"):
            try:
                since = parse_since(params["since"], ctx.clock())
            except ValueError as exc:
                return _bad(str(exc))
        try:
            limit = int(params.get("limit", "100"))
        except ValueError:
            return _bad("limit is not a number")
        if not 1 <= limit <= MAX_LIMIT:
            return _bad(f"limit must be 1 to {MAX_LIMIT}")
        after = params.get("after", "")
        if "text/event-stream" in request.headers.get("accept", ""):
            after = request.headers.get("last-event-id", "") or after
            return StreamingResponse(
                stream(after, envid, since, user),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            page = await ctx.queue.events(after=after, envid=envid, since=since, limit=limit)
            shown = await visible(page.events, user)
        except QueueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return JSONResponse({"events": [e.to_json() for e in shown], "cursor": page.cursor})

    async def stream(
        after: str, envid: str | None, since: float | None, user: str | None
    ) -> AsyncIterator[str]:
        cursor = after
        idle = 0.0
        yield ": hato events\n\n"
        while True:
            try:
                page = await ctx.queue.events(after=cursor, envid=envid, since=since, limit=200)
                shown = {e.event_id for e in await visible(page.events, user)}
            except QueueError:
                await asyncio.sleep(1.0)  # the queue is away; the client stays connected
                continue
            for index, event in enumerate(page.events):
                last = index == len(page.events) - 1
                if event.event_id in shown:
                    data = json.dumps(event.to_json(), ensure_ascii=False)
                    mark = page.cursor if last else cursor
                    yield f"event: {event.event}\nid: {mark}\ndata: {data}\n\n"
            cursor = page.cursor
            if page.events:
                idle = 0.0
                continue
            await asyncio.sleep(1.0)
            idle += 1.0
            if idle >= KEEPALIVE:
                idle = 0.0
                yield ": keepalive\n\n"

    return [Route(PATH, endpoint, methods=["GET"])]
