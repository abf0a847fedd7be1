"""``GET /healthz`` (the process answers) and ``GET /readyz`` (it can do its job).

``/readyz`` answers 200 when every check passes, else 503, with one JSON member per
check: ``queue`` (a real write, :meth:`~hato.queue.base.Queue.ping`), ``worker`` (its
claims work), ``listener ROLE=HOST:PORT`` (each SMTP listener bound), with several processes
``intake processes`` (``2 of 2 answering``: each intake process answered the delivery
process, whose listener this is, and the listeners are those of the intake processes
that answered), ``relay`` (a TCP
connection to the next hop opens within :data:`RELAY_TIMEOUT`, remembered for
:data:`RELAY_CACHE` seconds) and ``disk`` (free bytes on the queue's filesystem above
``HATO_QUEUE_MINFREE``'s threshold)::

    {"status": "ready", "checks": {"queue": {"ok": true, "detail": "writable"}, ...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hato.web.context import WebContext

QUEUE_TIMEOUT = 5.0
RELAY_TIMEOUT = 3.0
RELAY_CACHE = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str


class Readiness:
    """The checks of ``/readyz`` for one process; the relay probe is cached."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self._relay: tuple[float, Check] | None = None
        self.last: bool | None = None  # the last verdict, for the hato_ready gauge

    async def _queue(self) -> Check:
        try:
            await asyncio.wait_for(self.ctx.queue.ping(), QUEUE_TIMEOUT)
        except TimeoutError:
            return Check(False, f"no write within {QUEUE_TIMEOUT:g}s")
        except Exception as exc:  # any failure is the answer, not a crash of /readyz
            return Check(False, f"{type(exc).__name__}: {exc}")
        return Check(True, "writable")

    async def _relay_check(self, host: str, port: int) -> Check:
        now = time.monotonic()
        if self._relay is not None and now - self._relay[0] < RELAY_CACHE:
            return self._relay[1]
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), RELAY_TIMEOUT)
        except TimeoutError:
            check = Check(False, f"{host}:{port}: no connection within {RELAY_TIMEOUT:g}s")
        except OSError as exc:
            check = Check(False, f"{host}:{port}: {exc.strerror or exc}")
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            check = Check(True, f"{host}:{port} reachable")
        self._relay = (now, check)
        return check

    def _disk(self) -> Check | None:
        path = self.ctx.disk
        if path is None:
            return None
        try:
            free = shutil.disk_usage(path).free
        except OSError as exc:
            return Check(False, f"{path}: {exc.strerror or exc}")
        need = self.ctx.disk_min_free
        text = f"{free} bytes free, {need} needed"
        return Check(free >= need, text)

    async def checks(self) -> dict[str, Check]:
        ctx = self.ctx
        result = {"queue": await self._queue()}
        if ctx.worker_health is not None:
            health = ctx.worker_health()
            result["worker"] = Check(health == "ok", health)
        if ctx.intake is not None:  # the caller polled it
            answering, total = ctx.intake.answering()
            detail = f"{answering} of {total} answering"
            result["intake processes"] = Check(answering == total, detail)
        for name, serving in ctx.serving():
            result[f"listener {name}"] = Check(serving, "bound" if serving else "not serving")
        if ctx.relay is not None:
            result["relay"] = await self._relay_check(*ctx.relay)
        disk = self._disk()
        if disk is not None:
            result["disk"] = disk
        self.last = all(check.ok for check in result.values())
        return result


def routes(ctx: WebContext, readiness: Readiness) -> list[BaseRoute]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if ctx.intake is not None:
            await ctx.intake.poll()
        checks = await readiness.checks()
        ready = all(check.ok for check in checks.values())
        body = {
            "status": "ready" if ready else "not ready",
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
    ]
