"""Runs the byte-exact SMTP dialogs in tests/dialogs/ against the sans-IO server.

Format of a ``.dialog`` file (one item per line)::

    # comment
    @ key=value            session settings (see _settings), before the first S:/C:;
                           free_space=N is what the queue's filesystem reports free
    S: text                a line the server must send (CRLF added)
    C: text                a line the client sends (CRLF added)
    C~ text                bytes the client sends as they are (no CRLF added)
    |                      ends a client chunk (consecutive C lines are one chunk, pipelined)
    ! closed               the server has closed the connection by now
    ! starttls             the last chunk made the server start TLS (handshake simulated)
    ! queued N             N messages have been queued so far
    E: key=value ...       envelope of the last queued message (from, to, body_8bit, ...;
                           meta.K: its meta entry K, "" when absent)
    Q: text                a line of the last queued message's data (CRLF added)

Escapes in text: ``\\r \\n \\t \\0 \\\\ \\xNN``. The server's bytes after each client chunk
must equal the S: lines that follow it, exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hato import reply
from hato.message import META_REQUIRETLS, Envelope
from hato.smtp.auth import StaticAuthenticator
from hato.smtp.policy import ListenerRole, Policy, parse_networks
from hato.smtp.protocol import (
    Authenticate,
    Close,
    Event,
    MessageComplete,
    Send,
    ServerSession,
    SessionConfig,
    StartTLS,
)

DIALOGS = sorted((Path(__file__).parent.parent / "dialogs").glob("*.dialog"))

_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
_SIMPLE = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}


def unescape(text: str) -> bytes:
    def sub(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        if code.startswith(b"x"):
            return bytes([int(code[1:], 16)])
        return _SIMPLE[code]

    return _ESCAPE.sub(sub, text.encode("utf-8"))


@dataclass
class Harness:
    """Drives a ServerSession like the asyncio driver would, synchronously."""

    session: ServerSession
    users: dict[str, str]
    queue_mode: str = "ok"
    queued: list[tuple[Envelope, bytes]] = field(default_factory=list)
    closed: bool = False
    tls_started: bool = False

    def handle(self, events: list[Event]) -> bytes:
        out = bytearray()
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, Send):
                out += event.reply.to_bytes()
            elif isinstance(event, Close):
                assert not self.closed, "Close emitted twice"
                self.closed = True
            elif isinstance(event, StartTLS):
                self.tls_started = True
                pending.extend(self.session.tls_started())
            elif isinstance(event, Authenticate):
                ok = self.users.get(event.username) == event.password and event.authzid in (
                    "",
                    event.username,
                )
                pending.extend(self.session.auth_result(event.username if ok else None))
            elif isinstance(event, MessageComplete):
                if self.queue_mode == "full":
                    pending.extend(self.session.message_rejected(reply.STORAGE_FULL))
                elif self.queue_mode == "error":
                    pending.extend(self.session.message_rejected(reply.QUEUE_ERROR))
                else:
                    self.queued.append((event.envelope, event.data))
                    queue_id = f"Q{len(self.queued):04d}"
                    pending.extend(self.session.message_accepted(queue_id))
        return bytes(out)


def _settings(lines: list[str]) -> Harness:
    opts: dict[str, str] = {}
    for line in lines:
        key, _, value = line[1:].strip().partition("=")
        opts[key.strip()] = value.strip()
    ints = {
        k: int(opts[k])
        for k in (
            "max_command_line",
            "max_text_line",
            "max_message_size",
            "max_recipients",
            "max_errors",
            "max_junk_commands",
            "max_auth_failures",
            "max_received_headers",
            "queue_min_free",
        )
        if k in opts
    }
    free_space = int(opts["free_space"]) if "free_space" in opts else None
    config = SessionConfig(
        hostname=opts.get("hostname", "mail.example.org"),
        queue_free_space=(lambda: free_space) if free_space is not None else None,
        **ints,
    )

    def split(key: str) -> list[str]:
        return [x for x in opts.get(key, "").split(",") if x]

    users = dict(u.split(":", 1) for u in split("users"))
    policy = Policy(
        role=ListenerRole(opts.get("role", "smtp")),
        mynetworks=parse_networks(split("mynetworks")),
        domains=split("domains"),
        allowed_sender_domains=split("sender_domains"),
        allow_plaintext_auth=opts.get("plaintext_auth") == "yes",
        sender_allowed=(
            (lambda user, address: address == user) if opts.get("own_sender") == "yes" else None
        ),
        route=opts.get("route"),
        allow_private_mx=opts.get("allow_private_mx") == "yes",
    )
    tls = opts.get("tls", "no")
    session = ServerSession(
        config,
        policy,
        client_ip=opts.get("client", "192.0.2.10"),
        tls_active=tls == "implicit",
        tls_available=tls in ("yes", "implicit"),
        auth_available=bool(users),
        clock=lambda: 1_700_000_000.0,
    )
    return Harness(session, users, queue_mode=opts.get("queue", "ok"))


def _fmt(data: bytes) -> str:
    return "\n".join(repr(line) for line in data.splitlines(keepends=True)) or "(nothing)"


def run_dialog(path: Path) -> None:
    raw_lines = path.read_text(encoding="utf-8").splitlines()
    settings = [line for line in raw_lines if line.startswith("@")]
    harness = _settings(settings)
    session = harness.session

    got = session.greeting().to_bytes()
    expected = bytearray()
    chunk = bytearray()
    queued_lines: list[bytes] = []
    chunk_open = False
    lineno = 0

    def check_output(where: int) -> None:
        nonlocal got
        assert got == bytes(expected), (
            f"{path.name}:{where}: server output differs\n"
            f"expected:\n{_fmt(bytes(expected))}\n got:\n{_fmt(got)}"
        )
        got = b""
        expected.clear()

    def flush_chunk() -> None:
        nonlocal got, chunk_open
        if chunk_open:
            check_output(lineno)
            harness.tls_started = False
            got = harness.handle(session.receive(bytes(chunk)))
            chunk.clear()
            chunk_open = False

    def check_queued_data() -> None:
        if queued_lines:
            assert harness.queued, f"{path.name}: Q: lines but nothing queued"
            want = b"".join(queued_lines)
            have = harness.queued[-1][1]
            assert have == want, (
                f"{path.name}: queued data differs\nexpected:\n{_fmt(want)}\n got:\n{_fmt(have)}"
            )
            queued_lines.clear()

    saw_closed = False
    for lineno, line in enumerate(raw_lines, 1):
        if not line.strip() or line.startswith("#") or line.startswith("@"):
            continue
        if line.startswith("C: ") or line == "C:":
            if not chunk_open:
                check_queued_data()
            # Output since the previous chunk must be complete before sending more.
            if not chunk_open:
                check_output(lineno)
            chunk += unescape(line[3:]) + b"\r\n"
            chunk_open = True
        elif line.startswith("C~ "):
            if not chunk_open:
                check_queued_data()
                check_output(lineno)
            chunk += unescape(line[3:])
            chunk_open = True
        elif line.strip() == "|":
            flush_chunk()
        elif line.startswith("S: ") or line == "S:":
            flush_chunk()
            expected.extend(unescape(line[3:]) + b"\r\n")
        elif line.startswith("Q: ") or line == "Q:":
            flush_chunk()
            queued_lines.append(unescape(line[3:]) + b"\r\n")
        elif line.startswith("E: "):
            flush_chunk()
            assert harness.queued, f"{path.name}:{lineno}: E: but nothing queued"
            envelope = harness.queued[-1][0]
            for item in line[3:].split():
                key, _, value = item.partition("=")
                actual = {
                    "from": envelope.sender,
                    "to": ",".join(envelope.recipients),
                    "helo": envelope.client_helo,
                    "user": envelope.auth_user,
                    "body_8bit": "yes" if envelope.body_8bit else "no",
                    "smtputf8": "yes" if envelope.smtputf8 else "no",
                    "requiretls": envelope.meta.get(META_REQUIRETLS, "no"),
                }.get(key)
                if key.startswith("meta."):
                    actual = envelope.meta.get(key[5:], "")
                assert actual is not None, f"{path.name}:{lineno}: unknown envelope key {key}"
                assert actual == value, f"{path.name}:{lineno}: envelope {key}={actual!r}"
        elif line.startswith("! "):
            flush_chunk()
            directive = line[2:].split()
            if directive[0] == "closed":
                check_output(lineno)
                assert harness.closed, f"{path.name}:{lineno}: connection not closed"
                saw_closed = True
            elif directive[0] == "starttls":
                assert harness.tls_started, f"{path.name}:{lineno}: no StartTLS event"
            elif directive[0] == "queued":
                check_output(lineno)
                assert len(harness.queued) == int(directive[1]), (
                    f"{path.name}:{lineno}: queued {len(harness.queued)}, want {directive[1]}"
                )
            else:
                raise AssertionError(f"{path.name}:{lineno}: unknown directive {line!r}")
        else:
            raise AssertionError(f"{path.name}:{lineno}: cannot parse {line!r}")
    flush_chunk()
    check_output(lineno)
    check_queued_data()
    assert harness.closed == saw_closed, (
        f"{path.name}: connection closed={harness.closed}, dialog expects {saw_closed}"
    )


def test_dialogs_exist() -> None:
    assert len(DIALOGS) >= 30


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(path: Path) -> None:
    run_dialog(path)


def test_runner_detects_a_wrong_reply(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dialog"
    bad.write_text("S: 220 mail.example.org ESMTP Hato\nC: NOOP\nS: 250 2.0.0 NOT OK\n")
    with pytest.raises(AssertionError, match="server output differs"):
        run_dialog(bad)


def test_static_authenticator_is_the_dialog_semantics() -> None:
    # The harness checks passwords synchronously; it must agree with StaticAuthenticator.
    import asyncio

    auth = StaticAuthenticator({"alice": "s3cret"})
    assert asyncio.run(auth.authenticate("alice", "s3cret")) == "alice"
    assert asyncio.run(auth.authenticate("alice", "nope")) is None
    assert asyncio.run(auth.authenticate("alice", "s3cret", authzid="bob")) is None
