"""``hato queue check [--repair]`` and start-up on a damaged spool, as an operator meets
them: one line that says what to do, a report, a repair that keeps the old file."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, hato

from hato.message import Envelope
from hato.queue.sqlite import SQLiteQueue

ENV = Envelope("a@example.org", ["b@example.net"])
BAD_UTF8 = "CAST(X'5B5B22FF' AS TEXT)"


def fill(path: Path, n: int) -> list[str]:
    async def go() -> list[str]:
        q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
        await q.open()
        await q.recover()
        try:
            return [await q.enqueue(ENV, b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(n)]
        finally:
            await q.close()

    return asyncio.run(go())


def spoil_rcpt_state(path: Path, message_id: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE messages SET rcpt_state = {BAD_UTF8} WHERE id = ?", (message_id,))


def spoil_table_root(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        (page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'messages'"
        ).fetchone()
    with open(path, "r+b") as f:
        f.seek((page - 1) * 8192)
        f.write(random.Random(8).randbytes(8192))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_check_says_healthy_and_exits_0(data_dir: Path) -> None:
    fill(data_dir / "queue.db", 3)
    result = hato("queue", "check", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"queue:       {data_dir / 'queue.db'}"
    assert "integrity:   ok" in lines
    assert "messages:    3 (queued 3)" in lines
    assert "unreadable:  0" in lines
    assert lines[-1] == "healthy"
    again = hato("queue", "check", "--repair", "--data-dir", str(data_dir))
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "healthy: nothing to repair"


def test_a_bad_row_is_listed_reported_and_repaired(data_dir: Path) -> None:
    path = data_dir / "queue.db"
    ids = fill(path, 3)
    spoil_rcpt_state(path, ids[1])

    listed = hato("queue", "list", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    assert f"{ids[1]}  quarantined" in listed.stdout
    assert "(quarantined: recipient state is not valid UTF-8)" in listed.stdout

    checked = hato("queue", "check", "--data-dir", str(data_dir))
    assert checked.returncode == 1
    assert "unreadable:  1" in checked.stdout
    assert f"  {ids[1]}: recipient state is not valid UTF-8" in checked.stdout
    assert checked.stdout.splitlines()[-1] == "damaged: run hato queue check --repair"

    repaired = hato("queue", "check", "--repair", "--data-dir", str(data_dir))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired:    copied 3 row(s) (1 quarantined now), 0 lost" in repaired.stdout
    [kept] = [line for line in repaired.stdout.splitlines() if line.startswith("kept:")]
    aside = Path(kept.split()[1])
    assert aside.name.startswith("queue.db.damaged-") and aside.exists()
    assert repaired.stdout.splitlines()[-1] == "healthy"

    after = hato("queue", "check", "--data-dir", str(data_dir))
    assert after.returncode == 0
    assert "messages:    3 (queued 2, quarantined 1)" in after.stdout
    shown = hato("queue", "show", ids[0], "--data-dir", str(data_dir))
    assert shown.returncode == 0 and "Subject: 0" in shown.stdout


def test_a_damaged_file_stops_serve_in_one_line_until_repaired(data_dir: Path) -> None:
    path = data_dir / "queue.db"
    fill(path, 300)
    spoil_table_root(path)

    listed = hato("queue", "list", "--data-dir", str(data_dir))
    assert listed.returncode in (0, 1)  # row by row, or refused with the repair line
    assert "Traceback" not in listed.stderr
    checked = hato("queue", "check", "--data-dir", str(data_dir))
    assert checked.returncode == 1
    assert "integrity:   " in checked.stdout and "integrity:   ok" not in checked.stdout

    # An unclean stop (the spool was never closed by a server): quick_check runs.
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hato_meta SET value = '0' WHERE key = 'clean'")
    served = hato(
        "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", env={"HATO_HOSTNAME": "t"}
    )
    assert_one_line_error(served, f"hato: the queue database {path} is damaged: ")
    assert served.stderr.strip().endswith("; run hato queue check --repair")

    repaired = hato("queue", "check", "--repair", "--data-dir", str(data_dir))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "lost" in repaired.stdout
    assert hato("queue", "check", "--data-dir", str(data_dir)).returncode == 0


def test_an_emptied_spool_is_refused_in_one_line(data_dir: Path) -> None:
    path = data_dir / "queue.db"
    fill(path, 1)
    path.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    result = hato("queue", "list", "--data-dir", str(data_dir))
    assert_one_line_error(result, f"is empty (0 bytes), but a queue existed there ({path}.hato)")
    assert f"delete {path}.hato to start with an empty queue" in result.stderr
    checked = hato("queue", "check", "--data-dir", str(data_dir))
    assert checked.returncode == 1 and "the file is empty (0 bytes)" in checked.stdout


def test_repair_refuses_while_the_queue_is_open(data_dir: Path) -> None:
    path = data_dir / "queue.db"
    ids = fill(path, 2)
    spoil_rcpt_state(path, ids[0])

    async def while_open() -> object:
        q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)
        await q.open()
        try:
            return await asyncio.to_thread(
                hato, "queue", "check", "--repair", "--data-dir", str(data_dir)
            )
        finally:
            await q.close()

    result = asyncio.run(while_open())
    assert isinstance(result, subprocess.CompletedProcess)
    assert "is in use (hato serve, hato worker or another hato queue command)" in result.stderr
    assert result.returncode == 1
    assert not [p for p in os.listdir(data_dir) if ".damaged-" in p]


def test_check_is_for_sqlite_queues(tmp_path: Path) -> None:
    result = hato("queue", "check", "--queue", "memory://", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert_one_line_error(result, "hato queue check reads SQLite queue files")
