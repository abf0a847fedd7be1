"""Mail for the relay server's own domain (the guide's ``mydestination``) through ``hato serve``.

A client on the internet (loopback is untrusted here) writes to the ``smtp`` listener:
``postmaster@dbmx.net`` must be accepted without AUTH and land in Hato's Maildir
(``DATA_DIR/mail/dbmx.net/postmaster``), an unknown local part is refused at RCPT with
550 5.1.1, and mail for other domains is not relayed. With an aliases file, local names
expand to users' Maildirs and external addresses are forwarded through the MX route.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import smtplib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from peers.postfix_mx import PostfixMX

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayFactory, RelayServer

OUTSIDER = "someone@elsewhere.example"


def compose(to: str, subject: str) -> bytes:
    return (
        f"From: {OUTSIDER}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@elsewhere.example>\r\n\r\nHello postmaster.\r\n"
    ).encode()


def maildir_messages(
    maildir: Path, count: int = 1, timeout: float = 30.0, *, log: str = ""
) -> list[email.message.EmailMessage]:
    new = maildir / "new"
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(new.glob("*")) if new.is_dir() else []
        if len(found) >= count:
            messages = []
            for path in found:
                msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                assert isinstance(msg, email.message.EmailMessage)
                messages.append(msg)
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} message(s) in {new}; log:\n{log}")
        time.sleep(0.1)


def test_postmaster_accepted_from_anyone_and_unknown_refused(
    relay_server: RelayServer,
) -> None:
    with smtplib.SMTP("127.0.0.1", relay_server.port("smtp"), timeout=30) as client:
        client.ehlo("mail.elsewhere.example")
        assert client.sendmail(OUTSIDER, ["postmaster@dbmx.net"], compose("pm", "pm-1")) == {}

        code, text = client.mail(OUTSIDER)
        assert code == 250
        code, text = client.rcpt("unknown@dbmx.net")
        assert (code, text[:5]) == (550, b"5.1.1"), (code, text)
        client.rset()

        # Not an open relay: an outsider cannot send through us to another domain.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(OUTSIDER, ["victim@example.net"], compose("x", "relay-1"))
        [(code, text)] = refused.value.recipients.values()
        assert code == 554 and text.startswith(b"5.7.1"), (code, text)

    log = relay_server.serve.log
    [msg] = maildir_messages(relay_server.maildir("postmaster@dbmx.net"), log=log)
    assert msg["Message-ID"] == "<pm-1@elsewhere.example>"
    assert msg["Delivered-To"] == "postmaster@dbmx.net"
    assert msg["Return-Path"] == f"<{OUTSIDER}>"
    assert "by relay.dbmx.net (Hato) with ESMTP" in str(msg["Received"])
    relay_server.serve.wait_for_log(r"to=<postmaster@dbmx\.net>, relay=maildir.*status=sent")
    relay_server.serve.wait_for_log(r"reject=RCPT .*: 550 5\.1\.1 .*to=<unknown@dbmx\.net>")


def test_aliases_users_and_forwarding(
    relay_server_factory: RelayFactory, postfix_mx: PostfixMX
) -> None:
    relay = relay_server_factory(
        postfix_mx.port,
        aliases=(
            "# the guide's /etc/aliases, in Hato's data dir\n"
            "postmaster: postfix\n"
            "abuse:      postmaster\n"
            "sales:      postfix,\n"
            "            someone@example.net\n"
        ),
    )
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=30) as client:
        client.ehlo("mail.elsewhere.example")
        for to, subject in (
            ("abuse@dbmx.net", "abuse-1"),
            ("postfix+signup@dbmx.net", "plus-1"),
            ("sales@dbmx.net", "sales-1"),
        ):
            assert client.sendmail(OUTSIDER, [to], compose(to, subject)) == {}

    log = relay.serve.log
    got = maildir_messages(relay.maildir("postfix@dbmx.net"), 3, log=log)
    assert {m["Message-ID"] for m in got} == {
        "<abuse-1@elsewhere.example>",
        "<plus-1@elsewhere.example>",
        "<sales-1@elsewhere.example>",
    }
    # The external alias target is forwarded through the MX route to the Postfix MX.
    [forwarded] = postfix_mx.wait_for("someone@example.net", timeout=60)
    assert forwarded.message["Message-ID"] == "<sales-1@elsewhere.example>"
