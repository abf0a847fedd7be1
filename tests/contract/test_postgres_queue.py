"""PostgreSQL queue: what only this backend promises (outbox, SKIP LOCKED, NOTIFY, restarts).

Runs against the real server of ``HATO_TEST_POSTGRES_URL`` (default: the CI service on
127.0.0.1:5432). Each test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import pytest

from hato.errors import ConfigError, MessageNotFound, QueueError
from hato.message import Envelope
from hato.queue import open_queue
from hato.queue.base import MessageState, Outcome, RecipientState
from hato.queue.postgres import SCHEMA_VERSION, PostgresQueue, enqueue_sync
from hato.testing import FakeClock

SERVER = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _with_query(url: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


@pytest.fixture
def schema() -> Iterator[str]:
    name = "hato_t_" + secrets.token_hex(6)
    yield name
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def app_name() -> str:
    return "hato_test_" + secrets.token_hex(4)


@pytest.fixture
def url(schema: str, app_name: str) -> str:
    return _with_query(SERVER, schema=schema, application_name=app_name)


@pytest.fixture
async def queue(url: str) -> AsyncIterator[PostgresQueue]:
    q = PostgresQueue(url)
    await q.open()
    yield q
    await q.close()


def envelope(*recipients: str) -> Envelope:
    return Envelope("app@example.org", list(recipients) or ["user@example.net"])


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def terminate_backends(app_name: str) -> int:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app_name,),
        ).fetchall()
    return len(rows)


# -- schema and URL ----------------------------------------------------------------------


async def test_open_creates_versioned_schema_once(url: str, schema: str) -> None:
    q = PostgresQueue(url)
    await q.open()
    assert await q.migrate() == SCHEMA_VERSION
    await q.close()
    await q.open()  # again: nothing to do
    await q.close()
    with psycopg.connect(SERVER) as conn:
        versions = conn.execute(f'SELECT version FROM "{schema}".hato_schema_version').fetchall()
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,)
        ).fetchall()
    assert versions == [(1,), (2,)]
    assert tables == [("hato_events",), ("hato_messages",), ("hato_schema_version",)]


async def test_many_openers_at_once_create_the_schema_once(url: str) -> None:
    queues = [PostgresQueue(url) for _ in range(5)]
    await asyncio.gather(*(q.open() for q in queues))
    await asyncio.gather(*(q.close() for q in queues))


async def test_table_prefix_and_open_queue(schema: str) -> None:
    q = open_queue(_with_query(SERVER, schema=schema, table_prefix="outbox_"))
    assert isinstance(q, PostgresQueue)
    await q.open()
    try:
        await q.enqueue(envelope(), b"x")
    finally:
        await q.close()
    with psycopg.connect(SERVER) as conn:
        (n,) = conn.execute(f'SELECT count(*) FROM "{schema}".outbox_messages').fetchone() or (0,)
    assert n == 1


async def test_newer_schema_version_is_refused(queue: PostgresQueue, url: str, schema: str) -> None:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{schema}".hato_schema_version VALUES (99, 0)')
    with pytest.raises(QueueError, match="newer"):
        await PostgresQueue(url).open()


@pytest.mark.parametrize(
    "query", ["schema=bad-name", "schema=x;drop", "table_prefix=a%22b", "pool_size=0"]
)
def test_bad_url_options_are_config_errors(query: str) -> None:
    with pytest.raises(ConfigError):
        PostgresQueue(f"{SERVER}?{query}")


async def test_unreachable_server_is_a_queue_error() -> None:
    with socket_closed_port() as port:
        q = PostgresQueue(f"postgresql://hato:s3cret@127.0.0.1:{port}/test?pool_timeout=0.5")
        with pytest.raises(QueueError) as caught:
            await q.open()
        assert "s3cret" not in str(caught.value)
        with pytest.raises(QueueError) as caught:
            await q.wait_for_work(0)
        assert "s3cret" not in str(caught.value)


class socket_closed_port:
    """A loopback port nobody listens on (bound, never listening, so nobody else takes it)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_closed_queue_and_lost_table_raise_queue_errors(
    queue: PostgresQueue, schema: str
) -> None:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".hato_messages')
    with pytest.raises(QueueError):
        await queue.enqueue(envelope(), b"x")
    with pytest.raises(QueueError):
        await queue.claim(owner="w", limit=1, lease_seconds=30)
    await queue.close()
    with pytest.raises(QueueError, match="not open"):
        await queue.get("X")


