"""Fuzz targets: the intake state machine and the parsers, each a function of one ``bytes``.

Every target raises ``AssertionError`` (a finding) when an invariant breaks and returns
quietly otherwise; any other exception escaping a target is a finding too. They are run by
``tests/fuzz/run.py`` under atheris (coverage-guided, libFuzzer), by ``scripts/fuzz`` for as
long as asked, and by ``tests/fuzz/test_fuzz.py`` in CI (the seed corpus replayed, then a
short atheris run of each target).

The invariants, per target:

``intake``
    :class:`~hato.smtp.protocol.ServerSession` never raises; every reply is a well-formed
    SMTP reply; a queued message has CRLF line endings only, no NUL, no line over 1000
    octets, at least one recipient, and starts with our ``Received:`` header; a session
    from an untrusted, unauthenticated client queues mail only for our own domains; and
    the conversation is the same whether the bytes arrive in one piece or split at
    arbitrary points (up to STARTTLS, after which the split changes what is plaintext).
``sasl``
    the PLAIN/LOGIN decoders never raise; what they accept has no NUL and round-trips.
``address``
    :func:`~hato.message.parse_address` raises only ``AddressError``; what it accepts
    re-parses to itself; :class:`~hato.smtp.policy.Policy` never lets an untrusted
    session relay (an accepted recipient is in our own domains with a plain local part).
``compose``
    :func:`hato.mailer.compose` raises only ``AddressError``/``ValueError``/``TypeError``/
    ``HatoError``; what it builds is 7-bit, CRLF only, no line over 998 octets, parses
    back with the ``email`` package, carries no Bcc and no header it was not asked for.
``dsn``
    the RFC 3461 parsers (:mod:`hato.dsn_params`: xtext, RET, ENVID, NOTIFY, ORCPT, the
    stored per-recipient JSON) raise only ``DsnError`` (``request_of`` never raises);
    what they accept is printable US-ASCII within the limits and, encoded again, parses
    back to itself; every parameter a stored request would send on parses again.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
from collections.abc import Callable
from pathlib import Path

from hato import reply
from hato.dsn_params import (
    MAX_ENVID,
    MAX_ORCPT,
    META_NOTIFY,
    META_RCPT,
    META_RET,
    DsnError,
    encode_orcpt,
    notify_text,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
    request_of,
    xtext_decode,
    xtext_encode,
)
from hato.errors import AddressError, HatoError
from hato.message import normalize_domain, parse_address
from hato.smtp.auth import decode_response, parse_login_text, parse_plain
from hato.smtp.policy import ListenerRole, Policy, SessionFacts, parse_networks
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

DIALOGS = Path(__file__).resolve().parent.parent / "dialogs"
OWN_DOMAINS = ("example.org", "bücher.example")
USERS = {"alice@example.org": "secret"}
_ROLES = (ListenerRole.SMTP, ListenerRole.SMTP, ListenerRole.SUBMISSION, ListenerRole.SUBMISSIONS)


# -- intake ---------------------------------------------------------------------------


class _Driver:
    """Answers a session's events synchronously, like the asyncio driver would."""

    def __init__(self, session: ServerSession, flags: int, trusted: bool) -> None:
        self.session = session
        self.flags = flags
        self.trusted = trusted
        self.out = bytearray()
        self.queued: list[tuple[str, list[str], bytes, str]] = []
        self.closed = False
        self.tls = False
        self.messages = 0

    def handle(self, events: list[Event]) -> None:
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, Send):
                assert not self.closed, "reply after Close"
                self.out += _check_reply(event.reply)
            elif isinstance(event, Close):
                assert not self.closed, "Close emitted twice"
                self.closed = True
            elif isinstance(event, StartTLS):
                self.tls = True
                pending.extend(self.session.tls_started())
            elif isinstance(event, Authenticate):
                ok = USERS.get(event.username) == event.password and event.authzid in (
                    "",
                    event.username,
                )
                pending.extend(self.session.auth_result(event.username if ok else None))
            elif isinstance(event, MessageComplete):
                self.messages += 1
                _check_message(event, self.trusted)
                if self.flags & 0x40 and self.messages % 3 == 0:
                    pending.extend(self.session.message_rejected(reply.STORAGE_FULL))
                else:
                    envelope = event.envelope
                    self.queued.append(
                        (
                            envelope.sender,
                            list(envelope.recipients),
                            event.data,
                            envelope.auth_user,
                        )
                    )
                    pending.extend(self.session.message_accepted(f"Q{self.messages:04d}"))


