"""What the app does with delivery events: remember addresses that bounce."""

from typing import Any

from django.dispatch import receiver

from hato.contrib.django.signals import delivery_event
from hato.events import DeliveryEvent

BOUNCING: set[str] = set()
SEEN: list[str] = []


@receiver(delivery_event)
def on_delivery_event(sender: type, event: DeliveryEvent, **kwargs: Any) -> None:
    SEEN.append(event.event_id)
    if event.event == "bounced":
        BOUNCING.add(event.recipient)
