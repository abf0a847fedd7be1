"""The courier protocol: deliver one message to some recipients over one destination.

A courier returns one :class:`DeliveryResult` per recipient, each ``ok``, ``temporary``
or ``permanent`` with the reply that decided it. Couriers classify failures where they
happen (a 4xx, a refused connection or anything unexpected is temporary; a 5xx is
permanent) and never raise for a delivery failure. They may keep connections open across
calls; ``close`` ends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from hato.dsn_params import DsnRequest
from hato.reply import Reply


class Result(StrEnum):
    OK = "ok"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    HELD = "held"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    recipient: str
    result: Result
    reply: Reply
    relay: str = ""  # "host[ip]:port" as in Postfix's log, or "maildir", "hold"
    # The next hop spoken to, for the attempt record (hato.events.Attempt): its name and
    # address, the TLS protocol version ("" in plaintext) and whether its certificate
    # was checked. Empty when no SMTP session was reached. ``tls_policy`` names the rule
    # that chose the TLS level (hato.events.Attempt lists them); empty where none did.
    relay_host: str = ""
    relay_ip: str = ""
    tls_version: str = ""
    tls_verified: bool = False
    # The next hop offered DSN (RFC 3461), so the DSN parameters went on with the
    # message and that hop reports from now on; False: it did not, or no SMTP hop.
    next_hop_dsn: bool = False
    tls_policy: str = ""

    @property
    def ok(self) -> bool:
        return self.result is Result.OK


class Courier(Protocol):
    """Delivers messages. ``name`` appears in logs (``relay=``)."""

    name: str

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
        """Try once; one result per recipient, in the order given. Never raises for a
        delivery failure (only for programming errors). ``dsn``: the message's DSN
        parameters, passed on to a next hop that offers DSN (SMTP couriers).
        ``require_tls``: the message is REQUIRETLS (RFC 8689); network couriers send it
        only over verified TLS to a next hop that offers REQUIRETLS, local ones (maildir,
        hold) have no hop to protect."""
        ...

    async def close(self) -> None: ...


def all_results(
    recipients: Sequence[str], result: Result, reply: Reply, relay: str = ""
) -> list[DeliveryResult]:
    """The same result for every recipient (connection-level failures)."""
    return [DeliveryResult(r, result, reply, relay) for r in recipients]
