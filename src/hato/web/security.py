"""Who may use the HTTP listener, and from where: the one gate in front of every route.

:class:`Guard` is an ASGI middleware (pure ASGI, so streamed responses such as the
server-sent events pass through untouched). In order, for each HTTP request:

1. **Host** (DNS rebinding): the ``Host`` header must be a loopback name (``localhost``,
   ``*.localhost``) or address, the address the listener is bound to, or one of
   ``HATO_HTTP_HOSTS``; anything else is answered ``421``.
2. **Origin** (CSRF, on loopback too): a state-changing request (POST, PUT, PATCH,
   DELETE) that carries an ``Origin`` must come from this very origin (scheme, host,
   port); else ``403``. Clients without a browser send no ``Origin`` and pass.
3. **Token**: off loopback every path but ``/healthz``, ``/readyz``, ``/login`` and the
   MTA-STS policy (``/.well-known/mta-sts.txt``) needs
   the token, as ``Authorization: Bearer TOKEN`` or as the session cookie that
   ``POST /login`` (a form with the token) sets: HttpOnly, SameSite=Strict, Secure under
   HTTPS, holding a random server-side session id (sessions live in this process and
   end with it). On loopback no token is needed (a Bearer token sent anyway is still
   checked). A wrong token is answered ``401`` and counted per client address by the
   same :class:`~hato.smtp.auth.AuthThrottle` as SMTP AUTH failures: the delay grows,
   and a blocked address gets ``429`` until its failures leave the window. Each failure
   is one mail-log line, never with the token.
4. **CSRF token**: a state-changing request authenticated by the session cookie must also
   carry the session's CSRF token, in the ``X-CSRF-Token`` header or a ``csrf_token``
   form field (urlencoded forms); :func:`csrf_token` gives it to templates.

Every refusal is a problem body (RFC 9457, :func:`hato.web.problems.problem`). The
middleware records how the request was let in as ``scope["hato.auth"]`` (``loopback``,
``bearer``, ``cookie`` or ``public``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hato.maillog import MailLog
from hato.smtp.auth import AuthThrottle
from hato.web.problems import problem

SESSION_COOKIE = "hato_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 1000
# Paths anyone may reach, off loopback too.
# The MTA-STS policy is for every sending MTA (RFC 8461), never behind the token.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/login", "/.well-known/mta-sts.txt"})
# Paths whose route checks ``Authorization: Basic`` (SASL users) itself.
BASIC_PATHS = frozenset({"/api/v1/events"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A urlencoded form larger than this is not read for its CSRF field.
MAX_FORM_BYTES = 1024 * 1024


def is_loopback_host(host: str) -> bool:
    """A loopback name or address (``localhost``, ``x.localhost``, 127/8, ::1)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8025`` → ``::1``)."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(slots=True)
class Session:
    """One browser's login: the id in its cookie, its CSRF token, when it ends."""

    id: str
    csrf: str
    expires: float


class Sessions:
    """Logged-in browsers of this process, bounded (the oldest go first)."""

    def __init__(
        self, lifetime: float = SESSION_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def new(self) -> Session:
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), self._clock() + self.lifetime
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


