"""The real asyncio SMTP listener on 127.0.0.1 (port 0) with real clients.

Clients: smtplib, aiosmtplib (plain, STARTTLS with a trustme certificate, implicit TLS)
and a raw socket client for what libraries will not do (true pipelining, injection,
smuggling, vanishing mid-DATA). The queue is the in-memory backend or a small fake
where a failure must be provoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from hato.errors import QueueError, QueueFullError
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.memory import MemoryQueue
from hato.smtp.auth import StaticAuthenticator
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.protocol import SessionConfig
from hato.smtp.server import FreeSpace, SMTPListener, start_listener
from hato.smtp.tls import TLSContextProvider

LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])
USERS = {"alice@example.com": "s3cret"}


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> TLSContextProvider:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return TLSContextProvider(cert_file, key_file)


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Harness:
    def __init__(self) -> None:
        self.logbuf = io.StringIO()
        self.log = MailLog(self.logbuf)
        self.queue: Any = MemoryQueue()
        self.listeners: list[SMTPListener] = []
        self.clients: list[RawClient] = []

    async def connect(
        self, port: int, *, source: str | None = None, tls: ssl.SSLContext | None = None
    ) -> RawClient:
        client = await RawClient.connect(port, source=source, tls=tls)
        self.clients.append(client)
        return client

    async def start(
        self,
        *,
        role: ListenerRole = ListenerRole.SMTP,
        policy: Policy | None = None,
        tls: TLSContextProvider | None = None,
        auth: bool = False,
        queue: Any = None,
        hold: bool = False,
        greet_delay: float | None = None,
        **limits: Any,
    ) -> SMTPListener:
        if queue is not None:
            self.queue = queue
        await self.queue.open()
        listener = await start_listener(
            ListenerConfig("127.0.0.1", 0, role),
            queue=self.queue,
            policy=policy or Policy(role=role, mynetworks=LOOPBACK),
            authenticator=StaticAuthenticator(USERS) if auth else None,
            tls=tls,
            log=self.log,
            hostname="mx.test",
            limits=SessionConfig(**limits),
            hold=hold,
            greet_delay=greet_delay,
        )
        self.listeners.append(listener)
        return listener

    async def stored(self) -> list[Any]:
        return list(await self.queue.list(limit=1000))


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    for client in h.clients:
        await client.close()
    for listener in h.listeners:
        await listener.aclose(timeout=2)


class RawClient:
    """A line-level client over a real socket, for what SMTP libraries refuse to do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, *, source: str | None = None, tls: ssl.SSLContext | None = None
    ) -> RawClient:
        """Connect to 127.0.0.1, from the loopback address ``source`` if given."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            local_addr=(source, 0) if source else None,
            ssl=tls,
            server_hostname="localhost" if tls else None,
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 5.0) -> bytes:
        """One whole (possibly multi-line) reply."""
        out = b""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError(f"connection closed after {out!r}")
            out += line
            if line[3:4] != b"-":
                return out

    async def replies(self, n: int) -> list[bytes]:
        return [await self.reply() for _ in range(n)]

    async def closed(self, timeout: float = 5.0) -> bool:
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def message(to: str = "bob@example.net", subject: str = "hi") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hello from the test.\n.leading dot line\n")
    return msg


# Real clients ------------------------------------------------------------------


async def test_smtplib_relays_from_trusted_network(harness: Harness) -> None:
    listener = await harness.start()

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as client:
            return client.send_message(message())

    refused = await asyncio.to_thread(send)
    assert refused == {}
    [stored] = await harness.stored()
    full = await harness.queue.get(stored.id)
    assert full.sender == "alice@example.com"
    assert [r.address for r in full.recipients] == ["bob@example.net"]
    assert full.data.startswith(b"Received: from ")
    assert b"\r\n.leading dot line\r\n" in full.data  # unstuffed
    log = harness.logbuf.getvalue()
    assert f"{stored.id}: client=unknown[127.0.0.1], from=<alice@example.com>" in log
    assert re.search(r"\bconnect[= ]from unknown\[127\.0\.0\.1\]", log)


async def test_aiosmtplib_plain_reply_names_queue_id(harness: Harness) -> None:
    listener = await harness.start()
    errors, text = await aiosmtplib.send(
        message(), hostname="127.0.0.1", port=listener.port, start_tls=False
    )
    assert errors == {}
    [stored] = await harness.stored()
    assert text == f"2.0.0 Ok: queued as {stored.id}"


async def test_aiosmtplib_starttls_and_auth_on_submission(
    harness: Harness, tls: TLSContextProvider, client_tls: ssl.SSLContext
) -> None:
    listener = await harness.start(role=ListenerRole.SUBMISSION, tls=tls, auth=True)
    await aiosmtplib.send(
        message(),
        hostname="127.0.0.1",
        port=listener.port,
        start_tls=True,
        tls_context=client_tls,
        username="alice@example.com",
        password="s3cret",
    )
    [stored] = await harness.stored()
    full = await harness.queue.get(stored.id)
    assert b"with ESMTPSA" in full.data


async def test_submission_refuses_wrong_password_and_plaintext(
    harness: Harness, tls: TLSContextProvider, client_tls: ssl.SSLContext
) -> None:
    listener = await harness.start(role=ListenerRole.SUBMISSION, tls=tls, auth=True)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await aiosmtplib.send(
            message(),
            hostname="127.0.0.1",
            port=listener.port,
            start_tls=True,
            tls_context=client_tls,
            username="alice@example.com",
            password="wrong",
        )
    assert err.value.code == 535
    # Without TLS the server does not offer AUTH, so the client cannot even try.
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False)
    await client.connect()
    await client.ehlo()
    assert not client.supports_extension("auth")
    assert client.supports_extension("starttls")
    code, text = await client.execute_command(b"MAIL", b"FROM:<alice@example.com>")
    assert (code, text) == (530, "5.7.0 Must issue a STARTTLS command first")
    await client.quit()
    assert "SASL PLAIN authentication failed" in harness.logbuf.getvalue()
    assert "wrong" not in harness.logbuf.getvalue()
    assert await harness.stored() == []


async def test_aiosmtplib_implicit_tls_submissions(
    harness: Harness, tls: TLSContextProvider, client_tls: ssl.SSLContext
) -> None:
    listener = await harness.start(role=ListenerRole.SUBMISSIONS, tls=tls, auth=True)
    await aiosmtplib.send(
        message(),
        hostname="127.0.0.1",
        port=listener.port,
        use_tls=True,
        tls_context=client_tls,
        username="alice@example.com",
        password="s3cret",
    )
    assert len(await harness.stored()) == 1


async def test_untrusted_client_cannot_relay(harness: Harness) -> None:
    listener = await harness.start(policy=Policy(domains=["example.org"]))
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as err:
        await aiosmtplib.send(
            message("victim@evil.example"),
            hostname="127.0.0.1",
            port=listener.port,
            start_tls=False,
        )
    assert err.value.recipients[0].code == 554
    errors, _ = await aiosmtplib.send(
        message("User@Example.ORG"), hostname="127.0.0.1", port=listener.port, start_tls=False
    )
    assert errors == {}
    log = harness.logbuf.getvalue()
    assert re.search(
        r"NOQUEUE: reject[=:]? ?RCPT from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 Relay access denied",
        log,
    )


# Raw-socket behaviour ----------------------------------------------------------


async def test_pipelined_transactions_in_one_write(harness: Harness) -> None:
    listener = await harness.start()
    client = await harness.connect(listener.port)
    assert (await client.reply()).startswith(b"220 mx.test ESMTP")
    await client.send(
        b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    )
    replies = await client.replies(4)
    assert b"250-PIPELINING" in replies[0]
    assert [r[:3] for r in replies[1:]] == [b"250", b"250", b"354"]
    await client.send(
        b"Subject: 1\r\n\r\none\r\n.\r\nMAIL FROM:<a@example.com>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    replies = await client.replies(4)
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert [r[:3] for r in replies[1:]] == [b"250", b"250", b"354"]
    await client.send(b"Subject: 2\r\n\r\ntwo\r\n.\r\nQUIT\r\n")
    replies = await client.replies(2)
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert replies[1] == b"221 2.0.0 Bye\r\n"
    assert await client.closed()
    assert len(await harness.stored()) == 2


async def test_starttls_injection_is_discarded(
    harness: Harness, tls: TLSContextProvider, client_tls: ssl.SSLContext
) -> None:
    """CVE-2011-0411 / CVE-2024-34083 over a real socket."""
    listener = await harness.start(tls=tls)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"EHLO c.test\r\n")
    assert b"250 STARTTLS" in await client.reply()
    await client.send(
        b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nRCPT TO:<v@example.net>\r\n"
    )
    assert await client.reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.writer.start_tls(client_tls, server_hostname="localhost")
    await client.send(b"EHLO c.test\r\nRCPT TO:<v@example.net>\r\n")
    ehlo, rcpt = await client.replies(2)
    assert b"STARTTLS" not in ehlo
    assert rcpt == b"503 5.5.1 Need MAIL command\r\n"
    await client.close()


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"],
    ids=["lf-dot-lf", "lf-dot-crlf", "crlf-dot-lf", "cr-dot-cr", "crlf-dot-cr"],
)
async def test_smtp_smuggling_over_socket(harness: Harness, smuggle: bytes) -> None:
    listener = await harness.start()
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    await client.send(
        b"Subject: real\r\n\r\nbody"
        + smuggle
        + b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    assert (await client.reply()).startswith(b"554 5.6.11 ")
    assert await client.closed()
    assert await harness.stored() == []


async def test_http_request_is_refused_and_closed(harness: Harness) -> None:
    listener = await harness.start()
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert (await client.reply()).startswith(b"554 5.7.0 ")
    assert await client.closed()


@pytest.mark.parametrize("junk", [b"NOOP", b"VRFY postmaster"])
async def test_junk_command_flood_is_cut_off(harness: Harness, junk: bytes) -> None:
    # 200 junk commands in one write: the default limit (100) answers 100, then 421.
    listener = await harness.start()
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send((junk + b"\r\n") * 200)
    answers = await client.replies(101)
    assert all(answer[:1] == b"2" for answer in answers[:100])
    assert answers[100] == b"421 4.7.0 Too many junk commands, closing connection\r\n"
    assert await client.closed()
    verb = junk.split()[0].decode()
    assert (
        f"reject={verb} from unknown[127.0.0.1]: 421 4.7.0 Too many junk commands"
        in harness.logbuf.getvalue()
    )


async def test_full_disk_is_refused_at_mail_before_any_data(harness: Harness) -> None:
    free = [50_000]
    listener = await harness.start(queue_free_space=lambda: free[0], queue_min_free=40_000)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"EHLO c\r\nMAIL FROM:<a@example.com> SIZE=20000\r\n")
    _ehlo, mail = await client.replies(2)
    assert mail == b"452 4.3.1 Insufficient system storage\r\n"
    free[0] = 70_000
    await client.send(b"MAIL FROM:<a@example.com> SIZE=20000\r\n")
    assert await client.reply() == b"250 2.1.0 Sender OK\r\n"
    await client.close()
    assert "reject=MAIL from unknown[127.0.0.1]: 452 4.3.1" in harness.logbuf.getvalue()


def test_free_space_is_statvfs_cached_for_a_second(tmp_path: Path) -> None:
    calls: list[str] = []
    now = [100.0]

    def statvfs(path: str) -> os.statvfs_result:
        calls.append(path)
        return os.statvfs(path)

    free = FreeSpace(tmp_path, clock=lambda: now[0], statvfs=statvfs)
    first = free()
    assert isinstance(first, int) and first >= 0
    for _ in range(100):
        assert free() == first
    now[0] += 0.5
    free()
    assert calls == [str(tmp_path)]
    now[0] += 0.6
    free()
    assert len(calls) == 2
    # A filesystem that cannot be asked: unknown, never a refusal.
    assert FreeSpace(tmp_path / "gone")() is None


async def test_declared_and_undeclared_oversize(harness: Harness) -> None:
    listener = await harness.start(max_message_size=1000)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"EHLO c\r\nMAIL FROM:<a@example.com> SIZE=5000\r\n")
    ehlo, mail = await client.replies(2)
    assert b"250-SIZE 1000\r\n" in ehlo
    assert mail == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    await client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(3)
    for _ in range(50):
        await client.send(b"x" * 78 + b"\r\n")
    await client.send(b".\r\nNOOP\r\n")
    assert await client.replies(2) == [
        b"552 5.3.4 Message size exceeds fixed limit\r\n",
        b"250 2.0.0 OK\r\n",
    ]
    await client.close()
    assert await harness.stored() == []


async def test_vanished_client_mid_data_loses_nothing_and_crashes_nothing(
    harness: Harness,
) -> None:
    listener = await harness.start()
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    await client.send(b"Subject: half\r\n\r\nthis message never ends")
    client.writer.transport.abort()
    await wait_for(lambda: not listener.connections)
    # The listener still serves, and the half message was not queued.
    errors, _ = await aiosmtplib.send(
        message(), hostname="127.0.0.1", port=listener.port, start_tls=False
    )
    assert errors == {}
    assert len(await harness.stored()) == 1
    assert re.search(r"disconnect[= ]from unknown\[127\.0\.0\.1\]", harness.logbuf.getvalue())


async def test_connection_limit_per_client(harness: Harness) -> None:
    listener = await harness.start(policy=Policy(), max_connections_per_client=2)
    first = await harness.connect(listener.port)
    second = await harness.connect(listener.port)
    assert (await first.reply())[:3] == b"220"
    assert (await second.reply())[:3] == b"220"
    third = await harness.connect(listener.port)
    assert await third.reply() == b"421 4.7.0 Too many connections, try again later\r\n"
    assert await third.closed()
    await first.close()
    await wait_for(lambda: len(listener.connections) == 1)
    fourth = await harness.connect(listener.port)
    assert (await fourth.reply())[:3] == b"220"
    await second.close()
    await fourth.close()


async def test_connection_limit_in_total(harness: Harness) -> None:
    listener = await harness.start(max_connections=1)
    first = await harness.connect(listener.port)
    await first.reply()
    second = await harness.connect(listener.port)
    assert (await second.reply())[:3] == b"421"
    assert await second.closed()
    await first.close()


async def test_idle_strangers_cannot_lock_trusted_clients_out(harness: Harness) -> None:
    # 127.0.0.2 is the trusted network (the application); 127.0.0.1 a stranger.
    policy = Policy(mynetworks=parse_networks(["127.0.0.2/32"]))
    listener = await harness.start(policy=policy, max_connections=4, trusted_connection_reserve=2)
    strangers = [await harness.connect(listener.port, source="127.0.0.1") for _ in range(3)]
    assert [(await c.reply())[:4] for c in strangers] == [b"220 ", b"220 ", b"421 "]
    assert await strangers[2].closed()
    apps = [await harness.connect(listener.port, source="127.0.0.2") for _ in range(3)]
    # The reserve is theirs; the total still holds for everyone.
    assert [(await c.reply())[:4] for c in apps] == [b"220 ", b"220 ", b"421 "]
    # The application's mail flows while the strangers sit idle.
    await apps[0].send(b"HELO app\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
    assert [r[:3] for r in await apps[0].replies(3)] == [b"250", b"250", b"250"]
    # A stranger that leaves frees a place for a stranger again, as long as the total
    # has room.
    await strangers[0].close()
    await wait_for(lambda: len(listener.connections) == 3)
    again = await harness.connect(listener.port, source="127.0.0.1")
    assert (await again.reply())[:4] == b"220 "
    late = await harness.connect(listener.port, source="127.0.0.2")
    assert (await late.reply())[:4] == b"421 "


async def test_submission_listeners_have_no_trusted_reserve(
    harness: Harness, tls: TLSContextProvider
) -> None:
    # Everyone on a submission port is about to authenticate: the whole total is theirs.
    listener = await harness.start(
        role=ListenerRole.SUBMISSION,
        tls=tls,
        auth=True,
        policy=Policy(role=ListenerRole.SUBMISSION),
        max_connections=3,
        trusted_connection_reserve=2,
    )
    clients = [await harness.connect(listener.port) for _ in range(4)]
    assert [(await c.reply())[:4] for c in clients] == [b"220 ", b"220 ", b"220 ", b"421 "]


# Early talkers (Postfix postscreen's pregreet test). The listeners here are bound to
# loopback, where the delay never applies by default, so the tests ask for it explicitly.

STRANGERS_ONLY = Policy(mynetworks=parse_networks(["192.0.2.0/24"]))
GREETING = b"220 mx.test ESMTP Hato\r\n"


async def test_a_client_talking_before_the_greeting_is_refused(harness: Harness) -> None:
    listener = await harness.start(policy=STRANGERS_ONLY, greet_delay=60)
    client = await harness.connect(listener.port)
    assert await client.reader.readline() == b"220-mx.test ESMTP Hato\r\n"
    await client.send(b"EHLO bot.example\r\nMAIL FROM:<spam@example.com>\r\n")
    assert await client.reply() == (
        b"554 5.5.1 Protocol error: talking before the greeting, closing connection\r\n"
    )
    assert await client.closed()
    await wait_for(lambda: not listener.connections)
    log = harness.logbuf.getvalue()
    assert "reject=CONNECT from unknown[127.0.0.1]: 554 5.5.1 Protocol error" in log


async def test_a_client_that_talks_at_once_is_refused(harness: Harness) -> None:
    listener = await harness.start(policy=STRANGERS_ONLY, greet_delay=60)
    client = await harness.connect(listener.port)
    await client.send(b"HELO bot.example\r\n")
    assert await client.reply() == b"220-mx.test ESMTP Hato\r\n" + (
        b"554 5.5.1 Protocol error: talking before the greeting, closing connection\r\n"
    )
    assert await client.closed()


async def test_a_patient_client_gets_the_whole_greeting_and_is_served(harness: Harness) -> None:
    listener = await harness.start(policy=STRANGERS_ONLY, greet_delay=0.2)
    client = await harness.connect(listener.port)
    assert await client.reply() == b"220-mx.test ESMTP Hato\r\n" + GREETING
    await client.send(b"HELO mta.example\r\n")
    assert await client.reply() == b"250 mx.test\r\n"
    # Libraries read a multi-line greeting as one.
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port, start_tls=False)
    greeting = await smtp.connect()
    assert greeting.code == 220 and greeting.message.endswith("mx.test ESMTP Hato")
    assert (await smtp.ehlo()).code == 250
    await smtp.quit()


async def test_trusted_clients_are_greeted_at_once(harness: Harness) -> None:
    listener = await harness.start(greet_delay=60)  # loopback is trusted here
    client = await harness.connect(listener.port)
    assert await client.reply() == GREETING


@pytest.mark.parametrize(
    ("host", "role", "applies"),
    [
        ("0.0.0.0", ListenerRole.SMTP, True),
        ("::", ListenerRole.SMTP, True),
        ("192.0.2.25", ListenerRole.SMTP, True),
        ("127.0.0.1", ListenerRole.SMTP, False),
        ("::1", ListenerRole.SMTP, False),
        ("localhost", ListenerRole.SMTP, False),
        ("0.0.0.0", ListenerRole.SUBMISSION, False),
        ("0.0.0.0", ListenerRole.SUBMISSIONS, False),
    ],
)
def test_where_the_greeting_waits_by_default(host: str, role: ListenerRole, applies: bool) -> None:
    # Built, never started: nothing is bound.
    listener = SMTPListener(
        ListenerConfig(host, 25, role),
        queue=MemoryQueue(),
        policy=Policy(role=role),
        authenticator=None,
        tls=None,
        log=MailLog(io.StringIO()),
        limits=SessionConfig(greet_delay=1.5),
    )
    assert listener.greet_delay == (1.5 if applies else 0.0)


async def test_idle_timeout(harness: Harness) -> None:
    listener = await harness.start(idle_timeout=0.2)
    client = await harness.connect(listener.port)
    await client.reply()
    started = time.monotonic()
    assert await client.reply() == b"421 4.4.2 Timeout, closing connection\r\n"
    assert await client.closed()
    assert time.monotonic() - started < 3


async def test_trickling_client_times_out(harness: Harness) -> None:
    """Bytes that never complete a command do not keep a session alive."""
    listener = await harness.start(idle_timeout=10, command_timeout=0.3)
    client = await harness.connect(listener.port)
    await client.reply()
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 5 and sent < 100:
        try:
            await client.send(b"N")
        except ConnectionError:
            break
        sent += 1
        try:
            answer = await asyncio.wait_for(client.reader.readline(), 0.05)
        except TimeoutError:
            continue
        assert answer == b"421 4.4.2 Timeout, closing connection\r\n"
        break
    else:
        raise AssertionError("trickling client was not timed out")
    assert 0.25 < time.monotonic() - started < 3


async def test_trickled_data_is_limited_by_command_timeout(harness: Harness) -> None:
    listener = await harness.start(idle_timeout=10, command_timeout=0.4)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    started = time.monotonic()
    answer = b""
    for _ in range(100):
        try:
            await client.send(b"line\r\n")
            answer = await asyncio.wait_for(client.reader.readline(), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        break
    assert answer == b"421 4.4.2 Timeout, closing connection\r\n"
    assert time.monotonic() - started < 3
    assert await harness.stored() == []


async def test_silence_in_data_is_idle(harness: Harness) -> None:
    listener = await harness.start(idle_timeout=0.2, command_timeout=30)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    await client.send(b"partial line")
    assert await client.reply() == b"421 4.4.2 Timeout, closing connection\r\n"
    assert await client.closed()


async def test_steady_client_is_not_timed_out(harness: Harness) -> None:
    """Each reply restarts both clocks: a slow but steady client is served."""
    listener = await harness.start(idle_timeout=0.3, command_timeout=0.3)
    client = await harness.connect(listener.port)
    await client.reply()
    started = time.monotonic()
    while time.monotonic() - started < 0.8:
        await client.send(b"NOOP\r\n")
        assert await client.reply() == b"250 2.0.0 OK\r\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.reader.readline(), 0.15)


class SlowQueue(MemoryQueue):
    """Holds every enqueue until released, to show 250 waits for the commit."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def enqueue(self, envelope: Envelope, data: bytes, **kw: Any) -> str:
        self.started.set()
        await self.gate.wait()
        return await super().enqueue(envelope, data, **kw)