# -- transactional outbox ----------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_enqueue_in_callers_async_transaction(
    queue: PostgresQueue, outcome: str, schema: str
) -> None:
    async with await psycopg.AsyncConnection.connect(SERVER) as conn:
        await conn.execute("CREATE TEMP TABLE signup (email text)")
        await conn.execute("INSERT INTO signup VALUES ('user@example.net')")
        message_id = await queue.enqueue(envelope(), b"welcome", connection=conn)
        # Not visible outside the transaction before the caller decides.
        with pytest.raises(MessageNotFound):
            await queue.get(message_id)
        await (conn.commit() if outcome == "commit" else conn.rollback())
    if outcome == "commit":
        assert (await queue.get(message_id)).data == b"welcome"
        assert [m.id for m in await queue.claim(owner="w", limit=5, lease_seconds=30)] == [
            message_id
        ]
    else:
        with pytest.raises(MessageNotFound):
            await queue.get(message_id)
        assert await queue.claim(owner="w", limit=5, lease_seconds=30) == []


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_enqueue_in_callers_sync_transaction(queue: PostgresQueue, outcome: str) -> None:
    with psycopg.connect(SERVER) as conn:
        message_id = await queue.enqueue(envelope(), b"welcome", connection=conn)
        with pytest.raises(MessageNotFound):
            await queue.get(message_id)
        conn.commit() if outcome == "commit" else conn.rollback()
    if outcome == "commit":
        assert (await queue.get(message_id)).state is MessageState.QUEUED
    else:
        with pytest.raises(MessageNotFound):
            await queue.get(message_id)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_enqueue_sync_helper_in_a_thread_like_a_django_view(
    queue: PostgresQueue, url: str, outcome: str
) -> None:
    """The sync helper, called as a sync web framework would, from another thread."""

    def view() -> str:
        with psycopg.connect(SERVER) as conn, conn.transaction(force_rollback=outcome != "commit"):
            return enqueue_sync(
                conn, envelope("a@example.net", "b@example.net"), b"hi", queue_url=url
            )

    await queue.wait_for_work(0)  # LISTEN in place: a commit must wake us
    waiter = asyncio.create_task(queue.wait_for_work(30))
    message_id = await asyncio.to_thread(view)
    if outcome == "commit":
        await asyncio.wait_for(waiter, 5)
        stored = await queue.get(message_id)
        assert stored.pending == ["a@example.net", "b@example.net"]
    else:
        with pytest.raises(MessageNotFound):
            await queue.get(message_id)
        await asyncio.sleep(0)  # a rolled-back enqueue wakes nobody
        assert not waiter.done()
        waiter.cancel()


async def test_outbox_with_idempotency_key_inside_a_transaction(queue: PostgresQueue) -> None:
    first = await queue.enqueue(envelope(), b"one", idempotency_key="signup-42")
    async with await psycopg.AsyncConnection.connect(SERVER) as conn:
        again = await queue.enqueue(
            envelope(), b"two", idempotency_key="signup-42", connection=conn
        )
        await conn.commit()
    assert again == first
    assert (await queue.get(first)).data == b"one"


async def test_connection_of_another_kind_is_refused(queue: PostgresQueue) -> None:
    with pytest.raises(TypeError):
        await queue.enqueue(envelope(), b"x", connection=object())


async def test_caller_connection_errors_are_queue_errors(url: str, schema: str) -> None:
    q = PostgresQueue(url)
    await q.open()
    await q.close()
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".hato_messages')
        with pytest.raises(QueueError):
            enqueue_sync(conn, envelope(), b"x", queue_url=url)


