"""``hato worker`` and ``hato queue init``: the worker's composition in-process against aiosmtpd
sinks on loopback (sent, 5xx, relay down, graceful stop), and the commands as subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from hato import AsyncMailer, Status
from hato.app import build_outbox_worker, work
from hato.config import Settings, load_settings
from hato.maillog import MailLog
from hato.queue import open_queue, redact_url
from hato.queue.base import MessageState
from hato.worker import Worker
from peers.asyncsinks import HOST, Handler, Sink, wait_until
from peers.hato import run_hato

POSTGRES_URL = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FROM = "noreply@app.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def clean_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no hato.toml or .env from a developer's checkout


def settings_for(tmp_path: Path, port: int, **extra: object) -> Settings:
    values: dict[str, object] = {
        "queue_url": f"sqlite:///{tmp_path / 'outbox.db'}",
        "fsync": False,
        "smtp_host": HOST,
        "smtp_port": port,
        "smtp_tls": "none",
        "hostname": "worker.test",
        "retry_min_delay": 0.2,
        "retry_max_delay": 0.5,
        "lease_seconds": 30,
        "relay_timeout": 5,
    }
    values.update(extra)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, *, bounces: bool = False) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    started: list[Worker] = []
    lines: list[str] = []
    task = asyncio.create_task(
        work(settings, bounces=bounces, stop=stop, ready=started.append, say=lines.append)
    )
    await wait_until(lambda: bool(started) or task.done(), 10)
    if task.done():
        task.result()
    assert lines[-1] == "ready"
    try:
        yield started[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        assert lines[-1] == "stopped"


async def wait_status(
    mailer: AsyncMailer, message_id: str, *states: str, timeout: float = 15
) -> Status:
    async with asyncio.timeout(timeout):
        while True:
            status = await mailer.status(message_id)
            if status.state in states:
                return status
            await asyncio.sleep(0.02)


async def test_delivers_and_records_the_relays_reply(tmp_path: Path) -> None:
    async with Sink() as sink:
        settings = settings_for(tmp_path, sink.port)
        async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
            message_id = await mailer.send(
                "user@example.net", "Welcome", text="hi", bcc="audit@example.org"
            )
            async with running_worker(settings):
                status = await wait_status(mailer, message_id, "sent", "failed")
    assert status.state == "sent"
    assert status.reply == "250 2.0.0 Ok: queued as 1"
    [received] = sink.handler.messages
    assert received.mail_from == FROM
    assert received.rcpt_tos == ["user@example.net", "audit@example.org"]
    assert b"audit@" not in received.data
    assert b"Subject: Welcome\r\n" in received.data


async def test_5xx_fails_with_the_reason_and_no_bounce(tmp_path: Path) -> None:
    handler = Handler(
        rcpt_replies={"nobody@example.net": "550 5.1.1 <nobody@example.net>: no such user"}
    )
    async with Sink(handler) as sink:
        settings = settings_for(tmp_path, sink.port)
        async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
            message_id = await mailer.send("nobody@example.net", "Hello", text="x")
            async with running_worker(settings):
                status = await wait_status(mailer, message_id, "sent", "failed")
            assert status.state == "failed"
            assert status.reason.startswith("550 5.1.1")
            assert "no such user" in status.reason
            q = open_queue(settings.effective_queue_url, fsync=False)
            await q.open()
            try:
                counts = await q.counts()
            finally:
                await q.close()
    assert sum(counts.values()) == 1  # no DSN was queued for noreply@
    assert not sink.handler.messages


async def test_bounces_can_be_turned_on(tmp_path: Path) -> None:
    handler = Handler(rcpt_replies={"nobody@example.net": "550 5.1.1 no such user"})
    async with Sink(handler) as sink:
        settings = settings_for(tmp_path, sink.port)
        async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
            message_id = await mailer.send("nobody@example.net", "Hello", text="x")
            async with running_worker(settings, bounces=True):
                assert (await wait_status(mailer, message_id, "failed")).state == "failed"
                await wait_until(lambda: len(sink.handler.messages) == 1, 15)
    [dsn] = sink.handler.messages
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [FROM]
    assert b"multipart/report" in dsn.data


async def test_relay_down_defers_then_sends(tmp_path: Path) -> None:
    port = free_port()
    settings = settings_for(tmp_path, port)
    async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
        message_id = await mailer.send("user@example.net", "Later", text="x")
        async with running_worker(settings):
            deferred = await wait_status(mailer, message_id, "deferred", "sent", "failed")
            assert deferred.state == "deferred"
            assert deferred.reply.startswith("4")
            assert deferred.attempts >= 1
            sink = Sink()
            await sink.start(port)
            try:
                sent = await wait_status(mailer, message_id, "sent", "failed")
            finally:
                await sink.stop()
    assert sent.state == "sent" and sent.reply.startswith("250 ")
    assert len(sink.handler.messages) == 1


async def test_graceful_stop_finishes_the_delivery_in_flight(tmp_path: Path) -> None:
    gate = asyncio.Event()
    async with Sink(Handler(data_gate=gate)) as sink:
        settings = settings_for(tmp_path, sink.port)
        async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
            message_id = await mailer.send("user@example.net", "In flight", text="x")
            stop = asyncio.Event()
            lines: list[str] = []
            task = asyncio.create_task(work(settings, stop=stop, say=lines.append))
            await wait_until(lambda: "DATA" in sink.handler.verbs(), 10)
            stop.set()  # SIGTERM: no more claims, the delivery in flight may finish
            await wait_until(lambda: any(line.startswith("stopping") for line in lines), 5)
            assert not task.done()
            gate.set()
            await asyncio.wait_for(task, 15)
            assert (await mailer.status(message_id)).state == "sent"
    assert lines[-1] == "stopped"


def test_outbox_worker_routes_everything_to_the_smtp_host(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 2525, worker_concurrency=7, domains=["app.example"])
    worker = build_outbox_worker(settings, open_queue("memory://"), MailLog(enabled=False))
    assert worker.concurrency == 7 and worker.bounces is False
    assert worker.lease_seconds == 30
    assert worker.router.route("someone@app.example").value == "relay"
    assert list(worker.couriers) == ["relay"]


def test_redact_url() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/app") == "postgresql://app:***@db:5432/app"
    assert redact_url("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("sqlite:///var/lib/hato/q.db") == "sqlite:///var/lib/hato/q.db"


# The commands as a user runs them.


def one_line_error(proc: object) -> str:
    stderr = getattr(proc, "stderr", "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hato: ")
    return lines[0]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"HATO_QUEUE_URL": "memory://"}, "memory://"),
        ({"HATO_SMTP_USERNAME": "u", "HATO_SMTP_PASSWORD": "pw", "HATO_SMTP_TLS": "may"}, "AUTH"),
        ({"HATO_SMTP_USERNAME": "u"}, "HATO_SMTP_PASSWORD"),
        ({"HATO_SMTP_PORT": "nope"}, "HATO_SMTP_PORT"),
        ({"HATO_QUEUE_URL": "bogus://x"}, "unknown queue URL"),
    ],
)
def test_worker_refuses_bad_settings_in_one_line(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    proc = run_hato(["worker"], data_dir=tmp_path, env=env, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in one_line_error(proc)
    assert "pw" not in proc.stderr


def test_worker_help_names_its_settings(tmp_path: Path) -> None:
    out = run_hato(["worker", "--help"], data_dir=tmp_path).stdout
    for option in ("--queue", "--smtp-host", "--smtp-port", "--concurrency", "--bounces"):
        assert option in out


@pytest.fixture
def pg_schema() -> Iterator[str]:
    schema = f"hato_init_{secrets.token_hex(4)}"
    try:
        yield schema
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_queue_init_postgres(tmp_path: Path, pg_schema: str) -> None:
    # A password in the URL (ignored by the test server's trust auth) must not be printed.
    url = POSTGRES_URL.replace("postgres@", "postgres:hunter2@", 1) + f"?schema={pg_schema}"
    out = run_hato(["queue", "init", "--queue", url], data_dir=tmp_path).stdout
    assert "queue ready" in out and "schema version 2" in out
    assert "hunter2" not in out
    again = run_hato(["queue", "init", "--queue", url], data_dir=tmp_path).stdout
    assert "schema version 2" in again  # idempotent
    with psycopg.connect(POSTGRES_URL) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
            (pg_schema,),
        ).fetchone()
    assert row is not None and row[0] >= 2


def test_queue_init_sqlite_and_redis(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "queue.db"
    out = run_hato(
        ["queue", "init"], data_dir=tmp_path, env={"HATO_QUEUE_URL": f"sqlite:///{path}"}
    ).stdout
    assert "queue ready" in out and path.exists()
    prefix = f"hato-init-{secrets.token_hex(4)}:"
    out = run_hato(
        ["queue", "init", "--queue", f"{REDIS_URL}?prefix={prefix}"], data_dir=tmp_path
    ).stdout
    assert "queue ready" in out


def test_queue_init_unreachable_database_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x?pool_timeout=1"
    proc = run_hato(["queue", "init", "--queue", url], data_dir=tmp_path, check=False)
    assert proc.returncode == 1
    one_line_error(proc)


def test_states_are_the_queue_states() -> None:
    assert {s.value for s in MessageState} >= {"queued", "sending", "deferred", "sent", "failed"}
