"""Flow control for intake: slow the reply to DATA while delivery falls behind.

Postfix's ``in_flow_delay`` in Hato's terms. While the unsent messages of the queue
(queued, sending, deferred) reach the high-water mark, :meth:`FlowGate.wait` holds the
session back, up to ``delay`` seconds per message, rechecking as delivery drains. A
client then sends more slowly instead of the spool growing without bound; when the
delay runs out the message is accepted anyway (as in Postfix: a slow-down, not a
refusal). The count comes from the queue and is cached for ``interval`` seconds, so
a busy listener asks the queue a few times a second at most, whatever its rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["FlowGate"]


class FlowGate:
    """Hold intake back while ``backlog()`` is at or above ``high_water``.

    ``backlog`` returns the number of unsent messages; ``delay`` (seconds) is the most
    one message waits; ``high_water`` 0 or ``delay`` 0 turns the gate off;
    ``on_change(holding, backlog)`` is called when the gate starts or stops holding."""

    def __init__(
        self,
        backlog: Callable[[], Awaitable[int]],
        *,
        high_water: int,
        delay: float,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool, int], None] | None = None,
    ) -> None:
        self._backlog = backlog
        self.high_water = high_water
        self.delay = delay
        self.interval = interval
        self._clock = clock
        self._count = 0
        self._sampled_at: float | None = None
        self._sampling: asyncio.Future[int] | None = None
        self.delayed = 0  # messages held back so far (for metrics and tests)
        # Told (holding back?, backlog) when the gate starts or stops holding mail back:
        # one log line each way, not one per message.
        self.on_change = on_change
        self.holding = False

    @property
    def enabled(self) -> bool:
        return self.high_water > 0 and self.delay > 0

    async def count(self) -> int:
        """The backlog, at most ``interval`` seconds old; one query for every waiter."""
        now = self._clock()
        if self._sampled_at is not None and now - self._sampled_at < self.interval:
            return self._count
        if self._sampling is None:
            self._sampling = asyncio.ensure_future(self._backlog())
        sampling = self._sampling
        try:
            self._count = await asyncio.shield(sampling)
            self._sampled_at = self._clock()
        finally:
            if self._sampling is sampling and sampling.done():
                self._sampling = None
        return self._count

    def _note(self, count: int) -> None:
        holding = count >= self.high_water
        if holding != self.holding:
            self.holding = holding
            if self.on_change is not None:
                self.on_change(holding, count)

    async def wait(self) -> float:
        """Wait while the backlog is high, at most ``delay`` seconds; return the seconds
        waited. A failing count lets the message through (the queue reports its own
        errors where it matters: at enqueue)."""
        if not self.enabled:
            return 0.0
        start = self._clock()
        deadline = start + self.delay
        held = False
        while True:
            try:
                count = await self.count()
            except Exception:
                return self._clock() - start
            self._note(count)
            now = self._clock()
            if count < self.high_water or now >= deadline:
                # This message is about to be queued: count it until the next sample,
                # so that a burst inside one interval is seen rising.
                self._count += 1
                return now - start
            if not held:
                held = True
                self.delayed += 1
            await asyncio.sleep(min(self.interval, deadline - now))