async def test_250_only_after_enqueue_returned(harness: Harness) -> None:
    queue = SlowQueue()
    listener = await harness.start(queue=queue)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    await client.send(b"x\r\n.\r\nNOOP\r\n")
    await asyncio.wait_for(queue.started.wait(), 5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.reader.readline(), 0.2)
    queue.gate.set()
    assert (await client.reply()).startswith(b"250 2.0.0 Ok: queued as ")
    assert await client.reply() == b"250 2.0.0 OK\r\n"
    await client.close()


class FailingQueue(MemoryQueue):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    async def enqueue(self, envelope: Envelope, data: bytes, **kw: Any) -> str:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (QueueFullError("disk full"), b"452 4.3.1 Insufficient system storage\r\n"),
        (QueueError("db down"), b"451 4.3.0 Queue write failed, try again later\r\n"),
        (RuntimeError("bug"), b"451 4.3.0 Local error in processing, try again later\r\n"),
    ],
)
async def test_queue_failures_are_temporary(
    harness: Harness, exc: Exception, expected: bytes
) -> None:
    listener = await harness.start(queue=FailingQueue(exc))
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    await client.send(b"x\r\n.\r\nNOOP\r\n")
    assert await client.replies(2) == [expected, b"250 2.0.0 OK\r\n"]
    await client.close()


