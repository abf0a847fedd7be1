"""Leases of SQLite lease owners that are gone come back at the next start, at once.

An owner is alive while it holds the lock file of its name, which the kernel releases
when the process ends, whatever its parent does. Each case runs a real child process
that claims a message and is then killed with SIGKILL and left unreaped (a zombie), or
kept running; and one case names, in the owner, the pid of another live process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hato.message import Envelope
from hato.queue.base import MessageState
from hato.queue.sqlite import SQLiteQueue

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = Envelope("a@example.org", ["b@example.net"])
DATA = b"Subject: t\r\n\r\nbody\r\n"

# Claims one message as the owner named by argv[2] ("{pid}" becomes its own pid), prints
# its id, and waits to be killed.
CLAIMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from hato.queue.sqlite import SQLiteQueue

    async def main(path, owner):
        q = SQLiteQueue("sqlite://" + path, path, fsync=False)
        await q.open()
        [m] = await q.claim(owner=owner.format(pid=os.getpid()), limit=1, lease_seconds=600)
        print(m.id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


class Claimer:
    """A child process holding the lease of one message."""

    def __init__(self, path: Path, owner: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(path), owner],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(SRC)},
            text=True,
        )
        self.message_id = ""

    async def claimed(self) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        assert line, f"the claimer died (rc={self.proc.poll()})"
        self.message_id = line.strip()
        return self.message_id

    def kill_and_leave_unreaped(self) -> None:
        """SIGKILL, and no wait(): the child stays a zombie until we reap it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        # The leader shows Z as soon as it exits, while the queue's writer thread may
        # still be exiting and holding the open files (and so the lock): wait for every
        # thread to be gone, leaving only the zombie leader.
        while _state(self.proc.pid) != "Z" or len(os.listdir(f"/proc/{self.proc.pid}/task")) > 1:
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        os.kill(self.proc.pid, 0)  # a zombie still "exists" for kill(pid, 0)

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, Z, ...)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "queue.db"


@pytest.fixture
def claimers(path: Path) -> Iterator[list[Claimer]]:
    started: list[Claimer] = []
    yield started
    for claimer in started:
        claimer.reap()


@pytest.fixture
async def seeded(path: Path) -> AsyncIterator[list[str]]:
    """Three queued messages; the queue that wrote them is closed again."""
    q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await q.open()
    ids = [await q.enqueue(ENV, DATA) for _ in range(3)]
    await q.close()
    yield ids


async def start_claimer(path: Path, owner: str, claimers: list[Claimer]) -> Claimer:
    claimer = Claimer(path, owner)
    claimers.append(claimer)
    await claimer.claimed()
    return claimer


async def reopen(path: Path) -> SQLiteQueue:
    q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
    await q.open()
    return q


async def test_recover_returns_leases_of_processes_that_are_gone(
    path: Path, seeded: list[str], claimers: list[Claimer]
) -> None:
    """A worker killed with SIGKILL holds leases for minutes; at the next start its
    messages come back at once, while a live process keeps its lease."""
    gone = await start_claimer(path, "relay.example/{pid}/abcd", claimers)
    live = await start_claimer(path, "relay.example/{pid}/ef01", claimers)
    gone.kill_and_leave_unreaped()

    again = await reopen(path)
    try:
        report = await again.recover()
        assert report.leases_expired == 1
        assert (await again.get(gone.message_id)).state is MessageState.QUEUED
        assert (await again.get(live.message_id)).state is MessageState.SENDING
        claimed = await again.claim(owner="w/1/x", limit=10, lease_seconds=60)
        assert sorted(m.id for m in claimed) == sorted(set(seeded) - {live.message_id})
    finally:
        await again.close()


async def test_a_zombie_owner_is_gone_although_its_pid_still_exists(
    path: Path, seeded: list[str], claimers: list[Claimer]
) -> None:
    """kill -9 under a parent that reaps late: kill(pid, 0) still succeeds (the zombie
    case of issue 8), yet the lease comes back at the next start."""
    zombie = await start_claimer(path, "relay.example/{pid}/0bad", claimers)
    zombie.kill_and_leave_unreaped()
    assert _state(zombie.proc.pid) == "Z"

    again = await reopen(path)
    try:
        assert (await again.recover()).leases_expired == 1
        msg = await again.get(zombie.message_id)
        assert (msg.state, msg.lease_owner) == (MessageState.QUEUED, "")
    finally:
        await again.close()


async def test_an_owner_whose_pid_now_belongs_to_another_process_is_gone(
    path: Path, seeded: list[str], claimers: list[Claimer]
) -> None:
    """The lease names a pid that runs (this test's own, standing in for a reused pid),
    but the process that took the lease is dead: its lease comes back."""
    reused = await start_claimer(path, f"relay.example/{os.getpid()}/feed", claimers)
    reused.reap()

    again = await reopen(path)
    try:
        assert (await again.recover()).leases_expired == 1
        assert (await again.get(reused.message_id)).state is MessageState.QUEUED
    finally:
        await again.close()


async def test_an_owner_in_this_process_is_alive_until_its_queue_closes(
    path: Path, seeded: list[str]
) -> None:
    """Two queues on one spool in one process: the one claiming keeps its lease across
    the other's recovery; once it closes, its leases are over."""
    worker = await reopen(path)
    [leased] = await worker.claim(
        owner=f"relay.example/{os.getpid()}/1", limit=1, lease_seconds=600
    )
    other = await reopen(path)
    try:
        assert (await other.recover()).leases_expired == 0
        assert (await other.get(leased.id)).state is MessageState.SENDING
        await worker.close()
        assert (await other.recover()).leases_expired == 1
        assert (await other.get(leased.id)).state is MessageState.QUEUED
    finally:
        await worker.close()
        await other.close()


async def test_recovery_removes_the_lock_files_of_gone_owners(
    path: Path, seeded: list[str], claimers: list[Claimer]
) -> None:
    for _ in range(2):
        claimer = await start_claimer(path, "relay.example/{pid}/cafe", claimers)
        claimer.kill_and_leave_unreaped()
    owners = Path(f"{path}.owners")
    assert len(list(owners.iterdir())) == 2
    again = await reopen(path)
    try:
        assert (await again.recover()).leases_expired == 2
        assert list(owners.iterdir()) == []
        await again.claim(owner="w/1/x", limit=1, lease_seconds=60)
        assert [p.name for p in owners.iterdir()] == ["w%2F1%2Fx.lock"]
    finally:
        await again.close()
    assert list(owners.iterdir()) == []
