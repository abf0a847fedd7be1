"""Mailer and AsyncMailer against the real queue backends: memory, SQLite, PostgreSQL, Redis.

PostgreSQL and Redis are the servers that run beside CI (``HATO_TEST_POSTGRES_URL``,
``HATO_TEST_REDIS_URL``); each test gets its own schema or key prefix and removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import secrets
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hato import AsyncMailer, ConfigError, Email, Mailer, MessageNotFound
from hato.queue import open_queue
from hato.queue.base import MessageState, Queue

POSTGRES_URL = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("HATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FROM = "noreply@app.example"


def _drop_postgres(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _drop_redis(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.contextmanager
def queue_url_for(backend: str, tmp_path: Path) -> Iterator[str]:
    token = secrets.token_hex(4)
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'outbox' / 'queue.db'}"
    elif backend == "postgres":
        schema = f"hato_mailer_{token}"
        try:
            yield f"{POSTGRES_URL}?schema={schema}"
        finally:
            _drop_postgres(schema)
    elif backend == "redis":
        prefix = f"hato-mailer-{token}:"
        try:
            yield f"{REDIS_URL}?prefix={prefix}"
        finally:
            _drop_redis(prefix)
    else:  # pragma: no cover
        raise AssertionError(backend)


BACKENDS = ["memory", "sqlite", "postgres", "redis"]
DURABLE = ["sqlite", "postgres", "redis"]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with queue_url_for(request.param, tmp_path) as u:
        yield u


@pytest.fixture(params=DURABLE)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with queue_url_for(request.param, tmp_path) as u:
        yield u


@pytest.fixture
def mailer(url: str) -> Iterator[Mailer]:
    m = Mailer(url, default_from=FROM, fsync=False)
    try:
        yield m
    finally:
        m.close()


@contextlib.asynccontextmanager
async def reader(url: str) -> AsyncIterator[Queue]:
    """Another process's view of the queue (what a worker would see)."""
    q = open_queue(url, fsync=False)
    await q.open()
    try:
        yield q
    finally:
        await q.close()


def stored_on_queue(mailer: Mailer, message_id: str) -> bytes:
    """The bytes the mailer stored, read through its own queue (memory:// is per instance)."""

    async def get() -> bytes:
        q = await mailer._inner._open_queue()
        return (await q.get(message_id)).data

    return mailer._call(get())


def test_send_then_status(mailer: Mailer) -> None:
    message_id = mailer.send("user@example.net", "Welcome", text="Hello!", bcc="audit@app.example")
    status = mailer.status(message_id)
    assert status.state == "queued"
    assert status.id == message_id
    assert [r.address for r in status.recipients] == ["user@example.net", "audit@app.example"]
    data = stored_on_queue(mailer, message_id)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "Welcome" and msg["Bcc"] is None
    with pytest.raises(MessageNotFound):
        mailer.status("0000000000000000")


def test_many_sends_reuse_one_loop_and_connection(mailer: Mailer) -> None:
    """The queue objects stay bound to the mailer's loop: no asyncio.run per send."""
    ids = [mailer.send(f"u{i}@example.net", f"n{i}", text="x") for i in range(50)]
    assert len(set(ids)) == 50
    assert {mailer.status(i).state for i in ids} == {"queued"}


def test_idempotency_key_enqueues_once(mailer: Mailer) -> None:
    first = mailer.send("u@example.net", "Reset", text="a", idempotency_key="reset:7")
    again = mailer.send("u@example.net", "Reset", text="a", idempotency_key="reset:7")
    other = mailer.send("u@example.net", "Reset", text="a", idempotency_key="reset:8")
    assert first == again != other
    data = stored_on_queue(mailer, first)
    assert b"Hato-Idempotency-Key: reset:7\r\n" in data


def test_send_many(mailer: Mailer) -> None:
    ids = mailer.send_many(
        [
            Email("a@example.net", "one", text="1"),
            {"to": "b@example.net", "subject": "two", "html": "<b>2</b>"},
            Email("c@example.net", "three", text="3", idempotency_key="k3"),
            Email("c@example.net", "three", text="3", idempotency_key="k3"),
        ]
    )
    assert len(ids) == 4 and ids[2] == ids[3] and len(set(ids)) == 3
    assert all(mailer.status(i).state == "queued" for i in ids)


def test_send_many_checks_everything_before_storing(mailer: Mailer) -> None:
    with pytest.raises(ValueError):
        mailer.send_many(
            [Email("ok@example.net", "fine"), Email("bad@example.net", "evil\r\nBcc: x@y.z")]
        )

    async def count() -> int:
        q = await mailer._inner._open_queue()
        return sum((await q.counts()).values())

    assert mailer._call(count()) == 0


