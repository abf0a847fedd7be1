"""In-loop SMTP peers for the smarthost, MX and worker tests: an aiosmtpd sink and a raw server.

* :class:`Sink` is aiosmtpd (the real server library) on 127.0.0.1 port 0, in the test's
  own event loop, recording each connection, each command the handler sees (with whether
  the session was encrypted and authenticated at that point) and each message's envelope
  and raw bytes. Replies to MAIL, RCPT and DATA can be scripted per address.
* :class:`RawServer` is a hand-written SMTP responder for the cases aiosmtpd will not
  play: recording the exact bytes on the wire (dot-stuffing), appending injected lines
  after its ``220`` to STARTTLS, or stalling.
* :class:`PipeliningServer` offers PIPELINING and records each read from the socket, so
  a test sees which commands came in one write; its replies are scripted, and it can
  append a reply to no command.

Unlike :class:`peers.sinks.RecordingSink` (a thread of its own, for synchronous tests)
these run in the test's event loop. ``certs`` is a fixture: import it into the test module
that uses it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

HOST = "127.0.0.1"


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true, failing the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@dataclass
class Received:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    authenticated: bool


@dataclass
class Command:
    verb: str
    arg: str
    tls: bool
    authenticated: bool


def _tls_of(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


@dataclass
class Handler:
    """aiosmtpd handler that records everything and replies as scripted."""

    messages: list[Received] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    # Set to stall DATA until the event is set (graceful-stop tests).
    data_gate: asyncio.Event | None = None

    def _note(self, server: SMTP, session: Any, verb: str, arg: str) -> None:
        self.commands.append(Command(verb, arg, _tls_of(server), bool(session.authenticated)))

    def verbs(self) -> list[str]:
        return [c.verb for c in self.commands]

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self._note(server, session, "EHLO", hostname)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._note(server, session, "MAIL", address)
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._note(server, session, "RCPT", address)
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_RSET(self, server: SMTP, session: Any, envelope: Any) -> str:
        self._note(server, session, "RSET", "")
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self._note(server, session, "DATA", "")
        if self.data_gate is not None:
            await self.data_gate.wait()
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.mail_options),
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""),
                _tls_of(server),
                bool(session.authenticated),
            )
        )
        return f"250 2.0.0 Ok: queued as {len(self.messages)}"


class Sink:
    """aiosmtpd on loopback port 0. ``starttls``: offer STARTTLS with this context;
    ``implicit``: TLS from the first byte with this context; ``users``: AUTH required
    against this dict."""

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        smtputf8: bool = False,
    ) -> None:
        self.handler = handler or Handler()
        self.starttls = starttls
        self.implicit = implicit
        self.users = users
        self.smtputf8 = smtputf8
        self.connections = 0
        self.auth_attempts: list[tuple[str, str]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword) or self.users is None:
            return AuthResult(success=False, handled=False)
        user, password = data.login.decode(), data.password.decode()
        self.auth_attempts.append((mechanism, user))
        return AuthResult(success=self.users.get(user) == password, handled=False)

    def _factory(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {}
        if self.users is not None:
            kwargs.update(
                authenticator=self._authenticate,
                # aiosmtpd only counts STARTTLS as TLS, and warns when AUTH is required
                # without it; over implicit TLS, AUTH is offered but not enforced.
                auth_required=self.implicit is None,
                auth_require_tls=self.implicit is None,
            )
        protocol = SMTP(
            self.handler,
            hostname="sink.test",
            tls_context=self.starttls,
            enable_SMTPUTF8=self.smtputf8,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self._protocols.append(protocol)
        return protocol

    async def start(self, port: int = 0) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, HOST, port, ssl=self.implicit)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def drop_connections(self) -> None:
        """Close every open session from the server side (idle timeout, restart)."""
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        self._protocols.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class RawServer:
    """A scripted SMTP responder that records the exact bytes it receives.

    ``ehlo``: the EHLO extension lines; ``inject_after_starttls``: bytes written in the
    same packet right after ``220`` to STARTTLS; ``tls``: the context for STARTTLS;
    ``rcpt_reply``: the reply to every RCPT; ``greeting``: ``None`` to never greet.
    """

    ehlo: list[str] = field(default_factory=lambda: ["PIPELINING", "8BITMIME"])
    tls: ssl.SSLContext | None = None
    inject_after_starttls: bytes = b""
    rcpt_reply: bytes = b"250 2.1.5 OK\r\n"
    greeting: bytes | None = b"220 raw.test ESMTP\r\n"
    wire: bytearray = field(default_factory=bytearray)
    data_chunks: list[bytes] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            if self.greeting is None:
                await reader.read()  # never greet; wait for the client to give up
                return
            writer.write(self.greeting)
            encrypted = False
            while True:
                line = await reader.readline()
                self.wire += line
                if not line:
                    return
                self.lines.append(line)
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    exts = [e for e in self.ehlo if not (encrypted and e == "STARTTLS")]
                    out = ["raw.test", *exts]
                    writer.write(
                        b"".join(
                            f"250{'-' if i < len(out) - 1 else ' '}{t}\r\n".encode()
                            for i, t in enumerate(out)
                        )
                    )
                elif verb == b"STAR" and self.tls is not None:
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n" + self.inject_after_starttls)
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    encrypted = True
                elif verb == b"MAIL" or verb == b"RSET":
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"RCPT":
                    writer.write(self.rcpt_reply)
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    chunk = bytearray()
                    while not chunk.endswith(b"\r\n.\r\n"):
                        part = await reader.readline()
                        if not part:
                            return
                        chunk += part
                    self.wire += chunk
                    self.data_chunks.append(bytes(chunk))
                    writer.write(b"250 2.0.0 accepted\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.1 not implemented\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: str
    server: ssl.SSLContext


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throw-away CA and a server certificate for 127.0.0.1."""
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return Certs(ca, str(path), server)


