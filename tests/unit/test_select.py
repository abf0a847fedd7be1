"""The shared message filter, its pages and bulk actions (hato.queue.select), on the memory queue."""

from __future__ import annotations

import pytest

from hato.errors import ConfigError
from hato.message import Envelope
from hato.queue.base import MessageState, Outcome, RecipientState, RecipientStatus, StoredMessage
from hato.queue.memory import MemoryQueue
from hato.queue.select import FilterError, MessageFilter, bulk, page, select, select_page
from hato.testing import FakeClock

NOW = 1_700_000_000.0


def message(
    id: str = "A1",
    sender: str = "app@example.org",
    recipients: tuple[str, ...] = ("a@example.net",),
    state: MessageState = MessageState.QUEUED,
    created_at: float = NOW - 10,
    last_reply: str = "",
) -> StoredMessage:
    return StoredMessage(
        id=id,
        sender=sender,
        recipients=[RecipientStatus(r) for r in recipients],
        data=b"",
        state=state,
        created_at=created_at,
        next_attempt_at=created_at,
        last_reply=last_reply,
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, MessageFilter()),
        ({"state": "held"}, MessageFilter(states=(MessageState.HELD,))),
        (
            {"state": "Held, deferred"},
            MessageFilter(states=(MessageState.HELD, MessageState.DEFERRED)),
        ),
        (
            {"state": ["sent", "failed"]},
            MessageFilter(states=(MessageState.SENT, MessageState.FAILED)),
        ),
        ({"older_than": "3600"}, MessageFilter(older_than=3600.0)),
        ({"older_than": 90}, MessageFilter(older_than=90.0)),
        ({"sender": " a@b.example "}, MessageFilter(sender="a@b.example")),
        ({"q": "", "domain": None}, MessageFilter()),
    ],
)
def test_filter_parses_query_keys_and_json(
    keys: dict[str, object], expected: MessageFilter
) -> None:
    assert MessageFilter.parse(keys) == expected


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"state": "lost"}, "unknown state 'lost'"),
        ({"state": 3}, "state must be"),
        ({"state": ["held", 3]}, "state must be"),
        ({"older_than": "soon"}, "older_than must be a number"),
        ({"older_than": -1}, "0 or more"),
        ({"older_than": "nan"}, "0 or more"),
        ({"older_than": True}, "older_than must be a number"),
        ({"sender": 5}, "sender must be text"),
        ({"colour": "red"}, "unknown filter key: colour"),
    ],
)
def test_filter_refuses_bad_values(keys: dict[str, object], fragment: str) -> None:
    with pytest.raises(FilterError, match=fragment) as caught:
        MessageFilter.parse(keys)
    assert isinstance(caught.value, ConfigError)  # the CLI prints it as one line


@pytest.mark.parametrize(
    ("keys", "matched"),
    [
        ({}, True),
        ({"state": "queued"}, True),
        ({"state": "held"}, False),
        ({"sender": "APP@example.org"}, True),
        ({"sender": "app@example"}, False),  # an address, not a fragment
        ({"recipient": "B@example.com"}, True),
        ({"recipient": "b@example"}, False),
        ({"domain": "example.com"}, True),
        ({"domain": "@EXAMPLE.NET"}, True),
        ({"domain": "example.org"}, False),  # the sender's domain is not a recipient's
        ({"older_than": 10}, True),
        ({"older_than": 11}, False),
        ({"q": "a1"}, True),
        ({"q": "mailbox full"}, True),
        ({"q": "b@example.com"}, True),
        ({"q": "nothing like it"}, False),
        ({"state": "queued", "domain": "example.net", "q": "full"}, True),
        ({"state": "queued", "domain": "example.net", "q": "empty"}, False),
    ],
)
def test_filter_matches(keys: dict[str, object], matched: bool) -> None:
    m = message(recipients=("a@example.net", "b@example.com"), last_reply="452 4.2.2 mailbox full")
    assert MessageFilter.parse(keys).matches(m, NOW) is matched


def test_filter_round_trips_through_json() -> None:
    f = MessageFilter.parse({"state": "held,sent", "q": "x", "older_than": 5})
    assert MessageFilter.parse(f.to_json()) == f
    assert MessageFilter().is_empty() and not f.is_empty()


def test_pages_follow_the_cursor_newest_first() -> None:
    messages = [message(id=f"M{i}", created_at=NOW - i) for i in range(5)]
    first, cursor = page(messages, limit=2)
    assert [m.id for m in first] == ["M0", "M1"] and cursor
    second, cursor = page(messages, limit=2, cursor=cursor)
    assert [m.id for m in second] == ["M2", "M3"]
    # A message of the page before leaves meanwhile: the cursor still points after M3.
    rest = [m for m in messages if m.id != "M3"]
    third, cursor = page(rest, limit=2, cursor=cursor)
    assert [m.id for m in third] == ["M4"] and cursor == ""
    with pytest.raises(FilterError):
        page(messages, limit=2, cursor="garbage")


