"""The transactional outbox on PostgreSQL: ``send(..., connection=conn)`` joins the caller's
transaction, so a rolled-back sign-up sends no mail and a committed one always does."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest

from hato import AsyncMailer, Email, Mailer, MessageNotFound
from hato.queue.base import MessageState
from hato.queue.postgres import PostgresQueue

POSTGRES_URL = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
FROM = "noreply@app.example"


@pytest.fixture
def url() -> Iterator[str]:
    schema = f"hato_tx_{secrets.token_hex(4)}"
    queue_url = f"{POSTGRES_URL}?schema={schema}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".users (email text PRIMARY KEY)')

    async def init() -> None:  # what `hato queue init` does
        q = PostgresQueue(queue_url)
        await q.open()
        await q.close()

    asyncio.run(init())
    try:
        yield queue_url
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


def count_messages(url: str) -> int:
    with psycopg.connect(POSTGRES_URL) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema_of(url)}".hato_messages').fetchone()
        assert row is not None
        return int(row[0])


def sign_up(
    conn: psycopg.Connection[tuple[object, ...]], url: str, mailer: Mailer, who: str
) -> str:
    conn.execute(f'INSERT INTO "{schema_of(url)}".users (email) VALUES (%s)', (who,))
    return mailer.send(who, "Welcome", text="Thanks for signing up", connection=conn)


def test_rolled_back_sign_up_sends_nothing(url: str) -> None:
    mailer = Mailer(url, default_from=FROM)
    try:
        with psycopg.connect(POSTGRES_URL) as conn:
            message_id = sign_up(conn, url, mailer, "ann@example.net")
            conn.rollback()
        assert count_messages(url) == 0
        with pytest.raises(MessageNotFound):
            mailer.status(message_id)
    finally:
        mailer.close()


def test_committed_sign_up_sends(url: str) -> None:
    mailer = Mailer(url, default_from=FROM)
    try:
        with psycopg.connect(POSTGRES_URL) as conn:
            message_id = sign_up(conn, url, mailer, "bob@example.net")
            # Not visible to anyone before the commit.
            assert count_messages(url) == 0
            conn.commit()
        assert count_messages(url) == 1
        status = mailer.status(message_id)
        assert status.state == "queued"
        assert [r.address for r in status.recipients] == ["bob@example.net"]
    finally:
        mailer.close()


def test_transaction_block_and_failure_inside(url: str) -> None:
    mailer = Mailer(url, default_from=FROM)
    try:
        with psycopg.connect(POSTGRES_URL) as conn:
            with pytest.raises(RuntimeError), conn.transaction():
                sign_up(conn, url, mailer, "cat@example.net")
                raise RuntimeError("the sign-up fails after the mail was enqueued")
            assert count_messages(url) == 0
            with conn.transaction():
                kept = sign_up(conn, url, mailer, "dan@example.net")
        assert count_messages(url) == 1
        assert mailer.status(kept).state == "queued"
    finally:
        mailer.close()


def test_idempotency_and_send_many_in_one_transaction(url: str) -> None:
    mailer = Mailer(url, default_from=FROM)
    try:
        with psycopg.connect(POSTGRES_URL) as conn:
            first = mailer.send("e@example.net", "s", connection=conn, idempotency_key="k")
            again = mailer.send("e@example.net", "s", connection=conn, idempotency_key="k")
            many = mailer.send_many(
                [Email("f@example.net", "one"), Email("g@example.net", "two")], connection=conn
            )
            conn.commit()
        assert first == again
        assert count_messages(url) == 3
        assert {mailer.status(i).state for i in [first, *many]} == {"queued"}
    finally:
        mailer.close()


def test_async_connection_is_refused_by_the_sync_mailer(url: str) -> None:
    mailer = Mailer(url, default_from=FROM)
    try:
        with pytest.raises(TypeError):
            mailer.send("e@example.net", "s", connection=object())
    finally:
        mailer.close()


async def test_async_mailer_with_an_async_connection(url: str) -> None:
    async with AsyncMailer(url, default_from=FROM) as mailer:
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL) as conn:
            dropped = await mailer.send("h@example.net", "rolled back", connection=conn)
            await conn.rollback()
            kept = await mailer.send("i@example.net", "committed", connection=conn)
            await conn.commit()
        with pytest.raises(MessageNotFound):
            await mailer.status(dropped)
        assert (await mailer.status(kept)).state == "queued"
        # A committed message is claimable by a worker like any other.
        q = PostgresQueue(url)
        await q.open()
        try:
            claimed = await q.claim(owner="t", limit=5, lease_seconds=30)
            assert [m.id for m in claimed] == [kept]
            assert claimed[0].state is MessageState.SENDING
        finally:
            await q.close()
