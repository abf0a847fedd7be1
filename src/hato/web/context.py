"""What the HTTP routes may use: the one WebContext built by ``app.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hato.clock import Clock
from hato.config import Settings
from hato.maillog import MailLog
from hato.queue.base import Queue
from hato.users import UserStore

Role = Literal["serve", "worker"]


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
