"""The guide's clients for real against hato serve in hold mode: nodemailer, swaks, smtplib.

With no relay host configured ``hato serve`` keeps every message as ``held``; the tests
read the queue back through ``hato queue list --json`` and ``hato queue show``, and
finally release a held message to a relay configured later.
"""

from __future__ import annotations

import email.policy
import json
import re
import smtplib
import subprocess
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from peers.hato import HatoFactory, HatoServe
from peers.sinks import RecordingSink

SENDER = "noreply@dbmx.net"
QUEUED_RE = re.compile(r"queued as (\S+)")


def held(hato: HatoServe, queue_id: str) -> dict[str, Any]:
    items = hato.queue_list()
    ours = [item for item in items if item["id"] == queue_id]
    assert ours, f"{queue_id} not in hato queue list --json: {items}"
    item: dict[str, Any] = ours[0]
    assert item["state"] == "held", item
    return item


def test_guides_nodemailer_client_is_held(
    hato_serve: HatoFactory, node_send: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    hato = hato_serve()
    to = "new-user@example.org"
    subject = f"Welcome to Fakebook {uuid.uuid4().hex[:8]}"
    text = "Please confirm your address.\nThanks."

    proc = node_send(hato.host, hato.port, SENDER, to, subject, text)

    assert proc.returncode == 0, f"send.js failed:\n{proc.stdout}\n{proc.stderr}"
    info = json.loads(proc.stdout)
    assert info["accepted"] == [to], info
    assert info["rejected"] == [], info
    match = QUEUED_RE.search(info["response"])
    assert match, info["response"]
    queue_id = match.group(1)
    assert info["response"].startswith("250 2.0.0"), info["response"]

    item = held(hato, queue_id)
    assert item["sender"] == SENDER
    assert to in str(item["recipients"])

    shown = hato.cli("queue", "show", queue_id).stdout
    assert subject in shown
    assert "Please confirm your address." in shown
    assert info["messageId"].strip("<>") in shown


def test_swaks_as_in_the_guide_is_held(hato_serve: HatoFactory, swaks: str) -> None:
    hato = hato_serve()
    to = "someone@example.org"
    proc = subprocess.run(
        [
            swaks,
            "--server", f"{hato.host}:{hato.port}",
            "--from", SENDER,
            "--to", to,
            "--header", "Subject: test",
            "--body", "test1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"<-  250 2\.0\.0 .*queued as (\S+)", proc.stdout)
    assert match, proc.stdout
    item = held(hato, match.group(1))
    assert item["sender"] == SENDER
    assert to in str(item["recipients"])
    assert "test1" in hato.cli("queue", "show", match.group(1)).stdout


def test_smtplib_send_message_is_held(hato_serve: HatoFactory) -> None:
    hato = hato_serve()
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = "a@example.org, b@example.net"
    msg["Subject"] = "smtplib"
    msg.set_content("Body from smtplib.\n.leading dot\n")

    with smtplib.SMTP(hato.host, hato.port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("pipelining")
        assert client.has_extn("enhancedstatuscodes")
        refused = client.send_message(msg)
        assert refused == {}
        # smtplib keeps no DATA reply from send_message; a second message through the
        # low-level calls gives us the queue id.
        client.mail(SENDER)
        client.rcpt("c@example.org")
        code, reply = client.data(msg.as_bytes(policy=email.policy.SMTP))
    assert code == 250
    match = QUEUED_RE.search(reply.decode())
    assert match, reply
    item = held(hato, match.group(1))
    assert item["sender"] == SENDER

    all_held = [i for i in hato.queue_list() if i["state"] == "held"]
    recipients = " ".join(str(i["recipients"]) for i in all_held)
    for address in ("a@example.org", "b@example.net", "c@example.org"):
        assert address in recipients


def test_held_message_is_delivered_after_release(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """Held in hold mode; restarted with a relay host; ``hato queue release`` sends it."""
    hato = hato_serve()
    tag = uuid.uuid4().hex
    with smtplib.SMTP(hato.host, hato.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        client.rcpt("later@example.org")
        code, reply = client.data(
            f"From: {SENDER}\r\nTo: later@example.org\r\nSubject: held\r\n"
            f"X-Test-Tag: {tag}\r\n\r\nkept until released\r\n".encode()
        )
    assert code == 250
    match = QUEUED_RE.search(reply.decode())
    assert match
    queue_id = match.group(1)
    held(hato, queue_id)

    hato.stop()
    hato.env.update({"RELAYHOST": recording_sink.relayhost, "HATO_RELAY_TLS": "none"})
    hato.start()
    # Held stays held across a restart, even with a relay now configured.
    held(hato, queue_id)
    assert not recording_sink.messages

    hato.cli("queue", "release", queue_id)

    messages = recording_sink.wait_for(
        lambda ms: any(m.header("X-Test-Tag") == tag for m in ms), timeout=30, what="released"
    )
    got = next(m for m in messages if m.header("X-Test-Tag") == tag)
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ("later@example.org",)
    assert got.body == b"kept until released\r\n"
    hato.wait_for_log(rf"{re.escape(queue_id)}: .*status=sent", timeout=10)