# -- idempotency under concurrency -------------------------------------------------------


async def test_concurrent_enqueues_with_one_key_store_one_message(
    url: str, queue: PostgresQueue
) -> None:
    others = [PostgresQueue(url) for _ in range(3)]
    await asyncio.gather(*(q.open() for q in others))
    try:
        ids = await asyncio.gather(
            *(
                q.enqueue(envelope(), b"x", idempotency_key="same")
                for q in [queue, *others]
                for _ in range(5)
            )
        )
    finally:
        await asyncio.gather(*(q.close() for q in others))
    assert len(set(ids)) == 1
    assert (await queue.counts())[MessageState.QUEUED] == 1
    assert await queue.find("same") == ids[0]


async def test_group_commit_keeps_a_bad_message_from_failing_its_neighbours(
    queue: PostgresQueue,
) -> None:
    senders = [f"app{i}@example.org" for i in range(12)]
    senders[5] = "bad\x00@example.org"  # PostgreSQL text cannot hold NUL
    results = await asyncio.gather(
        *(queue.enqueue(Envelope(s, ["u@example.net"]), b"x") for s in senders),
        return_exceptions=True,
    )
    assert isinstance(results[5], QueueError)
    good = [r for i, r in enumerate(results) if i != 5]
    assert all(isinstance(r, str) for r in good)
    assert len(set(good)) == 11
    assert (await queue.counts())[MessageState.QUEUED] == 11


async def test_concurrent_enqueues_after_termination_are_all_stored_once(
    queue: PostgresQueue, app_name: str
) -> None:
    await queue.enqueue(envelope(), b"warm-up")
    terminate_backends(app_name)
    ids = await asyncio.gather(*(queue.enqueue(envelope(), b"%d" % i) for i in range(50)))
    assert len(set(ids)) == 50
    assert (await queue.counts())[MessageState.QUEUED] == 51


# -- claims ------------------------------------------------------------------------------


