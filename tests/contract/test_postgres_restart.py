"""PostgreSQL queue: a real server restart under a working loop (not a stand-in).

Starts a private throw-away cluster (``initdb`` + ``pg_ctl``, loopback, a free port) so
stopping it disturbs nobody else. Needs the PostgreSQL server binaries; as root the
cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hato.errors import QueueError
from hato.message import Envelope
from hato.queue.base import Outcome, RecipientState
from hato.queue.postgres import PostgresQueue

pytestmark = pytest.mark.slow


def _bindir() -> Path | None:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    def __init__(self, bindir: Path, root: Path, as_user: list[str]) -> None:
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data = root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def init(self) -> None:
        initdb = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]
        subprocess.run(
            [*self.as_user, *initdb, "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "-l", str(self.root / "log"), "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateServer]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="hato-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    srv = PrivateServer(bindir, root, as_user)
    try:
        srv.init()
        srv.start()
        yield srv
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            srv.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_working_loop_carries_on_through_a_server_restart(server: PrivateServer) -> None:
    url = f"{server.url}?pool_timeout=1"
    queue, other = PostgresQueue(url), PostgresQueue(url)
    await queue.open()
    await other.open()
    enqueued: set[str] = set()
    delivered: set[str] = set()
    errors: list[str] = []
    stop = asyncio.Event()

    async def worker() -> None:
        """The shape of hato worker's loop: claim, record, wait; QueueError means later.

        A batch whose record failed stays leased: the short lease brings it back (at
        least once), as it would after a crash.
        """
        while not stop.is_set():
            try:
                batch = await queue.claim(owner="w", limit=5, lease_seconds=2)
                for m in batch:
                    done = [Outcome(a, RecipientState.SENT, "250 ok") for a in m.pending]
                    if await queue.record(m.id, done, owner="w", retry_at=None):
                        delivered.add(m.id)
                if not batch:
                    await queue.wait_for_work(0.5)
            except QueueError as exc:
                errors.append(str(exc))
                await queue.wait_for_work(0.1)

    async def enqueue_until_accepted(data: bytes) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                enqueued.add(
                    await other.enqueue(Envelope("a@example.org", ["b@example.net"]), data)
                )
                return
            except QueueError:
                assert time.monotonic() < deadline, "enqueue never recovered"
                await asyncio.sleep(0.05)

    task = asyncio.create_task(worker())
    try:
        for i in range(20):
            await enqueue_until_accepted(b"before %d" % i)
        await asyncio.to_thread(server.stop)
        with pytest.raises(QueueError):
            await other.enqueue(Envelope("a@example.org", ["b@example.net"]), b"while down")
        await asyncio.to_thread(server.start)
        for i in range(20):
            await enqueue_until_accepted(b"after %d" % i)
        deadline = time.monotonic() + 30
        while delivered != enqueued:
            if time.monotonic() > deadline:
                left = [await other.get(i) for i in enqueued - delivered]
                raise AssertionError(f"undelivered: {left} {errors}")
            await asyncio.sleep(0.05)
        # The listener is back: a NOTIFY wakes an idle waiter long before its timeout.
        await queue.wait_for_work(0)
        waiter = asyncio.create_task(queue.wait_for_work(60))
        await asyncio.sleep(0.05)
        await enqueue_until_accepted(b"wake")
        await asyncio.wait_for(waiter, 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await queue.close()
        await other.close()
    assert len(enqueued) == 41
