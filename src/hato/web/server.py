"""The HTTP listener: one Starlette application, served in-process by uvicorn.

:func:`build_asgi` puts the parts together behind :class:`~hato.web.security.Guard`:
health and metrics (here), ``/login``, the JSON API, the events stream, and the console
last (it owns ``/``). :class:`HttpServer` binds the socket itself at start-up (so that a
port in use is a one-line :class:`~hato.errors.ConfigError` before ``ready``) and serves
it with a :class:`uvicorn.Server` whose signal handling is off: Hato's own handlers stop
the process, and cancelling :meth:`HttpServer.run` shuts uvicorn down gracefully.

Which address, token and names apply is read once by :meth:`HttpSettings.read`, which
refuses a listener off loopback without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from hato.config import Settings
from hato.errors import ConfigError
from hato.smtp.auth import AuthThrottle
from hato.web import (
    api,
    console,
    events_api,
    health,
    metrics,
    mta_sts,
    security,
    tls_reports,
)
from hato.web.context import WebContext
from hato.web.problems import problem

# How long in-flight requests (an open event stream) may take to finish at stop.
GRACEFUL_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP listener of one command, as the settings say (read once, at start-up)."""

    host: str
    port: int
    token: str | None
    hosts: tuple[str, ...]
    tls: bool
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def loopback(self) -> bool:
        return security.is_loopback_host(self.host)

    @classmethod
    def read(cls, settings: Settings, command: Literal["serve", "worker"]) -> HttpSettings | None:
        """``None`` when the listener is off. Raises ConfigError (one line) for a bad
        address, an unreadable token file, a listener off loopback without a token, or
        HTTPS without a certificate."""
        where = settings.http_listener(command)
        if where is None:
            return None
        host, port = where
        token = settings.http_token_value()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if token is None and not security.is_loopback_host(host):
            raise ConfigError(
                f"HATO_HTTP_LISTEN={shown} is reachable from outside loopback: set "
                "HATO_HTTP_TOKEN or HATO_HTTP_TOKEN_FILE (or listen on 127.0.0.1)"
            )
        cert = key = None
        if settings.http_tls:
            if settings.tls_cert_file is None or settings.tls_key_file is None:
                raise ConfigError("HATO_HTTP_TLS needs HATO_TLS_CERT_FILE and HATO_TLS_KEY_FILE")
            cert, key = str(settings.tls_cert_file), str(settings.tls_key_file)
        # Senders fetch our MTA-STS policy from https://mta-sts.DOMAIN/ (through a proxy).
        hosts = (*settings.http_hosts, *(f"mta-sts.{domain}" for domain in settings.domains))
        return cls(host, port, token, hosts, settings.http_tls, cert, key)


def _problem_for(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers) if exc.headers else None
        return problem(exc.status_code, detail=exc.detail, headers=headers)
    return problem(500, detail="internal error; see the server's log")


def build_asgi(
    ctx: WebContext,
    access: security.Access | None = None,
    *,
    throttle: AuthThrottle | None = None,
) -> Starlette:
    """The whole HTTP application of one process. Without ``access``, the access rules
    come from ``ctx.settings`` (the token read now) for ``ctx.role``'s listener."""
    if ctx.metrics is None:
        ctx.metrics = metrics.Metrics(role=ctx.role)
    scrape = ctx.metrics
    if access is None:
        read = HttpSettings.read(ctx.settings, ctx.role)
        access = security.Access(
            token=read.token if read else None,
            bound_host=read.host if read else "127.0.0.1",
            hosts=read.hosts if read else (),
            tls=read.tls if read else False,
            throttle=throttle,
            log=ctx.log,
            on_failure=scrape.http_auth_failures.inc,
        )
    readiness = health.Readiness(ctx)
    routes: list[BaseRoute] = [
        *health.routes(ctx, readiness),
        *metrics.routes(ctx, scrape, readiness),
        *security.routes(access),
        *mta_sts.routes(ctx),
        *tls_reports.routes(ctx),
        *api.routes(ctx),
        *events_api.routes(ctx),
        *console.routes(ctx),  # last: it owns "/"
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(security.Guard, access=access)],
        exception_handlers={HTTPException: _problem_for, Exception: _problem_for},
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: Hato's own decide when the process stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """One HTTP(S) listener serving ``app`` on the running event loop."""

    def __init__(self, app: Starlette, http: HttpSettings) -> None:
        self.http = http
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            ws="none",
            ssl_certfile=http.cert_file,
            ssl_keyfile=http.key_file,
            timeout_graceful_shutdown=int(GRACEFUL_SECONDS),
        )
        self.sock: socket.socket | None = None
        self.server: _Server | None = None

    def bind(self) -> None:
        """Bind and listen now. Raises ConfigError (one line) when it cannot."""
        host, port = self.http.host, self.http.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or exc
            raise ConfigError(f"cannot listen on http {self.shown(port)}: {reason}") from exc
        try:
            self.config.load()  # reads the certificate now: a bad one is a start-up error
        except Exception as exc:
            sock.close()
            raise ConfigError(f"http listener: {exc}") from exc
        self.sock = sock

    def shown(self, port: int | None = None) -> str:
        host = self.http.host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port if port is None else port}"

    @property
    def port(self) -> int:
        if self.sock is None:
            return self.http.port
        return int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.http.tls else 'http'}://{self.shown()}"

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.started and not self.server.should_exit

    async def run(self) -> None:
        """Serve until cancelled; then finish in-flight requests (a few seconds at most)
        and close the socket."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        self.server = server = _Server(self.config)
        serving = asyncio.ensure_future(server.serve(sockets=[self.sock]))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, GRACEFUL_SECONDS + 2)
            raise
        finally:
            if not serving.done():
                serving.cancel()
            self.sock.close()