def _check_reply(answer: reply.Reply) -> bytes:
    wire = answer.to_bytes()
    assert 200 <= answer.code <= 599, answer
    assert wire.endswith(b"\r\n"), wire
    for line in wire[:-2].split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, wire
        assert line[:3] == str(answer.code).encode(), wire
        assert len(line) <= 4 or line[3:4] in (b" ", b"-"), wire
    return wire


def _check_message(event: MessageComplete, trusted: bool) -> None:
    data, envelope = event.data, event.envelope
    assert envelope.recipients, "message without recipients"
    assert data.startswith(b"Received: "), data[:40]
    assert b"\0" not in data, "NUL in a queued message"
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"), "bare CR or LF"
    assert all(len(line) <= 998 for line in data.split(b"\r\n")[3:]), "line over 998 octets"
    if not trusted and not envelope.auth_user:
        for rcpt in envelope.recipients:
            local, _, domain = rcpt.rpartition("@")
            assert normalize_domain(domain) in {normalize_domain(d) for d in OWN_DOMAINS}, rcpt
            assert not any(c in local for c in "%!@"), rcpt


def _session(flags: int) -> tuple[ServerSession, bool]:
    trusted = bool(flags & 0x01)
    role = _ROLES[(flags >> 1) & 0x03]
    config = SessionConfig(
        hostname="mail.example.org",
        max_message_size=4096 if flags & 0x08 else 10 * 1024 * 1024,
        max_recipients=3 if flags & 0x10 else 1000,
        max_errors=5 if flags & 0x20 else 20,
        max_received_headers=3,
    )
    policy = Policy(
        role=role,
        mynetworks=parse_networks(["192.0.2.0/24", "127.0.0.0/8"]),
        domains=OWN_DOMAINS,
        allowed_sender_domains=("example.com", "example.org") if flags & 0x80 else (),
        allow_plaintext_auth=True,
        sender_allowed=lambda user, address: address.endswith("@example.org"),
    )
    session = ServerSession(
        config,
        policy,
        client_ip="192.0.2.7" if trusted else "198.51.100.7",
        tls_active=role is ListenerRole.SUBMISSIONS,
        tls_available=True,
        auth_available=True,
        clock=lambda: 1_700_000_000.0,
    )
    return session, trusted


def _run(flags: int, chunks: list[bytes]) -> _Driver:
    session, trusted = _session(flags)
    driver = _Driver(session, flags, trusted)
    driver.out += _check_reply(session.greeting())
    for chunk in chunks:
        if driver.tls and driver.out:
            break
        driver.handle(session.receive(chunk))
        if driver.closed:
            assert session.receive(b"NOOP\r\n") == [], "input accepted after Close"
            break
    return driver


def _cuts(stream: bytes, seed: bytes) -> list[bytes]:
    """``stream`` split at points drawn from ``seed`` (deterministic)."""
    digest = hashlib.blake2b(seed + stream[:64], digest_size=32).digest()
    points = sorted({(b * 37 + i * 101) % (len(stream) + 1) for i, b in enumerate(digest)})
    pieces, last = [], 0
    for p in points:
        pieces.append(stream[last:p])
        last = p
    pieces.append(stream[last:])
    return [p for p in pieces if p]


