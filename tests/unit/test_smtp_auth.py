"""Table tests for SASL decoding (PLAIN, LOGIN) and the static authenticator."""

from __future__ import annotations

import base64

import pytest

from hato.smtp.auth import (
    Credentials,
    StaticAuthenticator,
    decode_response,
    encode_plain,
    parse_login_text,
    parse_plain,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"=", b""),
        (b"YWxpY2U=", b"alice"),
        (b"AGFsaWNlAHMzY3JldA==", b"\0alice\0s3cret"),
        (b"", None),
        (b"*", None),
        (b"YWxpY2U", None),  # missing padding
        (b"YWx pY2U=", None),
        (b"YWxpY2U=YWxp", None),  # data after padding
        (b"!!!!", None),
        (b"A" * 12292, None),  # over RFC 4954's 12288
    ],
)
def test_decode_response(line: bytes, expected: bytes | None) -> None:
    assert decode_response(line) == expected


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b"\0alice\0s3cret", Credentials("", "alice", "s3cret")),
        (b"bob\0alice\0s3cret", Credentials("bob", "alice", "s3cret")),
        ("\0jörg\0pässword".encode(), Credentials("", "jörg", "pässword")),
        (b"\0alice\0", Credentials("", "alice", "")),
        (b"\0\0s3cret", None),  # no user
        (b"alice\0s3cret", None),  # two fields
        (b"\0a\0b\0c", None),  # four fields
        (b"\0alice\0\xff", None),  # not UTF-8
        (b"", None),
    ],
)
def test_parse_plain(blob: bytes, expected: Credentials | None) -> None:
    assert parse_plain(blob) == expected


def test_parse_login_text() -> None:
    assert parse_login_text(b"alice") == "alice"
    assert parse_login_text(b"a\0b") is None
    assert parse_login_text(b"\xc3") is None


def test_password_never_in_repr() -> None:
    assert "s3cret" not in repr(Credentials("", "alice", "s3cret"))


def test_encode_plain_roundtrip() -> None:
    text = encode_plain("alice", "s3cret", authzid="bob")
    assert base64.b64decode(text) == b"bob\0alice\0s3cret"
    blob = decode_response(text.encode())
    assert blob is not None
    assert parse_plain(blob) == Credentials("bob", "alice", "s3cret")


async def test_static_authenticator() -> None:
    auth = StaticAuthenticator({"alice": "s3cret"})
    assert await auth.authenticate("alice", "s3cret") == "alice"
    assert await auth.authenticate("alice", "s3cret", authzid="alice") == "alice"
    assert await auth.authenticate("alice", "s3cret", authzid="root") is None
    assert await auth.authenticate("alice", "S3cret") is None
    assert await auth.authenticate("mallory", "s3cret") is None
    assert await auth.authenticate("mallory", "\0unknown") is None
