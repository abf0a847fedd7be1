"""Peers for the outbox end-to-end tests, and tests of the peers themselves.

* :class:`HatoWorker` is ``hato worker`` as a real subprocess (the same process control as
  ``peers.hato.HatoServe``: readiness is its ``hato: ready`` line, its stderr is kept).
* :class:`PrivatePostgres` and :class:`PrivateRedis` are throw-away servers on free
  loopback ports, so a test may stop and restart them without touching the shared
  servers on 5432 and 6379.
* :class:`Chain` wires the guide's setup: ``Mailer`` → outbox → ``hato worker`` →
  ``hato serve`` (the local relay, ``RELAYHOST`` = a recording sink) → the sink.

The other ``test_outbox_*`` modules import these (pytest puts this directory on
``sys.path``).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest

from hato import Mailer, Status
from peers import free_port
from peers.datastores import PrivateRedis
from peers.hato import READY_RE, HatoServe, hato_env, run_hato
from peers.sinks import Received, RecordingSink

POSTGRES_URL = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FROM = "noreply@app.example"

# Fast retries and short leases so faults resolve in seconds.
WORKER_DEFAULTS: Mapping[str, str] = {
    "HATO_RETRY_MIN_DELAY": "0.5",
    "HATO_RETRY_MAX_DELAY": "1",
    "HATO_MAX_QUEUE_LIFETIME": "120",
    "HATO_LEASE_SECONDS": "3",
    "HATO_SMTP_TLS": "none",
    "HATO_RELAY_TIMEOUT": "10",
    "HATO_LOG_FORMAT": "text",
}


class HatoWorker(HatoServe):
    """``hato worker`` as a subprocess; ``kill``, ``stop``, ``log`` as for HatoServe."""

    def start(self, timeout: float = 30.0) -> HatoWorker:
        if self.running:
            raise AssertionError("hato worker is already running")
        self._runs += 1
        with self._cond:
            self._lines.append(f"--- hato worker start #{self._runs} ---")
            mark = len(self._lines)
        env = {k: v for k, v in self.env.items() if k != "HATO_LISTEN"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "hato", "worker", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=hato_env(self.data_dir, env),
            cwd=self.data_dir,
        )
        self._proc = proc
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()
        self.wait_for_log(READY_RE, timeout, since=mark)
        return self


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def message_id_of(received: Received) -> str:
    return str(parse(received.data)["Message-ID"])


# Private servers.


# The chain.


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Chain:
    """Mailer → queue → hato worker → hato serve → sink, with handles on every piece."""

    queue_url: str
    sink: RecordingSink
    relay: HatoServe
    data_dir: Path
    worker_env: dict[str, str]
    mailer: Mailer
    workers: list[HatoWorker] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # queue id -> Message-ID header

    def start_worker(self, **env: str) -> HatoWorker:
        worker = HatoWorker(
            self.data_dir / f"worker-{len(self.workers)}", {**self.worker_env, **env}
        )
        self.workers.append(worker)
        return worker.start()

    def send(self, subject: str, **kwargs: object) -> str:
        """``Mailer.send`` to user@example.net; remembers the stored Message-ID."""
        kwargs.setdefault("text", f"body of {subject}")
        to = kwargs.pop("to", "user@example.net")
        queue_id = self.mailer.send(to, subject, **kwargs)  # type: ignore[arg-type]
        self.ids[queue_id] = str(parse(self.stored(queue_id))["Message-ID"])
        return queue_id

    def stored(self, queue_id: str) -> bytes:
        async def get() -> bytes:
            q = await self.mailer._inner._open_queue()
            return (await q.get(queue_id)).data

        return self.mailer._call(get())

    def delivered(self, queue_id: str, timeout: float = 60) -> Received:
        """Wait for the sink to receive the message with this queue id's Message-ID."""
        header = self.ids[queue_id]
        found = self.sink.wait_for(
            lambda ms: any(message_id_of(m) == header for m in ms), timeout, what=header
        )
        return next(m for m in found if message_id_of(m) == header)

    def wait(self, queue_id: str, *states: str, timeout: float = 60) -> Status:
        return self.mailer.wait(queue_id, states=states or ("sent", "failed"), timeout=timeout)

    def logs(self) -> str:
        parts = [f"== relay ==\n{self.relay.log}"]
        parts += [f"== worker {i} ==\n{w.log}" for i, w in enumerate(self.workers)]
        return "\n".join(parts)