def fuzz_intake(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, stream = data[0], data[1:]
    whole = _run(flags, [stream])
    if whole.tls:
        return  # what follows STARTTLS depends on how the bytes were cut (see docstring)
    split = _run(flags, _cuts(stream, data[:1]))
    if split.tls:
        return
    assert whole.out == split.out, "replies depend on how the input was cut"
    assert whole.queued == split.queued, "queued mail depends on how the input was cut"
    assert whole.closed == split.closed


# -- SASL -----------------------------------------------------------------------------


def fuzz_sasl(data: bytes) -> None:
    blob = decode_response(data)
    if blob is None:
        return
    creds = parse_plain(blob)
    if creds is not None:
        for part in (creds.authzid, creds.username, creds.password):
            assert "\0" not in part
        assert creds.username
        rebuilt = f"{creds.authzid}\0{creds.username}\0{creds.password}".encode()
        assert rebuilt == blob
    text = parse_login_text(blob)
    if text is not None:
        assert "\0" not in text and text.encode() == blob


# -- addresses and the relay rule ------------------------------------------------------

_UNTRUSTED = Policy(
    role=ListenerRole.SMTP,
    mynetworks=parse_networks(["192.0.2.0/24"]),
    domains=OWN_DOMAINS,
)


def fuzz_address(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        address = parse_address(text)
    except AddressError:
        pass
    else:
        again = parse_address(str(address))
        assert again == address, (address, again)
        assert address.domain == address.domain.lower()
    facts = SessionFacts(client_ip="198.51.100.7")
    decision = _UNTRUSTED.check_recipient(facts, text, smtputf8=True)
    if isinstance(decision, str):
        local, _, domain = decision.rpartition("@")
        assert normalize_domain(domain) in {normalize_domain(d) for d in OWN_DOMAINS}, decision
        assert not any(c in local for c in "%!@"), decision
    _UNTRUSTED.check_sender(facts, text, smtputf8=bool(data[:1] == b"u"))


# -- composing mail --------------------------------------------------------------------

_ALLOWED_HEADERS = {
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "hato-idempotency-key",
    "x-fuzz",
}


def _fields(data: bytes, n: int) -> list[str]:
    parts = data.split(b"\x1f")
    parts += [b""] * (n - len(parts))
    return [p.decode("utf-8", "replace") for p in parts[:n]]


def fuzz_compose(data: bytes) -> None:
    from hato.mailer import compose

    to, subject, text, html, name, header, key = _fields(data, 7)
    try:
        composed = compose(
            to or "x@example.net",
            subject,
            text or None,
            html or None,
            from_=f"{name} <noreply@example.org>" if name else "noreply@example.org",
            bcc="hidden@example.net",
            headers={"X-Fuzz": header} if header else None,
            idempotency_key=key or None,
            clock=lambda: 1_700_000_000.0,
        )
    except (AddressError, ValueError, TypeError, HatoError):
        return
    raw = composed.data
    head, _, body = raw.partition(b"\r\n\r\n")
    # 7-bit, except a UTF-8 local part in the address headers (RFC 6532), which marks the
    # envelope SMTPUTF8.
    assert body.isascii(), "composed body is not 7-bit"
    assert head.isascii() or composed.envelope.smtputf8, "8-bit header without SMTPUTF8"
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r"), "bare CR or LF"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n")), "line over 998 octets"
    assert "hidden@example.net" in composed.envelope.recipients
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert message["Bcc"] is None and b"hidden@example.net" not in raw
    names = {k.lower() for k in message}
    assert names <= _ALLOWED_HEADERS, names - _ALLOWED_HEADERS
    assert len(message.get_all("Subject") or []) <= 1


# -- DSN parameters --------------------------------------------------------------------


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