class Access:
    """The access rules of one HTTP listener: its token, where it is bound, its names."""

    def __init__(
        self,
        *,
        token: str | None,
        bound_host: str,
        hosts: Iterable[str] = (),
        tls: bool = False,
        throttle: AuthThrottle | None = None,
        log: MailLog | None = None,
        sessions: Sessions | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.token = token
        self.bound_host = bound_host
        self.loopback = is_loopback_host(bound_host)
        self.hosts = {h.strip().lower().rstrip(".") for h in hosts if h.strip()}
        self.tls = tls
        self.throttle = throttle or AuthThrottle()
        self.log = log
        self.sessions = sessions or Sessions()
        self.on_failure = on_failure  # told of each wrong token (a metric)
        # The CSRF token of requests without a session (loopback): accepted, not required.
        self.loopback_csrf = secrets.token_urlsafe(32)

    @property
    def token_required(self) -> bool:
        return not self.loopback

    def host_allowed(self, host: str) -> bool:
        name = _split_host(host).lower().rstrip(".")
        if not name:
            return False
        if is_loopback_host(name) or name in self.hosts:
            return True
        bound = self.bound_host.strip("[]").lower()
        return name == bound and bound not in ("0.0.0.0", "::", "")

    def token_ok(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            offered.encode("utf-8", "surrogateescape"), self.token.encode()
        )

    async def failed(self, client_ip: str, how: str) -> Response:
        """A wrong token: count it, log it (without the token), slow the client down."""
        delay = self.throttle.failed(client_ip, listener="http")
        if self.on_failure is not None:
            self.on_failure()
        if self.log is not None:
            self.log.event("http", "", warning=f"[{client_ip}]: wrong token ({how})")
        if delay is None:
            return problem(429, detail="too many wrong tokens from this address; try later")
        if delay > 0:
            await asyncio.sleep(delay)
        return problem(
            401, detail="wrong token", headers={"WWW-Authenticate": 'Bearer realm="hato"'}
        )


def csrf_token(request: Request) -> str:
    """The CSRF token a form or script of this request's page sends back (the field
    ``csrf_token`` or the header ``X-CSRF-Token``)."""
    session = request.scope.get("hato.session")
    if isinstance(session, Session):
        return session.csrf
    access = request.scope.get("hato.access")
    return access.loopback_csrf if isinstance(access, Access) else ""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, list[Message]] | None:
    """The whole body (and the messages it came in), or ``None`` past ``limit``."""
    messages: list[Message] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return body, messages
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return body, messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access = self.access
        scope["hato.access"] = access
        host = _header(scope, b"host") or ""
        if not access.host_allowed(host):
            await problem(421, detail=f"this server does not answer to the host name {host!r}")(
                scope, receive, send
            )
            return
        method = scope["method"]
        unsafe = method in UNSAFE_METHODS
        origin = _header(scope, b"origin")
        if unsafe and origin is not None:
            scheme = "https" if access.tls else "http"
            if origin.rstrip("/").lower() != f"{scheme}://{host}".lower():
                await problem(403, detail="cross-origin request refused")(scope, receive, send)
                return
        path = scope["path"]
        ip = _client_ip(scope)
        authorization = _header(scope, b"authorization")
        how = "loopback" if not access.token_required else "public"
        session: Session | None = None
        if authorization is not None:
            kind, _, offered = authorization.partition(" ")
            if access.throttle.blocked(ip):
                await problem(429, detail="too many wrong tokens from this address; try later")(
                    scope, receive, send
                )
                return
            if kind.lower() == "basic" and path in BASIC_PATHS:
                how = "basic"  # SASL credentials: the route checks them (hato.web.events_api)
            elif kind.lower() != "bearer" or not access.token_ok(offered.strip()):
                await (await access.failed(ip, "bearer"))(scope, receive, send)
                return
            else:
                how = "bearer"
        else:
            sid = _cookie(scope, SESSION_COOKIE)
            session = access.sessions.get(sid) if sid else None
            if session is not None:
                how = "cookie"
                scope["hato.session"] = session
        if how == "public" and path not in PUBLIC_PATHS:
            await self._unauthenticated(scope, receive, send)
            return
        if unsafe and how == "cookie" and path != "/login":
            assert session is not None
            offered_csrf = _header(scope, CSRF_HEADER.encode())
            if offered_csrf is None and (_header(scope, b"content-type") or "").startswith(
                "application/x-www-form-urlencoded"
            ):
                read = await _read_body(receive, MAX_FORM_BYTES)
                if read is not None:
                    body, messages = read
                    receive = _replay(messages, receive)
                    values = parse_qs(body.decode("latin-1")).get(CSRF_FIELD)
                    offered_csrf = values[0] if values else None
            if offered_csrf is None or not hmac.compare_digest(
                offered_csrf.encode("utf-8", "surrogateescape"), session.csrf.encode()
            ):
                await problem(403, detail="missing or wrong CSRF token")(scope, receive, send)
                return
        scope["hato.auth"] = how
        await self.app(scope, receive, send)

    async def _unauthenticated(self, scope: Scope, receive: Receive, send: Send) -> None:
        accept = _header(scope, b"accept") or ""
        if scope["method"] == "GET" and "text/html" in accept:
            target = scope["path"]
            response: Response = RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        else:
            response = problem(
                401,
                detail="this listener needs the token: Authorization: Bearer TOKEN",
                headers={"WWW-Authenticate": 'Bearer realm="hato"'},
            )
        await response(scope, receive, send)


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hato: log in</title></head>
<body><main><h1>Hato</h1>
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label for="token">Token (HATO_HTTP_TOKEN)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button>
</form>{message}</main></body></html>
"""


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def routes(access: Access) -> list[BaseRoute]:
    """``GET /login`` (a form), ``POST /login`` (the token, as a form field ``token``:
    sets the session cookie), ``POST /logout``."""

    async def login_form(request: Request) -> Response:
        target = escape(_safe_next(request.query_params.get("next")))
        return HTMLResponse(_LOGIN_PAGE.format(next=target, message=""))

    async def login(request: Request) -> Response:
        ip = request.client.host if request.client else ""
        if access.throttle.blocked(ip):
            return problem(429, detail="too many wrong tokens from this address; try later")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return problem(413, detail="the login form is too large")
        form = parse_qs(body.decode("utf-8", "replace"))
        offered = form.get("token", [""])[0]
        target = _safe_next(form.get("next", ["/"])[0])
        if not offered or not access.token_ok(offered.strip()):
            return await access.failed(ip, "login")
        session = access.sessions.new()
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=int(access.sessions.lifetime),
            path="/",
            secure=access.tls,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(request: Request) -> Response:
        session = request.scope.get("hato.session")
        if isinstance(session, Session):
            access.sessions.end(session.id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]


def describe(scope: dict[str, Any]) -> str:
    """How a request was let in (``loopback``, ``bearer``, ``cookie``, ``public``)."""
    return str(scope.get("hato.auth", ""))
