"""``hato serve`` and ``hato worker`` in-process, around their one start/stop skeleton: the
lines they say, a stop on SIGTERM or SIGINT, and the signal handlers given back after."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from hato.app import serve, work
from hato.config import Listener, load_settings
from hato.smtp.tls import self_signed_certificate
from hato.worker import Worker

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def clean_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no hato.toml or .env from a developer's checkout


def handlers() -> dict[signal.Signals, object]:
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


def send_soon(sig: signal.Signals) -> Callable[..., None]:
    """A ``ready`` callback: the role is running with its handlers, so signal ourselves."""

    def ready(*_args: object) -> None:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), sig)

    return ready


async def test_serve_stops_on_sigterm_and_gives_the_handlers_back(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(
        ["localhost"], days=1, now=datetime.datetime.now(datetime.UTC)
    )
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    settings = load_settings(
        data_dir=tmp_path,
        listen=["127.0.0.1:0"],
        fsync=False,
        tls_cert_file=tmp_path / "cert.pem",
        tls_key_file=tmp_path / "key.pem",
        domains=["dbmx.net"],
    )
    before = handlers()
    lines: list[str] = []
    bound: list[tuple[Listener, int]] = []
    ready = send_soon(signal.SIGTERM)

    def started(listeners: list[tuple[Listener, int]]) -> None:
        bound.extend(listeners)
        ready()

    await asyncio.wait_for(serve(settings, ready=started, say=lines.append), 30)
    [(_listener, port)] = bound
    assert lines == [
        f"listener smtp on 127.0.0.1:{port}",
        "route: hold — mail is kept in the queue and nothing leaves this machine "
        "(hato queue list; set RELAYHOST to relay)",
        f"queue: sqlite:///{tmp_path / 'queue.db'}",
        "ready",
        "stopping",
    ]
    assert handlers() == before  # SIGHUP (certificate reload) included


async def test_worker_stops_on_sigint_and_gives_the_handlers_back(tmp_path: Path) -> None:
    settings = load_settings(
        queue_url=f"sqlite:///{tmp_path / 'outbox.db'}",
        fsync=False,
        smtp_host="127.0.0.1",
        smtp_port=2525,
        hostname="worker.test",
    )
    before = handlers()
    lines: list[str] = []
    started: list[Worker] = []
    ready = send_soon(signal.SIGINT)

    def running(worker: Worker) -> None:
        started.append(worker)
        ready()

    await asyncio.wait_for(work(settings, ready=running, say=lines.append), 30)
    assert lines == [
        f"worker {started[0].owner}",
        f"queue: sqlite:///{tmp_path / 'outbox.db'}",
        "delivering to 127.0.0.1:2525 (tls may, verify)",
        "concurrency 32, lease 300s, bounces off",
        "ready",
        "stopping: no more claims; finishing deliveries in flight",
        "stopped",
    ]
    assert handlers() == before
