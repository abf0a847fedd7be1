"""The operator log of a real ``hato serve`` cannot be forged by a client (issue 8, item 2).

An operator's setup (``hato tls self-signed``, ``hato user add``, an ``smtp`` and a
``submissions`` listener on 127.0.0.1, which is not a trusted network here); then a
client without credentials sends a failed ``AUTH PLAIN`` whose user name holds CRLF and a
whole fake log line, ESC sequences, a bare CR and the Unicode line separators, and a
recipient address with control characters. Each event stays exactly one line of the
log, text and JSON alike.
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
from pathlib import Path

import pytest

from peers import free_port
from peers.hato import HatoFactory, HatoServe, operator_setup

FAKE = "Jan  1 00:00:00 hato/smtpd[1]: 0FAKE0: to=<victim@example.org>, status=sent (250 ok)"
USER_NAME = f"ghost\r\n{FAKE}\r\n\x1b[2J\x1b]0;owned\x07\rcr\u2028ls\u2029ps\x85nel"
RECIPIENT = "\x1b[31mred\x9bcsi\x7fdel@example.net"


def start(hato_serve: HatoFactory, data: Path, log_format: str) -> HatoServe:
    env = operator_setup(data, {"postfix@dbmx.net": "guide-Secret-42"})
    env.update(
        HATO_LISTEN=f"smtp=127.0.0.1:{free_port()},submissions=127.0.0.1:{free_port()}",
        HATO_DOMAINS="dbmx.net",
        HATO_HOSTNAME="mail.dbmx.net",
        HATO_MYNETWORKS="192.0.2.0/24",
        HATO_FSYNC="false",
        HATO_LOG_FORMAT=log_format,
    )
    return hato_serve(env=env, data_dir=data)


def hostile_client(serve: HatoServe) -> None:
    host, port = serve.listeners["submissions"]
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL(host, port, context=tls, timeout=30) as client:
        client.ehlo("client.test")
        blob = f"\0{USER_NAME}\0not-the-password".encode()
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(blob).decode())
        assert code == 535
    host, port = serve.listeners["smtp"]
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.command_encoding = "utf-8"
        client.ehlo("client.test")
        assert client.docmd("MAIL", "FROM:<someone@example.com> SMTPUTF8")[0] == 250
        code, _ = client.docmd("RCPT", f"TO:<{RECIPIENT}>")
        assert code >= 500


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_hostile_values_stay_on_their_own_log_line(
    hato_serve: HatoFactory, tmp_path: Path, log_format: str
) -> None:
    serve = start(hato_serve, tmp_path / "relay", log_format)
    mark = serve.mark()
    hostile_client(serve)
    serve.wait_for_log("RCPT from unknown", since=mark)
    lines = serve.lines(since=mark)
    auth_lines = [line for line in lines if "ghost" in line]
    rcpt_lines = [line for line in lines if "RCPT from" in line]
    assert len(auth_lines) == 1, lines
    assert len(rcpt_lines) == 1, lines
    # Nothing the client sent begins a line, and no line holds a control character.
    assert not any("0FAKE0" in line and "ghost" not in line for line in lines), lines
    for line in auth_lines + rcpt_lines:
        assert line.splitlines() == [line]
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)
        assert "\u2028" not in line and "\u2029" not in line
    if log_format == "json":
        assert json.loads(auth_lines[0])["sasl_username"] == USER_NAME
        assert RECIPIENT in json.loads(rcpt_lines[0])["to"]
    else:
        assert (
            "sasl_username=ghost\\x0d\\x0aJan  1 00:00:00 hato/smtpd[1]: 0FAKE0" in (auth_lines[0])
        )
        assert "\\x1b[2J\\x1b]0;owned\\x07\\x0dcr\\u2028ls\\u2029ps\\x85nel" in auth_lines[0]
        assert "to=<\\x1b[31mred\\x9bcsi\\x7fdel@example.net>" in rcpt_lines[0]
