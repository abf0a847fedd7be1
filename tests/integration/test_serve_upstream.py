"""The guide's upstream for real: hato serve relays to Postfix configured as the relay server.

The chain is the guide's: a client → ``hato serve`` (the local relay, configured with the
boky/postfix variable names) → Postfix on a submission port with TLS required and SASL
from a sasldb made by ``saslpasswd2`` → a recording sink. The message must arrive byte for
byte as sent, with one ``Received:`` header added by each hop.
"""

from __future__ import annotations

import re
import smtplib
import uuid
from collections.abc import Callable, Sequence

import pytest

from peers.hato import HatoFactory, HatoServe
from peers.postfix import GuideRelay
from peers.sinks import Received

SENDER = "noreply@dbmx.net"
RECIPIENT = "someone@example.org"
QUEUED_RE = re.compile(r"queued as (\S+)")


def make_message(tag: str, *, sender: str = SENDER, to: str = RECIPIENT) -> bytes:
    """A message with the awkward parts a relay must keep: dots, long lines, 8-bit-free UTF-8."""
    body_lines = [
        "Hello from the guide's chain.",
        ".a line starting with a dot",
        "..and one with two",
        "",
        "trailing spaces stay   ",
        "x" * 900,
        "=?utf-8?q?not_an_encoded_word_in_a_body?=",
        "end.",
    ]
    headers = [
        f"From: Fakebook <{sender}>",
        f"To: <{to}>",
        "Subject: =?utf-8?b?5oSb44GV44KM44KL6bOp?= welcome",
        "Date: Fri, 27 Nov 2026 12:00:00 +0000",
        f"Message-ID: <{tag}@test.dbmx.net>",
        f"X-Test-Tag: {tag}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body_lines) + "\r\n").encode()


def submit(
    host: str, port: int, message: bytes, *, sender: str = SENDER, to: str = RECIPIENT
) -> str:
    """Send one message with smtplib; return the queue id from the DATA reply."""
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail(sender)
        assert code == 250, reply
        code, reply = client.rcpt(to)
        assert code == 250, reply
        code, reply = client.data(message)
        assert code == 250, reply
    match = QUEUED_RE.search(reply.decode())
    assert match, f"DATA reply carries no queue id: {reply!r}"
    return match.group(1)


def split_received(data: bytes) -> tuple[list[bytes], bytes]:
    """Leading ``Received:`` header fields (unfolded as bytes) and the rest of the message."""
    fields: list[bytes] = []
    rest = data
    while rest[:9].lower() == b"received:":
        end = 0
        while True:
            end = rest.index(b"\r\n", end) + 2
            if rest[end : end + 1] not in (b" ", b"\t"):
                break
        fields.append(rest[:end])
        rest = rest[end:]
    return fields, rest


def tagged(tag: str) -> Callable[[Sequence[Received]], bool]:
    return lambda messages: any(m.header("X-Test-Tag") == tag for m in messages)


def guide_env(relay: GuideRelay, **extra: str) -> dict[str, str]:
    env = {
        "RELAYHOST": relay.relayhost,
        "RELAYHOST_USERNAME": relay.login,
        "RELAYHOST_PASSWORD": relay.password,
        "ALLOWED_SENDER_DOMAINS": "dbmx.net",
    }
    env.update(extra)
    return env


def assert_arrived_intact(
    relay: GuideRelay, hato: HatoServe, tag: str, queue_id: str, sent: bytes
) -> None:
    messages = relay.sink.wait_for(tagged(tag), timeout=30, what=f"message {tag}")
    matching = [m for m in messages if m.header("X-Test-Tag") == tag]
    assert len(matching) == 1, f"delivered {len(matching)} times"
    got = matching[0]
    assert got.mail_from == SENDER
    assert got.rcpt_tos == (RECIPIENT,)
    received, rest = split_received(got.data)
    assert rest == sent, "headers or body changed on the way"
    assert len(received) == 2, f"expected one Received: per hop (hato, postfix), got {received}"
    postfix_hop, hato_hop = received
    # Postfix saw an authenticated, encrypted submission (ESMTPSA) from hato.
    assert b"ESMTPSA" in postfix_hop, postfix_hop
    assert b"relay.dbmx.net" in postfix_hop
    assert b"relay.dbmx.net" not in hato_hop
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=sent", timeout=10)


@pytest.mark.parametrize(
    "tls_env",
    [
        pytest.param("ca-file", id="verified-with-ca-file"),
        pytest.param("no-verify", id="tls-verify-false"),
    ],
)
def test_message_arrives_intact_through_the_guides_relay_server(
    guide_relay: GuideRelay, hato_serve: HatoFactory, tls_env: str
) -> None:
    extra = (
        {"HATO_RELAY_TLS_CA_FILE": str(guide_relay.ca_file)}
        if tls_env == "ca-file"
        else {"HATO_RELAY_TLS_VERIFY": "false"}
    )
    hato = hato_serve(env=guide_env(guide_relay, **extra))
    tag = uuid.uuid4().hex
    sent = make_message(tag)

    queue_id = submit(hato.host, hato.port, sent)

    assert_arrived_intact(guide_relay, hato, tag, queue_id, sent)
    log = guide_relay.postfix.log()
    assert "sasl_username=postfix@dbmx.net" in log, log
    assert "TLS connection established from" in log, log


def test_wrong_password_defers_with_postfix_reply_and_keeps_the_message(
    guide_relay: GuideRelay, hato_serve: HatoFactory
) -> None:
    hato = hato_serve(
        env=guide_env(
            guide_relay,
            RELAYHOST_PASSWORD="not-the-password",
            HATO_RELAY_TLS_CA_FILE=str(guide_relay.ca_file),
        )
    )
    tag = uuid.uuid4().hex
    queue_id = submit(hato.host, hato.port, make_message(tag))

    line = hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=deferred", timeout=30).string
    assert "535" in line, f"Postfix's 535 reply is not in the log line: {line}"
    assert "not-the-password" not in hato.log, "the relay password leaked into the log"

    items = hato.queue_list()
    ours = [item for item in items if item["id"] == queue_id]
    assert ours, f"{queue_id} vanished from the queue: {items}"
    assert ours[0]["sender"] == SENDER
    assert RECIPIENT in str(ours[0]["recipients"])
    assert ours[0]["state"] not in ("sent", "delivered", "bounced", "failed"), ours[0]
    assert not any(m.header("X-Test-Tag") == tag for m in guide_relay.sink.messages)
    assert "authentication failed" in guide_relay.postfix.log()


def test_unverifiable_certificate_defers_by_default(
    guide_relay: GuideRelay, hato_serve: HatoFactory
) -> None:
    """Verification is on by default: a throw-away certificate without its CA is refused."""
    hato = hato_serve(env=guide_env(guide_relay))
    tag = uuid.uuid4().hex
    queue_id = submit(hato.host, hato.port, make_message(tag))

    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=deferred", timeout=30)
    assert any(item["id"] == queue_id for item in hato.queue_list())
    assert not guide_relay.sink.messages
    assert "sasl_username" not in guide_relay.postfix.log(), "AUTH was sent over an unverified TLS"


async def test_delivery_events_record_both_hops_with_tls(
    guide_relay: GuideRelay, hato_serve: HatoFactory
) -> None:
    """The spool records ``accepted`` (the client's hop) with the message and ``relayed``
    (the upstream's hop: its address, its reply, TLS version, verified certificate) with
    the outcome."""
    from hato.queue import open_queue

    hato = hato_serve(env=guide_env(guide_relay, HATO_RELAY_TLS_CA_FILE=str(guide_relay.ca_file)))
    tag = uuid.uuid4().hex
    queue_id = submit(hato.host, hato.port, make_message(tag))
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=sent", timeout=30)

    queue = open_queue(f"sqlite://{hato.data_dir / 'queue.db'}")
    await queue.open()
    try:
        accepted, relayed = (await queue.events(queue_id=queue_id)).events
    finally:
        await queue.close()
    assert (accepted.event, accepted.recipient, accepted.relay_ip) == (
        "accepted",
        RECIPIENT,
        "127.0.0.1",
    )
    assert accepted.message_id == f"<{tag}@test.dbmx.net>"
    assert relayed.event == "relayed" and relayed.attempt == 1
    assert (relayed.relay_ip, relayed.reply_code) == ("127.0.0.1", 250)
    assert relayed.tls_version.startswith("TLSv1") and relayed.tls_verified
    assert relayed.node == accepted.node and relayed.time >= accepted.time