async def with_timeout(aw: Awaitable[Any], timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        return await aw


@dataclass
class PipeliningServer:
    """An SMTP responder that offers PIPELINING and records how the commands arrive.

    Each read from the socket after the greeting is kept in ``reads`` (with whether the
    session was encrypted then), so a test sees MAIL, RCPT and DATA come in one write.
    The replies to all complete lines of one read go out together, in order.
    ``mail_reply``, ``rcpt_replies`` (by address; default 250), ``data_reply`` (354 by
    default even when no recipient was accepted, as Postfix's smtp-sink does) and
    ``final_reply`` script the answers; ``limit`` recipients per transaction, then
    ``452 4.5.3``; ``inject_after`` (verb, or ``BODY`` for the final reply → bytes)
    appends a reply to no command; ``tls`` offers STARTTLS. ``messages``: envelope and
    body (as on the wire, before the final dot) of each message with recipients.
    """

    ehlo: list[str] = field(default_factory=lambda: ["PIPELINING", "8BITMIME"])
    tls: ssl.SSLContext | None = None
    mail_reply: bytes = b"250 2.1.0 OK\r\n"
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    data_reply: bytes = b"354 go ahead\r\n"
    final_reply: bytes = b"250 2.0.0 queued\r\n"
    limit: int = 0
    inject_after: dict[str, bytes] = field(default_factory=dict)
    reads: list[tuple[bool, bytes]] = field(default_factory=list)
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def groups(self) -> list[bytes]:
        """The reads that carried a MAIL command."""
        return [data for _, data in self.reads if b"MAIL FROM:" in data]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        buf = bytearray()
        encrypted = in_data = False
        sender: str | None = None
        rcpts: list[str] = []
        try:
            writer.write(b"220 pipe.test ESMTP\r\n")
            while chunk := await reader.read(65536):
                self.reads.append((encrypted, chunk))
                buf += chunk
                out = bytearray()
                while True:
                    if in_data:
                        end = 0 if buf.startswith(b".\r\n") else buf.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        body = bytes(buf[: end + 2]) if end else b""
                        del buf[: end + 5 if end else 3]
                        in_data = False
                        if rcpts and sender is not None:
                            self.messages.append((sender, rcpts, body))
                            out += self.final_reply
                        else:
                            out += b"554 5.5.1 Error: no valid recipients\r\n"
                        out += self.inject_after.get("BODY", b"")
                        sender, rcpts = None, []
                        continue
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line = bytes(buf[: nl + 1])
                    del buf[: nl + 1]
                    verb = line.split(b" ")[0].strip().upper().decode()
                    if verb == "EHLO":
                        exts = [e for e in self.ehlo if not (encrypted and e == "STARTTLS")]
                        lines = ["pipe.test", *exts]
                        out += b"".join(
                            f"250{'-' if i < len(lines) - 1 else ' '}{t}\r\n".encode()
                            for i, t in enumerate(lines)
                        )
                    elif verb == "STARTTLS" and self.tls is not None and not encrypted:
                        injected = self.inject_after.get("STARTTLS", b"")
                        writer.write(bytes(out) + b"220 2.0.0 Ready to start TLS\r\n" + injected)
                        await writer.drain()
                        await writer.start_tls(self.tls)
                        encrypted, out = True, bytearray()
                        buf.clear()  # whatever was pipelined with STARTTLS is discarded
                        sender, rcpts = None, []
                        break
                    elif verb == "MAIL":
                        out += self.mail_reply
                        if self.mail_reply.startswith(b"250"):
                            sender = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    elif verb == "RCPT":
                        address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                        if sender is None:
                            reply = b"503 5.5.1 Error: need MAIL command\r\n"
                        elif self.limit and len(rcpts) >= self.limit:
                            reply = b"452 4.5.3 Error: too many recipients\r\n"
                        else:
                            reply = self.rcpt_replies.get(address, b"250 2.1.5 OK\r\n")
                        if reply.startswith(b"250"):
                            rcpts.append(address)
                        out += reply
                    elif verb == "DATA":
                        if sender is None:
                            out += b"503 5.5.1 Error: need RCPT command\r\n"
                        else:
                            out += self.data_reply
                            in_data = self.data_reply.startswith(b"354")
                            if not in_data:
                                sender, rcpts = None, []
                    elif verb == "RSET":
                        sender, rcpts = None, []
                        out += b"250 2.0.0 OK\r\n"
                    elif verb == "QUIT":
                        writer.write(bytes(out) + b"221 2.0.0 Bye\r\n")
                        await writer.drain()
                        return
                    else:
                        out += b"502 5.5.2 Error: command not recognized\r\n"
                    out += self.inject_after.get(verb, b"")
                if out:
                    writer.write(bytes(out))
                    await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()

    async def start(self) -> PipeliningServer:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> PipeliningServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
