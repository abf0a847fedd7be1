"""Sans-IO ESMTP server: bytes in, replies and events out; no sockets, no asyncio.

A :class:`ServerSession` is one SMTP conversation. The driver (``smtp/server.py``, or a
test) feeds it the bytes the client sent with :meth:`ServerSession.receive` and acts on
the events it returns, in order:

* :class:`Send` — write ``reply`` to the client.
* :class:`Rejected` — a policy or content rejection worth an operator log line (the
  reply itself also comes as a :class:`Send`).
* :class:`StartTLS` — the ``220`` is already in a :class:`Send` before it; write it,
  upgrade the connection, then call :meth:`ServerSession.tls_started`.
* :class:`Authenticate` — check the credentials (asynchronously), then call
  :meth:`ServerSession.auth_result`.
* :class:`MessageComplete` — enqueue the message, then call
  :meth:`ServerSession.message_accepted` (only once it is durable) or
  :meth:`ServerSession.message_rejected`.
* :class:`Close` — close the connection once the replies before it are written.

While an :class:`Authenticate` or :class:`MessageComplete` is unanswered the session
processes no more input; bytes that arrive meanwhile are buffered and processed, in
order, by the answering call (PIPELINING).

The line-ending rule is strict: every line ends in CRLF. A bare CR or LF in a command
is answered ``500 5.5.2`` and the connection closed; in DATA, ``554 5.6.11`` and the
connection closed (like Postfix ``smtpd_forbid_bare_newline``), nothing queued. Only
``CRLF.CRLF`` ends DATA, so no smuggled end-of-data (``\\n.\\n``, ``\\r.\\r``, ...) can
split one DATA into two messages. Bytes pipelined after ``STARTTLS`` are discarded.

CHUNKING (RFC 3030): ``BDAT n [LAST]`` is followed by exactly ``n`` octets of message
data, counted, never scanned for a terminator and never unstuffed. Every chunk is read
to its end before it is answered, even when it is refused (no MAIL, over the size
limit, after a failed chunk), so its bytes can never be taken for commands. Each chunk
gets a ``250``; ``BDAT ... LAST`` ends the message like DATA's final dot. After a
failed chunk, further BDATs get ``503 5.5.1`` until RSET (or a new MAIL); DATA inside a
BDAT transaction is refused the same way. A malformed ``BDAT`` argument leaves no way to
find the next command: ``501 5.5.4`` and the connection closes. The message must still
be text with CRLF line endings (no BINARYMIME); a last line without CRLF gets one.
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

from hato import reply
from hato.dsn_params import (
    META_RET,
    DsnError,
    RecipientDsn,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
    store_recipients,
)
from hato.message import META_ENVID, META_REQUIRETLS, Envelope
from hato.reply import Reply
from hato.smtp.auth import (
    MECHANISMS,
    decode_response,
    parse_login_text,
    parse_plain,
)
from hato.smtp.policy import Policy, SessionFacts


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Limits and names of a session; the driver-side limits live here too.

    Defaults follow Postfix where it has one (``smtpd_hard_error_limit``,
    ``hopcount_limit``, ``smtpd_timeout``, ``message_size_limit`` of the guide).
    """

    hostname: str = "localhost"
    # RFC 5321 4.5.3.1.4 asks for at least 512; AUTH responses share this limit.
    max_command_line: int = 2048
    # RFC 5321 4.5.3.1.6: 998 characters plus CRLF.
    max_text_line: int = 1000
    # 0: no fixed limit (EHLO says a bare SIZE, RFC 1870).
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_errors: int = 20
    # Postfix smtpd_junk_command_limit: NOOP, VRFY, ETRN and RSET between two accepted
    # messages; one more gets 421 4.7.0 and the connection closes.
    max_junk_commands: int = 100
    max_auth_failures: int = 3
    max_received_headers: int = 50
    # Free bytes on the queue's filesystem, as the driver last saw them (a cheap cached
    # call; None: unknown). MAIL is answered 452 4.3.1 when less than queue_min_free
    # would be left once the declared SIZE is written (Postfix queue_minfree).
    queue_free_space: Callable[[], int | None] | None = None
    queue_min_free: int = 0
    # Used by the driver only. idle: the client sends nothing at all for this long;
    # command: one command line, or one whole DATA transfer, takes longer than this
    # from our previous reply (trickling clients).
    idle_timeout: float = 300.0
    command_timeout: float = 600.0
    # Seconds the greeting is held back from untrusted clients on a public smtp listener;
    # a client that talks meanwhile is a bot (Postfix postscreen's pregreet test).
    greet_delay: float = 0.0
    max_connections: int = 500
    max_connections_per_client: int = 50
    # Of max_connections, on an smtp listener, this many are kept for trusted networks:
    # idle strangers must not lock the application's own mail out.
    trusted_connection_reserve: int = 0


