"""One damaged row, page or file never stops the SQLite queue (issue 8, item 1).

Every column of a row is damaged in every way a torn write, a bad sector or a careless
hand can leave it (text that is not UTF-8, the wrong type, NULL where NOT NULL was
declared), then a page of an index or of the table, then random bytes anywhere in the
file. Whatever happens, the rows that can be read are delivered and the rest are
quarantined or reported; nothing raises anything but a Hato error with a way out.
"""

from __future__ import annotations

import io
import os
import random
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.router import RouteKind, Router
from hato.errors import MessageNotFound, QueueDamaged
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.base import MessageState
from hato.queue.retry import RetrySchedule
from hato.queue.sqlite import SQLiteQueue
from hato.queue.sqlite_check import check, repair
from hato.reply import Reply
from hato.worker import Worker

ENV = Envelope("a@example.org", ["b@example.net"])
DATA = b"Subject: t\r\n\r\n" + b"line of body text\r\n" * 40
BAD_UTF8 = "CAST(X'5B5B22FF' AS TEXT)"  # the reproduction of issue 8: '[["' and 0xFF

# column -> ways to damage it (SQL expressions written over the stored value)
DAMAGE: dict[str, Sequence[str]] = {
    # Numbers written into TEXT columns become text (column affinity); blobs stay blobs.
    "id": (BAD_UTF8, "NULL", "X'3432'"),
    "state": (BAD_UTF8, "NULL", "'qu-eued'", "7"),
    "created_at": (BAD_UTF8, "NULL", "'yesterday'"),
    "next_attempt_at": (BAD_UTF8, "NULL", "'now'"),
    "attempts": (BAD_UTF8, "NULL", "-1", "1.5", "'two'"),
    "last_reply": (BAD_UTF8, "NULL", "X'35'"),
    "lease_owner": (BAD_UTF8, "NULL", "X'00'"),
    "lease_until": (BAD_UTF8, "NULL", "'never'"),
    "idempotency_key": (BAD_UTF8, "X'33'"),
    "envelope": (BAD_UTF8, "NULL", "X'7B7D'", "'[]'", '\'{"s":"","r":[],"m":{}}\''),
    "rcpt_state": (BAD_UTF8, "NULL", "12", "'[' || replace(hex(zeroblob(3000)), '0', '[')"),
    "checksum": (BAD_UTF8, "NULL", "'sum'"),
    "data": (BAD_UTF8, "NULL", "'text, not bytes'"),
}
CASES = [(column, how) for column, ways in DAMAGE.items() for how in ways]


def write_cell(path: Path, seq: int, column: str, expr: str) -> None:
    """Write ``expr`` over one cell, NOT NULL or not: the schema is relaxed for the
    write (as a flipped type byte in the record would do) and put back after."""
    conn = sqlite3.connect(path, isolation_level=None)
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()
    _set_schema(conn, sql.replace(" NOT NULL", ""))
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"UPDATE messages SET {column} = {expr} WHERE seq = ?", (seq,))
    _set_schema(conn, sql)
    conn.close()