def build_chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    sink: RecordingSink,
    queue_url: str,
    *,
    relay_env: Mapping[str, str] | None = None,
) -> Iterator[Chain]:
    """A started relay and the pieces around it; workers are started by the test."""
    from conftest import attach_log

    relay = hato_serve(env={"RELAYHOST": sink.relayhost, **(relay_env or {})})
    run_hato(["queue", "init", "--queue", queue_url], data_dir=tmp_path)
    worker_env = {
        **WORKER_DEFAULTS,
        "HATO_QUEUE_URL": queue_url,
        "HATO_SMTP_HOST": relay.host,
        "HATO_SMTP_PORT": str(relay.port),
        "HATO_HOSTNAME": "worker.test",
    }
    mailer = Mailer(queue_url, default_from=FROM)
    chain = Chain(queue_url, sink, relay, tmp_path, worker_env, mailer)
    attach_log(request, "outbox chain", chain.logs)
    try:
        yield chain
    finally:
        for worker in chain.workers:
            if worker.running:
                worker.stop()
        mailer.close()


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    schema = f"hato_e2e_{secrets.token_hex(4)}"
    try:
        yield f"{POSTGRES_URL}?schema={schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def redis_prefix() -> Iterator[str]:
    import redis

    prefix = f"hato-e2e-{secrets.token_hex(4)}:"
    try:
        yield f"{REDIS_URL}?prefix={prefix}"
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def count_by_message_id(messages: list[Received]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in messages:
        key = message_id_of(m)
        counts[key] = counts.get(key, 0) + 1
    return counts


# Tests of the peers.


def test_hato_worker_starts_prints_its_banner_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    worker = HatoWorker(
        tmp_path / "w",
        {**WORKER_DEFAULTS, "HATO_QUEUE_URL": url, "HATO_SMTP_PORT": str(free_port()),
         "HATO_WORKER_CONCURRENCY": "5"},
    ).start()  # fmt: skip
    log = worker.log
    assert f"queue: {url}" in log
    assert re.search(r"delivering to 127\.0\.0\.1:\d+ \(tls none", log)
    assert "concurrency 5, lease 3s, bounces off" in log
    assert worker.stop() == 0
    assert "hato: stopped" in worker.log


def test_hato_worker_hides_the_queue_password(tmp_path: Path) -> None:
    with postgres_schema() as url:
        secret_url = url.replace("postgres@", "postgres:s3cret-pw@", 1)
        worker = HatoWorker(tmp_path / "w", {**WORKER_DEFAULTS, "HATO_QUEUE_URL": secret_url})
        worker.start()
        try:
            assert "postgres:***@" in worker.log
        finally:
            assert worker.stop() == 0
        assert "s3cret-pw" not in worker.log


def test_private_redis_restarts_on_its_data(tmp_path: Path) -> None:
    import redis

    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        server.stop(signal.SIGKILL)
        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"
    finally:
        server.stop()


# Scenarios shared by the PostgreSQL and Redis modules.


def subjects_received(sink: RecordingSink) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in sink.messages:
        subject = str(parse(m.data)["Subject"])
        counts[subject] = counts.get(subject, 0) + 1
    return counts


def send_with_retry(mailer: Mailer, subject: str, key: str, timeout: float = 60) -> str:
    """What an app does while its queue database restarts: retry with the same key."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return mailer.send("user@example.net", subject, text=subject, idempotency_key=key)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def scenario_end_to_end(chain: Chain) -> None:
    """Mailer.send → queue → hato worker → hato serve → sink; status ends as sent."""
    chain.start_worker()
    queue_id = chain.send("Welcome aboard", html="<p>Welcome</p>")
    received = chain.delivered(queue_id)
    status = chain.wait(queue_id)
    assert status.state == "sent", status
    # The relay's reply to the worker's DATA: hato serve's own queue id.
    assert re.fullmatch(r"250 2\.0\.0 Ok: queued as [0-9A-F]+", status.reply), status.reply
    assert status.recipients[0].state.value == "sent"
    assert received.mail_from == FROM and received.rcpt_tos == ("user@example.net",)
    msg = parse(received.data)
    assert msg["Subject"] == "Welcome aboard"
    assert msg["Received"] is not None  # it went through the relay
    assert msg.get_content_type() == "multipart/alternative"


def scenario_kill_mid_batch(chain: Chain, count: int = 300) -> dict[str, int]:
    """SIGKILL a worker mid-batch; another delivers the rest. Returns the duplicate counts."""
    from hato import Email

    subjects = [f"batch {i:04d}" for i in range(count)]
    ids = chain.mailer.send_many([Email("user@example.net", s, text=s) for s in subjects])
    first = chain.start_worker()
    wait_for(lambda: len(chain.sink.messages) >= 10, 60, "the first deliveries")
    first.kill(signal.SIGKILL)
    at_kill = len(subjects_received(chain.sink))
    assert at_kill < count, "the worker finished before it was killed: raise count"
    chain.start_worker()
    wait_for(lambda: len(subjects_received(chain.sink)) == count, 180, "every message")
    received = subjects_received(chain.sink)
    assert set(received) == set(subjects)  # none lost
    duplicates = {s: n - 1 for s, n in received.items() if n > 1}
    statuses = [chain.mailer.wait(i, timeout=60) for i in ids]
    assert {s.state for s in statuses} == {"sent"}
    print(
        f"\nkill -9 mid-batch: {count} messages, {at_kill} delivered before the kill, "
        f"{sum(duplicates.values())} duplicate deliveries ({len(duplicates)} messages)"
    )
    return duplicates


def scenario_queue_restart(chain: Chain, restart: Callable[[], None]) -> dict[str, int]:
    """The queue's server restarts under a running worker: it reconnects and carries on."""
    worker = chain.start_worker()
    before = [send_with_retry(chain.mailer, f"before {i}", f"before-{i}") for i in range(30)]
    restart()
    after = [send_with_retry(chain.mailer, f"after {i}", f"after-{i}") for i in range(10)]
    wanted = {f"before {i}" for i in range(30)} | {f"after {i}" for i in range(10)}
    wait_for(lambda: set(subjects_received(chain.sink)) >= wanted, 120, "every message")
    assert worker.running, "the worker must survive the restart"
    for queue_id in before + after:
        assert chain.mailer.wait(queue_id, timeout=60).state == "sent"
    received = subjects_received(chain.sink)
    duplicates = {s: n - 1 for s, n in received.items() if n > 1}
    print(f"\nqueue restart: {len(wanted)} messages, {sum(duplicates.values())} duplicates")
    return duplicates
