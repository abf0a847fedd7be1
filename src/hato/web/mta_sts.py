"""``/.well-known/mta-sts.txt``: our own MTA-STS policy (RFC 8461 3.2), from the settings.

Senders fetch it from ``https://mta-sts.DOMAIN/``; point that name at Hato's HTTP
listener (behind a TLS-terminating proxy with a certificate for ``mta-sts.DOMAIN``), or
place the output of ``hato dns mta-sts-policy`` on another web server. The ``_mta-sts``
record's ``id`` (``hato dns records``) follows the policy's content.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Route

from hato.records import mta_sts_policy
from hato.web.context import WebContext

POLICY_PATH = "/.well-known/mta-sts.txt"


def routes(ctx: WebContext) -> list[BaseRoute]:
    settings = ctx.settings
    policy = mta_sts_policy(
        [settings.hostname.lower().rstrip(".")], settings.mta_sts_mode, settings.mta_sts_max_age
    )

    async def mta_sts(request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            policy, media_type="text/plain", headers={"Cache-Control": "max-age=3600"}
        )

    return [Route(POLICY_PATH, mta_sts, methods=["GET"])]
