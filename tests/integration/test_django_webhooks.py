"""Delivery-event webhooks in the Django test project: the view at
``include("hato.contrib.django.urls")`` verifies, records on the outbox message (seen by
``Mailer.status``) and fires ``delivery_event``; forged and replayed posts are refused."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1] / "django_project"
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signup.settings")

import django  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from hato import Mailer  # noqa: E402
from hato.contrib.django import EmailBackend, close_mailers  # noqa: E402
from hato.events import DeliveryEvent, new_event_id  # noqa: E402
from hato.webhooks import sign  # noqa: E402

django.setup()

from signup import bounces  # noqa: E402

URL = "/hato/webhooks/"


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    with override_settings(HATO_QUEUE_URL=url):
        try:
            yield url
        finally:
            close_mailers()


def bounced(envid: str) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(),
        event="bounced",
        time=time.time(),
        node="relay.dbmx.net",
        queue_id="UPSTREAM1",
        recipient="gone@example.net",
        envid=envid,
        route="mx",
        relay_host="mx.example.net",
        relay_ip="127.0.0.1",
        reply_code=550,
        reply_enhanced="5.1.1",
        reply_text="no such user",
        attempt=1,
    )


def post(client: Client, body: bytes, header: str | None) -> int:
    extra = {"HTTP_HATO_SIGNATURE": header} if header is not None else {}
    response = client.post(URL, data=body, content_type="application/json", **extra)
    return int(response.status_code)


def test_the_backend_is_still_importable_as_before() -> None:
    from hato.contrib.django import EmailBackend as again

    assert again is EmailBackend


def test_a_signed_event_is_recorded_on_the_outbox_message_and_signalled(outbox: str) -> None:
    with Mailer(outbox, default_from="noreply@signup.example") as mailer:
        message_id = mailer.send("gone@example.net", "Welcome", text="hi")
    event = bounced(message_id)
    body = json.dumps(event.to_json()).encode()
    client = Client()
    now = int(time.time())
    assert post(client, body, sign(body, "django-whsec-old", now)) == 204
    assert event.event_id in bounces.SEEN and "gone@example.net" in bounces.BOUNCING
    with Mailer(outbox) as mailer:
        assert [e.event_id for e in mailer.status(message_id).events] == [event.event_id]


def test_forged_replayed_and_malformed_posts_are_refused(outbox: str) -> None:
    event = bounced("OUTBOX-X")
    body = json.dumps(event.to_json()).encode()
    client = Client()
    now = int(time.time())
    assert post(client, body, sign(body, "not-the-secret", now)) == 401
    assert post(client, body, sign(body, "django-whsec-new", now - 3600)) == 401
    assert post(client, body, None) == 401
    assert post(client, b"[1]", sign(b"[1]", "django-whsec-new", now)) == 400
    assert client.get(URL).status_code == 405
    assert event.event_id not in bounces.SEEN
