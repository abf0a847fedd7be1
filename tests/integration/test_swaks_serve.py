"""swaks (and smtplib) against ``hato serve`` as a real subprocess, set up as an operator would.

``hato tls self-signed`` makes the certificate, ``hato user add postfix@dbmx.net
--password-stdin`` the guide's user, then ``hato serve`` runs ``submission``, ``smtp``
and ``submissions`` listeners for ``dbmx.net`` with ``HATO_MYNETWORKS=192.0.2.0/24`` (so
127.0.0.1 is a client on the internet). Users and certificates change while it runs.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from peers import free_port
from peers.hato import HatoFactory, HatoServe, hato_env, run_hato

USER, PASSWORD = "postfix@dbmx.net", "guide-Secret-42"


def prepare(data_dir: Path, **extra: str) -> dict[str, str]:
    """The operator's steps before ``hato serve``; returns its environment."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out = run_hato(["tls", "self-signed", "--hostname", "localhost"], data_dir=data_dir).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("HATO_TLS_"))
    assert set(env) == {"HATO_TLS_CERT_FILE", "HATO_TLS_KEY_FILE"}
    add_user(data_dir, USER, PASSWORD)
    ports = {role: free_port() for role in ("submission", "smtp", "submissions")}
    env.update(
        HATO_LISTEN=",".join(f"{role}=127.0.0.1:{port}" for role, port in ports.items()),
        HATO_DOMAINS="dbmx.net",
        HATO_HOSTNAME="mail.dbmx.net",
        HATO_MYNETWORKS="192.0.2.0/24",
        HATO_FSYNC="false",
    )
    env.update(extra)
    return env


