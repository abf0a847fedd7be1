"""Issue 10's end-to-end test 3: the MX accepts, then a bounce arrives later at the relay
server, and becomes a ``bounced`` event for the original message.

``hato serve`` is the guide's relay server for ``dbmx.net`` (its own domain; the MX route
for everything else) and Debian's Postfix is ``example.net``'s MX, accepting with 250.
The bounce is then sent to the relay server by smtplib, from the null sender, as the
remote MX would send it hours later: it must be recorded as an event on the original
message (read back from the relay server's queue) and kept out of the Maildir, while
mail to the same address that is not a bounce is delivered as always. With
``HATO_VERP=true`` the MX sees a signed return path, a bounce with no other clue is
matched by it, and a forged token matches nothing.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from typing import TYPE_CHECKING

from hato.events import DeliveryEvent
from hato.queue import open_queue
from peers.hato import run_hato
from peers.postfix_mx import PostfixMX

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayFactory, RelayServer

SENDER = "postfix@dbmx.net"
RECIPIENT = "someone@example.net"
TRUSTED = "127.0.0.1/32"  # the test plays the app (trusted) and the remote MX


def send(relay: RelayServer, sender: str, to: str, data: bytes) -> str:
    """One message to the relay server's smtp listener; the queue id it answers."""
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=30) as client:
        client.ehlo("mx.example.net")
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt(to)
        assert code == 250, (code, text)
        code, text = client.data(data)
        assert code == 250, (code, text)
    return text.decode().rsplit(" ", 1)[-1]


def original(message_id: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: Your order\r\n"
        f"Message-ID: {message_id}\r\n\r\nThanks for your order.\r\n"
    ).encode()


def postfix_dsn(message_id: str) -> bytes:
    """What Postfix on the MX sends when the mailbox store refuses later on."""
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {SENDER}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="B1/mx.example.net"\r\n\r\n'
        "--B1/mx.example.net\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "This is the mail system at host mx.example.net.\r\n\r\n"
        f"<{RECIPIENT}>: host store.example.net[192.0.2.9] said: 550 5.1.1\r\n"
        "    User unknown (in reply to RCPT TO command)\r\n\r\n"
        "--B1/mx.example.net\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {RECIPIENT}\r\nOriginal-Recipient: rfc822;{RECIPIENT}\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; store.example.net\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n"
        "--B1/mx.example.net\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nMessage-ID: {message_id}\r\n\r\n"
        "--B1/mx.example.net--\r\n"
    ).encode()


def qmail_bounce(to: str) -> bytes:
    """qmail's text bounce: no ENVID, no copy of the message; only the address it came to."""
    return (
        f"From: MAILER-DAEMON@mx.example.net\r\nTo: {to}\r\nSubject: failure notice\r\n\r\n"
        "Hi. This is the qmail-send program at mx.example.net.\r\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
        f"<{RECIPIENT}>:\r\n192.0.2.9 does not like recipient.\r\n"
        f"Remote host said: 550 5.1.1 <{RECIPIENT}>... User unknown\r\n"
        "Giving up on 192.0.2.9.\r\n\r\n"
    ).encode()


def events_of(relay: RelayServer, queue_id: str) -> list[DeliveryEvent]:
    async def read() -> list[DeliveryEvent]:
        queue = open_queue(f"sqlite:///{relay.data_dir / 'queue.db'}")
        await queue.open()
        try:
            return (await queue.events(queue_id=queue_id)).events
        finally:
            await queue.close()

    return asyncio.run(read())