async def test_concurrent_claimers_never_share_a_message(url: str, queue: PostgresQueue) -> None:
    total = 400
    await asyncio.gather(*(queue.enqueue(envelope(), b"%d" % i) for i in range(total)))
    workers = [PostgresQueue(url) for _ in range(4)]
    await asyncio.gather(*(w.open() for w in workers))
    seen: dict[str, str] = {}
    duplicates: list[str] = []

    async def claimer(q: PostgresQueue, name: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batch = await q.claim(owner=name, limit=7, lease_seconds=300)
            if not batch:
                return
            for m in batch:
                if m.id in seen:
                    duplicates.append(m.id)
                seen[m.id] = name
                outcome = Outcome(m.pending[0], RecipientState.SENT, "250 ok")
                assert await q.record(m.id, [outcome], owner=name, retry_at=None) is (
                    MessageState.SENT
                )

    try:
        await asyncio.gather(
            *(claimer(w, f"w{i}-{j}") for i, w in enumerate(workers) for j in range(4))
        )
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    assert duplicates == []
    assert len(seen) == total
    assert len(set(seen.values())) > 1  # the work really was shared
    assert (await queue.counts())[MessageState.SENT] == total


async def test_claim_is_oldest_due_first_and_skips_future_and_held(url: str) -> None:
    clock = FakeClock()
    q = PostgresQueue(url, clock=clock)
    await q.open()
    try:
        late = await q.enqueue(envelope(), b"late", not_before=clock.now + 60)
        await q.enqueue(envelope(), b"held", held=True)
        clock.now += 1
        second = await q.enqueue(envelope(), b"b", not_before=clock.now - 0.5)
        first = await q.enqueue(envelope(), b"a", not_before=clock.now - 0.9)
        assert [m.id for m in await q.claim(owner="w", limit=10, lease_seconds=300)] == [
            first,
            second,
        ]
        clock.now += 60
        assert [m.id for m in await q.claim(owner="w", limit=10, lease_seconds=30)] == [late]
    finally:
        await q.close()


async def test_record_from_a_stale_lease_owner_is_refused(url: str) -> None:
    clock = FakeClock()
    q = PostgresQueue(url, clock=clock)
    await q.open()
    try:
        message_id = await q.enqueue(envelope("x@example.net"), b"x")
        (slow,) = await q.claim(owner="slow", limit=1, lease_seconds=10)
        clock.now += 11
        (fast,) = await q.claim(owner="fast", limit=1, lease_seconds=10)
        assert slow.id == fast.id == message_id
        sent = [Outcome("x@example.net", RecipientState.SENT, "250 2.0.0 ok")]
        assert await q.record(message_id, sent, owner="slow", retry_at=None) is None
        assert (await q.get(message_id)).lease_owner == "fast"
        assert await q.record(message_id, sent, owner="fast", retry_at=None) is MessageState.SENT
        stored = await q.get(message_id)
        assert stored.attempts == 1
        assert stored.recipients[0].reply == "250 2.0.0 ok"
    finally:
        await q.close()


async def test_same_owner_reclaiming_invalidates_its_old_lease_by_time(url: str) -> None:
    """record compares the lease end too: a record racing a re-claim cannot slip in."""
    clock = FakeClock()
    q = PostgresQueue(url, clock=clock)
    await q.open()
    try:
        message_id = await q.enqueue(envelope("x@example.net"), b"x")
        await q.claim(owner="w", limit=1, lease_seconds=10)
        later = [Outcome("x@example.net", RecipientState.PENDING, "451 4.3.0 later")]
        assert await q.record(message_id, later, owner="w", retry_at=clock.now) is (
            MessageState.DEFERRED
        )
        assert (await q.get(message_id)).last_reply == "451 4.3.0 later"
    finally:
        await q.close()


async def test_recover_returns_expired_leases_and_quarantines_unreadable_rows(
    url: str, schema: str
) -> None:
    clock = FakeClock()
    q = PostgresQueue(url, clock=clock)
    await q.open()
    try:
        leased = await q.enqueue(envelope(), b"a")
        broken = await q.enqueue(envelope(), b"b", not_before=clock.now + 100)
        await q.claim(owner="dead-worker", limit=1, lease_seconds=5)
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{schema}".hato_messages SET recipients = \'{{"no": 1}}\' WHERE id = %s',
                (broken,),
            )
        assert (await q.get(broken)).state is MessageState.QUARANTINED  # readers see it
        clock.now += 6
        report = await q.recover()
        assert report.leases_expired == 1
        assert report.quarantined == [broken]
        assert (await q.get(leased)).state is MessageState.QUEUED
        assert (await q.counts())[MessageState.QUARANTINED] == 1
        clock.now += 1000
        assert [m.id for m in await q.claim(owner="w", limit=10, lease_seconds=5)] == [leased]
    finally:
        await q.close()


async def test_take_over_dead_returns_the_leases_of_a_node_that_is_gone(url: str) -> None:
    """Two nodes on one queue: while node A's process lives its leases are its own; once
    its sessions end (here: closed, as kill -9 would end them), node B takes them over
    at once, long before the lease would run out."""
    a, b = PostgresQueue(url), PostgresQueue(url)
    await a.open()
    await b.open()
    try:
        message_id = await a.enqueue(envelope(), b"x")
        assert [m.id for m in await a.claim(owner="node-a", limit=1, lease_seconds=600)] == [
            message_id
        ]
        assert await b.take_over_dead() == 0  # alive: its lock is held
        assert await a.take_over_dead() == 0  # never our own
        await a.close()
        # The server drops a closed session's advisory locks a moment after the client
        # has gone: look again until then (bounded).
        deadline = time.monotonic() + 10
        taken = await b.take_over_dead()
        while taken == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            taken = await b.take_over_dead()
        assert taken == 1
        assert (await b.get(message_id)).state is MessageState.QUEUED
        claimed = await b.claim(owner="node-b", limit=1, lease_seconds=600)
        assert [m.id for m in claimed] == [message_id]
        assert await b.take_over_dead() == 0  # node B's own lease stays
    finally:
        await a.close()
        await b.close()


