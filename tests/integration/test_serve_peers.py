"""The peers the hato serve tests rely on, checked on their own with the guide's tools.

If the guide's relay server accepted mail without AUTH, or without TLS, the upstream tests
would prove nothing; these pin that the Postfix peer behaves like the guide's server.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import uuid
from collections.abc import Callable

from peers import require_tool
from peers.postfix import GuideRelay, PostfixInstance
from peers.sinks import RecordingSink, SmtpSinkProcess


def swaks_run(swaks: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [swaks, "--from", "noreply@dbmx.net", "--to", "someone@example.org", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_guide_relay_server_relays_with_tls_and_auth(guide_relay: GuideRelay, swaks: str) -> None:
    tag = uuid.uuid4().hex
    proc = swaks_run(
        swaks,
        "--server", f"127.0.0.1:{guide_relay.submission_port}",
        "--tls",
        "--tls-ca-path", str(guide_relay.ca_file),
        "--auth", "PLAIN",
        "--auth-user", guide_relay.login,
        "--auth-password", guide_relay.password,
        "--header", f"X-Test-Tag: {tag}",
        "--header", "Subject: test",
        "--body", "test1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "235 2.7.0 Authentication successful" in proc.stdout
    messages = guide_relay.sink.wait_for(
        lambda ms: any(m.header("X-Test-Tag") == tag for m in ms), timeout=30
    )
    got = next(m for m in messages if m.header("X-Test-Tag") == tag)
    assert got.mail_from == "noreply@dbmx.net"
    assert got.rcpt_tos == ("someone@example.org",)
    assert b"ESMTPSA" in got.data


def test_guide_relay_server_refuses_wrong_password(guide_relay: GuideRelay, swaks: str) -> None:
    proc = swaks_run(
        swaks,
        "--server", f"127.0.0.1:{guide_relay.submission_port}",
        "--tls",
        "--auth", "PLAIN",
        "--auth-user", guide_relay.login,
        "--auth-password", "wrong",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "535 5.7.8" in proc.stdout, proc.stdout


def test_guide_relay_server_requires_auth_even_from_loopback(
    guide_relay: GuideRelay, swaks: str
) -> None:
    proc = swaks_run(swaks, "--server", f"127.0.0.1:{guide_relay.submission_port}", "--tls")
    assert proc.returncode != 0
    assert "554 5.7.1" in proc.stdout, proc.stdout
    assert not guide_relay.sink.messages


def test_guide_relay_server_requires_tls(guide_relay: GuideRelay, swaks: str) -> None:
    proc = swaks_run(swaks, "--server", f"127.0.0.1:{guide_relay.submission_port}")
    assert proc.returncode != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in proc.stdout, proc.stdout


def test_plain_postfix_relay_takes_smtp_source_load(
    postfix_plain_relay: PostfixInstance, recording_sink: RecordingSink
) -> None:
    smtp_source = require_tool("smtp-source", hint="apt-get install postfix")
    port = postfix_plain_relay.port("smtp")
    proc = subprocess.run(
        [smtp_source, "-s", "5", "-m", "20", "-l", "2048", "-f", "a@dbmx.net",
         "-t", "b@example.org", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recording_sink.wait_for_count(20, timeout=30)


def test_smtp_sink_counts_smtp_source_messages(smtp_sink: SmtpSinkProcess) -> None:
    smtp_source = require_tool("smtp-source", hint="apt-get install postfix")
    proc = subprocess.run(
        [smtp_source, "-s", "4", "-m", "40", "-l", "2048", f"127.0.0.1:{smtp_sink.port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert smtp_sink.wait_for_count(40, timeout=30) >= 40


def test_recording_sink_scripted_failures_and_restart(recording_sink: RecordingSink) -> None:
    recording_sink.fail_rcpt("550 5.1.1 gone", address="gone@example.org")
    recording_sink.fail_data("451 4.3.0 later", times=1)
    with smtplib.SMTP(*recording_sink.address, timeout=10) as client:
        client.ehlo("client.test")
        code, _ = client.mail("a@dbmx.net")
        assert code == 250
        assert client.rcpt("gone@example.org")[0] == 550
        assert client.rcpt("ok@example.org")[0] == 250
        assert client.data(b"Subject: 1\r\n\r\nx\r\n")[0] == 451
        client.rset()
        client.sendmail("", ["ok@example.org"], b"Subject: 2\r\n\r\n.y\r\n")
    got = recording_sink.wait_for_count(1, timeout=10)[0]
    assert got.mail_from == ""
    assert got.body == b".y\r\n"

    recording_sink.stop()
    recording_sink.start()
    with smtplib.SMTP(*recording_sink.address, timeout=10) as client:
        client.sendmail("a@dbmx.net", ["ok@example.org"], b"Subject: 3\r\n\r\nz\r\n")
    assert len(recording_sink.wait_for_count(2, timeout=10)) == 2


def test_nodemailer_client_talks_to_a_plain_sink(
    recording_sink: RecordingSink, node_send: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    subject = f"node {uuid.uuid4().hex[:8]}"
    proc = node_send(
        *recording_sink.address, "noreply@dbmx.net", "x@example.org", subject, "hello\nworld"
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["accepted"] == ["x@example.org"]
    got = recording_sink.wait_for_count(1, timeout=10)[0]
    assert got.header("Subject") == subject
    assert got.mail_from == "noreply@dbmx.net"
