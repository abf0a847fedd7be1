"""The 8-bit → 7-bit converter: a table of messages, each parsed back with ``email``."""

from __future__ import annotations

import email
import email.message
import email.policy
import re

import pytest

from hato.mime7bit import NotConvertible, to_7bit

UTF8_PLAIN = "From: a@example.org\r\nTo: b@example.net\r\nSubject: Grüße aus Köln\r\n\r\nHällo Wörld\r\n".encode()

LABELLED = (
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\n"
    b"To: b@example.net\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    + "Ünïcödé body\r\n.\r\n..two dots\r\nFrom the start\r\ntrailing  \r\ntab\t\r\n\r\n".encode()
)

LATIN1 = b"From: a@example.org\r\nSubject: caf\xe9\r\n\r\ncaf\xe9 cr\xe8me\r\n"

LONG = (
    b"From: a@example.org\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "ü".encode() * 490 + b"\r\nx" * 3 + b"\r\n"
)


def multipart(inner: bytes, *, outer_cte: bytes = b"8bit") -> bytes:
    return (
        b"From: a@example.org\r\nTo: b@example.net\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n'
        b"Content-Transfer-Encoding: " + outer_cte + b"\r\n\r\n"
        b"This is a multipart message.\r\n"
        b"--outer\r\n" + inner + b"--outer--\r\nepilogue\r\n"
    )


MIXED = multipart(
    b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße\r\n".encode()
    + b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    + "<p>Grüße</p>\r\n".encode()
    + b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="' + "naïve.bin".encode() + b'"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"AAEC/w==\r\n"
)

ALREADY_7BIT = multipart(
    b"Content-Type: text/plain\r\n\r\nplain ascii\r\n", outer_cte=b"7bit"
).replace(b"Subject: parts", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=")


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def leaves(data: bytes) -> list[tuple[str, str | None, bytes]]:
    """(type, filename, decoded bytes with LF line ends) of every leaf part."""
    out = []
    for part in parse(data).walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), part.get_filename(), payload.replace(b"\r\n", b"\n")))
    return out


def headers(data: bytes) -> dict[str, list[str]]:
    msg = parse(data)
    skip = {"content-transfer-encoding", "mime-version", "content-type"}
    return {k.lower(): [str(v) for v in msg.get_all(k, [])] for k in msg if k.lower() not in skip}


