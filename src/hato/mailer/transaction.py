"""The transactional outbox: ``send(..., connection=conn)`` inside the caller's PostgreSQL transaction.

The INSERT runs on the caller's psycopg connection and is never committed here: the
caller's commit makes the message exist (and wakes the workers), a rollback discards it.
It goes through the PostgreSQL backend's own methods,
:meth:`~hato.queue.postgres.PostgresQueue.enqueue_in` (an ``AsyncConnection``, or a sync
``Connection`` from a worker thread) and
:meth:`~hato.queue.postgres.PostgresQueue.enqueue_sync` (a sync ``Connection``, in the
calling thread), so the row is the one ``enqueue`` writes.

This module needs the ``postgres`` extra; the mailers import it only when ``connection=``
is used (:func:`hato.mailer.async_mailer.caller_transaction`).
"""

from __future__ import annotations

import psycopg

from hato.clock import Clock
from hato.mailer.composition import Composed
from hato.queue.postgres import PostgresQueue

__all__ = ["CallerTransaction"]


class CallerTransaction:
    """Enqueues composed messages on connections the caller owns, into ``queue_url``'s tables."""

    def __init__(self, queue_url: str, clock: Clock) -> None:
        # Never opened: an INSERT on the caller's connection needs only the table names
        # (``schema`` and ``table_prefix`` of the URL) and the clock.
        self._queue = PostgresQueue(queue_url, clock=clock)

    async def enqueue(self, connection: object, composed: Composed) -> str:
        """``AsyncMailer``'s path: an ``AsyncConnection``, or a ``Connection`` (in a thread)."""
        if not isinstance(connection, psycopg.AsyncConnection | psycopg.Connection):
            raise TypeError(
                "connection= takes a psycopg AsyncConnection or Connection,"
                f" not {type(connection).__name__}"
            )
        return await self._queue.enqueue_in(
            connection,
            composed.envelope,
            composed.data,
            not_before=composed.not_before,
            idempotency_key=composed.idempotency_key,
        )

    def enqueue_sync(self, connection: object, composed: Composed) -> str:
        """``Mailer``'s path: a sync ``Connection``, used in the calling thread."""
        if not isinstance(connection, psycopg.Connection):
            raise TypeError(
                "Mailer.send(connection=...) takes a sync psycopg Connection; "
                "use AsyncMailer for an AsyncConnection"
            )
        return self._queue.enqueue_sync(
            connection,
            composed.envelope,
            composed.data,
            not_before=composed.not_before,
            idempotency_key=composed.idempotency_key,
        )
