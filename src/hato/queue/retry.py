"""The retry schedule: when a deferred message is tried again, and when we give up (pure).

Delays double from ``min_delay`` up to ``max_delay``, each spread by ± ``jitter`` so
that messages deferred together (an upstream outage) do not all come back in the same
second. A message older than ``max_lifetime`` is given up on (bounced).

=====================  ===================================  ==========================
                       Postfix default                      Hato default
=====================  ===================================  ==========================
first retry after      ``minimal_backoff_time`` = 300 s     ``min_delay`` = 60 s
longest gap            ``maximal_backoff_time`` = 4000 s    ``max_delay`` = 4000 s
give up after          ``maximal_queue_lifetime`` = 5 d     ``max_lifetime`` = 5 d
spread                 none (queue manager scan order)      ``jitter`` = ± 20 %
=====================  ===================================  ==========================

Why 60 s and not 300 s: Hato mostly carries a web application's mail (password resets,
sign-in links, receipts) to one smarthost. The usual failure there is a blip (the relay
restarting, a 421 under load), and a user waiting for a reset link should not wait five
minutes after it. With doubling the gaps are 60, 120, 240, 480, 960, 1920, 3840 and
then 4000 s, so a long outage costs the upstream six attempts in the first two hours
where Postfix makes four; after that both retry every 4000 s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """When to retry; ``next_delay`` and ``expired`` are pure functions of their inputs."""

    min_delay: float = 60.0
    max_delay: float = 4000.0
    max_lifetime: float = 5 * DAY
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.min_delay <= 0:
            raise ValueError("min_delay must be positive")
        if self.max_delay < self.min_delay:
            raise ValueError("max_delay must be at least min_delay")
        if self.max_lifetime < 0:
            raise ValueError("max_lifetime must not be negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def base_delay(self, attempts: int) -> float:
        """The delay without jitter after ``attempts`` failed attempts (1 = the first)."""
        if attempts <= 1:
            return self.min_delay
        # Capping the exponent keeps 2**n finite for absurd attempt counts.
        exponent = min(attempts - 1, 64)
        return min(self.min_delay * 2.0**exponent, self.max_delay)

    def next_delay(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after ``attempts`` failed attempts, spread by ± ``jitter``.

        The result stays within ``[min_delay * (1 - jitter), max_delay * (1 + jitter)]``
        and is never below one second.
        """
        base = self.base_delay(attempts)
        spread = base * self.jitter
        return max(1.0, base + rng.uniform(-spread, spread))

    def expired(self, created_at: float, now: float) -> bool:
        """True when a message created at ``created_at`` is too old to try again."""
        return now - created_at >= self.max_lifetime
