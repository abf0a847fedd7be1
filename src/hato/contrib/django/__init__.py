"""Django and Hato: an email backend that enqueues into Hato's outbox instead of talking
SMTP, and a webhook view that records delivery events and fires a signal for each.

In ``settings.py``::

    EMAIL_BACKEND = "hato.contrib.django.EmailBackend"
    HATO_QUEUE_URL = "postgresql://app@db/app"     # else the HATO_QUEUE_URL variable
    DEFAULT_FROM_EMAIL = "noreply@example.org"

``send_mail``, ``EmailMessage.send()``, ``EmailMultiAlternatives`` and ``mail_admins``
then return as soon as the message is durable in the queue, and ``hato worker`` delivers
it. Django renders the message itself (``EmailMessage.message()``: attachments,
alternatives, extra headers and its header-injection checks are Django's own); this
backend only takes the bytes and the envelope. Bcc addresses go into the envelope and
never into the headers, even when set through ``headers={"Bcc": ...}``. A
``Hato-Idempotency-Key`` header, when present, is also the queue's idempotency key, so a
retried request enqueues one message.

Settings, each falling back to the environment variable of the same name:
``HATO_QUEUE_URL`` and ``HATO_DEFAULT_FROM`` (used only when a message has no
``from_email``, which Django fills from ``DEFAULT_FROM_EMAIL``). The backend's keyword
arguments (``get_connection(queue_url=...)``) override both.

Django makes a backend per ``send_mail`` call, so the :class:`hato.Mailer` behind it (a
queue connection and a private event loop) is kept per queue URL for the life of the
process instead of being rebuilt each time.

To send only when the surrounding database transaction commits, call ``send_mail``
inside ``transaction.on_commit(...)``; for the same on PostgreSQL without the gap between
commit and enqueue, use ``hato.Mailer.send(..., connection=...)`` directly.

Delivery events (``delivered``, ``bounced``, ... from every hop; see
:mod:`hato.events`): route the relays' webhooks to this package's view and connect a
receiver to :data:`hato.contrib.django.signals.delivery_event`::

    # urls.py
    path("hato/webhooks/", include("hato.contrib.django.urls")),
    # settings.py: the secret(s) of HATO_WEBHOOK_SECRET on the relays
    HATO_WEBHOOK_SECRET = "..."          # else the HATO_WEBHOOK_SECRET(_FILE) variable
    # anywhere
    from hato.contrib.django.signals import delivery_event

    @receiver(delivery_event)
    def on_event(sender, event, **kwargs):
        if event.event == "bounced":
            mark_bouncing(event.recipient)

The view verifies the ``Hato-Signature`` (:func:`hato.webhooks.verify`), records the
events on the outbox message (``Mailer.status(id)`` then shows them), and sends the
signal once per event received (at least once: a sender retrying after a lost answer
sends an event again; ``event.event_id`` tells).
"""

from hato.contrib.django.backend import EmailBackend, close_mailers, shared_mailer

__all__ = ["EmailBackend", "close_mailers", "shared_mailer"]
