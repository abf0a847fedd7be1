"""Integrations with web frameworks: ``hato.contrib.django`` (an email backend, a webhook
view and a signal for delivery events)."""
