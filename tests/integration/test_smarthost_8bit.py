"""8-bit mail to a next hop without 8BITMIME: converted to 7 bit, or returned with 5.6.3.

The next hop is Debian's Postfix told not to offer 8BITMIME or SMTPUTF8
(``smtpd_discard_ehlo_keywords``); it relays what it gets to a recording sink, where the
message is parsed back with ``email``.
"""

from __future__ import annotations

import email
import email.message
import email.policy
from collections.abc import Callable, Mapping
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.dkim import dkim_txt_records, generate_key, load_signers
from peers.postfix import PostfixInstance
from peers.sinks import RecordingSink
from peers.verify import dkimpy_verdicts, mail_dkim_lines

SUBJECT = "Grüße aus Köln — 8 bit"
BODY = "Hällo Wörld,\r\n.\r\nein Punkt oben, ü am Ende ü\r\n"
PLAIN = (
    "From: Jörg <joerg@example.org>\r\n"
    "To: someone@example.net\r\n"
    f"Subject: {SUBJECT}\r\n"
    "Message-ID: <8bit-1@example.org>\r\n"
    "\r\n" + BODY
).encode()
MULTIPART = (
    b"From: app@example.org\r\nTo: someone@example.net\r\nSubject: parts\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + BODY.encode()
    + b"--b1\r\nContent-Type: text/csv; charset=utf-8\r\n"
    b'Content-Disposition: attachment; filename="' + "übersicht.csv".encode() + b'"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    + "name;ort\r\nJörg;Köln\r\n".encode()
    + b"--b1--\r\n"
)


@pytest.fixture
def relay_without_8bitmime(
    postfix_relay_with: Callable[[Mapping[str, str]], PostfixInstance],
) -> PostfixInstance:
    return postfix_relay_with({"smtpd_discard_ehlo_keywords": "8bitmime, smtputf8, chunking"})


def courier(relay: PostfixInstance) -> SmarthostCourier:
    return SmarthostCourier(
        SmarthostConfig(host="127.0.0.1", port=relay.port("smtp"), tls="none", timeout=30.0)
    )


async def deliver(relay: PostfixInstance, data: bytes, sender: str) -> DeliveryResult:
    c = courier(relay)
    [res] = await c.deliver(sender, ["someone@example.net"], data)
    await c.close()
    return res


async def relayed(
    relay: PostfixInstance, sink: RecordingSink, data: bytes, sender: str = "app@example.org"
) -> bytes:
    """What the sink behind ``relay`` got when Hato sent it ``data``."""
    res = await deliver(relay, data, sender)
    assert res.result is Result.OK, res.reply
    [got] = sink.wait_for_count(1, timeout=30)
    return got.data


async def returned(relay: PostfixInstance, data: bytes, sender: str) -> str:
    """The text of the 5.6.3 that Hato gave instead of sending ``data`` to ``relay``."""
    res = await deliver(relay, data, sender)
    assert res.result is Result.PERMANENT
    assert (res.reply.code, res.reply.enhanced) == (554, "5.6.3")
    assert "does not offer 8BITMIME" in res.reply.text
    assert "from=<" not in relay.log()  # no MAIL was sent
    return res.reply.text


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


async def test_8bit_subject_and_body_are_converted(
    relay_without_8bitmime: PostfixInstance, recording_sink: RecordingSink
) -> None:
    data = await relayed(relay_without_8bitmime, recording_sink, PLAIN)
    assert data.isascii()
    msg = parse(data)
    assert msg["Subject"] == SUBJECT
    assert msg["From"] == "Jörg <joerg@example.org>"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content().replace("\r\n", "\n") == BODY.replace("\r\n", "\n")


async def test_each_8bit_part_of_a_multipart_is_converted(
    relay_without_8bitmime: PostfixInstance, recording_sink: RecordingSink
) -> None:
    data = await relayed(relay_without_8bitmime, recording_sink, MULTIPART)
    assert data.isascii()
    text, table = parse(data).iter_parts()
    # The line break before a boundary belongs to the boundary (RFC 2046 5.1.1).
    assert text.get_content().replace("\r\n", "\n") == BODY.replace("\r\n", "\n")[:-1]
    assert table.get_filename() == "übersicht.csv"
    assert table.get_content().replace("\r\n", "\n") == "name;ort\nJörg;Köln"
    assert {p["Content-Transfer-Encoding"] for p in (text, table)} == {"quoted-printable"}


async def test_our_signature_on_8bit_mail_survives_the_hop(
    relay_without_8bitmime: PostfixInstance, recording_sink: RecordingSink, tmp_path: Path
) -> None:
    generate_key("example.org", "hato-rsa", "rsa", directory=tmp_path)
    generate_key("example.org", "hato-ed", "ed25519", directory=tmp_path)
    zone = {f"{r.name}.": r.txt for r in dkim_txt_records(tmp_path)}
    signed = load_signers(tmp_path).sign(PLAIN)
    data = await relayed(relay_without_8bitmime, recording_sink, signed, "joerg@example.org")
    assert data.isascii()
    assert parse(data)["Subject"] == SUBJECT
    assert dkimpy_verdicts(data, zone) == [True, True]
    assert "example.org hato-rsa rsa-sha256 pass" in mail_dkim_lines(data, zone)


async def test_a_foreign_signature_is_not_broken_but_returned(
    relay_without_8bitmime: PostfixInstance, tmp_path: Path
) -> None:
    generate_key("elsewhere.example", "s1", "rsa", directory=tmp_path, bits=1024)
    [key] = load_signers(tmp_path).keys
    message = PLAIN.replace(b"example.org", b"elsewhere.example")
    signature = dkim.sign(message, b"s1", b"elsewhere.example", key.private, linesep=b"\r\n")
    why = await returned(relay_without_8bitmime, signature + message, "joerg@elsewhere.example")
    assert "DKIM signature of elsewhere.example" in why


async def test_an_unconvertible_message_is_returned(
    relay_without_8bitmime: PostfixInstance,
) -> None:
    forwarded = (
        b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n"
        b"\r\n--x\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n"
        + "größer\r\n".encode()
        + b"--x--\r\n"
    )
    assert "message/rfc822" in await returned(relay_without_8bitmime, forwarded, "a@example.org")


async def test_a_next_hop_with_8bitmime_gets_the_bytes_unchanged(
    postfix_plain_relay: PostfixInstance, recording_sink: RecordingSink
) -> None:
    data = await relayed(postfix_plain_relay, recording_sink, PLAIN)
    assert f"Subject: {SUBJECT}\r\n".encode() in data
    assert data.endswith(b"\r\n\r\n" + BODY.encode())
