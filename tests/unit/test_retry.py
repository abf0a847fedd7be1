"""The retry schedule: doubling, ceiling, jitter bounds, give-up, and bad settings."""

from __future__ import annotations

import random

import pytest

from hato.queue.retry import DAY, RetrySchedule


@pytest.mark.parametrize(
    ("attempts", "base"),
    [
        (0, 60),
        (1, 60),
        (2, 120),
        (3, 240),
        (4, 480),
        (5, 960),
        (6, 1920),
        (7, 3840),
        (8, 4000),
        (9, 4000),
        (500, 4000),
        (10**9, 4000),
    ],
)
def test_base_delay_doubles_up_to_the_ceiling(attempts: int, base: float) -> None:
    assert RetrySchedule().base_delay(attempts) == base


def test_postfix_like_settings() -> None:
    postfix = RetrySchedule(min_delay=300, max_delay=4000, jitter=0)
    assert [postfix.base_delay(n) for n in range(1, 6)] == [300, 600, 1200, 2400, 4000]
    assert postfix.next_delay(3, random.Random(1)) == 1200


@pytest.mark.parametrize("attempts", [1, 2, 5, 8, 40])
def test_jitter_stays_within_bounds_and_spreads(attempts: int) -> None:
    schedule = RetrySchedule()
    rng = random.Random(42)
    base = schedule.base_delay(attempts)
    delays = [schedule.next_delay(attempts, rng) for _ in range(2000)]
    assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
    assert len({round(d, 3) for d in delays}) > 1000
    # Both halves of the spread are used, so a burst of deferrals fans out both ways.
    assert min(delays) < base * 0.85
    assert max(delays) > base * 1.15


def test_next_delay_is_deterministic_for_a_seeded_rng() -> None:
    schedule = RetrySchedule()
    first = [schedule.next_delay(n, random.Random(7)) for n in range(1, 10)]
    second = [schedule.next_delay(n, random.Random(7)) for n in range(1, 10)]
    assert first == second


def test_never_below_one_second() -> None:
    schedule = RetrySchedule(min_delay=0.5, max_delay=0.5, jitter=0.5)
    assert all(schedule.next_delay(1, random.Random(i)) >= 1.0 for i in range(100))


@pytest.mark.parametrize(
    ("age", "expired"),
    [(0, False), (4 * DAY, False), (5 * DAY - 1, False), (5 * DAY, True), (30 * DAY, True)],
)
def test_expired_after_max_lifetime(age: float, expired: bool) -> None:
    created = 1_700_000_000.0
    assert RetrySchedule().expired(created, created + age) is expired


def test_zero_lifetime_gives_up_at_once() -> None:
    assert RetrySchedule(max_lifetime=0).expired(10.0, 10.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_delay": 0},
        {"min_delay": -1},
        {"min_delay": 100, "max_delay": 50},
        {"max_lifetime": -1},
        {"jitter": -0.1},
        {"jitter": 1.0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetrySchedule(**kwargs)
