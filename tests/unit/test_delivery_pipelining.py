"""The reply reader of pipelined sessions (RFC 2920): :class:`ReplyParser`, by table."""

from __future__ import annotations

import pytest

from hato.delivery.session import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ProtocolViolation,
    ReplyParser,
    _dot_stuffed,
)


def parse(*chunks: bytes) -> list[list[tuple[int, str]]]:
    """The replies completed by each chunk in turn."""
    parser = ReplyParser()
    return [[(r.code, r.message) for r in parser.feed(chunk)] for chunk in chunks]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param(
            [b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go ahead\r\n"],
            [[(250, "2.1.0 OK"), (250, "2.1.5 OK"), (354, "go ahead")]],
            id="several-replies-in-one-chunk",
        ),
        pytest.param(
            [b"250 2.1", b".0 OK\r", b"\n550 5.1.1 no", b" such user\r\n"],
            [[], [], [(250, "2.1.0 OK")], [(550, "5.1.1 no such user")]],
            id="reply-split-across-chunks",
        ),
        pytest.param(
            [b"550-5.7.1 first\r\n550-5.7.1 second\r\n", b"550 5.7.1 third\r\n250 OK\r\n"],
            [[], [(550, "5.7.1 first\n5.7.1 second\n5.7.1 third"), (250, "OK")]],
            id="multi-line-reply",
        ),
        pytest.param([b"250\r\n", b"354\n"], [[(250, "")], [(354, "")]], id="code-only-lf-only"),
        pytest.param([b""], [[]], id="nothing"),
    ],
)
def test_replies_are_parsed_in_order(
    chunks: list[bytes], expected: list[list[tuple[int, str]]]
) -> None:
    assert parse(*chunks) == expected


@pytest.mark.parametrize(
    ("chunks", "why"),
    [
        pytest.param([b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n"], "line too long", id="long-line"),
        pytest.param([b"250 " + b"x" * MAX_REPLY_LINE], "line too long", id="long-partial"),
        pytest.param([b"250-x\r\n" * (MAX_REPLY_LINES + 1)], "reply too long", id="too-many-lines"),
        pytest.param([b"250-" + b"x" * 8000 + b"\r\n"] * 5, "reply too long", id="long-reply"),
        pytest.param([b"hello\r\n"], "malformed", id="not-a-code"),
        pytest.param([b"25 OK\r\n"], "malformed", id="short-code"),
        pytest.param([b"250OK\r\n"], "malformed", id="no-separator"),
    ],
)
def test_bad_replies_are_violations(chunks: list[bytes], why: str) -> None:
    parser = ReplyParser()
    with pytest.raises(ProtocolViolation, match=why):
        for chunk in chunks:
            parser.feed(chunk)


def test_partial_says_whether_a_reply_is_under_way() -> None:
    parser = ReplyParser()
    assert not parser.partial
    parser.feed(b"250-first\r\n")
    assert parser.partial
    parser.feed(b"250 last\r\n")
    assert not parser.partial
    parser.feed(b"25")
    assert parser.partial


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".\n.\r.\r\n", b"..\r\n..\r\n..\r\n.\r\n"),  # bare LF and CR become CRLF first
        (b"no end", b"no end\r\n.\r\n"),
        (b"", b"\r\n.\r\n"),
    ],
)
def test_body_is_crlf_and_dot_stuffed(data: bytes, wire: bytes) -> None:
    assert _dot_stuffed(data) == wire
