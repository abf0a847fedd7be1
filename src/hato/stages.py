"""Per-message stage timestamps for finding latency tails (``HATO_TRACE_STAGES``).

A debugging aid, off by default. When on, ``hato serve`` writes one JSON line per message
that reached the end of a delivery attempt in this process::

    {"id": "...", "accepted": 1764770000.1234, "committed": ..., "claimed": ...,
     "connected": ..., "delivered": ..., "recorded": ..., "ms": {"commit": 1.9, ...}}

(unix seconds; ``ms`` holds the gaps between consecutive stages: ``commit`` = accepted →
committed (the durable enqueue, fsync included), ``wait`` = committed → claimed (the
worker noticing the message), ``connect`` = claimed → connected (a free relay connection:
waiting for one of the pool's slots, then a pooled connection or a new one), ``deliver``
= connected → delivered (the relay's SMTP transaction), ``record`` = delivered →
recorded). ``connected`` is marked by the smarthost courier only; without it ``deliver``
spans claimed → delivered. With several processes the committer (the delivery process)
marks the first two, from the time in the intake's ``accepted`` events; a message
accepted before a restart lacks them.
Garbage collections longer than 5 ms are written as ``{"gc": GENERATION, "at": ...,
"ms": ...}`` lines, so a stall can be matched against them.

Stages are kept in memory only until the message's line is written (bounded: the oldest
unfinished entries are dropped beyond 100,000).
"""

from __future__ import annotations

import gc
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, TextIO

from hato.errors import ConfigError

STAGES = ("accepted", "committed", "claimed", "connected", "delivered", "recorded")
_GAPS = {
    "committed": "commit",
    "claimed": "wait",
    "connected": "connect",
    "delivered": "deliver",
    "recorded": "record",
}
_MAX_OPEN = 100_000
_GC_REPORTED_MS = 5.0


class StageTrace:
    """Collects stage times per message id and appends one JSON line when one finishes.
    Raises :class:`hato.errors.ConfigError` if ``path`` cannot be opened for appending."""

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        try:
            self._file: TextIO | None = self.path.open("a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"HATO_TRACE_STAGES: cannot open {self.path}: {exc}") from exc
        self._open: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)

    def mark(self, message_id: str, stage: str, at: float | None = None) -> None:
        """Note that ``message_id`` reached ``stage`` (now, or at ``at``)."""
        if self._file is None:
            return
        stages = self._open.get(message_id)
        if stages is None:
            stages = self._open[message_id] = {}
            if len(self._open) > _MAX_OPEN:
                self._open.popitem(last=False)
        stages[stage] = self._clock() if at is None else at

    def finish(self, message_id: str, stage: str = "recorded") -> None:
        """Mark the last stage and write the message's line."""
        self.mark(message_id, stage)
        stages = self._open.pop(message_id, None)
        if self._file is None or stages is None:
            return
        gaps: dict[str, float] = {}
        previous: float | None = None
        for name in STAGES:
            if name in stages:
                if previous is not None and name in _GAPS:
                    gaps[_GAPS[name]] = round((stages[name] - previous) * 1000, 3)
                previous = stages[name]
        self._write({"id": message_id, **stages, "ms": gaps})

    def close(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = (time.perf_counter() - self._gc_started) * 1000
        if took >= _GC_REPORTED_MS:
            self._write({"gc": info.get("generation"), "at": self._clock(), "ms": round(took, 3)})
