"""Upstream faults against a real hato serve: down then back, 4xx retried, 5xx bounced.

The upstream is a recording aiosmtpd sink that can be stopped, restarted on the same
port, and scripted to answer 4xx/5xx at RCPT or DATA. Retry delays are shortened through
settings (``HATO_RETRY_MIN_DELAY`` and friends), never by patching.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import smtplib
import uuid
from collections.abc import Sequence

from peers.hato import HatoFactory, HatoServe
from peers.sinks import Received, RecordingSink

SENDER = "app@dbmx.net"
QUEUED_RE = re.compile(r"queued as (\S+)")


def relay_env(sink: RecordingSink) -> dict[str, str]:
    return {
        "RELAYHOST": sink.relayhost,
        "HATO_RELAY_TLS": "none",
        "ALLOWED_SENDER_DOMAINS": "dbmx.net",
    }


def send(hato: HatoServe, recipients: Sequence[str], tag: str, *, sender: str = SENDER) -> str:
    message = (
        f"From: <{sender}>\r\nTo: {', '.join(recipients)}\r\nSubject: fault test\r\n"
        f"Message-ID: <{tag}@test.dbmx.net>\r\nX-Test-Tag: {tag}\r\n\r\nbody {tag}\r\n"
    ).encode()
    with smtplib.SMTP(hato.host, hato.port, timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail(sender)
        assert code == 250, reply
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        code, reply = client.data(message)
        assert code == 250, reply
    match = QUEUED_RE.search(reply.decode())
    assert match, reply
    return match.group(1)


def with_tag(messages: Sequence[Received], tag: str) -> list[Received]:
    return [m for m in messages if m.header("X-Test-Tag") == tag]


def test_upstream_down_defers_then_delivers_when_back(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    recording_sink.stop()
    hato = hato_serve(env=relay_env(recording_sink))
    tag = uuid.uuid4().hex

    queue_id = send(hato, ["user@example.org"], tag)

    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=deferred", timeout=30)
    items = hato.queue_list()
    assert any(item["id"] == queue_id for item in items), items

    recording_sink.start()
    messages = recording_sink.wait_for(
        lambda ms: bool(with_tag(ms, tag)), timeout=30, what="delivery after the upstream came back"
    )
    assert len(with_tag(messages, tag)) == 1
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=sent", timeout=10)
    hato.wait_for_queue(
        lambda items: all(
            i["id"] != queue_id or i["state"] in ("sent", "delivered") for i in items
        ),
        timeout=10,
        what=f"{queue_id} delivered",
    )


def test_upstream_4xx_at_rcpt_is_retried_then_delivered(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    recording_sink.fail_rcpt("450 4.2.1 Mailbox busy, try again", times=2)
    hato = hato_serve(env=relay_env(recording_sink))
    tag = uuid.uuid4().hex

    queue_id = send(hato, ["busy@example.org"], tag)

    recording_sink.wait_for(lambda ms: bool(with_tag(ms, tag)), timeout=30, what="retried")
    assert [r[0] for r in recording_sink.rejections] == ["rcpt", "rcpt"]
    deferred = hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=deferred", timeout=5)
    assert "450" in deferred.string and "4.2.1" in deferred.string, deferred.string
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=sent", timeout=10)


def test_upstream_4xx_at_data_is_retried_then_delivered(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    recording_sink.fail_data("451 4.3.0 Temporary local problem", times=1)
    hato = hato_serve(env=relay_env(recording_sink))
    tag = uuid.uuid4().hex

    queue_id = send(hato, ["data4xx@example.org"], tag)

    messages = recording_sink.wait_for(lambda ms: bool(with_tag(ms, tag)), timeout=30)
    assert len(with_tag(messages, tag)) == 1
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=deferred.*451", timeout=5)
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=sent", timeout=10)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def assert_is_dsn_for(bounce: Received, *, failed: str, reply_code: str, original_tag: str) -> None:
    assert bounce.mail_from == "", "a DSN must have the null envelope sender"
    assert bounce.rcpt_tos == (SENDER,)
    msg = parse(bounce.data)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert len(parts) >= 2, [p.get_content_type() for p in parts]
    assert parts[1].get_content_type() == "message/delivery-status"
    status_text = bytes(parts[1]).decode(errors="replace")
    assert re.search(rf"Final-Recipient:\s*rfc822;\s*{re.escape(failed)}", status_text, re.I), (
        status_text
    )
    assert re.search(r"Action:\s*failed", status_text, re.I), status_text
    assert re.search(rf"Status:\s*{re.escape(reply_code)}", status_text), status_text
    assert "Diagnostic-Code:" in status_text, status_text
    # The original message (or its headers) goes back with the report.
    assert original_tag in bounce.data.decode(errors="replace")


def test_upstream_5xx_at_rcpt_bounces_a_dsn_to_the_sender(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    bad = "nobody@example.org"
    recording_sink.fail_rcpt(
        f"550 5.1.1 <{bad}>: Recipient address rejected: User unknown", address=bad
    )
    hato = hato_serve(env=relay_env(recording_sink))
    tag = uuid.uuid4().hex

    queue_id = send(hato, [bad], tag)

    bounced = hato.wait_for_log(
        rf"{re.escape(queue_id)}: .*to=<{re.escape(bad)}>.*status=bounced", timeout=30
    )
    assert "550" in bounced.string and "5.1.1" in bounced.string, bounced.string
    messages = recording_sink.wait_for(
        lambda ms: any(m.mail_from == "" for m in ms), timeout=30, what="the DSN"
    )
    bounces = [m for m in messages if m.mail_from == ""]
    assert len(bounces) == 1
    assert_is_dsn_for(bounces[0], failed=bad, reply_code="5.1.1", original_tag=tag)
    assert not with_tag([m for m in messages if m.mail_from != ""], tag)


def test_mixed_outcome_delivers_good_and_bounces_bad(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    good, bad = "good@example.org", "gone@example.org"
    recording_sink.fail_rcpt("550 5.1.1 No such user", address=bad)
    hato = hato_serve(env=relay_env(recording_sink))
    tag = uuid.uuid4().hex

    queue_id = send(hato, [good, bad], tag)

    messages = recording_sink.wait_for(
        lambda ms: bool(with_tag(ms, tag)) and any(m.mail_from == "" for m in ms),
        timeout=30,
        what="the delivery to the good recipient and the DSN for the bad one",
    )
    delivered = [m for m in with_tag(messages, tag) if m.mail_from == SENDER]
    assert len(delivered) == 1
    assert delivered[0].rcpt_tos == (good,)
    bounces = [m for m in messages if m.mail_from == ""]
    assert len(bounces) == 1
    assert_is_dsn_for(bounces[0], failed=bad, reply_code="5.1.1", original_tag=tag)
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*to=<{re.escape(good)}>.*status=sent", timeout=10)
    hato.wait_for_log(
        rf"{re.escape(queue_id)}: .*to=<{re.escape(bad)}>.*status=bounced", timeout=10
    )


def test_upstream_5xx_at_data_bounces(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    recording_sink.fail_data("554 5.6.0 Message content rejected", times=1)
    hato = hato_serve(env=relay_env(recording_sink))
    tag = uuid.uuid4().hex
    rcpt = "content@example.org"

    queue_id = send(hato, [rcpt], tag)

    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=bounced.*554", timeout=30)
    messages = recording_sink.wait_for(
        lambda ms: any(m.mail_from == "" for m in ms), timeout=30, what="the DSN"
    )
    assert_is_dsn_for(
        next(m for m in messages if m.mail_from == ""),
        failed=rcpt,
        reply_code="5.6.0",
        original_tag=tag,
    )


def test_no_dsn_for_a_bounce_with_null_sender(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """A message with the null sender that bounces is logged, never bounced again (no loops)."""
    bad = "loop@example.org"
    recording_sink.fail_rcpt("550 5.1.1 No such user", address=bad)
    env = relay_env(recording_sink)
    del env["ALLOWED_SENDER_DOMAINS"]  # the null sender has no domain to allow
    hato = hato_serve(env=env)
    tag = uuid.uuid4().hex

    queue_id = send(hato, [bad], tag, sender="")

    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=bounced", timeout=30)
    # Prove the worker went on by delivering a second message after it.
    tag2 = uuid.uuid4().hex
    send(hato, ["after@example.org"], tag2)
    messages = recording_sink.wait_for(lambda ms: bool(with_tag(ms, tag2)), timeout=30)
    assert [m for m in messages if m.mail_from == ""] == []
