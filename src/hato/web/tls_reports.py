"""``/api/v1/tls/reports``: the TLS-RPT reports other servers sent about our domains.

The same list as ``hato tls reports --json``: one entry per policy of each received
report (reporting organization, date range, policy, successful and failed sessions,
failure details), newest period first. ``hato serve`` reads new reports from our rua
Maildirs every 10 minutes; this route only reads the store. Optional query parameters:
``domain`` (a policy domain) and ``limit`` (default 100, at most 1000).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from hato.tlsrpt import TLSReportError, TLSReportStore, summarize
from hato.web.context import WebContext

REPORTS_PATH = "/api/v1/tls/reports"
MAX_LIMIT = 1000


def routes(ctx: WebContext) -> list[BaseRoute]:
    data_dir = ctx.settings.data_dir

    def read(domain: str, limit: int) -> list[dict[str, Any]]:
        store = TLSReportStore.in_data_dir(data_dir, clock=ctx.clock)
        try:
            entries = [s.as_dict() for r in store.received() for s in summarize(r)]
        finally:
            store.close()
        if domain:
            entries = [e for e in entries if e["policy-domain"] == domain]
        return entries[:limit]

    async def reports(request: Request) -> JSONResponse:
        domain = request.query_params.get("domain", "").strip().lower().rstrip(".")
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            return JSONResponse(
                {"error": f"limit must be a whole number from 1 to {MAX_LIMIT}"}, status_code=400
            )
        try:
            entries = await asyncio.to_thread(read, domain, int(raw))
        except TLSReportError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return JSONResponse({"reports": entries})

    return [Route(REPORTS_PATH, reports, methods=["GET"])]