def add_user(data_dir: Path, name: str, password: str) -> None:
    """``hato user add NAME --password-stdin``, the password on stdin as an operator types it."""
    proc = subprocess.run(
        [sys.executable, "-m", "hato", "user", "add", name, "--password-stdin"],
        input=password + "\n", capture_output=True, text=True, timeout=60,
        env=hato_env(data_dir), cwd=data_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


Swaks = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def swaks_at(swaks: str) -> Callable[[HatoServe], Swaks]:
    def bind(serve: HatoServe) -> Swaks:
        def run(
            role: str, *args: str, sender: str = "noreply@dbmx.net"
        ) -> subprocess.CompletedProcess[str]:
            _host, port = serve.listeners[role]
            return subprocess.run(
                [
                    swaks, "--server", f"127.0.0.1:{port}", "--helo", "client.test",
                    "--from", sender, "--to", "someone@example.net",
                    "--header", "Subject: test", "--body", "test1", "--timeout", "30", *args,
                ],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip

        return run

    return bind


def auth(mechanism: str = "PLAIN", user: str = USER, password: str = PASSWORD) -> list[str]:
    return ["--auth", mechanism, "--auth-user", user, "--auth-password", password]


def saw(proc: subprocess.CompletedProcess[str], text: str) -> bool:
    return any(
        line.split(maxsplit=1)[-1].startswith(text)
        for line in proc.stdout.splitlines()
        if line.startswith(("<-", "<~", "<**", "<~*"))
    )


def test_relay_server_with_swaks(
    hato_serve: HatoFactory, tmp_path: Path, swaks_at: Callable[[HatoServe], Swaks]
) -> None:
    data = tmp_path / "relay"
    serve = hato_serve(env=prepare(data), data_dir=data)
    assert set(serve.listeners) == {"submission", "smtp", "submissions"}
    swaks = swaks_at(serve)

    # The guide's own command, PLAIN and LOGIN, and implicit TLS on 465's role.
    for args in (["--tls", *auth("PLAIN")], ["--tls", *auth("LOGIN")], ["--tlsc", *auth()]):
        role = "submissions" if "--tlsc" in args else "submission"
        proc = swaks(role, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert saw(proc, "235 2.7.0") and saw(proc, "250 2.0.0 Ok: queued as")

    # AUTH before STARTTLS on 587: not offered, and MAIL in clear text is refused.
    proc = swaks("submission", *auth())
    assert proc.returncode != 0 and "did not advertise" in proc.stderr.lower()
    proc = swaks("submission")
    assert saw(proc, "530 5.7.0 Must issue a STARTTLS command first"), proc.stdout
    proc = swaks("submission", "--tls")
    assert saw(proc, "530 5.7.0 Authentication required"), proc.stdout

    # Wrong password and unknown user: the same 535 5.7.8.
    for args in (auth(password="wrong-1"), auth(user="nobody@dbmx.net", password="wrong-2")):
        proc = swaks("submission", "--tls", *args)
        assert proc.returncode == 28 and saw(proc, "535 5.7.8 Authentication credentials invalid")

    # No relay without AUTH; mail for our own domain is fine.
    proc = swaks("smtp", sender="someone@elsewhere.example")
    assert saw(proc, "554 5.7.1 Relay access denied"), proc.stdout

    # Sending as another domain's address.
    proc = swaks("submission", "--tls", *auth(), sender="ceo@example.org")
    assert saw(proc, "553 5.7.1"), proc.stdout

    items = serve.queue_list()
    assert len(items) == 3
    assert {item["sender"] for item in items} == {"noreply@dbmx.net"}
    log = serve.log
    assert "sasl_username=nobody@dbmx.net" in log
    assert "wrong-1" not in log and "wrong-2" not in log and PASSWORD not in log


def test_user_added_while_running(
    hato_serve: HatoFactory, tmp_path: Path, swaks_at: Callable[[HatoServe], Swaks]
) -> None:
    data = tmp_path / "relay"
    serve = hato_serve(env=prepare(data), data_dir=data)
    swaks = swaks_at(serve)
    newcomer = auth(user="app@dbmx.net", password="fresh-Pw-1")
    assert saw(swaks("submission", "--tls", *newcomer), "535 5.7.8")
    add_user(data, "app@dbmx.net", "fresh-Pw-1")
    proc = swaks("submission", "--tls", *newcomer)
    assert proc.returncode == 0, proc.stdout


def test_user_added_while_running_receives_mail_and_authenticates_at_once(
    hato_serve: HatoFactory, tmp_path: Path
) -> None:
    data = tmp_path / "relay"
    env = prepare(data)
    serve = hato_serve(env=env, data_dir=data)
    name, password, outsider = "newcomer@dbmx.net", "fresh-Pw-2", "someone@elsewhere.example"
    message = (
        f"From: {outsider}\r\nTo: {name}\r\nSubject: welcome\r\n"
        "Message-ID: <welcome-1@elsewhere.example>\r\n\r\nHello.\r\n"
    )

    def smtp(role: str) -> smtplib.SMTP:
        host, port = serve.listeners[role]
        client = smtplib.SMTP(host, port, timeout=30)
        client.ehlo("mail.elsewhere.example")
        return client

    with smtp("smtp") as client:  # from the internet: only our own, existing recipients
        client.mail(outsider)
        assert client.rcpt(name)[0] == 550

    add_user(data, name, password)
    # No pause, and no AUTH before it that would re-read the file: the very next session
    # already knows the new user.
    with smtp("smtp") as client:
        assert client.sendmail(outsider, [name], message) == {}
    trust = ssl.create_default_context(cafile=env["HATO_TLS_CERT_FILE"])
    trust.check_hostname = False  # the certificate names localhost; we dial 127.0.0.1
    with smtp("submission") as client:
        client.starttls(context=trust)
        client.ehlo("app.dbmx.net")
        assert client.login(name, password)[0] == 235

    new = data / "mail" / "dbmx.net" / "newcomer" / "new"
    deadline = time.monotonic() + 30
    while not (new.is_dir() and any(new.iterdir())):
        assert time.monotonic() < deadline, f"nothing delivered to {new}:\n{serve.log}"
        time.sleep(0.1)
    [delivered] = list(new.iterdir())
    assert b"Message-ID: <welcome-1@elsewhere.example>" in delivered.read_bytes()


def test_auth_failures_throttled_across_connections(
    hato_serve: HatoFactory, tmp_path: Path, swaks_at: Callable[[HatoServe], Swaks]
) -> None:
    data = tmp_path / "relay"
    serve = hato_serve(env=prepare(data, HATO_AUTH_FAILURE_LIMIT="2"), data_dir=data)
    swaks = swaks_at(serve)
    first = swaks("submission", "--tls", *auth(password="guess-1"))
    assert saw(first, "535 5.7.8")
    second = swaks("submissions", "--tlsc", *auth(password="guess-2"))
    assert saw(second, "535 5.7.8") and saw(second, "421 4.7.0"), second.stdout
    third = swaks("smtp", "--tls", *auth())  # even the right password, on any listener
    assert third.returncode == 21 and saw(third, "421 4.7.0"), third.stdout


def test_certificate_reload(
    hato_serve: HatoFactory, tmp_path: Path, swaks_at: Callable[[HatoServe], Swaks]
) -> None:
    data = tmp_path / "relay"
    env = prepare(data)
    serve = hato_serve(env=env, data_dir=data)
    swaks = swaks_at(serve)
    cert_file = Path(env["HATO_TLS_CERT_FILE"])
    got = tmp_path / "peer.pem"

    def peer(role: str, mode: str) -> str:
        got.unlink(missing_ok=True)
        proc = swaks(role, mode, "--quit-after", "TLS", "--tls-get-peer-cert", str(got))
        assert proc.returncode == 0, proc.stdout
        return got.read_text().strip()

    def wait_for_cert(expected: str, role: str, mode: str) -> None:
        deadline = time.monotonic() + 30
        while peer(role, mode) != expected:
            assert time.monotonic() < deadline, f"{role} never served the new certificate"
            time.sleep(0.2)

    old = cert_file.read_text().strip()
    assert peer("submission", "--tls") == old
    # A renewal in place: new connections get the new certificate, no restart.
    run_hato(["tls", "self-signed", "--hostname", "renewed.test", "--force"], data_dir=data)
    new = cert_file.read_text().strip()
    assert new != old
    wait_for_cert(new, "submission", "--tls")
    wait_for_cert(new, "submissions", "--tlsc")
    # SIGHUP reloads at once, whatever the files' times say.
    run_hato(["tls", "self-signed", "--hostname", "again.test", "--force"], data_dir=data)
    assert serve.pid is not None
    os.kill(serve.pid, signal.SIGHUP)
    wait_for_cert(cert_file.read_text().strip(), "smtp", "--tls")


def test_submission_without_certificate_refuses_to_start(tmp_path: Path) -> None:
    proc = run_hato(
        ["serve"],
        data_dir=tmp_path,
        env={"HATO_LISTEN": f"submission=127.0.0.1:{free_port()}"},
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [
        line
        for line in proc.stderr.splitlines()
        if line.startswith("hato: ") and "ready" not in line
    ]
    assert any("needs a TLS certificate" in line for line in errors), proc.stderr
    assert "Traceback" not in proc.stderr
