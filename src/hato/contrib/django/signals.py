"""The Django signal fired for each delivery event the webhook view receives."""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["delivery_event"]

delivery_event = Signal()
"""Sent once per received event, after it is stored, with ``sender`` the
:class:`hato.events.DeliveryEvent` class and ``event`` the event."""
