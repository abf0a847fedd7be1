"""Queue scale benchmark: SQLite enqueue and claim+record on an empty queue and at a million.

Usage::

    PYTHONPATH=src python bench/queue_scale.py [--messages 1000000] [--size 2048]
        [--dir DIR] [--fill-seconds 240] [--keep]

The fill writes rows straight into the database in big transactions (synchronous OFF:
it is set-up, not the thing measured), half of them queued and due, half deferred into
the next day, like a backlog after an upstream outage. Everything measured after that
goes through ``SQLiteQueue`` with fsync on, exactly as ``hato serve`` uses it:

* enqueue with 1, 20 and 100 concurrent callers (like SMTP sessions finishing DATA):
  msg/s, and per-call latency p50/p99;
* claim + record (4 workers, claims of 50, each message recorded as sent): msg/s;
* ``counts()``, and the start-up ``recover()`` after a crash (it sweeps every
  undelivered record) and after a clean stop (it does not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hato.message import Envelope
from hato.queue.base import Outcome, RecipientState, RecipientStatus, new_message_id
from hato.queue.sqlite import SQLiteQueue, _checksum, _encode_rcpt_state

ENVELOPE = Envelope("app@example.org", ["user@example.net"])


def payload(size: int, n: int) -> bytes:
    head = b"From: app@example.org\r\nTo: user@example.net\r\nSubject: bench %d\r\n\r\n" % n
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def fill(path: Path, count: int, size: int, budget: float) -> int:
    """Insert ``count`` messages directly; stop early when ``budget`` seconds are spent."""
    conn = sqlite3.connect(path, isolation_level=None)
    # Set-up only: no journal, no flushes. The queue turns WAL back on when it opens.
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    env_text = json.dumps(
        {"s": ENVELOPE.sender, "r": ENVELOPE.recipients, "m": {}}, separators=(",", ":")
    )
    env_bytes = env_text.encode()
    rcpt = _encode_rcpt_state([RecipientStatus(a) for a in ENVELOPE.recipients])
    now = time.time()
    started = time.monotonic()
    done = 0
    batch = 20_000
    while done < count:
        rows = []
        for i in range(done, min(count, done + batch)):
            created = now - 3600 - (count - i) * 0.001
            due = i % 2 == 0
            data = payload(size, i)
            rows.append(
                (
                    new_message_id(lambda c=created: c),
                    "queued" if due else "deferred",
                    created,
                    created if due else now + 3600 + (i % 86_400),
                    0 if due else 1,
                    None,
                    env_text,
                    rcpt,
                    _checksum(env_bytes, data),
                    data,
                )
            )
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (id, state, created_at, next_attempt_at, attempts,"
            " idempotency_key, envelope, rcpt_state, checksum, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
        done += len(rows)
        elapsed = time.monotonic() - started
        print(
            f"\r  fill: {done:>9,} / {count:,} messages, {done / elapsed:,.0f}/s",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if elapsed > budget:
            print(f"\n  fill: time budget of {budget:.0f} s spent", file=sys.stderr)
            break
    print(file=sys.stderr)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return done


async def enqueue_rate(q: SQLiteQueue, concurrency: int, total: int, size: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = iter(range(total))
    data = payload(size, 0)

    async def session() -> None:
        for _ in counter:
            t0 = time.perf_counter()
            await q.enqueue(ENVELOPE, data)
            latencies.append(time.perf_counter() - t0)

    tx0, calls0 = q.write_stats()
    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    tx, calls = q.write_stats()
    latencies.sort()
    return {
        "rate": total / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "batch": (calls - calls0) / max(1, tx - tx0),
    }


async def claim_record_rate(q: SQLiteQueue, total: int, workers: int = 4) -> float:
    done = 0

    async def worker(name: str) -> None:
        nonlocal done
        while done < total:
            claimed = await q.claim(owner=name, limit=50, lease_seconds=300)
            if not claimed:
                return
            await asyncio.gather(
                *(
                    q.record(
                        m.id,
                        [Outcome(a, RecipientState.SENT, "250 2.0.0 ok") for a in m.pending],
                        owner=name,
                        retry_at=None,
                    )
                    for m in claimed
                )
            )
            done += len(claimed)

    started = time.perf_counter()
    await asyncio.gather(*(worker(f"w{i}") for i in range(workers)))
    return done / (time.perf_counter() - started)


async def timed(coro: object) -> float:
    started = time.perf_counter()
    await coro  # type: ignore[misc]
    return time.perf_counter() - started


async def measure(path: Path, size: int, label: str, quick: bool) -> dict[str, object]:
    q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=True)
    open_s = await timed(q.open())
    recover_s = await timed(q.recover())
    result: dict[str, object] = {"label": label, "open": open_s, "recover": recover_s}
    try:
        for concurrency, total in ((1, 1000), (20, 4000), (100, 6000)):
            if quick:
                total //= 4
            r = await enqueue_rate(q, concurrency, total, size)
            result[f"enqueue c={concurrency}"] = r
            print(
                f"  {label}: enqueue c={concurrency:<3} {r['rate']:>7,.0f} msg/s"
                f"  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  {r['batch']:.1f}/commit",
                file=sys.stderr,
            )
        result["claim+record"] = await claim_record_rate(q, 2000 if quick else 8000)
        print(f"  {label}: claim+record {result['claim+record']:,.0f} msg/s", file=sys.stderr)
        result["counts"] = await timed(q.counts())
    finally:
        await q.close()
    again = SQLiteQueue(f"sqlite://{path}", str(path), fsync=True)
    await again.open()
    result["recover clean"] = await timed(again.recover())
    await again.close()
    return result


def table(rows: list[dict[str, object]]) -> str:
    def rate(row: dict[str, object], key: str) -> str:
        r = row[key]
        assert isinstance(r, dict)
        return f"{r['rate']:,.0f} ({r['p50']:.1f}/{r['p99']:.1f} ms)"

    header = (
        "| queue | enqueue c=1 | enqueue c=20 | enqueue c=100 | claim+record"
        " | counts() | recover() after crash / clean stop |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {rate(row, 'enqueue c=1')} | {rate(row, 'enqueue c=20')}"
            f" | {rate(row, 'enqueue c=100')} | {row['claim+record']:,.0f}"
            f" | {row['counts']:.3f} s | {row['recover']:.2f} s / {row['recover clean']:.2f} s |"
        )
    lines.append("")
    lines.append("enqueue: msg/s (p50/p99 latency per call), fsync on; claim+record: msg/s")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--fill-seconds", type=float, default=240.0)
    parser.add_argument("--quick", action="store_true", help="fewer measured messages")
    parser.add_argument("--keep", action="store_true", help="keep the database files")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="hato-bench-", dir=args.dir))
    try:
        rows = []
        print("empty queue", file=sys.stderr)
        rows.append(await measure(base / "empty.db", args.size, "empty", args.quick))

        big = base / "big.db"
        q = SQLiteQueue(f"sqlite://{big}", str(big))
        await q.open()  # creates the schema
        await q.close()
        print(f"filling to {args.messages:,} messages of {args.size} bytes", file=sys.stderr)
        started = time.monotonic()
        filled = fill(big, args.messages, args.size, args.fill_seconds)
        print(
            f"  filled {filled:,} in {time.monotonic() - started:.0f} s,"
            f" {os.path.getsize(big) / 2**30:.2f} GiB",
            file=sys.stderr,
        )
        label = f"{filled / 1e6:g} M" if filled >= 100_000 else f"{filled:,}"
        rows.append(await measure(big, args.size, label, args.quick))
        print(table(rows))
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