def fuzz_dsn(data: bytes) -> None:
    text = data[1:].decode("utf-8", "replace")
    which = data[0] % 6 if data else 0
    try:
        if which == 0:
            value = xtext_decode(text)
            assert xtext_decode(xtext_encode(value)) == value
        elif which == 1:
            envid = parse_envid(text)
            assert len(text) <= MAX_ENVID and _printable(envid), envid
            assert parse_envid(xtext_encode(envid)) == envid
        elif which == 2:
            words = parse_notify(text)
            assert words == {"NEVER"} or (words and words <= {"SUCCESS", "FAILURE", "DELAY"})
            assert parse_notify(notify_text(words)) == words
        elif which == 3:
            orcpt = parse_orcpt(text)
            assert len(text) <= MAX_ORCPT and orcpt.isprintable(), orcpt
            assert parse_orcpt(encode_orcpt(orcpt)) == orcpt
        elif which == 4:
            assert parse_ret(text) in ("FULL", "HDRS")
        else:
            ascii_text = text.encode("ascii", "replace").decode()
            assert xtext_decode(xtext_encode(ascii_text)) == ascii_text
    except DsnError:
        pass
    request = request_of(
        {META_RCPT: text, META_NOTIFY: text[:20], META_RET: text[:4], "envid": text[:100]}
    )
    for option in request.mail_options():
        key, _, value = option.decode("ascii").partition("=")
        (parse_ret if key == "RET" else parse_envid)(value)
    for address in request.recipients:
        for option in request.rcpt_options(address):
            key, _, value = option.decode("ascii").partition("=")
            (parse_notify if key == "NOTIFY" else parse_orcpt)(value)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "intake": fuzz_intake,
    "sasl": fuzz_sasl,
    "address": fuzz_address,
    "compose": fuzz_compose,
    "dsn": fuzz_dsn,
}


# -- seeds ------------------------------------------------------------------------------


def _dialog_streams() -> list[tuple[bytes, bytes]]:
    """(settings line bytes, client bytes) of every dialog file."""
    from re import compile as rx

    escape = rx(rb"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
    simple = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}

    def unescape(text: str) -> bytes:
        def sub(m: object) -> bytes:
            code = m.group(1)  # type: ignore[attr-defined]
            return bytes([int(code[1:], 16)]) if code.startswith(b"x") else simple[code]

        return escape.sub(sub, text.encode("utf-8"))

    out = []
    for path in sorted(DIALOGS.glob("*.dialog")):
        settings, stream = b"", bytearray()
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("@"):
                settings += line.encode() + b"\n"
            elif line.startswith("C: ") or line == "C:":
                stream += unescape(line[3:]) + b"\r\n"
            elif line.startswith("C~ "):
                stream += unescape(line[3:])
        out.append((settings, bytes(stream)))
    return out


def seeds(target: str) -> list[bytes]:
    """The seed corpus of a target, from the dialog files and a few hand-written cases."""
    dialogs = _dialog_streams()
    if target == "intake":
        result = []
        for settings, stream in dialogs:
            flags = 0x01 if b"mynetworks=192.0.2" in settings else 0x00
            if b"role=submission" in settings:
                flags |= 0x04
            result.append(bytes([flags]) + stream)
            result.append(bytes([flags ^ 0x01]) + stream)
        return result
    if target == "sasl":
        return [b"AGFsaWNlAHNlY3JldA==", b"=", b"YWxpY2U=", b"*", b"AAA=", b"%%%"]
    if target == "address":
        return [
            b"a@example.org",
            b"@x.example:a@example.org",
            b'"a@b"@example.org',
            b"a%b@example.org",
            b"b!a@example.org",
            b"a@[192.0.2.1]",
            b"a@example.org.",
            b"postmaster",
            b"a@B\xc3\x9cCHER.example",
            b"a@xn--bcher-kva.example",
        ]
    if target == "compose":
        return [
            b"user@example.net\x1fHello\x1fHi there\x1f\x1fAda\x1fv\x1fk1",
            "a@bücher.example\x1fGrüße aus Köln\x1fこんにちは\x1f<p>x</p>\x1fJosé\x1f\x1f".encode(),
            b"Name <u@example.net>\x1f" + b"s" * 300 + b"\x1f" + b"long " * 400,
        ]
    if target == "dsn":
        return [
            b"\x00a+2Bb+3D",
            b"\x01Q+204711",
            b"\x02SUCCESS,FAILURE,DELAY",
            b"\x02NEVER",
            b"\x03rfc822;a+2Bb@example.org",
            b"\x04hdrs",
            b"\x05a b=c+d",
            b'\x00{"a@x":{"notify":"SUCCESS","orcpt":"rfc822;a@x"}}',
        ]
    raise KeyError(target)
