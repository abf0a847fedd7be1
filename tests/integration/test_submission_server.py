"""The relay server's intake on 127.0.0.1, built the way ``hato serve`` builds it: one user
store, one authenticator and one AUTH throttle shared by an ``smtp``, a ``submission``
and a ``submissions`` listener, with a certificate from ``self_signed_certificate``.

Clients: aiosmtplib (STARTTLS, implicit TLS, AUTH PLAIN/LOGIN) and a raw socket for the
replies libraries hide. 127.0.0.1 is *not* a trusted network here (mynetworks is
192.0.2.0/24), so it plays a client on the internet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import ssl
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from hato.errors import ConfigError
from hato.maillog import MailLog
from hato.queue.memory import MemoryQueue
from hato.smtp.auth import AuthThrottle, encode_plain
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy
from hato.smtp.server import start_listener
from hato.smtp.tls import self_signed_certificate
from peers.relay_intake import PASSWORD, USER, RelayServer, relay

__all__ = ["relay"]  # the fixture, re-exported so pytest finds it here


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(
        cls, port: int, tls: ssl.SSLContext | None = None, *, source: str | None = None
    ) -> Raw:
        """Connect to 127.0.0.1, from the loopback address ``source`` if given."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls,
            server_hostname="localhost" if tls else None,
            local_addr=(source, 0) if source else None,
        )
        return cls(reader, writer)

    async def reply(self) -> str:
        out = ""
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                return out + "(closed)"
            out += line
            if line[3:4] != "-":
                return out

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS")).startswith("220 ")
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def message(sender: str = "noreply@dbmx.net", to: str = "someone@example.net") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "test"
    msg.set_content("test1\n")
    return msg


async def test_submission_needs_starttls_then_auth(relay: RelayServer) -> None:
    raw = await Raw.connect(relay.port(ListenerRole.SUBMISSION))
    assert (await raw.reply()).startswith("220 mail.dbmx.net ESMTP")
    ehlo = await raw.cmd("EHLO client.test")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    assert (await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD)}")).startswith("538 5.7.11")
    assert await raw.cmd("MAIL FROM:<noreply@dbmx.net>") == (
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    )
    await raw.starttls(relay.client_tls())
    ehlo = await raw.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
    assert await raw.cmd("MAIL FROM:<noreply@dbmx.net>") == "530 5.7.0 Authentication required\r\n"
    assert (await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD)}")).startswith("235 2.7.0")
    assert (await raw.cmd("MAIL FROM:<noreply@dbmx.net>")).startswith("250 ")
    assert (await raw.cmd("RCPT TO:<anyone@example.net>")).startswith("250 ")
    await raw.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_aiosmtplib_submits_with_starttls(relay: RelayServer, mechanism: str) -> None:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.port(ListenerRole.SUBMISSION),
        start_tls=True,
        tls_context=relay.client_tls(),
        timeout=20,
    )
    await client.connect()
    await client.ehlo()
    await client.auth_plain(USER, PASSWORD) if mechanism == "PLAIN" else await client.auth_login(
        USER, PASSWORD
    )
    errors, _ = await client.send_message(message())
    await client.quit()
    assert errors == {}
    [stored] = await relay.queue.list(limit=10)
    full = await relay.queue.get(stored.id)
    assert full.sender == "noreply@dbmx.net"
    assert b"with ESMTPSA" in full.data
    assert f"sasl_username={USER}" in relay.logbuf.getvalue()


async def test_submissions_is_implicit_tls_and_needs_auth(relay: RelayServer) -> None:
    port = relay.port(ListenerRole.SUBMISSIONS)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await aiosmtplib.send(
            message(),
            hostname="127.0.0.1",
            port=port,
            use_tls=True,
            tls_context=relay.client_tls(),
            timeout=20,
        )
    assert (err.value.code, err.value.message) == (530, "5.7.0 Authentication required")
    errors, _ = await aiosmtplib.send(
        message(),
        hostname="127.0.0.1",
        port=port,
        use_tls=True,
        tls_context=relay.client_tls(),
        username=USER,
        password=PASSWORD,
        timeout=20,
    )
    assert errors == {}


