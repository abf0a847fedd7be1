"""``kill -9`` of a process in the middle of group-committed enqueues loses nothing that
was acknowledged: a ledger of the ids it printed is checked against the reopened queue."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hato.queue.base import MessageState
from hato.queue.sqlite import SQLiteQueue

SRC = Path(__file__).resolve().parents[2] / "src"

# Enqueues forever from 40 concurrent tasks (bounded by a count), printing "id n" the
# moment each enqueue returns, i.e. the moment SMTP would answer 250.
WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from hato.message import Envelope
    from hato.queue.sqlite import SQLiteQueue

    async def main(path, fsync):
        q = SQLiteQueue("sqlite://" + path, path, fsync=fsync)
        await q.open()
        counter = iter(range(200_000))

        async def client():
            for n in counter:
                body = b"message %d\\r\\n" % n * 40
                mid = await q.enqueue(Envelope("a@example.org", ["b@example.net"]), body)
                sys.stdout.write(f"{mid} {n}\\n")
                sys.stdout.flush()

        await asyncio.gather(*(client() for _ in range(40)))

    asyncio.run(main(sys.argv[1], sys.argv[2] == "1"))
    """
)


def run_and_kill(path: Path, *, fsync: bool, acknowledged: int) -> dict[str, int]:
    """Start the writer, let it acknowledge ``acknowledged`` messages, SIGKILL it."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "1" if fsync else "0"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    ledger: dict[str, int] = {}
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while len(ledger) < acknowledged:
            assert time.monotonic() < deadline, "the writer is too slow"
            line = proc.stdout.readline()
            assert line, f"the writer died early (rc={proc.poll()})"
            mid, n = line.split()
            ledger[mid] = int(n)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            # Lines printed after our last read were acknowledged too: keep them.
            for line in proc.stdout.read().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    ledger[parts[0]] = int(parts[1])
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return ledger


@pytest.mark.slow
@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
async def test_kill_9_loses_no_acknowledged_message(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "spool" / "queue.db"
    ledger = await asyncio.to_thread(run_and_kill, path, fsync=fsync, acknowledged=1500)
    q = SQLiteQueue(f"sqlite://{path}", str(path))
    await q.open()
    try:
        report = await q.recover()
        assert report.quarantined == []
        for mid, n in ledger.items():
            msg = await q.get(mid)
            assert msg.data == b"message %d\r\n" % n * 40
            assert msg.state is MessageState.QUEUED
        counts = await q.counts()
        # Some enqueues may have committed without their line reaching us: never fewer.
        assert counts[MessageState.QUEUED] >= len(ledger)
        assert sum(counts.values()) == counts[MessageState.QUEUED]
    finally:
        await q.close()
