"""Crash test: ``kill -9`` of hato serve under a parent that does not reap it (issue 8,
item 5). Its deliveries in flight hold leases of ten minutes; the next ``hato serve``
gives them back at start-up at once, because the dead process's lock files were released
by the kernel, zombie or not, and delivers them within seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.hato import HatoFactory, HatoServe
from peers.sinks import RecordingSink

pytestmark = pytest.mark.slow

LEASE = "600"


class BlackHole:
    """An upstream that accepts connections and never says a word: deliveries hang."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _send(host: str, port: int, n: int) -> None:
    with smtplib.SMTP(host, port, timeout=15) as client:
        for i in range(n):
            client.sendmail(
                "app@dbmx.net",
                ["sink@example.org"],
                f"Subject: zombie {i}\r\nMessage-ID: <zombie-{i}@test>\r\n\r\nbody {i}\r\n",
            )


def test_leases_of_a_killed_unreaped_hato_serve_come_back_at_the_next_start(
    hato_serve: HatoFactory,
    recording_sink: RecordingSink,
    black_hole: BlackHole,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "spool"
    # One process: what is tested is the leases of a process killed and left a zombie
    # (several processes: test_processes.py kills each of them).
    env = {
        "HATO_RELAY_TLS": "none",
        "HATO_LEASE_SECONDS": LEASE,
        "HATO_MAX_QUEUE_LIFETIME": "3600",
        "HATO_PROCESSES": "1",
    }
    first = hato_serve(
        env={**env, "RELAYHOST": f"[127.0.0.1]:{black_hole.port}"}, data_dir=data_dir
    )
    _send(first.host, first.port, 5)
    _wait(lambda: len(black_hole.accepted) >= 1, 30, "a delivery to hang upstream")

    pid = first.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # and no wait(): the parent has not reaped it
    _wait(lambda: _state(pid) == "Z", 10, "hato serve to become a zombie")
    os.kill(pid, 0)  # kill(pid, 0) still finds it: the old liveness test said "alive"

    second = HatoServe(data_dir, {**first.env, "RELAYHOST": recording_sink.relayhost})
    try:
        second.start()
        assert _state(pid) == "Z"  # still unreaped while the new one recovered
        second.wait_for_log(r"recovered \d+ message\(s\) whose delivery was interrupted", 5)
        # An unclean stop: the file was checked first, and the log says what was found.
        second.wait_for_log(r"^hato: queue: quick_check after an unclean stop: ok$", 5)
        second.wait_for_log(r"status=checked \(quick_check after an unclean stop: ok\)", 5)
        # Ten-minute leases, delivered in seconds: recovery gave them back at start-up.
        recording_sink.wait_for(lambda ms: len(ms) >= 5, timeout=30, what="all five messages")
    finally:
        second.stop()
        first.kill()  # reaps the zombie
