"""What the HTTP routes may use: the one WebContext built by ``app.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from hato.clock import Clock
from hato.config import Settings
from hato.delivery.base import Courier
from hato.maillog import MailLog
from hato.queue.base import Queue
from hato.users import UserStore

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