async def test_smtp_role_takes_own_domains_and_relays_only_after_auth(relay: RelayServer) -> None:
    port = relay.port(ListenerRole.SMTP)
    raw = await Raw.connect(port)
    await raw.reply()
    assert "AUTH" not in await raw.cmd("EHLO mx.elsewhere.example")  # only after STARTTLS
    assert (await raw.cmd("MAIL FROM:<someone@elsewhere.example>")).startswith("250 ")
    assert (await raw.cmd("RCPT TO:<postmaster@dbmx.net>")).startswith("250 ")
    assert await raw.cmd("RCPT TO:<victim@example.net>") == "554 5.7.1 Relay access denied\r\n"
    assert (await raw.cmd("RSET")).startswith("250 ")
    await raw.starttls(relay.client_tls())
    assert "AUTH PLAIN LOGIN" in await raw.cmd("EHLO client.test")
    assert (await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD)}")).startswith("235 ")
    assert (await raw.cmd("MAIL FROM:<noreply@dbmx.net>")).startswith("250 ")
    assert (await raw.cmd("RCPT TO:<friend@example.net>")).startswith("250 ")
    await raw.close()


async def test_sender_ownership(relay: RelayServer) -> None:
    raw = await Raw.connect(relay.port(ListenerRole.SUBMISSIONS), relay.client_tls())
    await raw.reply()
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD)}")).startswith("235 ")
    for sender in ("x@example.org", "other@example.org", "noreply@mail.dbmx.net"):
        assert await raw.cmd(f"MAIL FROM:<{sender}>") == (
            "553 5.7.1 Sender address rejected: not owned by user\r\n"
        )
    assert (await raw.cmd("MAIL FROM:<NoReply@DBMX.net>")).startswith("250 ")
    await raw.close()
    # A grant made while the server runs applies at the next AUTH.
    relay.store.set_senders(USER, allow=["@example.org"])
    raw = await Raw.connect(relay.port(ListenerRole.SUBMISSIONS), relay.client_tls())
    await raw.reply()
    await raw.cmd("EHLO client.test")
    await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD)}")
    assert (await raw.cmd("MAIL FROM:<x@example.org>")).startswith("250 ")
    await raw.close()


async def test_sender_login_check_off(tmp_path: Path) -> None:
    relay = await RelayServer(tmp_path, sender_login_check=False).start()
    try:
        errors, _ = await aiosmtplib.send(
            message(sender="anything@example.org"),
            hostname="127.0.0.1",
            port=relay.port(ListenerRole.SUBMISSIONS),
            use_tls=True,
            tls_context=relay.client_tls(),
            username=USER,
            password=PASSWORD,
            timeout=20,
        )
        assert errors == {}
    finally:
        await relay.aclose()


async def test_failures_look_alike_and_are_logged_without_passwords(relay: RelayServer) -> None:
    raw = await Raw.connect(relay.port(ListenerRole.SUBMISSIONS), relay.client_tls())
    await raw.reply()
    await raw.cmd("EHLO client.test")
    wrong = await raw.cmd(f"AUTH PLAIN {encode_plain(USER, 'not-it-1')}")
    unknown = await raw.cmd(f"AUTH PLAIN {encode_plain('ghost@dbmx.net', 'not-it-2')}")
    # PLAIN authzid: acting as someone else (proxy auth) is refused like a bad password.
    proxy = await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD, authzid='other@example.org')}")
    assert wrong == unknown == proxy == "535 5.7.8 Authentication credentials invalid\r\n"
    await raw.close()
    log = relay.logbuf.getvalue()
    assert f"sasl_username={USER}" in log and "sasl_username=ghost@dbmx.net" in log
    assert "not-it" not in log and PASSWORD not in log
    # The authzid equal to the user is the user itself.
    raw = await Raw.connect(relay.port(ListenerRole.SUBMISSIONS), relay.client_tls())
    await raw.reply()
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD, authzid=USER)}")).startswith(
        "235 "
    )
    await raw.close()