async def test_close_says_421_to_idle_sessions(harness: Harness) -> None:
    listener = await harness.start()
    client = await harness.connect(listener.port)
    await client.reply()
    listener.close()
    assert await client.reply() == b"421 4.3.2 Server shutting down, closing connection\r\n"
    assert await client.closed()
    await listener.wait_closed(timeout=2)
    assert not listener.connections


async def test_close_lets_a_message_being_enqueued_finish(harness: Harness) -> None:
    queue = SlowQueue()
    listener = await harness.start(queue=queue)
    client = await harness.connect(listener.port)
    await client.reply()
    await client.send(b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    await client.replies(4)
    await client.send(b"x\r\n.\r\n")
    await asyncio.wait_for(queue.started.wait(), 5)
    listener.close()
    queue.gate.set()
    await listener.wait_closed(timeout=5)
    assert (await client.reply()).startswith(b"250 2.0.0 Ok: queued as ")
    assert await client.reply() == b"421 4.3.2 Server shutting down, closing connection\r\n"
    assert len(await harness.stored()) == 1


async def test_auth_over_plaintext_loopback_when_allowed(harness: Harness) -> None:
    listener = await harness.start(policy=Policy(allow_plaintext_auth=True), auth=True)
    errors, _ = await aiosmtplib.send(
        message(),
        hostname="127.0.0.1",
        port=listener.port,
        start_tls=False,
        username="alice@example.com",
        password="s3cret",
    )
    assert errors == {}


async def test_many_concurrent_sessions(harness: Harness) -> None:
    listener = await harness.start()

    async def one(i: int) -> None:
        await aiosmtplib.send(
            message(f"r{i}@example.net"),
            hostname="127.0.0.1",
            port=listener.port,
            start_tls=False,
        )

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(30))), 30)
    assert len(await harness.stored()) == 30


async def test_trusted_networks_are_exempt_from_the_per_client_limit(harness: Harness) -> None:
    listener = await harness.start(max_connections_per_client=1)
    first = await harness.connect(listener.port)
    second = await harness.connect(listener.port)
    assert (await first.reply())[:3] == b"220"
    assert (await second.reply())[:3] == b"220"


async def test_hold_enqueues_held_messages(harness: Harness) -> None:
    listener = await harness.start(hold=True)
    await aiosmtplib.send(message(), hostname="127.0.0.1", port=listener.port, start_tls=False)
    [stored] = await harness.stored()
    assert stored.state == "held"


async def test_port_in_use_is_a_config_error(harness: Harness) -> None:
    from hato.errors import ConfigError

    listener = await harness.start()
    with pytest.raises(ConfigError, match="cannot listen"):
        await start_listener(
            ListenerConfig("127.0.0.1", listener.port),
            queue=harness.queue,
            policy=Policy(),
            log=harness.log,
        )


async def test_submissions_without_certificate_is_a_config_error(harness: Harness) -> None:
    from hato.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a TLS certificate"):
        await harness.start(role=ListenerRole.SUBMISSIONS)