async def _queue_with_mail(clock: FakeClock) -> tuple[MemoryQueue, dict[str, str]]:
    q = MemoryQueue(clock=clock)
    await q.open()
    ids = {}
    ids["held"] = await q.enqueue(
        Envelope("dev@example.org", ["x@example.net"]), b"S: 1\r\n\r\n1\r\n", held=True
    )
    clock.advance(100)
    ids["queued"] = await q.enqueue(
        Envelope("app@example.org", ["y@example.com"]), b"S: 2\r\n\r\n2\r\n"
    )
    clock.advance(100)
    ids["other"] = await q.enqueue(
        Envelope("app@example.org", ["z@example.net"]), b"S: 3\r\n\r\n3\r\n"
    )
    return q, ids


async def test_select_is_newest_first_and_narrowed_by_states() -> None:
    clock = FakeClock()
    q, ids = await _queue_with_mail(clock)
    everything = await select(q, MessageFilter(), now=clock())
    assert [m.id for m in everything] == [ids["other"], ids["queued"], ids["held"]]
    old = await select(q, MessageFilter(older_than=150), now=clock())
    assert [m.id for m in old] == [ids["held"]]
    none = await select(q, MessageFilter(states=(MessageState.SENT,)), states=[MessageState.HELD])
    assert none == []


async def test_bulk_dry_run_counts_and_acting_does_it() -> None:
    clock = FakeClock()
    q, ids = await _queue_with_mail(clock)
    example_net = MessageFilter(domain="example.net")
    # release applies to held messages only: one of the two at example.net.
    dry = await bulk(q, "release", example_net, dry_run=True, clock=clock)
    assert dry.to_json() == {"matched": 1} and dry.ids == (ids["held"],)
    assert (await q.get(ids["held"])).state is MessageState.HELD
    seen: list[tuple[int, int]] = []
    done = await bulk(
        q, "release", example_net, node="n1", progress=lambda *a: seen.append(a), clock=clock
    )
    assert done.to_json() == {"matched": 1, "done": 1} and seen == [(1, 1)]
    assert (await q.get(ids["held"])).state is MessageState.QUEUED
    released = (await q.events(queue_id=ids["held"])).events
    assert [(e.event, e.recipient, e.node) for e in released][-1] == (
        "released",
        "x@example.net",
        "n1",
    )

    deleted = await bulk(
        q, "delete", MessageFilter(sender="app@example.org"), node="n1", clock=clock
    )
    assert deleted.to_json() == {"matched": 2, "done": 2}
    assert [m.id for m in await q.list()] == [ids["held"]]
    gone = (await q.events(queue_id=ids["other"])).events
    assert [e.event for e in gone][-1] == "deleted"


async def test_bulk_retry_touches_queued_and_deferred_only() -> None:
    clock = FakeClock()
    q, ids = await _queue_with_mail(clock)
    claimed = await q.claim(owner="w", limit=10, lease_seconds=60)
    mine = next(m for m in claimed if m.id == ids["queued"])
    await q.record(
        mine.id,
        [_pending(mine, "451 4.3.0 try later")],
        owner="w",
        retry_at=clock() + 3600,
    )
    for m in claimed:
        if m.id != mine.id:
            await q.release(m.id, owner="w")
    result = await bulk(q, "retry", MessageFilter(), dry_run=True, clock=clock)
    assert result.matched == 2  # the deferred one and the queued one; not the held one
    assert set(result.ids) == {ids["queued"], ids["other"]}
    with pytest.raises(FilterError):
        await bulk(q, "bounce", MessageFilter(), clock=clock)  # type: ignore[arg-type]


def _pending(m: StoredMessage, reply: str) -> Outcome:
    return Outcome(m.recipients[0].address, RecipientState.PENDING, reply)


class CountingQueue(MemoryQueue):
    """The memory queue, remembering the limit of each ``list``."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.limits: list[int] = []

    async def list(self, *, states=None, limit=100):  # type: ignore[no-untyped-def]
        self.limits.append(limit)
        return await super().list(states=states, limit=limit)


async def test_select_page_reads_only_as_much_as_the_page_needs() -> None:
    clock = FakeClock()
    q = CountingQueue(clock)
    await q.open()
    ids = []
    for n in range(700):
        domain = "rare.example" if n % 10 == 0 else "example.com"
        ids.append(await q.enqueue(Envelope("a@example.org", [f"u{n}@{domain}"]), b"x\r\n"))
        clock.advance(1)
    first, cursor = await select_page(q, MessageFilter(), limit=50, now=clock())
    assert [m.id for m in first] == ids[::-1][:50] and cursor
    assert q.limits == [256]  # the newest 256 held the page

    q.limits.clear()
    rare = MessageFilter(domain="rare.example")
    got: list[str] = []
    cursor = ""
    for _ in range(10):
        chunk, cursor = await select_page(q, rare, limit=30, cursor=cursor, now=clock())
        got += [m.id for m in chunk]
        if not cursor:
            break
    assert got == [i for n, i in enumerate(ids) if n % 10 == 0][::-1]
    assert len(got) == 70
    assert max(q.limits) == 1024  # doubled until the queue was read to its end