def test_concurrent_sends_from_threads(mailer: Mailer) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(20):
                message_id = mailer.send(f"t{n}-{i}@example.net", "hi", text="x")
                with lock:
                    results.append(message_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(set(results)) == 160


async def test_send_at_is_not_claimed_early(durable_url: str) -> None:
    mailer = Mailer(durable_url, default_from=FROM, fsync=False)
    try:
        later = await asyncio.to_thread(
            mailer.send, "u@example.net", "later", text="x", send_at=time.time() + 3600
        )
        now = await asyncio.to_thread(mailer.send, "u@example.net", "now", text="x")
    finally:
        await asyncio.to_thread(mailer.close)
    async with reader(durable_url) as q:
        claimed = await q.claim(owner="test", limit=10, lease_seconds=30)
        assert [m.id for m in claimed] == [now]
        assert (await q.get(later)).state is MessageState.QUEUED


async def test_another_process_sees_what_was_sent(durable_url: str) -> None:
    mailer = Mailer(durable_url, default_from=FROM, fsync=False)
    try:
        message_id = await asyncio.to_thread(
            mailer.send, "u@example.net", "durable", text="x", attachments=[("a.txt", b"abc")]
        )
    finally:
        await asyncio.to_thread(mailer.close)
    async with reader(durable_url) as q:
        msg = await q.get(message_id)
    assert msg.sender == FROM
    assert b"Subject: durable\r\n" in msg.data


async def test_async_mailer(url: str) -> None:
    async with AsyncMailer(url, default_from=FROM, fsync=False) as mailer:
        message_id = await mailer.send("u@example.net", "async", text="x")
        assert (await mailer.status(message_id)).state == "queued"
        ids = await mailer.send_many([Email(f"u{i}@example.net", "many") for i in range(30)])
        assert len(set(ids)) == 30
        assert (await mailer.status(ids[-1])).state == "queued"
    with pytest.raises(Exception, match="closed"):
        await mailer.send("u@example.net", "after close")


def test_async_mailer_belongs_to_one_loop(tmp_path: Path) -> None:
    mailer = AsyncMailer(f"sqlite:///{tmp_path / 'q.db'}", default_from=FROM, fsync=False)

    async def send() -> str:
        return await mailer.send("u@example.net", "s")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(send())
        with pytest.raises(RuntimeError, match="event loop"):
            asyncio.run(send())
        loop.run_until_complete(mailer.aclose())
    finally:
        loop.close()


def test_settings_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no hato.toml or .env from the developer's checkout
    monkeypatch.setenv("HATO_QUEUE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("HATO_DEFAULT_FROM", "Env Sender <env@app.example>")
    mailer = Mailer(fsync=False)
    try:
        assert mailer.queue_url == f"sqlite:///{tmp_path / 'env.db'}"
        assert mailer.default_from == "Env Sender <env@app.example>"
        message_id = mailer.send("u@example.net", "from env")
        assert mailer.status(message_id).state == "queued"
    finally:
        mailer.close()
    assert (tmp_path / "env.db").exists()
    explicit = Mailer("memory://", default_from="x@app.example")
    assert explicit.queue_url == "memory://" and explicit.default_from == "x@app.example"
    explicit.close()


def test_connection_needs_postgres(tmp_path: Path) -> None:
    mailer = Mailer(f"sqlite:///{tmp_path / 'q.db'}", default_from=FROM, fsync=False)
    try:
        with pytest.raises(ConfigError, match="postgresql"):
            mailer.send("u@example.net", "s", connection=object())
    finally:
        mailer.close()


def test_bad_queue_url_fails_on_open() -> None:
    mailer = Mailer("nosuch://x", default_from=FROM)
    try:
        with pytest.raises(ConfigError):
            mailer.open()
    finally:
        mailer.close()


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    mailer = Mailer(f"sqlite:///{tmp_path / 'q.db'}", default_from=FROM, fsync=False)
    mailer.send("u@example.net", "s")
    mailer.close()
    mailer.close()
    with pytest.raises(Exception, match="closed"):
        mailer.send("u@example.net", "s")


def test_a_forked_child_gets_its_own_loop(tmp_path: Path) -> None:
    """gunicorn --preload: a Mailer made before the fork works in the worker processes."""
    url = f"sqlite:///{tmp_path / 'fork.db'}"
    mailer = Mailer(url, default_from=FROM, fsync=False)
    try:
        parent_id = mailer.send("parent@example.net", "from the parent")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                child_id = mailer.send("child@example.net", "from the child")
                code = 0 if mailer.status(child_id).state == "queued" else 2
                mailer.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert mailer.status(parent_id).state == "queued"
    finally:
        mailer.close()

    async def subjects() -> set[str]:
        async with reader(url) as q:
            return {m.recipients[0].address for m in await q.list()}

    assert asyncio.run(subjects()) == {"parent@example.net", "child@example.net"}
