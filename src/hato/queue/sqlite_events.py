"""The SQLite queue's delivery events: the statements, run by the queue's own threads.

Events live in the ``events`` table (schema version 3, :mod:`hato.queue.sqlite_records`):
``seq`` orders them and is the cursor, ``event_id`` is unique (an event pulled twice is
stored once), ``queue_id``/``envid``/``time`` are what queries select by, and ``body`` is
the event's JSON. They are written in the transaction of the step they describe (the
enqueue, the record), so they commit with it and need no fsync of their own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from hato.errors import QueueError
from hato.events import DeliveryEvent, EventPage, encode
from hato.events import decode as decode_event

_INSERT = (
    "INSERT OR IGNORE INTO events (event_id, queue_id, envid, time, body) VALUES (?, ?, ?, ?, ?)"
)


def insert_events(conn: sqlite3.Connection, events: Sequence[DeliveryEvent]) -> int:
    """Store ``events`` (those not stored yet); how many were new."""
    if not events:
        return 0
    before = conn.total_changes
    conn.executemany(
        _INSERT, [(e.event_id, e.queue_id, e.envid, e.time, encode(e)) for e in events]
    )
    return conn.total_changes - before


def select_events(
    conn: sqlite3.Connection,
    *,
    after: str,
    queue_id: str | None,
    envid: str | None,
    since: float | None,
    limit: int,
) -> EventPage:
    """A page of stored events after cursor ``after`` (``""``: from the first).

    The body is read as bytes and decoded here, so a damaged row is skipped (it is a
    record, never mail) instead of failing the page.
    """
    try:
        start = int(after) if after else 0
    except ValueError:
        raise QueueError(f"not an event cursor of this queue: {after!r}") from None
    # The newest event first: whatever commits after it waits for the next page, so the
    # cursor can skip what did not match without skipping what arrived meanwhile.
    top = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    if not isinstance(top, int) or top <= start:
        return EventPage([], str(start))
    where, params = ["seq > ?", "seq <= ?"], [start, top]
    if queue_id is not None:
        where.append("queue_id = ?")
        params.append(queue_id)  # type: ignore[arg-type]
    if envid is not None:
        where.append("envid = ? AND envid != ''" if envid else "envid = ?")
        params.append(envid)  # type: ignore[arg-type]
    if since is not None:
        where.append("time >= ?")
        params.append(since)  # type: ignore[arg-type]
    rows = conn.execute(
        f"SELECT seq, CAST(body AS BLOB) FROM events WHERE {' AND '.join(where)}"
        " ORDER BY seq LIMIT ?",
        (*params, limit),
    ).fetchall()
    found: list[DeliveryEvent] = []
    cursor = start
    for seq, body in rows:
        cursor = seq
        try:
            found.append(decode_event(body))
        except (ValueError, TypeError):
            continue
    if len(rows) < limit:
        # Nothing more matches up to ``top``: a follower need not scan those again.
        cursor = top
    return EventPage(found, str(cursor))


def delete_events_before(conn: sqlite3.Connection, before: float) -> int:
    return conn.execute("DELETE FROM events WHERE time < ?", (before,)).rowcount
