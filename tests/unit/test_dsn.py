"""DSN bounces (RFC 3464): structure, fields, and the never-bounce-a-bounce rule."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest

from hato.dsn import FailedRecipient, build_bounce, remote_mta_of, status_of
from hato.reply import Reply

ORIGINAL = (
    b"From: App <noreply@example.org>\r\n"
    b"To: user@example.net\r\n"
    b"Subject: Reset your password\r\n"
    b"Message-ID: <abc@example.org>\r\n"
    b"\r\n"
    b"secret reset link\r\n"
)
UNKNOWN = FailedRecipient(
    "user@example.net", Reply(550, "5.1.1", "User unknown"), "relay.example.net[192.0.2.1]:587"
)


def bounce(**kwargs: object) -> bytes:
    args: dict[str, object] = {
        "hostname": "mx.example.org",
        "queue_id": "0193A2F4C11B7E2",
        "sender": "noreply@example.org",
        "recipients": [UNKNOWN],
        "original": ORIGINAL,
        "arrival": 1_700_000_000.0,
        "now": 1_700_000_060.0,
    }
    args.update(kwargs)
    result = build_bounce(**args)  # type: ignore[arg-type]
    assert result is not None
    return result.data


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_null_sender_gets_no_bounce() -> None:
    assert (
        build_bounce(
            hostname="mx.example.org",
            queue_id="Q",
            sender="",
            recipients=[UNKNOWN],
            original=ORIGINAL,
            arrival=0.0,
            now=1.0,
        )
        is None
    )


def test_nothing_to_report_gets_no_bounce() -> None:
    assert (
        build_bounce(
            hostname="h",
            queue_id="Q",
            sender="a@b.example",
            recipients=[],
            original=b"",
            arrival=0,
            now=0,
        )
        is None
    )


def test_envelope_is_null_sender_to_original_sender() -> None:
    result = build_bounce(
        hostname="mx.example.org",
        queue_id="Q1",
        sender="noreply@example.org",
        recipients=[UNKNOWN],
        original=ORIGINAL,
        arrival=0.0,
        now=1.0,
    )
    assert result is not None
    assert result.envelope.sender == ""
    assert result.envelope.recipients == ["noreply@example.org"]
    assert result.envelope.meta["dsn_for"] == "Q1"


def test_structure_is_multipart_report() -> None:
    msg = parse(bounce())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["To"] == "<noreply@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"].endswith("@mx.example.org>")


def test_delivery_status_fields() -> None:
    msg = parse(bounce())
    status = msg.get_payload()[1]
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_recipient["Final-Recipient"] == "rfc822; user@example.net"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; relay.example.net"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"


def test_original_headers_only_never_the_body() -> None:
    data = bounce()
    headers = parse(data).get_payload()[2].get_payload()
    assert "Subject: Reset your password" in headers
    assert b"secret reset link" not in data


def test_wire_form_is_crlf_only() -> None:
    data = bounce(original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_several_recipients_and_local_failures() -> None:
    local = FailedRecipient("other@example.net", Reply(451, "4.4.1", "connect: refused"), "")
    msg = parse(bounce(recipients=[UNKNOWN, local], reason="Gave up after 5 days."))
    blocks = msg.get_payload()[1].get_payload()
    assert len(blocks) == 3
    assert blocks[2]["Final-Recipient"] == "rfc822; other@example.net"
    assert blocks[2]["Status"] == "4.4.1"  # given up on a temporary error, like Postfix
    assert blocks[2]["Remote-MTA"] is None
    human = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "Gave up after 5 days." in human
    assert "<user@example.net>: host relay.example.net[192.0.2.1]:587 said: 550 5.1.1" in human


def test_hostile_reply_text_cannot_inject_headers() -> None:
    evil = FailedRecipient("u@example.net", Reply(550, "5.0.0", "no\r\nBcc: victim@example.com"))
    data = bounce(recipients=[evil])
    assert b"\r\nBcc:" not in data
    blocks = parse(data).get_payload()[1].get_payload()
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.0.0 no Bcc: victim@example.com"


def test_boundary_avoids_crafted_original_headers() -> None:
    first = bounce()
    boundary = parse(first).get_boundary()
    assert boundary
    crafted = f"X-Trap: --{boundary}\r\n".encode() + ORIGINAL
    msg = parse(bounce(original=crafted))
    assert msg.get_boundary() != boundary
    assert len(msg.get_payload()) == 3


def test_utf8_recipient_uses_utf8_address_type() -> None:
    r = FailedRecipient("jürgen@example.net", Reply(550, "5.1.1", "unknown"))
    blocks = parse(bounce(recipients=[r])).get_payload()[1].get_payload()
    assert blocks[1]["Final-Recipient"] == "utf-8; j\\x{FC}rgen@example.net"


def test_delayed_report() -> None:
    r = FailedRecipient("u@example.net", Reply(451, "4.4.1", "later"), action="delayed")
    msg = parse(bounce(recipients=[r]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg.get_payload()[1].get_payload()[1]["Action"] == "delayed"


@pytest.mark.parametrize(
    ("reply", "action", "expected"),
    [
        (Reply(550, "5.1.1", "x"), "failed", "5.1.1"),
        (Reply(550, "", "x"), "failed", "5.0.0"),
        (Reply(451, "", "x"), "failed", "4.0.0"),
        (Reply(554, "bogus", "x"), "failed", "5.0.0"),
        (Reply(250, "", "odd"), "failed", "5.0.0"),
        (Reply(550, "5.1.1", "x"), "delayed", "4.1.1"),
    ],
)
def test_status_of(reply: Reply, action: str, expected: str) -> None:
    assert status_of(reply, action) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("relay", "expected"),
    [
        ("relay.example.net[192.0.2.1]:587", "relay.example.net"),
        ("127.0.0.1[127.0.0.1]:25", "127.0.0.1"),
        ("hold", ""),
        ("", ""),
    ],
)
def test_remote_mta_of(relay: str, expected: str) -> None:
    assert remote_mta_of(relay) == expected


# RFC 3461: ENVID, ORCPT, RET and the other actions.


def test_envid_and_orcpt_are_reported() -> None:
    orcpt = FailedRecipient(
        "user@example.net", Reply(550, "5.1.1", "User unknown"), orcpt="rfc822;Old+x@example.net"
    )
    msg = parse(bounce(recipients=[orcpt], envid="QQ 1=x"))
    per_message, per_recipient = msg.get_payload()[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "QQ+201+3Dx"
    assert per_recipient["Original-Recipient"] == "rfc822;Old+x@example.net"


def test_no_envid_no_orcpt_no_fields() -> None:
    per_message, per_recipient = parse(bounce()).get_payload()[1].get_payload()
    assert per_message["Original-Envelope-Id"] is None
    assert per_recipient["Original-Recipient"] is None


def test_ret_full_returns_the_whole_message() -> None:
    data = bounce(ret="FULL")
    parts = parse(data).get_payload()
    assert parts[2].get_content_type() == "message/rfc822"
    (inner,) = parts[2].get_payload()
    assert inner["Subject"] == "Reset your password"
    assert b"secret reset link" in data


def test_ret_full_of_a_large_message_returns_headers() -> None:
    big = ORIGINAL + b"x" * 60_000 + b"\r\n"
    data = bounce(ret="FULL", original=big)
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"secret reset link" not in data


def test_ret_hdrs_returns_headers() -> None:
    data = bounce(ret="HDRS")
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"secret reset link" not in data


@pytest.mark.parametrize("action", ["relayed", "delivered"])
def test_success_reports(action: str) -> None:
    ok = FailedRecipient(
        "user@example.net",
        Reply(250, "2.0.0", "Ok: queued as X"),
        "relay.example.net[192.0.2.1]:587" if action == "relayed" else "maildir",
        action,  # type: ignore[arg-type]
    )
    data = bounce(recipients=[ok], ret="FULL")
    msg = parse(data)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    per_recipient = msg.get_payload()[1].get_payload()[1]
    assert per_recipient["Action"] == action
    assert per_recipient["Status"] == "2.0.0"
    # RET applies to failure reports only (RFC 3461 4.3).
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"secret reset link" not in data


def test_delayed_report_keeps_the_4xx_status() -> None:
    late = FailedRecipient(
        "user@example.net", Reply(451, "4.4.1", "Connection refused"), action="delayed"
    )
    msg = parse(bounce(recipients=[late]))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    per_recipient = msg.get_payload()[1].get_payload()[1]
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.4.1"
