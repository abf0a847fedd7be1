"""The pure parts of several processes and flow control: how many intake processes
``hato serve`` runs, :class:`hato.smtp.flow.FlowGate`'s holding back, the shared
connection counts and the AUTH throttle's replay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from hato.config import load_settings
from hato.smtp.auth import AuthEvent, AuthThrottle
from hato.smtp.flow import FlowGate
from hato.smtp.shared import SharedCounts
from hato.supervisor import MAX_AUTO_PROCESSES, available_cpus, effective_processes


@pytest.mark.parametrize(
    ("cpu_max", "expected_at_most"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("junk", None)],
)
def test_available_cpus_reads_the_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected_at_most: int | None
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    unlimited = available_cpus(tmp_path / "absent")
    got = available_cpus(path)
    assert got >= 1
    if expected_at_most is None:
        assert got == unlimited
    else:
        assert got == min(unlimited, expected_at_most)


@pytest.mark.parametrize(
    ("overrides", "cpus", "expected"),
    [
        ({}, 8, MAX_AUTO_PROCESSES),  # unset: the CPUs, at most 4
        ({}, 2, 2),
        ({}, 1, 1),
        ({"processes": 1}, 8, 1),
        ({"processes": 3}, 1, 3),
        ({"processes": 0}, 2, 2),
        ({"processes": 0}, 16, MAX_AUTO_PROCESSES),
        ({"processes": 4, "queue_url": "memory://"}, 8, 1),
        ({"processes": 0, "queue_url": "memory://"}, 8, 1),
    ],
)
def test_effective_processes(
    tmp_path: Path, overrides: dict[str, object], cpus: int, expected: int
) -> None:
    settings = load_settings(data_dir=tmp_path, **overrides)
    assert effective_processes(settings, cpus=lambda: cpus) == expected


def test_processes_and_flow_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HATO_PROCESSES", "2")
    monkeypatch.setenv("HATO_IN_FLOW_DELAY", "0.25")
    monkeypatch.setenv("HATO_QUEUE_HIGH_WATER", "500")
    settings = load_settings(data_dir=tmp_path)
    assert (settings.processes, settings.in_flow_delay, settings.queue_high_water) == (
        2,
        0.25,
        500,
    )
    defaults = load_settings(data_dir=tmp_path, processes=1)
    assert defaults.processes == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counts(
    values: list[int], clock: Clock, step: float
) -> tuple[list[int], Callable[[], Awaitable[int]]]:
    asked: list[int] = []
    it: Iterator[int] = iter(values)

    async def backlog() -> int:
        value = next(it, values[-1])
        asked.append(value)
        clock.now += step  # each look at the queue costs time on the fake clock
        return value

    return asked, backlog


async def test_the_gate_lets_mail_through_below_high_water() -> None:
    clock = Clock()
    asked, backlog = counts([5], clock, 0.0)
    gate = FlowGate(backlog, high_water=10, delay=1.0, interval=0.0, clock=clock)
    assert await gate.wait() == 0.0
    assert gate.delayed == 0 and asked == [5]


async def test_the_gate_holds_mail_until_delivery_catches_up() -> None:
    clock = Clock()
    asked, backlog = counts([12, 11, 10, 9], clock, 0.1)
    gate = FlowGate(backlog, high_water=10, delay=5.0, interval=0.0, clock=clock)
    waited = await gate.wait()
    assert asked == [12, 11, 10, 9]  # asked again until the backlog fell below 10
    assert gate.delayed == 1 and waited == pytest.approx(0.4)


async def test_the_gate_waits_at_most_the_delay() -> None:
    clock = Clock()
    asked, backlog = counts([50], clock, 0.3)
    gate = FlowGate(backlog, high_water=10, delay=1.0, interval=0.0, clock=clock)
    waited = await gate.wait()
    assert gate.delayed == 1
    assert 1.0 <= waited < 1.0 + 0.3 + 1e-9 and len(asked) == 4


async def test_the_gate_is_off_with_no_high_water_or_no_delay() -> None:
    clock = Clock()
    asked, backlog = counts([99], clock, 0.0)
    for gate in (
        FlowGate(backlog, high_water=0, delay=1.0, clock=clock),
        FlowGate(backlog, high_water=10, delay=0.0, clock=clock),
    ):
        assert not gate.enabled and await gate.wait() == 0.0
    assert asked == []


async def test_the_count_is_cached_for_the_interval() -> None:
    clock = Clock()
    asked, backlog = counts([1, 2, 3], clock, 0.0)
    gate = FlowGate(backlog, high_water=10, delay=1.0, interval=0.5, clock=clock)
    assert [await gate.count(), await gate.count()] == [1, 1]
    clock.now += 0.5
    assert await gate.count() == 2 and asked == [1, 2]


async def test_a_failing_count_lets_mail_through() -> None:
    async def broken() -> int:
        raise OSError("gone")

    gate = FlowGate(broken, high_water=1, delay=1.0)
    assert await gate.wait() >= 0.0 and gate.delayed == 0


@pytest.fixture
def make_counts() -> Iterator[Callable[..., SharedCounts]]:
    made: list[SharedCounts] = []

    def make(**kwargs: int) -> SharedCounts:
        made.append(SharedCounts(**kwargs))
        return made[-1]

    yield make
    for counts in made:
        counts.close()


def test_shared_counts_sum_the_columns_and_hold_the_limit(
    make_counts: Callable[..., SharedCounts],
) -> None:
    counts = make_counts(processes=3, slots=64)
    counts.attach(1)
    assert counts.acquire("smtp|192.0.2.1", limit=2)
    counts.column = 2  # another process, as the supervisor's fork would make it
    assert counts.acquire("smtp|192.0.2.1", limit=2)
    assert not counts.acquire("smtp|192.0.2.1", limit=2)
    assert counts.acquire("smtp|192.0.2.9", limit=2)  # another client
    assert counts.total("smtp|192.0.2.1") == 2
    counts.release("smtp|192.0.2.1")
    assert counts.total("smtp|192.0.2.1") == 1
    counts.release("smtp|192.0.2.1")  # nothing more of this column: no underflow
    assert counts.total("smtp|192.0.2.1") == 1


def test_a_restarted_process_forgets_what_its_predecessor_held(
    make_counts: Callable[..., SharedCounts],
) -> None:
    counts = make_counts(processes=2, slots=64)
    counts.attach(1)
    for _ in range(3):
        assert counts.acquire("k", limit=3)
    assert not counts.acquire("k", limit=3)
    counts.attach(1)  # the child in slot 1 was killed and started again
    assert counts.total("k") == 0 and counts.acquire("k", limit=3)


def test_shared_counts_fail_open_when_full(make_counts: Callable[..., SharedCounts]) -> None:
    counts = make_counts(processes=1, slots=4)
    for n in range(4):
        assert counts.acquire(f"client-{n}", limit=1)
    assert counts.acquire("one-too-many", limit=1)  # no slot: admitted
    assert counts.total("one-too-many") == 0
    counts.release("client-0")
    assert counts.acquire("now-there-is-room", limit=1)
    assert counts.total("now-there-is-room") == 1


def test_the_throttle_replays_what_another_process_saw() -> None:
    clock = Clock()
    here = AuthThrottle(limit=3, window=60, user_limit=2, user_window=60, clock=clock)
    there = AuthThrottle(limit=3, window=60, user_limit=2, user_window=60, clock=clock)
    told: list[AuthEvent] = []
    there.publish = told.append
    there.failed("192.0.2.7", "alice")
    there.failed("192.0.2.7", "alice")
    for event in told:
        here.replay(event)
    assert here.failures("192.0.2.7") == 2 and here.locked("alice", "192.0.2.8")
    assert here.failure_counts == {}  # metrics count this process's own attempts only
    there.succeeded("192.0.2.8", "alice")
    here.replay(told[-1])
    assert not here.locked("alice", "192.0.2.8")  # that address knows the password
    clock.now += 61
    assert here.failures("192.0.2.7") == 0


async def test_the_gate_says_when_it_starts_and_stops_holding() -> None:
    clock = Clock()
    # Each look at the queue takes longer than the delay: no message waits in this test.
    asked, backlog = counts([2, 3, 3, 0], clock, 0.001)
    changes: list[tuple[bool, int]] = []
    gate = FlowGate(
        backlog,
        high_water=3,
        delay=0.0001,
        interval=0.0,
        clock=clock,
        on_change=lambda holding, n: changes.append((holding, n)),
    )
    for _ in range(3):
        await gate.wait()
    assert changes == [(True, 3)] and asked == [2, 3, 3]
    await gate.wait()
    assert changes == [(True, 3), (False, 0)]
