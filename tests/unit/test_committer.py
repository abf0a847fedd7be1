"""The committer of several processes (hato.committer): its frames and their contents
round trip, errors come back as the same class, and a client and a server on a real
Unix socket (no SMTP, no queue: the commit is a table) carry concurrent requests,
survive a server that goes away and reconnect."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Sequence

import pytest

from hato.committer import (
    COMMIT,
    ERROR,
    OK,
    UNSENT,
    CommitterClient,
    CommitterServer,
    FrameError,
    bind_committer,
    commit_header,
    decode_frame,
    encode_frame,
    envelope_from_json,
    envelope_to_json,
    error_from_json,
    error_to_json,
    read_commit,
)
from hato.errors import HatoError, MessageNotFound, QueueDamaged, QueueError, QueueFullError
from hato.events import ACCEPTED, DeliveryEvent
from hato.message import META_AUTH_USER, META_ENVID, META_REQUIRETLS, Envelope

FULL = Envelope(
    sender="søren@bücher.example",
    recipients=["a@example.org", '"quoted local"@example.net', "ü@[192.0.2.1]"],
    client_address="2001:db8::1",
    client_helo="helo.example\udcff",  # a byte that was not UTF-8, kept by surrogateescape
    auth_user="alice",
    smtputf8=True,
    body_8bit=True,
    meta={META_ENVID: "env+2Did", META_AUTH_USER: "alice", META_REQUIRETLS: "yes", "x": ""},
)

EVENT = DeliveryEvent(
    event_id="ev1",
    event=ACCEPTED,
    time=1700000000.25,
    node="mx.example",
    queue_id="",
    recipient="a@example.org",
    envid="env-id",
    message_id="<m@example>",
    route="smtp",
    relay_host="helo.example",
    relay_ip="192.0.2.7",
    reply_code=250,
    reply_enhanced="2.0.0",
    reply_text="queued",
    tls_version="TLSv1.3",
)


def test_every_envelope_field_is_carried() -> None:
    assert set(envelope_to_json(FULL)) == {f.name for f in dataclasses.fields(Envelope)}


@pytest.mark.parametrize(
    "envelope", [FULL, Envelope(sender="", recipients=["postmaster@example.org"])]
)
def test_an_envelope_round_trips_through_a_frame(envelope: Envelope) -> None:
    body = bytes(range(256)) * 3 + b"\r\n.\r\n"
    frame = encode_frame(7, COMMIT, commit_header(envelope, [EVENT], True), body)
    decoded = decode_frame(frame[4:])
    assert (decoded.request_id, decoded.kind, decoded.body) == (7, COMMIT, body)
    got, events, held = read_commit(decoded.header)
    assert got == envelope
    assert events == [EVENT]
    assert held is True


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x00" * 5, "shorter"),
        (b"\x00" * 8 + b"\x09" + b"\x00\x00\x00\x00", "unknown frame kind"),
        (b"\x00" * 8 + b"\x03" + b"\x00\x00\x00\x09{}", "longer"),
        (b"\x00" * 8 + b"\x03" + b"\x00\x00\x00\x02[]", "not an object"),
        (b"\x00" * 8 + b"\x03" + b"\x00\x00\x00\x02{x", "does not parse"),
    ],
)
def test_a_damaged_frame_is_refused(payload: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode_frame(payload)


@pytest.mark.parametrize(
    "broken",
    [
        {"recipients": "a@example.org"},
        {"smtputf8": "yes"},
        {"meta": {"envid": 1}},
        {"recipients": [1]},
        {"auth_user": None},
    ],
)
def test_a_mistyped_envelope_is_refused(broken: dict[str, object]) -> None:
    with pytest.raises(FrameError):
        envelope_from_json({**envelope_to_json(FULL), **broken})


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (QueueFullError("disk full"), QueueFullError),
        (QueueDamaged("queue.db is damaged"), QueueDamaged),
        (MessageNotFound("Q1"), MessageNotFound),
        (QueueError("database down"), QueueError),
        (HatoError("refused"), HatoError),
        (RuntimeError("a bug"), QueueError),
    ],
)
def test_errors_come_back_as_the_same_class(raised: Exception, expected: type[HatoError]) -> None:
    got = error_from_json(error_to_json(raised))
    assert type(got) is expected
    assert str(raised) in str(got)


# --- a client and a server on a real Unix socket -------------------------------------------


class Table:
    """The delivery process's side, as a table: ids in order, or an error to raise."""

    def __init__(self) -> None:
        self.committed: list[tuple[Envelope, bytes, list[DeliveryEvent], bool]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def commit(
        self, envelope: Envelope, data: bytes, events: Sequence[DeliveryEvent], held: bool
    ) -> str:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.committed.append((envelope, data, list(events), held))
        return f"Q{len(self.committed)}"

    async def unsent(self) -> int:
        return len(self.committed)


@pytest.fixture
async def listening() -> AsyncIterator[tuple[socket.socket, str]]:
    sock, address = bind_committer()
    try:
        yield sock, address
    finally:
        sock.close()


async def serve(sock: socket.socket, table: Table) -> CommitterServer:
    # The server gets its own descriptor, as a forked delivery process does: closing it
    # leaves the supervisor's socket (and its backlog) open.
    server = CommitterServer(
        sock.dup(), commit=table.commit, unsent=table.unsent, drain_timeout=0.1
    )
    await server.start()
    return server


async def test_concurrent_requests_share_one_connection(
    listening: tuple[socket.socket, str],
) -> None:
    sock, address = listening
    table = Table()
    server = await serve(sock, table)
    client = CommitterClient(address)
    try:
        bodies = [b"message %d\r\n" % i for i in range(50)]
        ids = await asyncio.gather(
            *(client.commit(FULL, body, [EVENT], i % 2 == 0) for i, body in enumerate(bodies))
        )
        assert sorted(ids) == sorted(f"Q{i}" for i in range(1, 51))
        assert sorted(c[1] for c in table.committed) == sorted(bodies)
        assert all(c[0] == FULL and c[2] == [EVENT] for c in table.committed)
        assert await client.unsent() == 50
        assert server.commits == 50
    finally:
        await client.close()
        await server.aclose()


async def test_the_committers_error_is_raised_in_the_intake(
    listening: tuple[socket.socket, str],
) -> None:
    sock, address = listening
    table = Table()
    server = await serve(sock, table)
    client = CommitterClient(address)
    try:
        table.fail = QueueFullError("no space left on device")
        with pytest.raises(QueueFullError, match="no space left"):
            await client.commit(FULL, b"x", [], False)
        table.fail = None  # the connection is still good
        assert await client.commit(FULL, b"x", [], False) == "Q1"
    finally:
        await client.close()
        await server.aclose()


async def test_a_committer_gone_mid_request_is_a_queue_error_and_the_next_one_reconnects(
    listening: tuple[socket.socket, str],
) -> None:
    sock, address = listening
    table = Table()
    table.gate = asyncio.Event()  # the commit never returns: the process dies first
    server = await serve(sock, table)
    client = CommitterClient(address)
    try:
        waiting = asyncio.ensure_future(client.commit(FULL, b"lost", [], False))
        while not server._requests:  # the request arrived and its commit runs
            await asyncio.sleep(0.01)
        await server.aclose()  # as a killed delivery process: no answer
        with pytest.raises(QueueError) as caught:
            await waiting
        assert type(caught.value) is QueueError
        # A new delivery process on the supervisor's same socket.
        table.gate = None
        server = await serve(sock, table)
        assert await client.commit(FULL, b"next", [], False) == "Q1"
    finally:
        await client.close()
        await server.aclose()


async def test_a_request_waits_in_the_backlog_while_no_committer_runs(
    listening: tuple[socket.socket, str],
) -> None:
    sock, address = listening
    table = Table()
    client = CommitterClient(address)
    waiting = asyncio.ensure_future(client.commit(FULL, b"early", [], False))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    server = await serve(sock, table)  # the restarted delivery process takes it
    try:
        assert await asyncio.wait_for(waiting, 10) == "Q1"
    finally:
        await client.close()
        await server.aclose()


async def test_an_unreachable_committer_is_a_queue_error() -> None:
    client = CommitterClient("\0hato-committer-nobody-listens")
    with pytest.raises(QueueError, match="cannot be reached"):
        await client.commit(FULL, b"x", [], False)


def test_kinds_are_distinct() -> None:
    assert len({COMMIT, UNSENT, OK, ERROR}) == 4