def _set_schema(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute("PRAGMA writable_schema = ON")
    (version,) = conn.execute("PRAGMA schema_version").fetchone()
    conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'messages'", (sql,))
    conn.execute(f"PRAGMA schema_version = {version + 1}")
    conn.execute("PRAGMA writable_schema = OFF")


def seq_of(path: Path, message_id: str) -> int:
    with sqlite3.connect(path) as conn:
        (seq,) = conn.execute("SELECT seq FROM messages WHERE id = ?", (message_id,)).fetchone()
    return int(seq)


def settle(path: Path) -> None:
    """Copy the WAL into the database file: the damage below must hit what is read."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()


def overwrite_page(path: Path, page: int, seed: int) -> None:
    settle(path)
    with open(path, "r+b") as f:
        f.seek((page - 1) * 8192)
        f.write(random.Random(seed).randbytes(8192))


def root_page(path: Path, name: str) -> int:
    settle(path)
    with sqlite3.connect(path) as conn:
        (page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()
    return int(page)


def make(path: Path) -> SQLiteQueue:
    return SQLiteQueue(f"sqlite://{path}", str(path), fsync=False)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
async def queue(path: Path) -> AsyncIterator[SQLiteQueue]:
    q = make(path)
    await q.open()
    yield q
    await q.close()


async def claim_all(q: SQLiteQueue) -> list[str]:
    return sorted(m.id for m in await q.claim(owner="w", limit=100, lease_seconds=60))


@pytest.mark.parametrize(("column", "how"), CASES, ids=[f"{c}={h[:20]}" for c, h in CASES])
async def test_any_damaged_column_quarantines_its_row_only(
    queue: SQLiteQueue, path: Path, column: str, how: str
) -> None:
    ids = [await queue.enqueue(ENV, DATA, idempotency_key=f"k{n}") for n in range(3)]
    bad = ids[1]
    seq = seq_of(path, bad)
    write_cell(path, seq, column, how)
    shown = bad if column != "id" else f"#{seq}"
    quarantined: list[tuple[str, str]] = []
    queue.on_quarantine = lambda mid, why: quarantined.append((mid, why))

    # Listing never fails, and shows the damaged row as what it is (a listing does not
    # read the bytes, so damage to them and their checksum shows once a claim met it).
    listed = {m.id: m for m in await queue.list()}
    assert set(listed) == {ids[0], ids[2], shown}
    if column not in ("checksum", "data"):
        assert listed[shown].state is MessageState.QUARANTINED
        assert listed[shown].last_reply.startswith("quarantined: ")

    # This spool never ran recover(): the start-up sweep checks every undelivered row
    # (quick_check is for a spool whose last process crashed).
    report = await queue.recover()
    assert report.quarantined == [shown]
    assert report.integrity == ""
    counts = await queue.counts()
    assert counts[MessageState.QUARANTINED] == 1 and sum(counts.values()) == 3

    assert await claim_all(queue) == sorted([ids[0], ids[2]])
    msg = await queue.get(shown)
    assert msg.state is MessageState.QUARANTINED
    assert msg.last_reply.startswith("quarantined: ")
    await queue.delete(shown)
    with pytest.raises(MessageNotFound):
        await queue.get(shown)


@pytest.mark.parametrize(
    "column", ["rcpt_state", "envelope", "id", "attempts", "last_reply", "data"]
)
async def test_claim_quarantines_a_damaged_row_without_a_start_up_sweep(
    queue: SQLiteQueue, path: Path, column: str
) -> None:
    """Damage at rest on a cleanly stopped spool: claim meets it, quarantines it, says so
    through on_quarantine, and hands out the rest."""
    await queue.recover()
    ids = [await queue.enqueue(ENV, DATA) for _ in range(3)]
    seq = seq_of(path, ids[0])
    write_cell(path, seq, column, BAD_UTF8)
    quarantined: list[tuple[str, str]] = []
    queue.on_quarantine = lambda mid, why: quarantined.append((mid, why))
    assert await claim_all(queue) == sorted(ids[1:])
    shown = ids[0] if column != "id" else f"#{seq}"
    label = {"rcpt_state": "recipient state"}.get(column, column)
    assert quarantined == [(shown, f"{label} is not valid UTF-8")]
    assert (await queue.counts())[MessageState.QUARANTINED] == 1


class Recorder:
    """A courier that accepts everything and remembers what it delivered."""

    name = "relay.test"

    def __init__(self) -> None:
        self.delivered: list[bytes] = []

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: object = None,
    ) -> list[DeliveryResult]:
        self.delivered.append(data)
        return [
            DeliveryResult(r, Result.OK, Reply(250, "2.0.0", "ok"), relay="relay.test")
            for r in recipients
        ]

    async def close(self) -> None:
        return None


def worker_for(q: SQLiteQueue, courier: Recorder, log: io.StringIO) -> Worker:
    return Worker(
        q,
        {RouteKind.RELAY: courier},  # type: ignore[dict-item]
        Router((), RouteKind.RELAY),
        RetrySchedule(min_delay=60, max_delay=600, max_lifetime=3600),
        MailLog(log),
        hostname="mx.example.org",
        owner="mx.example.org/1/w",
        batch_size=50,
    )


async def test_issue_8_one_bad_rcpt_state_among_20(path: Path) -> None:
    """The reproduction: 20 messages, one rcpt_state made invalid UTF-8, restart. Before,
    every claim failed ('Could not decode to UTF-8 column') and 0 of 20 went out."""
    q = make(path)
    await q.open()
    await q.recover()
    ids = [await q.enqueue(ENV, DATA + b"%d" % n) for n in range(20)]
    await q.close()
    write_cell(path, seq_of(path, ids[7]), "rcpt_state", BAD_UTF8)

    q = make(path)
    await q.open()
    try:
        assert (await q.recover()).quarantined == []  # a clean stop: no sweep
        courier, log = Recorder(), io.StringIO()
        worker = worker_for(q, courier, log)
        while await worker.run_once():
            pass
        assert len(courier.delivered) == 19
        assert (await q.counts())[MessageState.SENT] == 19
        [line] = [x for x in log.getvalue().splitlines() if "quarantined" in x]
        assert f"{ids[7]}: event=quarantined" in line
        assert "recipient state is not valid UTF-8" in line
        [shown] = await q.list(states=[MessageState.QUARANTINED])
        assert shown.last_reply == "quarantined: recipient state is not valid UTF-8"
    finally:
        await q.close()


async def test_a_damaged_due_index_is_rebuilt_and_delivery_goes_on(path: Path) -> None:
    """Writes through a damaged index fail (SQLite cannot even drop it); the queue
    rebuilds it in place from the table and every message is delivered."""
    q = make(path)
    await q.open()
    await q.recover()
    ids = [await q.enqueue(ENV, DATA) for _ in range(300)]
    await q.close()
    overwrite_page(path, root_page(path, "messages_due"), seed=1)

    q = make(path)
    await q.open()
    try:
        await q.recover()  # clean stop: no quick_check; the damage is met by claim
        claimed = []
        while batch := await q.claim(owner="w", limit=64, lease_seconds=60):
            claimed += [m.id for m in batch]
        assert sorted(claimed) == sorted(ids)
        assert (await q.enqueue(ENV, DATA)) not in ids
    finally:
        await q.close()
    report = check(str(path))
    assert report.healthy, report
    assert report.leaked_pages > 0  # the old index's pages, until --repair
    done = repair(str(path))
    assert (done.copied, done.quarantined, done.lost) == (301, [], [])
    after = check(str(path))
    assert after.healthy and after.leaked_pages == 0
    assert sum(after.counts.values()) == 301


async def test_check_reports_progress_on_a_big_queue(path: Path) -> None:
    q = make(path)
    await q.open()
    for _ in range(2500):
        await q.enqueue(ENV, b"x")
    await q.close()
    seen: list[tuple[int, int]] = []
    report = check(str(path), progress=lambda done, total: seen.append((done, total)))
    assert report.healthy and sum(report.counts.values()) == 2500
    assert seen == [(1000, 2500), (2000, 2500)]


def leave_behind_in_due_index(path: Path, message_id: str) -> None:
    """Lease a row behind the due index's back: its old entry stays (as damage to that
    entry would leave it), naming the row as due although the table says leased."""
    settle(path)
    conn = sqlite3.connect(path, isolation_level=None)
    row = conn.execute(
        "SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master WHERE name = 'messages_due'"
    ).fetchone()
    conn.execute("PRAGMA writable_schema = ON")
    (version,) = conn.execute("PRAGMA schema_version").fetchone()
    conn.execute("DELETE FROM sqlite_master WHERE name = 'messages_due'")
    conn.execute(f"PRAGMA schema_version = {version + 1}")
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "UPDATE messages SET state = 'sending', lease_owner = 'x', lease_until = 4e9,"
        " next_attempt_at = 4e9 WHERE id = ?",
        (message_id,),
    )
    conn.execute("PRAGMA writable_schema = ON")
    (version,) = conn.execute("PRAGMA schema_version").fetchone()
    conn.execute("INSERT INTO sqlite_master VALUES (?, ?, ?, ?, ?)", row)
    conn.execute(f"PRAGMA schema_version = {version + 1}")
    conn.close()


async def test_a_stale_due_index_entry_never_hands_a_leased_row_out_again(path: Path) -> None:
    """Found by the random damage below: a due-index entry left pointing at a row that
    is leased made every claim hand that row out again (a delivery loop)."""
    q = make(path)
    await q.open()
    await q.recover()
    ids = [await q.enqueue(ENV, DATA) for _ in range(3)]
    await q.close()
    leave_behind_in_due_index(path, ids[0])
    assert check(str(path)).problems  # integrity_check sees the index disagree

    q = make(path)
    await q.open()
    try:
        assert await claim_all(q) == sorted(ids[1:])
        assert await claim_all(q) == []
        assert (await q.get(ids[0])).lease_owner == "x"
    finally:
        await q.close()
    assert check(str(path)).healthy


async def test_a_damaged_table_page_costs_only_the_rows_on_it(path: Path) -> None:
    q = make(path)
    await q.open()
    await q.recover()
    ids = [await q.enqueue(ENV, DATA) for _ in range(300)]
    await q.close()
    settle(path)
    with sqlite3.connect(path) as conn:
        # A leaf page of the table in the middle of the file.
        (page,) = conn.execute(
            "SELECT max(pageno) FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'"
            " AND pageno < (SELECT max(pageno) FROM dbstat) / 2"
        ).fetchone()
    overwrite_page(path, page, seed=2)

    q = make(path)
    await q.open()
    lost: list[tuple[str, str]] = []
    q.on_quarantine = lambda mid, why: lost.append((mid, why))
    try:
        await q.recover()
        claimed: list[str] = []
        while batch := await q.claim(owner="w", limit=64, lease_seconds=60):
            claimed += [m.id for m in batch]
        assert 0 < len(claimed) < len(ids) and set(claimed) < set(ids)
        assert lost and all(mid.startswith("#") for mid, _ in lost)
        assert all("malformed" in why for _, why in lost)
        assert len(claimed) + len(lost) >= len(ids) - 1  # a row may fall on a page boundary
        assert await q.claim(owner="w", limit=64, lease_seconds=60) == []
        listed = await q.list(limit=1000)
        assert {m.id for m in listed} >= set(claimed)
        counts = await q.counts()
        assert counts[MessageState.SENDING] == len(claimed)
    finally:
        await q.close()


async def test_quick_check_after_an_unclean_stop_stops_on_a_damaged_table(path: Path) -> None:
    q = make(path)
    await q.open()
    await q.recover()
    for _ in range(300):
        await q.enqueue(ENV, DATA)
    await q._stop()  # a crash: no clean mark
    overwrite_page(path, root_page(path, "messages"), seed=3)

    q = make(path)
    await q.open()
    try:
        with pytest.raises(QueueDamaged) as caught:
            await q.recover()
    finally:
        await q.close()
    text = str(caught.value)
    assert text.startswith(f"the queue database {path} is damaged: quick_check found damage: ")
    assert text.endswith("; run hato queue check --repair")
    assert "\n" not in text


async def test_quick_check_after_an_unclean_stop_rebuilds_a_damaged_index(path: Path) -> None:
    q = make(path)
    await q.open()
    await q.recover()
    ids = [await q.enqueue(ENV, DATA) for _ in range(300)]
    await q._stop()
    overwrite_page(path, root_page(path, "messages_state"), seed=4)

    q = make(path)
    await q.open()
    try:
        report = await q.recover()
        assert report.integrity.startswith(
            "quick_check after an unclean stop: ok; damaged index messages_state rebuilt"
        )
        assert report.quarantined == []
        assert (await q.counts())[MessageState.QUEUED] == len(ids)
    finally:
        await q.close()


async def test_a_file_that_is_not_a_database_is_refused_in_one_line(path: Path) -> None:
    path.write_bytes(b"this is not SQLite" * 1000)
    with pytest.raises(QueueDamaged) as caught:
        await make(path).open()
    assert str(caught.value) == (
        f"the queue database {path} is damaged: file is not a database;"
        " run hato queue check --repair"
    )


@pytest.mark.parametrize("how", ["empty", "missing"])
async def test_an_emptied_spool_is_not_replaced_by_an_empty_queue(path: Path, how: str) -> None:
    q = make(path)
    await q.open()
    await q.enqueue(ENV, DATA)
    await q.close()
    assert Path(f"{path}.hato").read_text().startswith("hato queue ")
    for leftover in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    if how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(QueueDamaged) as caught:
        await make(path).open()
    state = "empty (0 bytes)" if how == "empty" else "missing"
    assert str(caught.value) == (
        f"the queue database {path} is {state}, but a queue existed there ({path}.hato):"
        f" restore it from a backup, or delete {path}.hato to start with an empty queue"
    )
    Path(f"{path}.hato").unlink()  # the operator's choice: start afresh
    q = make(path)
    await q.open()
    try:
        assert await q.list() == []
    finally:
        await q.close()


async def test_another_queues_file_in_its_place_is_refused(tmp_path: Path) -> None:
    one, two = tmp_path / "one" / "queue.db", tmp_path / "two" / "queue.db"
    for p in (one, two):
        q = make(p)
        await q.open()
        await q.close()
    for p in (two, one):
        settle(p)
    for suffix in ("-wal", "-shm"):
        Path(f"{one}{suffix}").unlink(missing_ok=True)
    os.replace(two, one)
    with pytest.raises(QueueDamaged, match=r"says queue \w+ was there: if it is another"):
        await make(one).open()


# -- random damage ------------------------------------------------------------------


def body(n: int) -> bytes:
    return DATA + b"%d\r\n" % n


class Ticks:
    """A clock that moves one second per reading: the same file, byte for byte, on
    every run (with the ids below), so each seed damages the same bytes."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def _fill(path: Path, n: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    serial = iter(range(1, 1_000_000))
    monkeypatch.setattr(
        "hato.queue.sqlite.new_message_id", lambda clock: f"{int(clock()):011X}{next(serial):08X}"
    )
    q = SQLiteQueue(f"sqlite://{path}", str(path), fsync=False, clock=Ticks())
    await q.open()
    await q.recover()
    ids = [await q.enqueue(ENV, body(i), idempotency_key=f"k{i}") for i in range(n)]
    for m in await q.claim(owner="w", limit=5, lease_seconds=60):  # some history
        await q.release(m.id, owner="w")
    await q.close()
    return ids


