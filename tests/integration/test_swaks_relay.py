"""swaks (the guide's own test client) against the relay server's listeners, in-process.

The listeners are built as ``hato serve`` builds them (see ``RelayServer`` in
tests/peers/relay_intake.py); users and certificates are changed with the real ``hato
user`` and ``hato tls`` commands while the listeners run. 127.0.0.1 is not trusted
(mynetworks is 192.0.2.0/24), so swaks plays a client on the internet.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hato.smtp.policy import ListenerRole
from peers.relay_intake import PASSWORD, USER, RelayServer, relay

__all__ = ["relay"]  # the fixture, re-exported so pytest finds it here

SRC = Path(__file__).resolve().parents[2] / "src"
SUBMISSION, SUBMISSIONS, SMTP = ListenerRole.SUBMISSION, ListenerRole.SUBMISSIONS, ListenerRole.SMTP


@dataclass
class Run:
    code: int
    output: str

    def saw(self, text: str) -> bool:
        """Did the server send a line starting with ``text`` (in clear or over TLS)?"""
        return any(
            line.split(maxsplit=1)[-1].startswith(text)
            for line in self.output.splitlines()
            if line.startswith(("<-", "<~", "<**", "<~*"))
        )


async def run(
    program: str,
    *args: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Run:
    proc = await asyncio.create_subprocess_exec(
        program,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode("utf-8", "replace"))


async def swaks_to(
    swaks: str, relay: RelayServer, role: ListenerRole, *args: str, sender: str = "noreply@dbmx.net"
) -> Run:
    """The guide's command: ``swaks --to … --from noreply@dbmx.net --header … --body test1``."""
    return await run(
        swaks,
        "--server",
        "127.0.0.1",
        "--port",
        str(relay.port(role)),
        "--helo",
        "client.test",
        "--from",
        sender,
        "--to",
        "someone@example.net",
        "--header",
        "Subject: test",
        "--body",
        "test1",
        "--timeout",
        "30",
        *args,
    )


def auth(mechanism: str = "PLAIN", user: str = USER, password: str = PASSWORD) -> list[str]:
    return ["--auth", mechanism, "--auth-user", user, "--auth-password", password]


