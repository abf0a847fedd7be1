"""The webhook view: verify, record on the outbox message, fire ``delivery_event``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from hato.config import environment_webhook_secrets
from hato.contrib.django.backend import shared_mailer
from hato.contrib.django.signals import delivery_event
from hato.errors import HatoError, SignatureError
from hato.events import DeliveryEvent
from hato.webhooks import DEFAULT_TOLERANCE, HEADER, MAX_BODY, parse_events, verify

__all__ = ["webhook"]

_debug = logging.getLogger(__name__)


def _secrets() -> Sequence[str]:
    """``settings.HATO_WEBHOOK_SECRET`` (a string, comma-separated for a rotation, or a
    list), else the environment's ``HATO_WEBHOOK_SECRET`` / ``_FILE``."""
    configured = getattr(settings, "HATO_WEBHOOK_SECRET", None)
    if isinstance(configured, str):
        return [s.strip() for s in configured.split(",") if s.strip()]
    if isinstance(configured, list | tuple):
        return [str(s) for s in configured if s]
    return environment_webhook_secrets()


@csrf_exempt
@require_POST
def webhook(request: HttpRequest) -> HttpResponse:
    """Take one signed webhook (see the package docstring): 204 when recorded, 401 for
    a bad or stale signature, 400 for a body that is not events, 503 when the outbox
    cannot store them (the relay retries)."""
    body = request.body
    if len(body) > MAX_BODY:
        return HttpResponse("body too large\n", status=413, content_type="text/plain")
    tolerance = getattr(settings, "HATO_WEBHOOK_TOLERANCE", DEFAULT_TOLERANCE)
    try:
        verify(body, request.headers.get(HEADER), _secrets(), tolerance)
    except SignatureError as exc:
        return HttpResponse(f"{exc}\n", status=401, content_type="text/plain")
    try:
        events = parse_events(body)
    except ValueError as exc:
        return HttpResponse(f"{exc}\n", status=400, content_type="text/plain")
    mailer = shared_mailer(
        getattr(settings, "HATO_QUEUE_URL", None), getattr(settings, "HATO_DEFAULT_FROM", None)
    )
    try:
        mailer.record_events(events)
    except HatoError as exc:
        _debug.warning("webhook: cannot record %d event(s): %s", len(events), exc)
        return HttpResponse("cannot store the events now\n", status=503, content_type="text/plain")
    for event in events:
        delivery_event.send(sender=DeliveryEvent, event=event)
    return HttpResponse(status=204)