# Events


@dataclass(frozen=True, slots=True)
class Send:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Rejected:
    """A rejection for the operator log; ``command`` is ``MAIL``, ``RCPT``, ``DATA``,
    ``BDAT``, ``END-OF-MESSAGE``, ``AUTH``, ``CONNECT``, or the junk command that was one
    too many (``NOOP``, ``VRFY``, ``ETRN``, ``RSET``)."""

    command: str
    reply: Reply
    sender: str | None = None
    recipient: str | None = None


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class Authenticate:
    mechanism: str
    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageComplete:
    """A message to enqueue. ``data`` already starts with our ``Received:`` header and is
    dot-unstuffed, CRLF throughout."""

    envelope: Envelope
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Close:
    pass


Event = Send | Rejected | StartTLS | Authenticate | MessageComplete | Close

_CLOSE = Close()
_START_TLS = StartTLS()

# States
_COMMAND = 0
_DATA = 1
_AUTH_PLAIN = 2
_AUTH_LOGIN_USER = 3
_AUTH_LOGIN_PASS = 4
_WAIT_AUTH = 5
_WAIT_MESSAGE = 6
_TLS_PENDING = 7
_SKIP_LINE = 8
_CLOSED = 9
_BDAT = 10

_AUTH_STATES = (_AUTH_PLAIN, _AUTH_LOGIN_USER, _AUTH_LOGIN_PASS)
_WAITING = (_WAIT_AUTH, _WAIT_MESSAGE, _TLS_PENDING, _CLOSED)

# Other protocols talking to our port (Postfix smtpd_forbidden_commands): HTTP request
# methods, and header lines ("Host:") from a proxy that already sent its request line.
_FOREIGN_VERBS = frozenset(
    {"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "PATCH", "TRACE"}
)

_PATH_RE = re.compile(r' *<((?:"(?:[^"\\]|\\[\x20-\x7e])*"|[^<>"\s])*)>')
_PARAM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+)?")
_RECEIVED_RE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_HELO_UNSAFE_RE = re.compile(r"[^\x21-\x27\x2a-\x7e]")
_DATA_END = b"\r\n.\r\n"
_DSN_MAIL_PARAMS = frozenset({"RET", "ENVID"})
_DSN_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
_NO_SIZE_LIMIT = 1 << 62
_BDAT_SIZE_RE = re.compile(r"[0-9]{1,18}")


def _has_long_line(data: bytes, limit: int, skip: int = 0) -> bool:
    """Does ``data`` (CRLF lines) hold a line longer than ``limit`` octets with its CRLF,
    not counting its first ``skip`` lines?"""
    if len(data) <= limit:
        return False
    # ``split`` runs in C; far cheaper than a Python loop or a backtracking regex.
    lines = data.split(b"\n")
    if max(map(len, lines)) + 1 <= limit:
        return False
    return max(map(len, itertools.islice(lines, skip, None)), default=0) + 1 > limit


@functools.lru_cache(maxsize=4)
def _rfc5322_date(seconds: int) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC))


def _sanitize_helo(helo: str) -> str:
    return _HELO_UNSAFE_RE.sub("?", helo[:255]) or "unknown"


def _address_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


