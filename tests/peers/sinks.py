"""SMTP sinks for tests: a recording aiosmtpd sink and Postfix's smtp-sink for load.

``RecordingSink`` keeps the envelope and the raw bytes of every message it accepts, can be
told to answer 4xx/5xx at RCPT or DATA (always, or for the next N times), and can be
stopped and started again on the same port to play an upstream that goes down and comes
back. ``SmtpSinkProcess`` runs ``/usr/sbin/smtp-sink`` (accept and discard, fast) and
counts what it received.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from peers import free_port, require_tool


@dataclass(frozen=True)
class Received:
    """One message as the sink saw it: envelope plus the exact bytes after DATA."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...] = ()
    peer: str = ""
    tls: bool = False
    auth_login: str | None = None

    @property
    def message(self) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    def header(self, name: str) -> str | None:
        value = self.message[name]
        return None if value is None else str(value)

    def headers(self, name: str) -> list[str]:
        return [str(v) for v in self.message.get_all(name, [])]

    @property
    def body(self) -> bytes:
        """The raw bytes after the first empty line (the header/body separator)."""
        _, sep, rest = self.data.partition(b"\r\n\r\n")
        return rest if sep else b""


@dataclass
class _Scripted:
    """A reply to give instead of accepting: for every match, or only the next ``times``."""

    reply: str
    times: int | None = None
    matches: Callable[[str], bool] = field(default=lambda _address: True)

    def take(self, address: str) -> str | None:
        if not self.matches(address):
            return None
        if self.times is not None:
            if self.times <= 0:
                return None
            self.times -= 1
        return self.reply


class _Handler:
    def __init__(self, sink: RecordingSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._sink._scripted_reply("rcpt", address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._sink._scripted_reply("data", envelope.mail_from or "")
        if reply is not None:
            return reply
        content = envelope.original_content or b""
        if isinstance(content, str):  # only with decode_data=True, which we never set
            content = content.encode()
        peer = session.peer
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        login = session.auth_data if session.authenticated else None
        self._sink._record(
            Received(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=content,
                mail_options=tuple(envelope.mail_options),
                peer=peer_text,
                tls=session.ssl is not None,
                auth_login=_login_name(login),
            )
        )
        return "250 2.0.0 Ok: recorded"


def _login_name(auth_data: object) -> str | None:
    login = getattr(auth_data, "login", auth_data)
    if isinstance(login, bytes):
        return login.decode(errors="replace")
    return login if isinstance(login, str) else None


class RecordingSink:
    """An aiosmtpd server on 127.0.0.1 in a thread that records every accepted message."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        hostname: str = "sink.test",
        smtputf8: bool = True,  # aiosmtpd's Controller default
    ) -> None:
        self.host = host
        self._smtputf8 = smtputf8
        self.port = port or free_port(host)
        self._tls_context = tls_context
        self._require_starttls = require_starttls
        self._hostname = hostname
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self._scripts: dict[str, list[_Scripted]] = {"rcpt": [], "data": []}
        self._controller: Controller | None = None
        self.rejections: list[tuple[str, str, str]] = []  # (stage, address, reply)

    # Lifecycle.

    def start(self) -> RecordingSink:
        if self._controller is not None:
            return self
        controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname=self._hostname,
            ready_timeout=10.0,
            tls_context=self._tls_context,
            require_starttls=self._require_starttls,
            enable_SMTPUTF8=self._smtputf8,
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def relayhost(self) -> str:
        """This sink as a Postfix/boky ``RELAYHOST`` value: ``[127.0.0.1]:PORT``."""
        return f"[{self.host}]:{self.port}"

    def __enter__(self) -> RecordingSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Scripted failures.

    def fail_rcpt(
        self,
        reply: str,
        *,
        address: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``reply`` at RCPT (for ``address`` only, if given; ``times`` times, if given)."""
        want = address.lower() if address else None
        self._add_script(
            "rcpt",
            _Scripted(reply, times, (lambda a: a.lower() == want) if want else (lambda _a: True)),
        )

    def fail_data(self, reply: str, *, times: int | None = None) -> None:
        """Answer ``reply`` after DATA (``times`` times, if given) instead of recording."""
        self._add_script("data", _Scripted(reply, times))

    def clear_failures(self) -> None:
        with self._lock:
            for scripts in self._scripts.values():
                scripts.clear()

    def _add_script(self, stage: str, script: _Scripted) -> None:
        with self._lock:
            self._scripts[stage].append(script)

    def _scripted_reply(self, stage: str, address: str) -> str | None:
        with self._lock:
            for script in self._scripts[stage]:
                reply = script.take(address)
                if reply is not None:
                    self.rejections.append((stage, address, reply))
                    self._lock.notify_all()
                    return reply
        return None

    # Recording.

    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)
            self._lock.notify_all()

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    def wait_for(
        self,
        predicate: Callable[[Sequence[Received]], bool],
        timeout: float = 30.0,
        *,
        what: str = "condition",
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; raise AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"sink: timed out after {timeout}s waiting for {what}; "
                        f"have {len(self._messages)} message(s), rejections={self.rejections}"
                    )
                self._lock.wait(min(left, 0.5))
            return list(self._messages)

    def wait_for_count(self, count: int, timeout: float = 30.0) -> list[Received]:
        return self.wait_for(lambda ms: len(ms) >= count, timeout, what=f"{count} message(s)")

    def wait_for_rejections(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.rejections) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"sink: timed out waiting for {count} rejection(s): {self.rejections}"
                    )
                self._lock.wait(min(left, 0.5))


class SmtpSinkProcess:
    """Postfix's ``smtp-sink``: accepts and discards mail as fast as it can (load tests)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        backlog: int = 256,
        options: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._backlog = backlog
        self._options = list(options)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Condition()
        self._messages = 0
        self._sessions = 0

    @property
    def relayhost(self) -> str:
        return f"[{self.host}]:{self.port}"

    def start(self, timeout: float = 10.0) -> SmtpSinkProcess:
        binary = require_tool("smtp-sink", hint="apt-get install postfix")
        self._proc = subprocess.Popen(
            [
                binary,
                "-c",
                "-u",
                "postfix",
                *self._options,
                f"{self.host}:{self.port}",
                str(self._backlog),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, daemon=True, name="smtp-sink-reader")
        self._reader.start()
        deadline = time.monotonic() + timeout

        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited with {self._proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    sock.settimeout(2.0)
                    if sock.recv(64).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink on {self.port} not ready")
            time.sleep(0.05)
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        buffer = b""
        fd = self._proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            buffer += chunk
            # The counter is redrawn with CR: "sess=N quit=N mesg=N".
            *complete, buffer = buffer.replace(b"\n", b"\r").split(b"\r")
            for line in complete:
                fields = dict(part.split(b"=", 1) for part in line.split() if b"=" in part)
                with self._lock:
                    if b"mesg" in fields:
                        self._messages = int(fields[b"mesg"])
                    if b"sess" in fields:
                        self._sessions = int(fields[b"sess"])
                    self._lock.notify_all()

    @property
    def received(self) -> int:
        """Messages received so far (the readiness probe does not count: it sends none)."""
        with self._lock:
            return self._messages

    def wait_for_count(self, count: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._messages < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"smtp-sink: {self._messages} of {count} messages after {timeout}s"
                    )
                self._lock.wait(min(left, 0.5))
            return self._messages

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SmtpSinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