def mailbox(relay: RelayServer) -> list[bytes]:
    new = relay.maildir(SENDER) / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def test_a_late_dsn_becomes_a_bounced_event(
    relay_server_factory: RelayFactory, postfix_mx: PostfixMX
) -> None:
    relay = relay_server_factory(postfix_mx.port, HATO_MYNETWORKS=TRUSTED)
    queue_id = send(relay, SENDER, RECIPIENT, original("<order-7@dbmx.net>"))
    [got] = postfix_mx.wait_for(RECIPIENT)  # the MX accepted with 250
    assert got.message["Return-Path"] == f"<{SENDER}>"  # no VERP unless asked for
    relay.serve.wait_for_log(rf"{queue_id}: to=<{RECIPIENT}>.*status=sent")

    bounce_id = send(relay, "", SENDER, postfix_dsn("<order-7@dbmx.net>"))
    relay.serve.wait_for_log(rf"{bounce_id}: .*bounce for {queue_id} recorded \(message-id")
    # The mail log shows it under the original's queue id, beside the delivery.
    relay.serve.wait_for_log(
        rf"{queue_id}: to=<{RECIPIENT}>, relay=store\.example\.net, .*dsn=5\.1\.1, "
        rf"status=bounced \(550 5\.1\.1 User unknown \(reported by bounce {bounce_id}"
    )
    timeline = [(e.event, e.recipient) for e in events_of(relay, queue_id)]
    assert timeline == [
        ("accepted", RECIPIENT),
        ("delivered", RECIPIENT),
        ("bounced", RECIPIENT),
    ]
    bounced = events_of(relay, queue_id)[-1]
    assert (bounced.reply_code, bounced.reply_enhanced) == (550, "5.1.1")
    assert bounced.reply_text == "User unknown"
    assert bounced.relay_host == "store.example.net"
    assert bounced.message_id == "<order-7@dbmx.net>"
    assert bounced.node == "relay.dbmx.net"
    # The original message's recipient is no longer counted as sent on the relay server.
    listed = json.loads(
        run_hato(["queue", "list", "--state", "failed", "--json"], data_dir=relay.data_dir).stdout
    )
    assert [m["id"] for m in listed] == [queue_id]

    # Mail to the same address that is not a bounce is delivered as always; the bounce,
    # handled before it, is not in the Maildir.
    plain = b"From: friend@example.net\r\nSubject: hello\r\nMessage-ID: <hi@x>\r\n\r\nhi\r\n"
    plain_id = send(relay, "", SENDER, plain)
    relay.serve.wait_for_log(rf"{plain_id}: to=<{SENDER}>, relay=maildir.*status=sent")
    [stored] = mailbox(relay)
    assert b"Message-ID: <hi@x>" in stored


def test_verp_matches_a_bounce_without_envid_and_ignores_forged_tokens(
    relay_server_factory: RelayFactory, postfix_mx: PostfixMX
) -> None:
    relay = relay_server_factory(postfix_mx.port, HATO_MYNETWORKS=TRUSTED, HATO_VERP="true")
    queue_id = send(relay, SENDER, RECIPIENT, original("<order-8@dbmx.net>"))
    [got] = postfix_mx.wait_for(RECIPIENT)
    return_path = str(got.message["Return-Path"]).strip("<>")
    local, _, domain = return_path.partition("@")
    assert domain == "dbmx.net"
    assert local.startswith(f"postfix+{queue_id.lower()}.")
    assert (relay.data_dir / "verp.key").is_file()

    # A forged token (its signature changed) matches nothing: mail like any other.
    mac = local.rpartition(".")[2]
    forged = f"{local.rpartition('.')[0]}.{mac[::-1]}@{domain}"
    assert forged != return_path
    forged_id = send(relay, "", forged, qmail_bounce(forged))
    relay.serve.wait_for_log(rf"{forged_id}: .*relay=maildir.*status=sent")
    assert len(mailbox(relay)) == 1

    bounce_id = send(relay, "", return_path, qmail_bounce(return_path))
    relay.serve.wait_for_log(rf"{bounce_id}: .*bounce for {queue_id} recorded \(verp")
    bounced = [e for e in events_of(relay, queue_id) if e.event == "bounced"]
    assert [(e.recipient, e.reply_code, e.reply_enhanced) for e in bounced] == [
        (RECIPIENT, 550, "5.1.1")
    ]
    assert len(mailbox(relay)) == 1  # the real bounce is only an event
