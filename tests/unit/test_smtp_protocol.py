"""Tests of the sans-IO server's API and of properties the dialogs cannot show well:
chunking never changes the outcome, big messages, waiting states, the limits."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from hato import reply
from hato.smtp.policy import Policy, parse_networks
from hato.smtp.protocol import (
    Authenticate,
    Close,
    Event,
    MessageComplete,
    Rejected,
    Send,
    ServerSession,
    SessionConfig,
    _has_long_line,
)

TRUSTING = Policy(mynetworks=parse_networks(["0.0.0.0/0"]))


def new_session(**config: object) -> ServerSession:
    return ServerSession(
        SessionConfig(hostname="mx.test", **config),  # type: ignore[arg-type]
        TRUSTING,
        client_ip="192.0.2.1",
        clock=lambda: 0.0,
    )


def drive(session: ServerSession, chunks: list[bytes]) -> tuple[bytes, list[bytes], bool]:
    """Feed chunks, accept every message; return (server bytes, messages, closed)."""
    out = bytearray()
    messages: list[bytes] = []
    closed = False
    for chunk in chunks:
        pending: list[Event] = list(session.receive(chunk))
        while pending:
            event = pending.pop(0)
            if isinstance(event, Send):
                out += event.reply.to_bytes()
            elif isinstance(event, MessageComplete):
                messages.append(event.data)
                pending.extend(session.message_accepted(f"ID{len(messages)}"))
            elif isinstance(event, Close):
                closed = True
    return bytes(out), messages, closed


TRANSACTION = (
    b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\n"
    b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    b".\r\nQUIT\r\n"
)


@pytest.mark.parametrize(
    "stream",
    [
        TRANSACTION,
        TRANSACTION.replace(b"line\r\n", b"li\nne\r\n"),
        TRANSACTION.replace(b"line\r\n", b"li\rne\r\n"),
        TRANSACTION.replace(b"line\r\n.\r\n", b"line\r\n.\r"),
        TRANSACTION.replace(b"line\r\n", b"li\0ne\r\n"),
        TRANSACTION.replace(b"EHLO c\r\n", b"EHLO c\n"),
    ],
    ids=["clean", "bare-lf", "bare-cr", "cr-at-end", "nul", "lf-command"],
)
def test_chunking_never_changes_the_outcome(stream: bytes) -> None:
    whole = drive(new_session(), [stream])
    for size in (1, 2, 3, 5, 7, 64):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert drive(new_session(), chunks) == whole, f"chunk size {size}"
    for cut in range(len(stream)):
        assert drive(new_session(), [stream[:cut], stream[cut:]]) == whole, f"cut at {cut}"


def test_clean_transaction_result() -> None:
    out, messages, closed = drive(new_session(), [TRANSACTION])
    assert closed
    assert out.count(b"250 2.0.0 Ok: queued as ") == 2
    assert messages[0].endswith(b"Subject: x\r\n\r\n.dot\r\nline\r\n")
    assert messages[1].endswith(b"+0000\r\n")  # empty message: just our Received header


def test_large_message_in_chunks() -> None:
    session = new_session()
    drive(session, [b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"])
    line = b"x" * 76 + b"\r\n"
    body = line * (5 * 1024 * 1024 // len(line))
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] + [b".\r\n"]
    out, messages, _ = drive(session, chunks)
    assert out == b"250 2.0.0 Ok: queued as ID1\r\n"
    assert messages[0].endswith(body)


def test_ending_a_large_message_copies_it_once() -> None:
    # 4 MiB in lines of 998 octets: few lines, so the line-length check's own list of
    # lines is about one more copy for a moment.
    session = new_session()
    drive(session, [b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"])
    line = b"z" * 996 + b"\r\n"
    body = line * (4 * 1024 * 1024 // len(line))
    for i in range(0, len(body), 65536):
        assert session.receive(body[i : i + 65536]) == []
    tracemalloc.start()
    try:
        events = session.receive(b".\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [message] = [e for e in events if isinstance(e, MessageComplete)]
    assert message.data.endswith(body)
    # Beyond the bytes already buffered: the message to queue, and the list of lines while
    # they are checked. Slicing, copying, unstuffing and prepending the Received header
    # one after the other held three copies at once.
    assert peak < 2.5 * len(body)
    # And the session's buffer does not keep the message's size.
    assert session._buf.__alloc__() < 64 * 1024


def test_oversize_data_is_not_kept_in_memory() -> None:
    session = new_session(max_message_size=100_000)
    drive(session, [b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"])
    line = b"y" * 98 + b"\r\n"
    for _ in range(5000):
        assert session.receive(line) == []
        assert len(session._buf) < 200_000
    out, messages, closed = drive(session, [b".\r\nNOOP\r\n"])
    assert out == b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 OK\r\n"
    assert messages == [] and not closed


def test_input_waits_while_an_answer_is_outstanding() -> None:
    session = new_session()
    events = session.receive(
        b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert isinstance(events[-1], MessageComplete)
    assert session.waiting
    assert session.receive(b"NOOP\r\n") == []
    assert session.receive(b"QUIT\r\n") == []
    events = session.message_accepted("Q1")
    assert [e.reply for e in events if isinstance(e, Send)] == [
        reply.queued_as("Q1"),
        reply.NOOP_OK,
        reply.BYE,
    ]
    assert isinstance(events[-1], Close)
    assert session.closed
    assert session.receive(b"NOOP\r\n") == []
    assert session.message_accepted("Q2") == []
    assert session.auth_result("x") == []


def test_message_rejected_logs_and_resets() -> None:
    session = new_session()
    session.receive(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    events = session.receive(b"x\r\n.\r\nRCPT TO:<c@example.net>\r\n")
    assert isinstance(events[-1], MessageComplete)
    events = session.message_rejected(reply.STORAGE_FULL)
    assert events[0] == Rejected("END-OF-MESSAGE", reply.STORAGE_FULL, "a@example.com")
    assert [e.reply for e in events if isinstance(e, Send)] == [reply.STORAGE_FULL, reply.NEED_MAIL]


def test_envelope_facts() -> None:
    session = new_session()
    events = session.receive(
        b"EHLO c.example\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n"
        b"RCPT TO:<b@example.net>\r\nDATA\r\n\xc3\xa9\r\n.\r\n"
    )
    complete = events[-1]
    assert isinstance(complete, MessageComplete)
    env = complete.envelope
    assert (env.sender, env.recipients, env.client_address, env.client_helo) == (
        "a@example.com",
        ["b@example.net"],
        "192.0.2.1",
        "c.example",
    )
    assert env.smtputf8 and env.body_8bit and env.auth_user == ""
    assert "data" not in repr(complete).split("envelope=")[0]


def test_authenticate_event_hides_password() -> None:
    event = Authenticate("PLAIN", "", "alice", "s3cret")
    assert "s3cret" not in repr(event)


@pytest.mark.parametrize(
    ("data", "limit", "long"),
    [
        (b"", 10, False),
        (b"\r\n123456789\r\n", 10, True),
        (b"\r\n12345678\r\n", 10, False),
        (b"\r\n12345678\r\n123456789\r\n", 10, True),
        (b"\r\n" + b"x" * 998 + b"\r\n", 1000, False),
        (b"\r\n" + b"x" * 999 + b"\r\n", 1000, True),
    ],
)
def test_long_line_detection(data: bytes, limit: int, long: bool) -> None:
    assert _has_long_line(data, limit) is long


def test_long_line_detection_skips_our_own_header_lines() -> None:
    ours = b"Received: from a long name indeed\r\n\tby mx.test;\r\n"
    assert _has_long_line(ours + b"short\r\n", 10, skip=2) is False
    assert _has_long_line(ours + b"short\r\n", 10) is True
    assert _has_long_line(ours + b"123456789\r\n", 10, skip=2) is True


def test_greeting_has_no_enhanced_code() -> None:
    assert new_session().greeting().to_bytes() == b"220 mx.test ESMTP Hato\r\n"


def test_recipient_limit_counts_distinct_accepted_recipients() -> None:
    session = new_session(max_recipients=2)
    out, _, _ = drive(
        session,
        [
            b"HELO c\r\nMAIL FROM:<a@example.com>\r\n"
            + b"RCPT TO:<b@example.net>\r\n" * 3
            + b"RCPT TO:<c@example.net>\r\nRCPT TO:<d@example.net>\r\n"
        ],
    )
    assert out.endswith(b"250 2.1.5 Recipient OK\r\n452 4.5.3 Too many recipients\r\n")
    assert session.recipients == ["b@example.net", "c@example.net"]


def test_hot_path_speed() -> None:
    """A 2 KiB message transaction must cost well under a millisecond of parsing."""
    body = (b"x" * 70 + b"\r\n") * 28
    stream = (
        b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        + body
        + b".\r\nQUIT\r\n"
    )
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        session = new_session()
        session.greeting()
        for event in session.receive(stream):
            if isinstance(event, MessageComplete):
                session.message_accepted("X")
    elapsed = time.perf_counter() - started
    assert elapsed / n < 0.001, f"{elapsed / n * 1e6:.0f} µs per session"


def test_a_size_limit_of_zero_means_no_limit() -> None:
    """``HATO_MESSAGE_SIZE_LIMIT=0`` (documented as no limit) accepts any size and says a
    bare ``SIZE`` in EHLO (RFC 1870: no fixed maximum), instead of refusing everything."""
    session = new_session(max_message_size=0)
    body = b"x" * 998 + b"\r\n"
    out, messages, _ = drive(
        session,
        [
            b"EHLO c\r\nMAIL FROM:<a@example.com> SIZE=50000000\r\nRCPT TO:<b@example.net>\r\n"
            b"DATA\r\n" + body * 2000 + b".\r\nQUIT\r\n"
        ],
    )
    assert b"250-SIZE\r\n" in out
    assert b"552" not in out and len(messages) == 1
    assert messages[0].endswith(body * 2000)


def _bdat(chunk: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n%s" % (len(chunk), b" LAST" if last else b"", chunk)


BDAT_TRANSACTION = (
    b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
    + _bdat(b"Subject: x\r\n\r\n.\r\nQUIT\r\n")
    + _bdat(b"RSET\r\nlast line", last=True)
    + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.net>\r\n"
    + _bdat(b"ab\nQUIT\r\n", last=True)
    + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.net>\r\n"
    + _bdat(b"", last=True)
    + b"QUIT\r\n"
)


def test_bdat_chunking_never_changes_the_outcome() -> None:
    whole = drive(new_session(), [BDAT_TRANSACTION])
    out, messages, closed = whole
    assert closed
    assert out.count(b"250 2.0.0 Ok: queued as ") == 2
    assert b"554 5.6.11 " in out
    assert messages[0].endswith(b"+0000\r\nSubject: x\r\n\r\n.\r\nQUIT\r\nRSET\r\nlast line\r\n")
    assert messages[1].endswith(b"+0000\r\n")
    for size in (1, 2, 3, 5, 7, 64):
        chunks = [BDAT_TRANSACTION[i : i + size] for i in range(0, len(BDAT_TRANSACTION), size)]
        assert drive(new_session(), chunks) == whole, f"chunk size {size}"
    for cut in range(len(BDAT_TRANSACTION)):
        halves = [BDAT_TRANSACTION[:cut], BDAT_TRANSACTION[cut:]]
        assert drive(new_session(), halves) == whole, f"cut at {cut}"


def test_oversize_bdat_is_not_kept_in_memory() -> None:
    session = new_session(max_message_size=100_000)
    start = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
    drive(session, [start + b"BDAT 500000 LAST\r\n"])
    line = b"y" * 98 + b"\r\n"
    for _ in range(4999):
        assert session.receive(line) == []
        assert len(session._buf) < 200_000 and len(session._bdat_body) == 0
    out, messages, closed = drive(session, [line + b"NOOP\r\n"])
    assert out == b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 OK\r\n"
    assert messages == [] and not closed


def test_large_bdat_message_in_many_chunks() -> None:
    session = new_session()
    drive(session, [b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"])
    line = b"x" * 76 + b"\r\n"
    body = line * (5 * 1024 * 1024 // len(line))
    out, messages, _ = drive(session, [_bdat(body[:1_000_000]), _bdat(body[1_000_000:], True)])
    assert out == b"250 2.0.0 1000000 octets received\r\n250 2.0.0 Ok: queued as ID1\r\n"
    assert messages[0].endswith(body)


@pytest.mark.parametrize(
    "command",
    [
        b"BDAT",
        b"BDAT x",
        b"BDAT -1",
        b"BDAT +5",
        b"BDAT 10 FIRST",
        b"BDAT 10 LAST x",
        b"BDAT 1234567890123456789",
        b"BDAT \xd9\xa3",
        b"BDAT 1e3",
    ],
)
def test_bdat_with_a_bad_size_closes_the_connection(command: bytes) -> None:
    start = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
    out, messages, closed = drive(new_session(), [start + command + b"\r\nNOOP\r\n"])
    assert closed and messages == []
    assert out.endswith(b"\r\n501 5.5.4 Syntax: BDAT chunk-size [LAST], closing connection\r\n")
