"""The hold courier: keeps every message in the queue, delivers nothing.

It is the route when no relay host is configured, so a developer's mail never leaves the
machine; ``hato queue release`` sends a held message once a relay exists.
"""

from __future__ import annotations

from collections.abc import Sequence

from hato.delivery.base import DeliveryResult, Result, all_results
from hato.dsn_params import DsnRequest
from hato.reply import Reply

HELD = Reply(250, "2.0.0", "held: no relay configured")


class HoldCourier:
    """Answers :attr:`Result.HELD` for every recipient."""

    name = "hold"

    def __init__(self, reply: Reply = HELD) -> None:
        self.reply = reply

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: DsnRequest | None = None,
        require_tls: bool = False,
    ) -> list[DeliveryResult]:
        return all_results(recipients, Result.HELD, self.reply, relay="hold")

    async def close(self) -> None:
        return None
