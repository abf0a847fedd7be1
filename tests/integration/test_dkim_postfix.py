"""DKIM signatures survive a real MTA hop: signed by Hato, relayed by Debian's Postfix,
recorded by a sink, verified by dkimpy (RSA and Ed25519) and Mail::DKIM (RSA)."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from hato.dkim import DKIMSigner, dkim_txt_records, generate_key, load_signers
from peers.postfix import PostfixInstance
from peers.sinks import RecordingSink
from peers.verify import dkimpy_verdicts, mail_dkim_lines

BODY = (
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b".\r\n"
    b"8-bit: \xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf\r\n"
    + b"long line "
    * 90
    + b"\r\n"
    b"trailing whitespace \t \r\n"
    b"\r\n\r\n"
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[DKIMSigner, dict[str, str]]:
    generate_key("dbmx.net", "hato-rsa", "rsa", directory=tmp_path)
    generate_key("dbmx.net", "hato-ed", "ed25519", directory=tmp_path)
    zone = {f"{r.name}.": r.txt for r in dkim_txt_records(tmp_path)}
    return load_signers(tmp_path), zone


def test_signatures_verify_after_a_postfix_hop(
    keys: tuple[DKIMSigner, dict[str, str]],
    postfix_plain_relay: PostfixInstance,
    recording_sink: RecordingSink,
) -> None:
    signer, zone = keys
    message = (
        b"From: =?utf-8?b?44OP44OI?= <noreply@dbmx.net>\r\n"
        b"To: someone@example.org\r\n"
        b"Subject: signed before it is queued\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <dkim-hop@dbmx.net>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + BODY
    )
    signed = signer.sign(message)
    with smtplib.SMTP("127.0.0.1", postfix_plain_relay.port("smtp"), timeout=30) as client:
        client.ehlo("app.test")
        client.sendmail("noreply@dbmx.net", ["someone@example.org"], signed, ["BODY=8BITMIME"])
    [received] = recording_sink.wait_for_count(1, timeout=30)
    assert received.data != signed  # Postfix added its Received header on the way
    assert received.data.endswith(signed)

    assert dkimpy_verdicts(received.data, zone) == [True, True]
    lines = mail_dkim_lines(received.data, zone)
    assert "dbmx.net hato-rsa rsa-sha256 pass" in lines, lines
