"""What the HTTP routes may use: the one WebContext built by ``app.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hato.clock import Clock
from hato.config import Settings
from hato.delivery.base import Courier
from hato.maillog import MailLog
from hato.queue.base import Queue
from hato.users import UserStore

if TYPE_CHECKING:
    from hato.web.metrics import Metrics
    from hato.web.process_metrics import IntakeView

Role = Literal["serve", "worker"]

ReleaseCourier = Callable[[str | None], Courier | None]
"""The courier a console release sends a held message through: to ``"host:port"`` (a
one-off relay the operator typed), or with ``None`` to the configured relay (``None``
when there is none). Built by ``app.py`` (:func:`hato.app.build_release_courier`)."""


@dataclass
class WebContext:
    """The dependencies of every HTTP route, built once by :mod:`hato.app`.

    Routes read the queue and settings through it and never build anything themselves.
    Parts of the web package add fields here (with defaults) as they need them.
    """

    settings: Settings
    queue: Queue
    log: MailLog
    clock: Clock
    role: Role
    node: str  # this machine's name, as in delivery events
    users: UserStore | None = None  # SASL users (who may read their own messages' events)
    listeners: list[tuple[str, str, int]] = field(default_factory=list)  # (role, host, port)
    release_courier: ReleaseCourier | None = None  # console/API release of held mail
    # For /readyz: each SMTP listener's name and whether it is bound and serving now.
    serving: Callable[[], list[tuple[str, bool]]] = list
    # Open connections per SMTP listener name, for the metrics.
    active_connections: Callable[[], dict[str, int]] = dict
    # Where this role hands mail on, (host, port), when it has such a next hop.
    relay: tuple[str, int] | None = None
    # The worker's view of its queue: "ok", or why it cannot claim (Worker.health).
    worker_health: Callable[[], str] | None = None
    # A directory on the queue's filesystem, and the bytes that must stay free there.
    disk: Path | None = None
    disk_min_free: int = 0
    # This process's metrics, when the HTTP listener runs (hato.web.metrics).
    metrics: Metrics | None = None
    # With several processes (HATO_PROCESSES): the intake processes, asked at scrape time
    # (``await intake.poll()``); ``serving`` and ``active_connections`` then read it.
    intake: IntakeView | None = None
