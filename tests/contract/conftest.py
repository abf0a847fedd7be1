"""Fixtures for the queue contract suite: one ``queue`` per backend, on a fake clock.

Adding a backend is one factory and one line in ``BACKENDS``. A factory is an async
context manager ``factory(request, tmp_path)`` that yields a queue URL private to one
test and cleans up after it (drop the schema, delete the key prefix, ...). It may use
``request.getfixturevalue(...)`` to reach a session fixture (a server started once)::

    @contextlib.asynccontextmanager
    async def postgres_backend(request, tmp_path):
        schema = f"hato_test_{secrets.token_hex(4)}"
        yield f"{SERVER}?schema={schema}"
        await drop_schema(schema)

    BACKENDS.append(Backend("postgres", postgres_backend))

``durable=False`` marks a backend that forgets everything on ``close`` (memory): tests
marked ``durable_only`` are deselected for it (not skipped: there is nothing to run).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from hato.queue import open_queue
from hato.queue.base import Queue
from hato.testing import FakeClock

Factory = Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[str]]


@dataclass(frozen=True)
class Backend:
    name: str
    factory: Factory
    durable: bool = True


@contextlib.asynccontextmanager
async def memory_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    yield "memory://"


@contextlib.asynccontextmanager
async def sqlite_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    # A sub-directory that does not exist yet: open() must create it.
    yield f"sqlite://{tmp_path / 'spool' / 'queue.db'}"


REDIS_URL = os.environ.get("HATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.asynccontextmanager
async def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    import redis.asyncio as aioredis

    prefix = f"hato-test-{secrets.token_hex(4)}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


POSTGRES_URL = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.asynccontextmanager
async def postgres_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    import psycopg

    schema = f"hato_test_{secrets.token_hex(4)}"
    yield f"{POSTGRES_URL}?schema={schema}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


BACKENDS: list[Backend] = [
    Backend("memory", memory_backend, durable=False),
    Backend("sqlite", sqlite_backend),
    Backend("redis", redis_backend),
    Backend("postgres", postgres_backend),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "durable_only: needs a backend that survives close")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        b = callspec.params.get("backend") if callspec is not None else None
        if isinstance(b, Backend) and not b.durable and item.get_closest_marker("durable_only"):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.param
    return b


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def queue_url(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[str]:
    async with backend.factory(request, tmp_path) as url:
        yield url


OpenQueue = Callable[[], Awaitable[Queue]]


@pytest.fixture
async def open_new(queue_url: str, clock: FakeClock) -> AsyncIterator[OpenQueue]:
    """Open another queue on the same URL (another process would see this); closed at
    the end of the test. fsync is off: durability on power loss is not what these test."""
    opened: list[Queue] = []

    async def open_one() -> Queue:
        q = open_queue(queue_url, clock=clock, fsync=False)
        await q.open()
        opened.append(q)
        return q

    yield open_one
    for q in reversed(opened):
        await q.close()


@pytest.fixture
async def queue(open_new: OpenQueue) -> Queue:
    return await open_new()