FLIPS = (1, 2, 3, 20, 200)


def _flip(path: Path, rng: random.Random, flips: int) -> None:
    settle(path)
    data = bytearray(path.read_bytes())
    for _ in range(flips):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


class Outcome:
    def __init__(self) -> None:
        self.delivered: set[bytes] = set()
        self.listed: list[str] = []
        self.repaired = False
        self.lost_in_repair = 0


async def _run_like_serve(path: Path) -> Outcome:
    """Start as hato serve does (open, recover), claim until nothing is due, list and
    count; on a refused start, repair as the message says and start once more."""
    outcome = Outcome()
    for attempt in (1, 2):
        q = make(path)
        try:
            await q.open()
            await q.recover()
            for _ in range(50):
                batch = await q.claim(owner="w", limit=20, lease_seconds=600)
                if not batch:
                    break
                outcome.delivered |= {m.data for m in batch}
            else:
                raise AssertionError("claim never ran dry")
            outcome.listed = [m.id for m in await q.list(limit=1000)]
            await q.counts()
            return outcome
        except QueueDamaged as exc:
            assert attempt == 1, f"still refused after --repair: {exc}"
            assert "hato queue check --repair" in str(exc), exc
        finally:
            await q.close()
        done = repair(str(path))
        outcome.repaired = True
        outcome.lost_in_repair = len(done.lost)
        assert Path(done.kept_as).exists()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(60))
