"""The queue: the one store of messages in flight, for the MTA spool and the app outbox.

``open_queue(url)`` picks a backend by URL scheme; drivers are imported lazily, so the
PostgreSQL and Redis extras are needed only by those who use them. The protocol and the
pure rules every backend shares live in :mod:`hato.queue.base`.
"""

from __future__ import annotations

import os
import re
import time

from hato.clock import Clock
from hato.errors import ConfigError
from hato.queue.base import (
    MessageState,
    Outcome,
    Queue,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
    StoredMessage,
    new_message_id,
)

__all__ = [
    "MessageState",
    "Outcome",
    "Queue",
    "RecipientState",
    "RecipientStatus",
    "RecoveryReport",
    "StoredMessage",
    "new_message_id",
    "open_queue",
    "redact_url",
]


def redact_url(url: str) -> str:
    """A queue URL fit for a log line: the password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def open_queue(url: str, *, clock: Clock = time.time, fsync: bool = True) -> Queue:
    """Build (not yet open) the queue for ``url``: ``memory://``, ``sqlite:///path``,
    ``postgresql://...``, ``redis://...``. Drivers are imported lazily."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from hato.queue.memory import MemoryQueue

        return MemoryQueue(url, clock=clock)
    if scheme == "sqlite":
        from hato.queue.sqlite import SQLiteQueue

        path = url.removeprefix("sqlite://")
        # sqlite:///abs/path -> /abs/path ; sqlite://rel/path -> rel/path; and
        # sqlite:////abs/path (an absolute path after sqlite:///) -> /abs/path, so the
        # path in messages is the one the operator knows.
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        return SQLiteQueue(url, os.path.expanduser(path), clock=clock, fsync=fsync)
    if scheme in ("postgres", "postgresql"):
        try:
            from hato.queue.postgres import PostgresQueue  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ConfigError(
                f"queue {scheme}:// needs: pip install 'hato[postgres]' ({exc})"
            ) from exc
        return PostgresQueue(url, clock=clock)  # type: ignore[no-any-return,unused-ignore]
    if scheme in ("redis", "rediss"):
        try:
            from hato.queue.redis import RedisQueue  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ConfigError(
                f"queue {scheme}:// needs: pip install 'hato[redis]' ({exc})"
            ) from exc
        return RedisQueue(url, clock=clock)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError(
        f"unknown queue URL {url!r}: use memory://, sqlite:///PATH, postgresql://... or redis://..."
    )