async def fail_once(
    port: int, tls: ssl.SSLContext | None, *, starttls: bool = False, blocked: bool = False
) -> list[str]:
    """One connection, one failed AUTH LOGIN; ``blocked``: read the 421 and the close too."""
    raw = await Raw.connect(port, None if starttls else tls)
    replies = [await raw.reply()]
    if replies[0].startswith("220 "):
        await raw.cmd("EHLO client.test")
        if starttls:
            assert tls is not None
            await raw.starttls(tls)
            await raw.cmd("EHLO client.test")
        login = base64.b64encode(b"ghost@dbmx.net").decode()
        replies.append(await raw.cmd(f"AUTH LOGIN {login}"))
        replies.append(await raw.cmd(base64.b64encode(b"guess").decode()))
        if blocked:
            replies.append(await raw.reply())
            replies.append(await raw.reply())
    await raw.close()
    return replies


async def test_throttle_across_connections_and_listeners(relay: RelayServer) -> None:
    tls = relay.client_tls()
    submissions = relay.port(ListenerRole.SUBMISSIONS)
    started = time.monotonic()
    for _ in range(3):
        replies = await fail_once(submissions, tls)
        assert replies[-1] == "535 5.7.8 Authentication credentials invalid\r\n"
    # The limit (4) is reached on another listener: 535, then 421 and the door closes.
    replies = await fail_once(relay.port(ListenerRole.SUBMISSION), tls, starttls=True, blocked=True)
    assert replies[-3:] == [
        "535 5.7.8 Authentication credentials invalid\r\n",
        "421 4.7.0 Too many authentication failures, closing connection\r\n",
        "(closed)",
    ]
    # The delays grew (0.01 + 0.02 + 0.04 at least) before the block.
    assert time.monotonic() - started >= 0.07
    # Every listener now refuses this client at connect, the right password too.
    for role in ListenerRole:
        raw = await Raw.connect(relay.port(role), tls if role is ListenerRole.SUBMISSIONS else None)
        assert await raw.reply() == (
            "421 4.7.0 Too many authentication failures, closing connection\r\n"
        )
        await raw.close()
    assert "reject=CONNECT from unknown[127.0.0.1]: 421 4.7.0" in relay.logbuf.getvalue()


async def test_blocked_while_connected(relay: RelayServer) -> None:
    tls = relay.client_tls()
    port = relay.port(ListenerRole.SUBMISSIONS)
    early = await Raw.connect(port, tls)  # connected before the block
    await early.reply()
    await early.cmd("EHLO client.test")
    for _ in range(4):
        await fail_once(port, tls)
    assert relay.throttle.blocked("127.0.0.1")
    assert (await early.cmd(f"AUTH PLAIN {encode_plain(USER, PASSWORD)}")).startswith("535 5.7.8")
    assert (await early.reply()).startswith("421 4.7.0")
    assert await early.reply() == "(closed)"
    await early.close()


async def test_listeners_that_need_tls_or_users_refuse_to_start(tmp_path: Path) -> None:
    queue = MemoryQueue()
    log = MailLog(io.StringIO())
    relay = RelayServer(tmp_path)
    for role in (ListenerRole.SUBMISSION, ListenerRole.SUBMISSIONS):
        with pytest.raises(ConfigError, match=f"\\({role}\\) needs a TLS certificate"):
            await start_listener(
                ListenerConfig("127.0.0.1", 0, role),
                queue=queue,
                policy=Policy(role=role),
                authenticator=relay.authenticator,
                log=log,
            )
        with pytest.raises(ConfigError, match="needs a user store"):
            await start_listener(
                ListenerConfig("127.0.0.1", 0, role),
                queue=queue,
                policy=Policy(role=role),
                tls=relay.tls,
                log=log,
            )
    # smtp needs neither (STARTTLS and AUTH are simply not offered).
    listener = await start_listener(
        ListenerConfig("127.0.0.1", 0), queue=queue, policy=Policy(), log=log
    )
    await listener.aclose(timeout=2)