async def hato(relay: RelayServer, *args: str, stdin: bytes = b"") -> Run:
    """A real ``hato`` command on the relay's files."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC)}
    result = await run(sys.executable, "-m", "hato", *args, stdin=stdin, env=env)
    assert result.code == 0, result.output
    return result


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_guide_command_with_starttls(swaks: str, relay: RelayServer, mechanism: str) -> None:
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *auth(mechanism))
    assert result.code == 0, result.output
    assert result.saw("235 2.7.0") and result.saw("250 2.0.0 Ok: queued as")
    [stored] = await relay.queue.list(limit=10)
    full = await relay.queue.get(stored.id)
    assert full.sender == "noreply@dbmx.net"
    assert b"test1" in full.data


async def test_auth_before_starttls_refused_on_587(swaks: str, relay: RelayServer) -> None:
    # AUTH is not even offered before STARTTLS, so swaks gives up before MAIL.
    result = await swaks_to(swaks, relay, SUBMISSION, *auth())
    assert result.code != 0
    assert "did not advertise" in result.output.lower()
    assert not result.saw("235")
    # Without AUTH, MAIL in clear text is refused too.
    result = await swaks_to(swaks, relay, SUBMISSION)
    assert result.code == 23, result.output
    assert result.saw("530 5.7.0 Must issue a STARTTLS command first")
    # After STARTTLS but without AUTH: authentication required.
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls")
    assert result.code == 23, result.output
    assert result.saw("530 5.7.0 Authentication required")
    assert await relay.queue.list(limit=10) == []


async def test_bad_password_and_unknown_user_get_the_same_reply(
    swaks: str, relay: RelayServer
) -> None:
    bad = await swaks_to(swaks, relay, SUBMISSION, "--tls", *auth(password="wrong"))
    unknown = await swaks_to(
        swaks, relay, SUBMISSION, "--tls", *auth(user="nobody@dbmx.net", password="wrong")
    )
    for result in (bad, unknown):
        assert result.code == 28, result.output  # swaks: authentication failed
        assert result.saw("535 5.7.8 Authentication credentials invalid")
    assert "wrong" not in relay.logbuf.getvalue()


async def test_relay_without_auth_refused(swaks: str, relay: RelayServer) -> None:
    result = await swaks_to(swaks, relay, SMTP, sender="someone@elsewhere.example")
    assert result.code == 24, result.output
    assert result.saw("554 5.7.1 Relay access denied")
    # Mail for our own domain is accepted from anyone (the MX role).
    result = await run(
        swaks,
        "--server",
        "127.0.0.1",
        "--port",
        str(relay.port(SMTP)),
        "--helo",
        "mx.test",
        "--from",
        "someone@elsewhere.example",
        "--to",
        "postmaster@dbmx.net",
        "--timeout",
        "30",
    )
    assert result.code == 0, result.output


async def test_sending_as_another_domain_refused(swaks: str, relay: RelayServer) -> None:
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *auth(), sender="ceo@example.org")
    assert result.code == 23, result.output
    assert result.saw("553 5.7.1 Sender address rejected: not owned by user")
    # The other user's own address is just as foreign.
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *auth(), sender="other@example.org")
    assert result.saw("553 5.7.1")


async def test_implicit_tls_on_submissions(swaks: str, relay: RelayServer) -> None:
    result = await swaks_to(swaks, relay, SUBMISSIONS, "--tlsc", *auth())
    assert result.code == 0, result.output
    assert result.saw("250 2.0.0 Ok: queued as")
    result = await swaks_to(swaks, relay, SUBMISSIONS, "--tlsc")
    assert result.saw("530 5.7.0 Authentication required")


async def test_throttled_across_connections(swaks: str, relay: RelayServer) -> None:
    limit = relay.throttle.limit
    for attempt in range(limit):
        result = await swaks_to(
            swaks, relay, SUBMISSIONS, "--tlsc", *auth("LOGIN", password=f"guess-{attempt}")
        )
        assert result.saw("535 5.7.8"), result.output
    assert result.saw("421 4.7.0 Too many authentication failures")
    # The next connection, with the right password even, is turned away at once.
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *auth())
    assert result.code == 21, result.output  # swaks: error reading the banner
    assert result.saw("421 4.7.0 Too many authentication failures")
    assert relay.logbuf.getvalue().count("SASL LOGIN authentication failed") == limit


async def test_user_added_while_running_can_log_in(swaks: str, relay: RelayServer) -> None:
    newcomer = auth(user="app@dbmx.net", password="fresh-Pw-1")
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *newcomer)
    assert result.saw("535 5.7.8")
    await hato(
        relay,
        "user",
        "add",
        "app@dbmx.net",
        "--password-stdin",
        "--users-file",
        str(relay.store.path),
        stdin=b"fresh-Pw-1\n",
    )
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *newcomer)
    assert result.code == 0, result.output
    await hato(relay, "user", "del", "app@dbmx.net", "--users-file", str(relay.store.path))
    result = await swaks_to(swaks, relay, SUBMISSION, "--tls", *newcomer)
    assert result.saw("535 5.7.8")


async def test_certificate_reload(swaks: str, relay: RelayServer, tmp_path: Path) -> None:
    got = tmp_path / "peer.pem"
    result = await swaks_to(
        swaks, relay, SUBMISSION, "--tls", "--quit-after", "TLS", "--tls-get-peer-cert", str(got)
    )
    assert result.code == 0, result.output
    before = got.read_text()
    assert before.strip() == relay.cert_file.read_text().strip()
    # A renewal: new files in place (as certbot or `hato tls self-signed --force` do).
    await hato(
        relay,
        "tls",
        "self-signed",
        "--hostname",
        "renewed.dbmx.net",
        "--out-dir",
        str(relay.directory),
        "--force",
    )
    for role, mode in ((SUBMISSION, "--tls"), (SUBMISSIONS, "--tlsc"), (SMTP, "--tls")):
        got.unlink(missing_ok=True)
        result = await swaks_to(
            swaks, relay, role, mode, "--quit-after", "TLS", "--tls-get-peer-cert", str(got)
        )
        assert result.code == 0, result.output
        assert got.read_text().strip() == relay.cert_file.read_text().strip() != before.strip()