class ServerSession:
    """One SMTP server conversation, as a pure state machine (see the module docstring)."""

    def __init__(
        self,
        config: SessionConfig,
        policy: Policy,
        *,
        client_ip: str,
        tls_active: bool = False,
        tls_available: bool = False,
        auth_available: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._size_limit = config.max_message_size or _NO_SIZE_LIMIT
        self.policy = policy
        self.facts: SessionFacts = policy.facts(client_ip, tls=tls_active)
        self.tls_available = tls_available
        self.auth_available = auth_available
        self._clock = clock
        self._buf = bytearray()
        self._out: list[Event] = []
        self._state = _COMMAND
        self.helo = ""
        self.esmtp = False
        self.errors = 0
        self.junk_commands = 0
        self.auth_failures = 0
        self.messages = 0
        # Transaction.
        self.sender: str | None = None
        self.recipients: list[str] = []
        self._rcpt_set: set[str] = set()
        self._smtputf8 = False
        self._requiretls = False
        # DSN (RFC 3461): RET and ENVID of MAIL, NOTIFY and ORCPT of each RCPT.
        self._dsn_ret = ""
        self._dsn_envid = ""
        self._dsn_rcpt: dict[str, RecipientDsn] = {}
        # DATA scanning; see _feed_data.
        self._scan = 0
        self._checked = 0
        self._size_base = 0
        self._too_big = False
        self._nul = False
        # BDAT (CHUNKING); see _cmd_bdat and _feed_bdat.
        self._bdat_body = bytearray()
        self._bdat_active = False  # the transaction has had a BDAT: DATA is refused
        self._bdat_failed = False  # a chunk failed: BDAT is refused until RSET or MAIL
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None  # the answer once the chunk is read
        # AUTH exchange.
        self._auth_mechanism = ""
        self._auth_username = ""

    # Public API ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def in_data(self) -> bool:
        """True while message data is being received."""
        return self._state in (_DATA, _BDAT)

    @property
    def waiting(self) -> bool:
        """True while an Authenticate or MessageComplete answer is outstanding."""
        return self._state in (_WAIT_AUTH, _WAIT_MESSAGE)

    def greeting(self) -> Reply:
        # RFC 2034 3: no enhanced code in the greeting.
        return Reply(220, "", f"{self.config.hostname} ESMTP Hato")

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns the events they cause, in order."""
        state = self._state
        if state in (_CLOSED, _TLS_PENDING):
            # STARTTLS injection (CVE-2011-0411): nothing sent in the clear after
            # STARTTLS may be acted upon.
            return []
        self._buf += data
        if state in (_WAIT_AUTH, _WAIT_MESSAGE):
            return []
        out: list[Event] = []
        self._out = out
        self._run()
        return out

    def tls_started(self) -> list[Event]:
        """The driver finished the TLS handshake after :class:`StartTLS`."""
        if self._state != _TLS_PENDING:
            return []
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.facts.tls = True
        self.facts.user = ""
        self.helo = ""
        self.esmtp = False
        self._reset_transaction()
        self._buf.clear()
        self._state = _COMMAND
        return []

    def auth_result(
        self, user: str | None, *, close: bool = False, refusal: Reply = reply.AUTH_FAILED
    ) -> list[Event]:
        """Answer an :class:`Authenticate`: the authenticated user, or ``None``.

        ``refusal`` is the reply for ``None`` (``454 4.7.0`` when the driver's throttle has
        locked the user name). ``close`` (with ``None``): the throttle has blocked the
        client, so the refusal is followed by ``421 4.7.0`` and the connection closes.
        """
        if self._state != _WAIT_AUTH:
            return []
        out: list[Event] = []
        self._out = out
        self._state = _COMMAND
        if user:
            self.facts.user = user
            self._send(reply.AUTH_OK)
        else:
            self.auth_failures += 1
            self._out.append(Rejected("AUTH", refusal))
            if close or self.auth_failures >= self.config.max_auth_failures:
                self._send(refusal)
                self._send(reply.TOO_MANY_AUTH_FAILURES)
                self._close()
                return out
            self._error(refusal)
        self._run()
        return out

    def message_accepted(self, queue_id: str) -> list[Event]:
        """Answer a :class:`MessageComplete` once the message is durable."""
        if self._state != _WAIT_MESSAGE:
            return []
        out: list[Event] = []
        self._out = out
        self.messages += 1
        self.junk_commands = 0  # as Postfix: a client that delivers mail is no junk talker
        return self._end_message(reply.queued_as(queue_id), out)

    def message_rejected(self, answer: Reply) -> list[Event]:
        """Answer a :class:`MessageComplete` that could not be enqueued."""
        if self._state != _WAIT_MESSAGE:
            return []
        out: list[Event] = []
        self._out = out
        out.append(Rejected("END-OF-MESSAGE", answer, self.sender))
        return self._end_message(answer, out)

    def _end_message(self, answer: Reply, out: list[Event]) -> list[Event]:
        self._state = _COMMAND
        self._reset_transaction()
        self._send(answer)
        self._run()
        return out

    # Input loop ------------------------------------------------------------------

    def _run(self) -> None:
        buf = self._buf
        max_line = self.config.max_command_line
        while buf:
            state = self._state
            if state == _DATA:
                if not self._feed_data():
                    return
                continue
            if state == _BDAT:
                self._feed_bdat()
                continue
            if state in _WAITING:
                return
            idx = buf.find(b"\n")
            if state == _SKIP_LINE:
                if idx < 0:
                    buf.clear()
                    return
                del buf[: idx + 1]
                self._state = _COMMAND
                continue
            if idx < 0:
                if len(buf) > max_line:
                    buf.clear()
                    self._state = _SKIP_LINE
                    self._abort_auth()
                    self._error(reply.LINE_TOO_LONG)
                return
            line = bytes(buf[: idx + 1])
            del buf[: idx + 1]
            if idx + 1 > max_line:
                self._abort_auth()
                self._error(reply.LINE_TOO_LONG)
                continue
            self._line(line)

    def _abort_auth(self) -> None:
        if self._state in _AUTH_STATES:
            self._state = _COMMAND

    def _line(self, line: bytes) -> None:
        if len(line) < 2 or line[-2] != 0x0D or line.find(b"\r", 0, len(line) - 2) >= 0:
            self._send(reply.BARE_LINE_ENDING_COMMAND)
            self._close()
            return
        raw = line[:-2]
        if b"\0" in raw:
            self._abort_auth()
            self._error(reply.NUL_IN_COMMAND)
            return
        if self._state != _COMMAND:
            self._auth_line(raw)
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(reply.INVALID_UTF8)
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = _HANDLERS.get(verb)
        if handler is None:
            if verb in _FOREIGN_VERBS or verb.endswith(":"):
                self._out.append(Rejected("CONNECT", reply.CROSS_PROTOCOL))
                self._send(reply.CROSS_PROTOCOL)
                self._close()
                return
            self._error(reply.UNRECOGNIZED)
            return
        handler(self, arg.strip(" "))

    # Output helpers --------------------------------------------------------------

    def _send(self, answer: Reply) -> None:
        self._out.append(Send(answer))

    def _error(self, answer: Reply) -> None:
        """Send a negative reply that counts towards the hard error limit."""
        self._out.append(Send(answer))
        self.errors += 1
        if self.errors >= self.config.max_errors and self._state != _CLOSED:
            self._send(reply.TOO_MANY_ERRORS)
            self._close()

    def _reject(self, command: str, answer: Reply, *, recipient: str | None = None) -> None:
        self._out.append(Rejected(command, answer, self.sender, recipient))
        if answer.is_permanent:
            self._error(answer)
        else:
            self._send(answer)

    def _junk(self, verb: str) -> bool:
        """Count a junk command; True when it is one too many (421 sent, closing)."""
        self.junk_commands += 1
        if self.junk_commands > self.config.max_junk_commands:
            self._out.append(Rejected(verb, reply.TOO_MANY_JUNK_COMMANDS))
            self._send(reply.TOO_MANY_JUNK_COMMANDS)
            self._close()
            return True
        return False

    def _close(self) -> None:
        self._state = _CLOSED
        self._buf.clear()
        self._out.append(_CLOSE)

    def _reset_transaction(self) -> None:
        self.sender = None
        if self.recipients:
            self.recipients = []
            self._rcpt_set = set()
        self._smtputf8 = False
        self._requiretls = False
        if self._bdat_active:
            self._bdat_active = False
            self._bdat_body = bytearray()
        self._bdat_failed = False
        self._dsn_ret = self._dsn_envid = ""
        if self._dsn_rcpt:
            self._dsn_rcpt = {}

    # Commands --------------------------------------------------------------------

    def _ehlo_reply(self) -> Reply:
        lines = [
            self.config.hostname,
            "PIPELINING",
            f"SIZE {self.config.max_message_size}" if self.config.max_message_size else "SIZE",
            "DSN",
            "8BITMIME",
            "SMTPUTF8",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.facts.tls:
            lines.append("REQUIRETLS")  # RFC 8689 2: only on a TLS session
        if self.tls_available and not self.facts.tls:
            lines.append("STARTTLS")
        if self.auth_available and self.policy.auth_permitted(self.facts) and not self.facts.user:
            lines.append("AUTH " + " ".join(MECHANISMS))
        # RFC 2034 3: EHLO keyword lines carry no enhanced code.
        return Reply(250, "", "\n".join(lines))

    def _cmd_ehlo(self, arg: str) -> None:
        if not arg:
            self._error(reply.EHLO_SYNTAX)
            return
        self.helo = arg
        self.esmtp = True
        self._reset_transaction()
        self._send(self._ehlo_reply())

    def _cmd_helo(self, arg: str) -> None:
        if not arg:
            self._error(reply.HELO_SYNTAX)
            return
        self.helo = arg
        self.esmtp = False
        self._reset_transaction()
        self._send(Reply(250, "", self.config.hostname))

    def _cmd_mail(self, arg: str) -> None:
        if not self.helo:
            self._error(reply.NEED_HELO)
            return
        if self.sender is not None:
            self._error(reply.NESTED_MAIL)
            return
        refusal = self.policy.mail_permitted(self.facts)
        if refusal is not None:
            self._reject("MAIL", refusal)
            return
        if arg[:5].upper() != "FROM:":
            self._error(reply.MAIL_SYNTAX)
            return
        m = _PATH_RE.match(arg, 5)
        if m is None:
            self._error(reply.MAIL_SYNTAX)
            return
        smtputf8 = requiretls = False
        declared = 0
        ret = envid = ""
        seen: set[str] = set()
        rest = arg[m.end() :]
        if rest:
            if rest[0] != " ":
                self._error(reply.MAIL_SYNTAX)
                return
            for param in rest.split():
                if _PARAM_RE.fullmatch(param) is None:
                    self._error(reply.MAIL_SYNTAX)
                    return
                key, _, value = param.partition("=")
                key = key.upper()
                if key in _DSN_MAIL_PARAMS:
                    if key in seen:
                        self._error(reply.param_duplicate(key))
                        return
                    seen.add(key)
                    try:
                        if key == "RET":
                            ret = parse_ret(value)
                        else:
                            envid = parse_envid(value)
                    except DsnError as exc:
                        self._error(reply.param_invalid(key, str(exc)))
                        return
                elif key == "SIZE":
                    if not value.isdigit() or len(value) > 20:
                        self._error(reply.MAIL_SYNTAX)
                        return
                    declared = int(value)
                    if declared > self._size_limit:
                        self._reject("MAIL", reply.MESSAGE_TOO_BIG)
                        return
                elif key == "BODY":
                    if value.upper() not in ("7BIT", "8BITMIME"):
                        self._error(reply.PARAM_NOT_IMPLEMENTED)
                        return
                elif key == "SMTPUTF8":
                    if value:
                        self._error(reply.MAIL_SYNTAX)
                        return
                    smtputf8 = True
                elif key == "AUTH":
                    pass  # RFC 4954 5: we may ignore the claimed submitter.
                elif key == "REQUIRETLS":
                    if value:
                        self._error(reply.MAIL_SYNTAX)
                        return
                    # RFC 8689 4.1: over TLS only; a trusted network's plaintext is the
                    # first hop from our own worker (docs/security.md).
                    if not (self.facts.tls or self.facts.trusted):
                        self._reject("MAIL", reply.REQUIRETLS_NEEDS_TLS)
                        return
                    requiretls = True
                else:
                    self._error(reply.PARAM_UNRECOGNIZED)
                    return
        free_space = self.config.queue_free_space
        if free_space is not None:
            free = free_space()
            if free is not None and free - declared < self.config.queue_min_free:
                self._reject("MAIL", reply.STORAGE_FULL)
                return
        decision = self.policy.check_sender(self.facts, m.group(1), smtputf8=smtputf8)
        if isinstance(decision, Reply):
            self._reject("MAIL", decision)
            return
        self.sender = decision
        self._smtputf8 = smtputf8
        self._requiretls = requiretls
        self._bdat_failed = False
        self._dsn_ret, self._dsn_envid = ret, envid
        self._send(reply.SENDER_OK)

    def _cmd_rcpt(self, arg: str) -> None:
        if self.sender is None:
            self._error(reply.NEED_MAIL)
            return
        if arg[:3].upper() != "TO:":
            self._error(reply.RCPT_SYNTAX)
            return
        m = _PATH_RE.match(arg, 3)
        if m is None:
            self._error(reply.RCPT_SYNTAX)
            return
        rest = arg[m.end() :]
        dsn = RecipientDsn()
        if rest:
            if rest[0] != " ":
                self._error(reply.RCPT_SYNTAX)
                return
            found = self._rcpt_params(rest)
            if found is None:
                return
            dsn = found
        if len(self.recipients) >= self.config.max_recipients:
            self._reject("RCPT", reply.TOO_MANY_RECIPIENTS, recipient=m.group(1))
            return
        decision = self.policy.check_recipient(self.facts, m.group(1), smtputf8=self._smtputf8)
        if isinstance(decision, Reply):
            self._reject("RCPT", decision, recipient=m.group(1))
            return
        if decision not in self._rcpt_set:
            self._rcpt_set.add(decision)
            self.recipients.append(decision)
            if dsn.notify or dsn.orcpt:
                self._dsn_rcpt[decision] = dsn
        self._send(reply.RECIPIENT_OK)

    def _rcpt_params(self, rest: str) -> RecipientDsn | None:
        """The DSN parameters of a RCPT (the only ones it takes); None once refused."""
        notify: frozenset[str] = frozenset()
        orcpt = ""
        seen: set[str] = set()
        for param in rest.split():
            if _PARAM_RE.fullmatch(param) is None:
                self._error(reply.RCPT_SYNTAX)
                return None
            key, _, value = param.partition("=")
            key = key.upper()
            if key not in _DSN_RCPT_PARAMS:
                self._error(reply.PARAM_UNRECOGNIZED)
                return None
            if key in seen:
                self._error(reply.param_duplicate(key))
                return None
            seen.add(key)
            try:
                if key == "NOTIFY":
                    notify = parse_notify(value)
                else:
                    orcpt = parse_orcpt(value)
            except DsnError as exc:
                self._error(reply.param_invalid(key, str(exc)))
                return None
        return RecipientDsn(notify, orcpt)

    def _cmd_data(self, arg: str) -> None:
        if arg:
            self._error(reply.SYNTAX_ERROR)
            return
        if self._bdat_active or self._bdat_failed:
            # RFC 3030 2: no DATA in a BDAT transaction; the client must RSET.
            self._reset_transaction()
            self._bdat_failed = True
            self._error(reply.DATA_AFTER_BDAT)
            return
        if self.sender is None:
            self._error(reply.NEED_MAIL)
            return
        if not self.recipients:
            self._reject("DATA", reply.NO_VALID_RECIPIENTS)
            return
        self._send(reply.START_DATA)
        self._state = _DATA
        # A virtual CRLF in front makes "." on the first line end DATA like any other
        # and lets one search (and one dot-unstuffing replace) cover every line.
        self._buf[0:0] = b"\r\n"
        self._scan = 0
        self._checked = 0
        self._size_base = -2
        self._too_big = False
        self._nul = False

    def _cmd_rset(self, arg: str) -> None:
        if self._junk("RSET"):
            return
        if arg:
            self._error(reply.SYNTAX_ERROR)
            return
        self._reset_transaction()
        self._send(reply.RESET_OK)

    def _cmd_noop(self, arg: str) -> None:
        if self._junk("NOOP"):
            return
        self._send(reply.NOOP_OK)

    def _cmd_quit(self, arg: str) -> None:
        self._send(reply.BYE)
        self._close()

    def _cmd_vrfy(self, arg: str) -> None:
        if self._junk("VRFY"):
            return
        self._send(reply.VRFY_DISABLED)

    def _cmd_etrn(self, arg: str) -> None:
        if self._junk("ETRN"):
            return
        self._error(reply.NOT_IMPLEMENTED)

    def _cmd_expn(self, arg: str) -> None:
        self._send(reply.NOT_IMPLEMENTED)

    def _cmd_help(self, arg: str) -> None:
        self._send(reply.HELP)

    def _cmd_not_implemented(self, arg: str) -> None:
        self._error(reply.NOT_IMPLEMENTED)

    def _cmd_starttls(self, arg: str) -> None:
        if arg:
            self._error(reply.SYNTAX_ERROR)
            return
        if self.facts.tls:
            self._error(reply.TLS_ALREADY_ACTIVE)
            return
        if not self.tls_available:
            self._send(reply.TLS_UNAVAILABLE)
            return
        self._send(reply.READY_TLS)
        self._out.append(_START_TLS)
        self._state = _TLS_PENDING
        self._buf.clear()

    # AUTH ------------------------------------------------------------------------

    def _cmd_auth(self, arg: str) -> None:
        if not self.esmtp:
            self._error(reply.NEED_EHLO)
            return
        if not self.auth_available:
            self._error(reply.AUTH_NOT_ENABLED)
            return
        if self.facts.user:
            self._error(reply.AUTH_ALREADY)
            return
        if self.sender is not None:
            self._error(reply.AUTH_IN_TRANSACTION)
            return
        if not self.policy.auth_permitted(self.facts):
            self._reject("AUTH", reply.AUTH_ENCRYPTION_REQUIRED)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip(" ")
        if mechanism not in MECHANISMS:
            self._error(reply.AUTH_MECH_UNKNOWN)
            return
        self._auth_mechanism = mechanism
        if mechanism == "PLAIN":
            if initial:
                self._state = _AUTH_PLAIN
                self._auth_line(initial.encode("utf-8"))
            else:
                self._state = _AUTH_PLAIN
                self._send(reply.AUTH_CHALLENGE_EMPTY)
        elif initial:
            self._state = _AUTH_LOGIN_USER
            self._auth_line(initial.encode("utf-8"))
        else:
            self._state = _AUTH_LOGIN_USER
            self._send(reply.AUTH_CHALLENGE_USERNAME)

    def _auth_line(self, raw: bytes) -> None:
        state = self._state
        if raw == b"*":
            self._state = _COMMAND
            self._error(reply.AUTH_CANCELLED)
            return
        blob = decode_response(raw)
        if blob is None:
            self._state = _COMMAND
            self._error(reply.AUTH_BAD_RESPONSE)
            return
        if state == _AUTH_PLAIN:
            creds = parse_plain(blob)
            if creds is None:
                self._state = _COMMAND
                self._error(reply.AUTH_BAD_RESPONSE)
                return
            self._state = _WAIT_AUTH
            self._out.append(Authenticate("PLAIN", creds.authzid, creds.username, creds.password))
            return
        text = parse_login_text(blob)
        if text is None:
            self._state = _COMMAND
            self._error(reply.AUTH_BAD_RESPONSE)
            return
        if state == _AUTH_LOGIN_USER:
            self._auth_username = text
            self._state = _AUTH_LOGIN_PASS
            self._send(reply.AUTH_CHALLENGE_PASSWORD)
            return
        username, self._auth_username = self._auth_username, ""
        self._state = _WAIT_AUTH
        self._out.append(Authenticate("LOGIN", "", username, text))

    # DATA ------------------------------------------------------------------------

    def _feed_data(self) -> bool:
        """Scan buffered DATA; True when the message ended (state has moved on)."""
        buf = self._buf
        idx = buf.find(_DATA_END, self._scan)
        if idx >= 0:
            end = idx + 2
        else:
            end = len(buf)
            if buf[end - 1] == 0x0D:
                # A CR at the end may yet be followed by its LF.
                end -= 1
        start = self._checked
        if start < end:
            # Each CR must be followed by LF and each LF preceded by CR: counting in C
            # is enough, because the region never starts between a CR and its LF.
            lf = buf.count(b"\n", start, end)
            if lf != buf.count(b"\r", start, end) or lf != buf.count(b"\r\n", start, end):
                self._out.append(Rejected("DATA", reply.BARE_LINE_ENDING, self.sender))
                self._send(reply.BARE_LINE_ENDING)
                self._close()
                return False
            if not self._nul and buf.find(b"\0", start, end) >= 0:
                self._nul = True
            self._checked = end
        if idx < 0:
            size = self._size_base + len(buf)
            if size > self._size_limit:
                self._too_big = True
            if self._too_big and len(buf) > 8:
                # Keep only what the terminator search and the CR check still need.
                drop = min(len(buf) - 4, self._checked)
                del buf[:drop]
                self._size_base += drop
                self._checked -= drop
            self._scan = max(0, len(buf) - 4)
            return False
        size = self._size_base + idx + 2
        header = raw = b""
        if not self._too_big:
            # The one copy of the message: our Received header, then the data as sent.
            header = self._received_header()
            with memoryview(buf) as view:
                raw = header + view[2 : idx + 2]
        # Deleting from the front shrinks a bytearray to what is left, so the buffer does
        # not keep the size of the largest message.
        del buf[: idx + 5]
        self._state = _COMMAND
        self._finish_message(header, raw, size)
        return True

    def _finish_message(
        self, header: bytes, raw: bytes, size: int, *, stuffed: bool = True
    ) -> None:
        """``raw`` is our ``header`` followed by the DATA as sent (dot-stuffed, with its
        last line's CRLF): ``raw[len(header) - 2:]`` reads like DATA after a CRLF, so one
        search for ``CRLF.`` unstuffs the first line too. BDAT data is not ``stuffed``."""
        answer: Reply | None = None
        start = len(header) - 2
        if self._too_big or size > self._size_limit:
            answer = reply.MESSAGE_TOO_BIG
        elif self._nul:
            answer = reply.NUL_IN_DATA
        elif _has_long_line(raw, self.config.max_text_line, header.count(b"\n")):
            answer = reply.TEXT_LINE_TOO_LONG
        else:
            end = raw.find(b"\r\n\r\n", start)
            if end < 0:
                end = len(raw)
            limit = self.config.max_received_headers
            # Counting the header lines that start with "r" or "R", in C and without a
            # copy, is an upper bound; the exact regex runs only when that bound is over
            # the limit.
            if (
                raw.count(b"\nr", start, end) + raw.count(b"\nR", start, end) > limit
                and len(_RECEIVED_RE.findall(raw, start, end)) > limit
            ):
                answer = reply.LOOP_DETECTED
        if answer is not None:
            self._out.append(Rejected("END-OF-MESSAGE", answer, self.sender))
            self._reset_transaction()
            self._error(answer)
            return
        # Our header holds no "CRLF." of its own. Without dot-stuffed lines replace()
        # returns raw itself: no copy.
        data = raw.replace(b"\r\n.", b"\r\n") if stuffed else raw
        del raw  # when replace() did copy, the original goes before anything else
        # A non-ASCII host name of ours says nothing about the client's data.
        body_8bit = not (data if header.isascii() else data[len(header) :]).isascii()
        sender = self.sender if self.sender is not None else ""
        envelope = Envelope(
            sender=sender,
            recipients=self.recipients,
            client_address=self.facts.client_ip,
            client_helo=self.helo,
            auth_user=self.facts.user,
            smtputf8=self._smtputf8,
            body_8bit=body_8bit,
        )
        if self._dsn_envid:
            envelope.meta[META_ENVID] = self._dsn_envid
        if self._dsn_ret:
            envelope.meta[META_RET] = self._dsn_ret
        if self._dsn_rcpt:
            store_recipients(envelope.meta, self._dsn_rcpt)
        if self._requiretls:
            envelope.meta[META_REQUIRETLS] = "yes"
        self._state = _WAIT_MESSAGE
        self._out.append(MessageComplete(envelope, data))

    # BDAT ------------------------------------------------------------------------

    def _cmd_bdat(self, arg: str) -> None:
        size_text, _, last = arg.partition(" ")
        last = last.strip(" ")
        if _BDAT_SIZE_RE.fullmatch(size_text) is None or last.upper() not in ("", "LAST"):
            # The chunk's length is unknown, so its bytes cannot be told from commands.
            self._out.append(Rejected("BDAT", reply.BDAT_SYNTAX, self.sender))
            self._send(reply.BDAT_SYNTAX)
            self._close()
            return
        size = int(size_text)
        refusal: Reply | None = None
        if not self.esmtp:
            refusal = reply.NEED_EHLO
        elif self._bdat_failed:
            refusal = reply.BDAT_AFTER_FAILURE
        elif self.sender is None:
            refusal = reply.NEED_MAIL
        elif not self.recipients:
            refusal = reply.NO_VALID_RECIPIENTS
        elif not self._bdat_active:
            self._bdat_active = True
            self._bdat_body = bytearray()
        self._bdat_remaining = size
        self._bdat_last = bool(last)
        self._bdat_refusal = refusal
        if refusal is None and len(self._bdat_body) + size > self._size_limit:
            self._bdat_refusal = reply.MESSAGE_TOO_BIG
        self._state = _BDAT
        if size == 0:
            self._end_chunk()

    def _feed_bdat(self) -> None:
        """Move buffered chunk bytes into the message (or drop them when the chunk is
        refused); answer the chunk once all of its bytes are in."""
        buf = self._buf
        take = min(self._bdat_remaining, len(buf))
        if self._bdat_refusal is None:
            with memoryview(buf) as view:
                self._bdat_body += view[:take]
        del buf[:take]
        self._bdat_remaining -= take
        if self._bdat_remaining == 0:
            self._end_chunk()

    def _end_chunk(self) -> None:
        self._state = _COMMAND
        refusal = self._bdat_refusal
        if refusal is not None:
            self._bdat_refusal = None
            if refusal.code == 503:
                self._error(refusal)
                return
            # A refused chunk fails the transaction (RFC 3030 2): the client must RSET.
            self._out.append(Rejected("BDAT", refusal, self.sender))
            self._reset_transaction()
            self._bdat_failed = True
            self._error(refusal)
            return
        if not self._bdat_last:
            self._send(reply.chunk_received(len(self._bdat_body)))
            return
        body = self._bdat_body
        self._bdat_body = bytearray()
        self._bdat_active = False
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        size = len(body)
        lf = body.count(b"\n")
        if lf != body.count(b"\r") or lf != body.count(b"\r\n"):
            self._out.append(Rejected("END-OF-MESSAGE", reply.BARE_LINE_ENDING, self.sender))
            self._reset_transaction()
            self._error(reply.BARE_LINE_ENDING)
            return
        self._nul = b"\0" in body
        self._too_big = False
        header = self._received_header()
        raw = header + body
        del body
        self._finish_message(header, raw, size, stuffed=False)

    def _received_header(self) -> bytes:
        if self._smtputf8:
            proto = "UTF8SMTP"
        elif self.esmtp or self.facts.tls or self.facts.user:
            proto = "ESMTP"
        else:
            proto = "SMTP"
        if self.facts.tls:
            proto += "S"
        if self.facts.user:
            proto += "A"
        if proto == "SMTPS":  # HELO then STARTTLS: RFC 3848 has no name for it
            proto = "ESMTPS"
        recipient = f"\r\n\tfor <{self.recipients[0]}>" if len(self.recipients) == 1 else ""
        date = _rfc5322_date(int(self._clock()))
        text = (
            f"Received: from {_sanitize_helo(self.helo)} "
            f"({_address_literal(self.facts.client_ip)})\r\n"
            f"\tby {self.config.hostname} (Hato) with {proto}{recipient};\r\n"
            f"\t{date}\r\n"
        )
        return text.encode("utf-8")


_HANDLERS: dict[str, Callable[[ServerSession, str], None]] = {
    "EHLO": ServerSession._cmd_ehlo,
    "HELO": ServerSession._cmd_helo,
    "MAIL": ServerSession._cmd_mail,
    "RCPT": ServerSession._cmd_rcpt,
    "DATA": ServerSession._cmd_data,
    "RSET": ServerSession._cmd_rset,
    "NOOP": ServerSession._cmd_noop,
    "QUIT": ServerSession._cmd_quit,
    "VRFY": ServerSession._cmd_vrfy,
    "EXPN": ServerSession._cmd_expn,
    "HELP": ServerSession._cmd_help,
    "STARTTLS": ServerSession._cmd_starttls,
    "AUTH": ServerSession._cmd_auth,
    "BDAT": ServerSession._cmd_bdat,
    "ETRN": ServerSession._cmd_etrn,
    "TURN": ServerSession._cmd_not_implemented,
}