def assert_wire_safe(data: bytes) -> None:
    assert data.isascii()
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None, "bare CR or LF"
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    ("name", "data", "charset"),
    [
        ("no MIME headers, UTF-8", UTF8_PLAIN, "utf-8"),
        ("labelled 8bit text", LABELLED, "utf-8"),
        ("no MIME headers, not UTF-8", LATIN1, "unknown-8bit"),
        ("lines far over 76", LONG, "utf-8"),
        ("LF line ends", UTF8_PLAIN.replace(b"\r\n", b"\n"), "utf-8"),
    ],
)
def test_single_part_becomes_quoted_printable(name: str, data: bytes, charset: str) -> None:
    out = to_7bit(data)
    assert_wire_safe(out)
    msg = parse(out)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_charset() == charset
    assert leaves(out) == leaves(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert headers(out) == headers(data)
    assert max(len(line) for line in out.partition(b"\r\n\r\n")[2].split(b"\r\n")) <= 76


def test_multipart_converts_only_its_8bit_parts() -> None:
    out = to_7bit(MIXED)
    assert_wire_safe(out)
    assert leaves(out) == leaves(MIXED)
    assert [p.get_filename() for p in parse(out).walk()][-1] == "naïve.bin"
    assert headers(out) == headers(MIXED)
    msg = parse(out)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    # Preamble, epilogue, boundaries and the base64 part are the same bytes as before.
    for kept in (b"This is a multipart message.\r\n", b"--outer--\r\nepilogue\r\n", b"AAEC/w=="):
        assert kept in out
    plain, html, _ = (p for p in msg.walk() if not p.is_multipart())
    assert plain["Content-Transfer-Encoding"] == html["Content-Transfer-Encoding"]
    assert html["Content-Transfer-Encoding"] == "quoted-printable"


def test_seven_bit_message_is_returned_as_is() -> None:
    assert to_7bit(ALREADY_7BIT) is ALREADY_7BIT


def test_only_headers_with_8bit_bytes_change() -> None:
    data = (
        b"Received: from x by y\r\nSubject: caf\xc3\xa9\r\nX-Long: "
        + b"a" * 200
        + b"\r\n\r\nok\r\n"
    )
    out = to_7bit(data)
    assert out.startswith(b"Received: from x by y\r\nSubject: =?utf-8?")
    assert b"X-Long: " + b"a" * 200 + b"\r\n\r\nok\r\n" in out
    assert parse(out)["Subject"] == "café"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            multipart(b"Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\nb\xc3\xa4\r\n"),
            "message/rfc822",
        ),
        (
            multipart(
                b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\r\n"
            ),
            "labelled base64",
        ),
        (
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nb\xc3\xa4=3D\r\n",
            "labelled quoted-printable",
        ),
        (multipart(b"\r\nok\r\n").replace(b"a multipart", b"a m\xc3\xbcltipart"), "preamble"),
        ("From: jörg@example.org\r\n\r\nx\r\n".encode(), "non-ASCII address"),
        ("To: Jörg <jörg@exämple.org>\r\n\r\nx\r\n".encode(), "non-ASCII address"),
        ("Message-ID: <ä@example.org>\r\n\r\nx\r\n".encode(), "Message-ID header"),
        (
            b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\n\xff\r\n--x--\r\n",
            "without a boundary",
        ),
    ],
)
def test_what_cannot_be_converted_says_why(data: bytes, reason: str) -> None:
    with pytest.raises(NotConvertible, match=re.escape(reason)):
        to_7bit(data)


def test_deep_nesting_is_refused() -> None:
    inner = b"Content-Type: text/plain\r\n\r\n\xc3\xa4\r\n"
    for depth in range(40):
        b = f"b{depth}".encode()
        inner = (
            b"Content-Type: multipart/mixed; boundary="
            + b
            + b"\r\n\r\n--"
            + b
            + b"\r\n"
            + inner
            + b"--"
            + b
            + b"--\r\n"
        )
    with pytest.raises(NotConvertible, match="nested"):
        to_7bit(inner)


SIGNATURE = (
    b"DKIM-Signature: v=1; a=rsa-sha256; d=elsewhere.example; s=s;\r\n\th=From : To; bh=x; b=y\r\n"
)


@pytest.mark.parametrize(
    "data",
    [
        SIGNATURE + b"From: a@elsewhere.example\r\n\r\nb\xc3\xa4\r\n",  # the body
        SIGNATURE + "From: Jörg <a@elsewhere.example>\r\n\r\nok\r\n".encode(),
        SIGNATURE.replace(b"To;", b"To:Subject;") + "Subject: Grüße\r\n\r\nok\r\n".encode(),
        # Adding a field that h= names breaks it too: h= signs that the field was absent.
        SIGNATURE.replace(b"To;", b"To:Content-Transfer-Encoding;") + b"\r\nb\xc3\xa4\r\n",
    ],
)
def test_a_signature_that_conversion_would_break_is_refused(data: bytes) -> None:
    with pytest.raises(NotConvertible, match=re.escape("DKIM signature of elsewhere.example")):
        to_7bit(data)


def test_a_signature_that_does_not_cover_the_change_is_kept() -> None:
    data = SIGNATURE + "Subject: Grüße\r\n\r\nok\r\n".encode()  # Subject is not in h=
    out = to_7bit(data)
    assert out.startswith(SIGNATURE)
    assert out.endswith(b"\r\n\r\nok\r\n")
    assert_wire_safe(out)
