"""The hato command as a user runs it: one-line errors, queue commands, config check, send."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hato.message import Envelope
from hato.queue import open_queue

SRC = str(Path(__file__).resolve().parents[2] / "src")


def hato(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["HATO_HTTP_LISTEN"] = ""  # not 127.0.0.1:8025, which parallel runs share
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=60,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hato: ") and fragment in lines[0], lines[0]


def test_config_check_prints_the_effective_role(tmp_path: Path) -> None:
    result = hato(
        "config",
        "check",
        "--data-dir",
        str(tmp_path),
        env={
            "RELAYHOST": "[dbmx.net]:587",
            "RELAYHOST_USERNAME": "postfix@dbmx.net",
            "RELAYHOST_PASSWORD": "hunter2",
            "ALLOWED_SENDER_DOMAINS": "dbmx.net",
            "HATO_LISTEN": "0.0.0.0:587",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "local relay (relays to [dbmx.net]:587)" in out
    assert "smtp=0.0.0.0:587" in out
    assert "tls encrypt" in out and "AUTH as postfix@dbmx.net" in out
    assert "hunter2" not in out
    assert "senders:     dbmx.net" in out


def test_config_check_refuses_an_exposed_relay_without_sender_domains(tmp_path: Path) -> None:
    result = hato(
        "config",
        "check",
        env={
            "RELAYHOST": "[dbmx.net]:587",
            "HATO_LISTEN": "0.0.0.0:587",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert_one_line_error(result, "ALLOWED_SENDER_DOMAINS")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"HATO_LISTEN": "pop3=1.2.3.4:110"}, "unknown listener role"),
        ({"MESSAGE_SIZE_LIMIT": "big"}, "MESSAGE_SIZE_LIMIT"),
        ({"HATO_RELAY_TLS": "sometimes"}, "HATO_RELAY_TLS"),
        ({"RELAYHOST": "[a]:b"}, "relay host"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    assert_one_line_error(hato("config", "check", env=env, cwd=tmp_path), fragment)


def test_serve_refuses_bad_settings_with_one_line(tmp_path: Path) -> None:
    result = hato(
        "serve",
        "--data-dir",
        str(tmp_path),
        "--listen",
        "0.0.0.0:0",
        env={"RELAYHOST": "[127.0.0.1]:9"},
        cwd=tmp_path,
    )
    assert_one_line_error(result, "ALLOWED_SENDER_DOMAINS")


def test_secret_files_are_read_by_the_roles_that_use_them(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "secrets" / "password"
    env = {
        "RELAYHOST": "[127.0.0.1]:9",
        "RELAYHOST_USERNAME": "postfix@dbmx.net",
        "RELAYHOST_PASSWORD_FILE": str(missing),
        "HATO_SMTP_USERNAME": "app",
        "HATO_SMTP_PASSWORD_FILE": str(missing),
        "HATO_SMTP_TLS": "encrypt",
    }
    data = ["--data-dir", str(tmp_path)]
    # A command that needs no secret does not read it.
    listed = hato("queue", "list", *data, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    # The roles that use it refuse to start, in one line, and so does the check of serve's.
    for args, what in (
        (["serve", *data, "--listen", "127.0.0.1:0"], "relay password"),
        (["worker", *data], "SMTP password"),
        (["config", "check", *data], "relay password"),
    ):
        result = hato(*args, env=env, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert_one_line_error(result, f"cannot read {what} file {missing}: No such file")


def _fill(url: str) -> list[str]:
    async def go() -> list[str]:
        q = open_queue(url)
        await q.open()
        try:
            one = await q.enqueue(
                Envelope("a@example.org", ["b@example.net"], meta={"envid": "app-1"}),
                b"Subject: one\r\n\r\nbody one\r\n",
                held=True,
            )
            two = await q.enqueue(
                Envelope("c@example.org", ["d@example.net", "e@example.net"]),
                b"Subject: two\r\n\r\nbody two\r\n",
            )
            return [one, two]
        finally:
            await q.close()

    return asyncio.run(go())


def test_queue_commands(tmp_path: Path) -> None:
    one, two = _fill(f"sqlite:///{tmp_path}/queue.db")
    data_dir = ["--data-dir", str(tmp_path)]
    listed = hato("queue", "list", "--json", *data_dir)
    assert listed.returncode == 0, listed.stderr
    items = {item["id"]: item for item in json.loads(listed.stdout)}
    assert set(items) == {one, two}
    assert items[one]["state"] == "held"
    assert items[one]["sender"] == "a@example.org"
    assert items[two]["recipients"] == ["d@example.net", "e@example.net"]
    assert items[two]["state"] == "queued"

    text = hato("queue", "list", *data_dir)
    assert one in text.stdout and "held" in text.stdout

    shown = hato("queue", "show", one, *data_dir)
    assert shown.returncode == 0
    assert "Subject: one" in shown.stdout and "body one" in shown.stdout
    assert "\nenvid:    app-1\n" in shown.stdout

    released = hato("queue", "release", one, *data_dir)
    assert released.returncode == 0 and f"{one}: released" in released.stdout
    states = {
        i["id"]: i["state"] for i in json.loads(hato("queue", "list", "--json", *data_dir).stdout)
    }
    assert states[one] == "queued"

    assert hato("queue", "delete", two, *data_dir).returncode == 0
    remaining = [i["id"] for i in json.loads(hato("queue", "list", "--json", *data_dir).stdout)]
    assert remaining == [one]

    assert_one_line_error(hato("queue", "show", "NOSUCHID", *data_dir), "no such message")
    assert_one_line_error(hato("queue", "list", "--state", "lost", *data_dir), "unknown state")


def test_send_reports_a_refused_connection_in_one_line() -> None:
    result = hato(
        "send", "--server", "127.0.0.1:1", "--from", "a@example.org", "--to", "b@example.net"
    )
    assert_one_line_error(result, "connect failed")


def test_send_refuses_header_injection() -> None:
    result = hato(
        "send",
        "--server",
        "127.0.0.1:1",
        "--from",
        "a@example.org",
        "--to",
        "b@example.net",
        "--header",
        "Subject: x\r\nBcc: evil@example.com",
    )
    assert_one_line_error(result, "CR, LF")


def test_config_check_refuses_a_submission_listener_without_certificate(tmp_path: Path) -> None:
    result = hato("config", "check", env={"HATO_LISTEN": "submission=127.0.0.1:587"}, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "needs a TLS certificate")


def test_choices_are_case_insensitive(tmp_path: Path) -> None:
    result = hato(
        "config",
        "check",
        env={"RELAYHOST": "[r.example]:587", "HATO_RELAY_TLS": "ENCRYPT"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "tls encrypt" in result.stdout


def test_send_verbose_prints_the_dialog_like_swaks(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    env["PYTHONPATH"] = SRC
    env["HATO_HTTP_LISTEN"] = ""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hato",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        assert server.stderr is not None
        for line in server.stderr:
            if "ready" in line or time.monotonic() > deadline:
                break
        result = hato(
            "send",
            "--server",
            f"127.0.0.1:{port}",
            "--from",
            "a@example.org",
            "--to",
            "b@example.net",
            "-v",
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout
        for expected in (
            "-> EHLO",
            "-> MAIL FROM:<a@example.org>",
            "-> RCPT TO:<b@example.net>",
            "-> DATA",
            "<-  250",
            "sent: 250 2.0.0 Ok: queued as",
        ):
            assert expected in out, out
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr is not None:
            server.stderr.close()