async def test_new_certificate_for_new_connections(relay: RelayServer) -> None:
    async def peer_cert(role: ListenerRole) -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if role is ListenerRole.SUBMISSIONS:
            raw = await Raw.connect(relay.port(role), ctx)
            await raw.reply()
        else:
            raw = await Raw.connect(relay.port(role))
            await raw.reply()
            await raw.cmd("EHLO client.test")
            await raw.starttls(ctx)
        sslobj = raw.writer.get_extra_info("ssl_object")
        der: bytes = sslobj.getpeercert(binary_form=True)
        await raw.close()
        return der

    before = {role: await peer_cert(role) for role in ListenerRole}
    cert, key = self_signed_certificate(
        ["renewed.test"], days=1, now=datetime.datetime.now(datetime.UTC)
    )
    for name, data in (("privkey.pem", key), ("fullchain.pem", cert)):
        (relay.directory / f"{name}.new").write_bytes(data)
        (relay.directory / f"{name}.new").replace(relay.directory / name)
    want = ssl.PEM_cert_to_DER_cert(cert.decode())
    for role in ListenerRole:
        got = await peer_cert(role)
        assert got == want and got != before[role], role


# Guessing spread over many client addresses (issue 8, item 4). Each address is a loopback
# address of its own (127.0.0.0/8 is all on lo), each guess a connection of its own.


async def guess(relay: RelayServer, source: str, user: str, password: str) -> str:
    raw = await Raw.connect(relay.port(ListenerRole.SUBMISSIONS), relay.client_tls(), source=source)
    assert (await raw.reply()).startswith("220 ")
    await raw.cmd("EHLO client.test")
    answer = await raw.cmd(f"AUTH PLAIN {encode_plain(user, password)}")
    await raw.close()
    return answer


FAILED = "535 5.7.8 Authentication credentials invalid\r\n"
LOCKED = "454 4.7.0 Temporary authentication failure, try again later\r\n"


async def test_guessing_one_user_from_many_addresses_locks_the_name(tmp_path: Path) -> None:
    throttle = AuthThrottle(
        limit=5, window=60, user_limit=10, user_window=60, base_delay=0.001, max_delay=0.002
    )
    relay = await RelayServer(tmp_path, throttle=throttle, mynetworks=["127.0.9.9/32"]).start()
    try:
        # The site's own relay logs in before the attack.
        assert (await guess(relay, "127.0.8.1", USER, PASSWORD)).startswith("235 ")
        # 8 addresses x 4 guesses at a real user, then at a name that does not exist:
        # the same replies in the same order, 10 failures and then the lock.
        for user, net in ((USER, "127.0.1"), ("ghost@dbmx.net", "127.0.2")):
            answers = [
                await guess(relay, f"{net}.{host}", user, f"guess-{host}-{n}")
                for host in range(1, 9)
                for n in range(4)
            ]
            assert answers == [FAILED] * 10 + [LOCKED] * 22, user
        # While the name is locked, the right password from a new address changes nothing.
        assert await guess(relay, "127.0.3.1", USER, PASSWORD) == LOCKED
        # Not locked out: the address that logged in within the window, a trusted client.
        assert (await guess(relay, "127.0.8.1", USER, PASSWORD)).startswith("235 ")
        assert (await guess(relay, "127.0.9.9", USER, PASSWORD)).startswith("235 ")
        # Other users are not affected.
        assert (await guess(relay, "127.0.3.2", "other@example.org", "other-pw")).startswith("235")
        # Counters for /metrics, and a log line per lock.
        label = relay.listeners[ListenerRole.SUBMISSIONS].label
        assert throttle.failure_counts == {label: 65}
        assert throttle.user_locks == 2
        assert throttle.locked_refusals == 45
        assert throttle.client_blocks == 0
        log = relay.logbuf.getvalue()
        assert log.count("SASL login name locked") == 2
        assert "reject=AUTH from unknown[127.0.1.8]: 454 4.7.0" in log
    finally:
        await relay.aclose()


async def test_user_lock_expires_with_its_window(tmp_path: Path) -> None:
    clock = [1000.0]
    throttle = AuthThrottle(
        limit=50, window=60, user_limit=3, user_window=60, base_delay=0, clock=lambda: clock[0]
    )
    relay = await RelayServer(tmp_path, throttle=throttle).start()
    try:
        answers = [await guess(relay, f"127.0.4.{n}", USER, "wrong") for n in range(1, 5)]
        assert answers == [FAILED] * 3 + [LOCKED]
        clock[0] += 61
        assert (await guess(relay, "127.0.4.9", USER, PASSWORD)).startswith("235 ")
    finally:
        await relay.aclose()