# -- wake-ups ----------------------------------------------------------------------------


async def test_notify_from_another_process_wakes_a_waiter_quickly(
    url: str, queue: PostgresQueue
) -> None:
    await queue.wait_for_work(0)  # starts the listener
    other = PostgresQueue(url)
    await other.open()
    try:
        for action in ("enqueue", "requeue", "release"):
            if action == "requeue":
                held = await other.enqueue(envelope(), b"h", held=True)
            if action == "release":
                (leased,) = await other.claim(owner="o", limit=1, lease_seconds=300)
            # Nothing is due now: the waiter can only be woken by NOTIFY.
            await other.claim(owner="drain", limit=100, lease_seconds=300)
            waiter = asyncio.create_task(queue.wait_for_work(30))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            started = time.monotonic()
            if action == "enqueue":
                await other.enqueue(envelope(), b"new")
            elif action == "requeue":
                await other.requeue(held)
            else:
                await other.release(leased.id, owner="o")
            await asyncio.wait_for(waiter, 5)
            assert time.monotonic() - started < 1.0, action
    finally:
        await other.close()


async def test_wait_for_work_wakes_when_a_retry_falls_due(queue: PostgresQueue) -> None:
    await queue.enqueue(envelope(), b"soon", not_before=time.time() + 0.3)
    started = time.monotonic()
    await queue.wait_for_work(30)
    assert 0.2 < time.monotonic() - started < 5


async def test_wait_for_work_polls_when_nothing_happens(queue: PostgresQueue) -> None:
    started = time.monotonic()
    await queue.wait_for_work(0.2)
    assert time.monotonic() - started >= 0.19


# -- restarts ----------------------------------------------------------------------------


async def test_survives_termination_of_all_its_connections(
    url: str, queue: PostgresQueue, app_name: str
) -> None:
    other = PostgresQueue(url)
    await other.open()
    try:
        await queue.wait_for_work(0)
        first = await queue.enqueue(envelope(), b"before")
        assert [m.id for m in await queue.claim(owner="w", limit=5, lease_seconds=300)] == [first]
        # Same application_name on both queues: kill every connection, pool and listener.
        assert terminate_backends(app_name) >= 2
        # The pool replaces its dead connections; the caller sees no error.
        second = await queue.enqueue(envelope(), b"after")
        assert [m.id for m in await queue.claim(owner="w", limit=5, lease_seconds=300)] == [second]
        done = Outcome("user@example.net", RecipientState.SENT, "250 ok")
        assert await queue.record(first, [done], owner="w", retry_at=None) is MessageState.SENT
        # The listener reconnects by itself; it wakes waiters once when it comes back,
        # then NOTIFY works again.
        await queue.wait_for_work(5)
        waiter = asyncio.create_task(queue.wait_for_work(30))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await other.enqueue(envelope(), b"wake")
        await asyncio.wait_for(waiter, 5)
    finally:
        await other.close()


async def test_repeated_terminations_under_a_working_loop(
    queue: PostgresQueue, app_name: str
) -> None:
    """A worker-shaped loop carries on through several kills; nothing enqueued is lost."""
    enqueued: set[str] = set()
    delivered: set[str] = set()
    for round_ in range(5):
        for _ in range(10):
            enqueued.add(await queue.enqueue(envelope(), b"r%d" % round_))
        terminate_backends(app_name)
        deadline = time.monotonic() + 10
        while enqueued - delivered and time.monotonic() < deadline:
            try:
                batch = await queue.claim(owner="w", limit=4, lease_seconds=300)
                for m in batch:
                    done = [Outcome(m.pending[0], RecipientState.SENT, "250 ok")]
                    if await queue.record(m.id, done, owner="w", retry_at=None):
                        delivered.add(m.id)
            except QueueError:
                await queue.wait_for_work(0.05)
    assert delivered == enqueued