async def test_random_damage_never_stops_the_queue(
    path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flip random bits anywhere in the file. Whatever they hit, a start either runs or
    stops with the repair line, and runs after the repair; claims run dry (no loop);
    nothing torn is ever delivered; every message is delivered, still listed (under its
    id, or as a damaged row), or reported lost (by the repair or by hato queue check).
    Only Hato errors."""
    rng = random.Random(seed)
    ids = await _fill(path, 30, monkeypatch)
    flips = rng.choice(FLIPS)
    _flip(path, rng, flips)

    outcome = await _run_like_serve(path)

    originals = {body(i): mid for i, mid in enumerate(ids)}
    assert outcome.delivered <= set(originals), "a damaged message was delivered"
    delivered = {originals[d] for d in outcome.delivered}
    unaccounted = set(ids) - delivered - set(outcome.listed)
    others = [m for m in outcome.listed if m not in originals.values()]
    if outcome.repaired and not outcome.listed and not outcome.delivered:
        return  # nothing of the file read as a database: it is kept aside, see above
    if flips > 20:
        return  # so many bits: a row can vanish from every structure that named it
    # Rows that damage took out of the table's view are reported by hato queue check.
    reported = check(str(path)).lost
    assert len(unaccounted) <= len(others) + outcome.lost_in_repair + len(reported), (
        unaccounted,
        others,
        reported,
    )
