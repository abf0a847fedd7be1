"""The application API: ``Mailer.send`` enqueues a message into the outbox, ``status`` reads it back.

A web app never talks SMTP inside a request. It calls :meth:`Mailer.send`, which builds
the message with the standard library's :mod:`email` package and stores it in the queue
(SQLite, PostgreSQL, Redis, or memory for tests); ``hato worker`` (or ``hato serve``)
delivers it later, with retries, and :meth:`Mailer.status` says what became of it.

::

    mailer = hato.Mailer("postgresql://app@db/app")          # or HATO_QUEUE_URL
    message_id = mailer.send("user@example.net", "Welcome", text="Hello!")
    mailer.status(message_id).state                         # "queued" … "sent"

:class:`AsyncMailer` has the same methods as coroutines, for asyncio apps.

What ``send`` promises:

* It returns only once the message is durable in the queue (the backend's ``enqueue``
  contract); with ``connection=`` (PostgreSQL) the message is part of the caller's open
  transaction instead, so it exists exactly when the caller commits.
* Every header value and address is checked for CR, LF and NUL before anything is built
  (:class:`~hato.errors.AddressError`): no header injection through a subject, a name or
  an address.
* ``Bcc`` recipients go into the envelope only, never into the headers.
* ``Date`` and ``Message-ID`` are added; the Message-ID is in the stored bytes, so every
  retry delivers the same one. With an ``idempotency_key`` the Message-ID is derived from
  the key, and the key is stored with the message (a second ``send`` with the same key
  returns the first message's id and stores nothing) and travels in the
  ``Hato-Idempotency-Key`` header.
* The bytes are 7-bit clean (non-ASCII text is quoted-printable or base64, non-ASCII
  header text RFC 2047 encoded, non-ASCII domains IDNA-encoded), so no relay needs
  8BITMIME or SMTPUTF8. Non-ASCII local parts are refused.

Status states are the five of :data:`STATES`. The queue's ``held`` (kept by a hold route
until ``hato queue release``) reads as ``queued``: it has not been sent and will be once
released. ``quarantined`` (the stored record could not be read back) reads as ``failed``
with the reason.

The sync :class:`Mailer` runs an :class:`AsyncMailer` on a private event loop in a daemon
thread, because the PostgreSQL and Redis queue objects belong to the loop they were
opened on; ``send`` builds the message in the calling thread, hands the enqueue to that
loop and waits for it (tens of microseconds on top of the queue's own round trip).
Build one ``Mailer`` per process and share it between threads; a forked child
(``gunicorn --preload``) starts its own loop and connections on first use.

The message is written with the email package's encoders (:mod:`email.header`,
:mod:`email.quoprimime`, :mod:`email.utils`) rather than ``EmailMessage`` with
``policy.SMTP``, for speed (see the comment above :func:`compose`); the tests parse every
shape back with ``EmailMessage``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import email.quoprimime
import email.utils
import hashlib
import math
import mimetypes
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar, cast

from hato.clock import Clock
from hato.errors import AddressError, ConfigError, HatoError, QueueError
from hato.message import Envelope, check_header_value, parse_address
from hato.queue import open_queue
from hato.queue.base import MessageState, Queue, RecipientState, RecipientStatus, StoredMessage

if TYPE_CHECKING:
    from hato.templates import Templates

__all__ = [
    "IDEMPOTENCY_HEADER",
    "STATES",
    "AddressLike",
    "AsyncMailer",
    "Attachment",
    "Composed",
    "Email",
    "Mailer",
    "MessageId",
    "State",
    "Status",
    "compose",
]

T = TypeVar("T")

MessageId: TypeAlias = str
"""A queue id as ``send`` returns it: 19 upper-case hex digits (11 of time, 8 random)."""

State = Literal["queued", "sending", "deferred", "sent", "failed"]
STATES: tuple[State, ...] = ("queued", "sending", "deferred", "sent", "failed")

AddressLike: TypeAlias = "str | HeaderAddress"
"""``"user@example.net"``, ``"Name <user@example.net>"`` or an
:class:`email.headerregistry.Address`."""

Attachment: TypeAlias = "tuple[str, bytes] | tuple[str, bytes, str | None] | str | os.PathLike[str]"
"""``(filename, content)``, ``(filename, content, mimetype)`` or a path to read."""

IDEMPOTENCY_HEADER = "Hato-Idempotency-Key"


MAX_IDEMPOTENCY_KEY = 200
MAX_FILENAME = 255
_PRINTABLE_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
# A display name that needs no quoting: atext and spaces (RFC 5322 phrase of atoms).
_PHRASE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ \-]+$")
_MIMETYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
# A parameter value that can go in quotes as it is.
_TOKEN_VALUE_RE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]+$")
_LINE_END_RE = re.compile(r"\r\n|\r|\n")
# Header names RFC 5322 allows: printable ASCII but the colon.
_FIELD_NAME_RE = re.compile(r"^[!-9;-~]+$")
# Set by ``send``'s own parameters, so a ``headers`` entry would conflict or smuggle.
_RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        IDEMPOTENCY_HEADER.lower(),
    }
)
_REPLACEABLE_HEADERS = frozenset({"date", "message-id"})


# -- composing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Email:
    """One message for :meth:`Mailer.send_many`; the fields are ``send``'s parameters."""

    to: AddressLike | Iterable[AddressLike]
    subject: str
    text: str | None = None
    html: str | None = None
    from_: AddressLike | None = None
    cc: AddressLike | Iterable[AddressLike] = ()
    bcc: AddressLike | Iterable[AddressLike] = ()
    reply_to: AddressLike | Iterable[AddressLike] | None = None
    headers: Mapping[str, str] | None = None
    attachments: Iterable[Attachment] = ()
    send_at: datetime | float | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Composed:
    """A message ready for the queue: envelope, bytes and queue options."""

    envelope: Envelope
    data: bytes
    message_id: str
    idempotency_key: str | None = None
    not_before: float | None = None


@dataclass(frozen=True, slots=True)
class _Mailbox:
    """A checked address: ``display`` (may be empty or non-ASCII) and an ASCII addr-spec."""

    display: str
    addr_spec: str

    @property
    def domain(self) -> str:
        return self.addr_spec.rpartition("@")[2]

    def header_text(self) -> str:
        """The mailbox as header text: the display name plain when it is atoms, quoted
        when it is other ASCII, RFC 2047 encoded words when it is not ASCII."""
        if not self.display:
            return self.addr_spec
        if _PHRASE_RE.match(self.display):
            return f"{self.display} <{self.addr_spec}>"
        if self.display.isascii():
            quoted = self.display.replace("\\", "\\\\").replace('"', '\\"')
            return f'"{quoted}" <{self.addr_spec}>'
        words = Header(self.display, "utf-8", maxlinelen=76).encode(linesep="\r\n")
        return f"{words} <{self.addr_spec}>"


def _addresses(value: AddressLike | Iterable[AddressLike] | None, what: str) -> list[_Mailbox]:
    if value is None:
        return []
    items: Iterable[AddressLike] = [value] if isinstance(value, str | HeaderAddress) else value
    return [_address(item, what) for item in items]


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return re.sub(r"\\(.)", r"\1", name[1:-1])
    return name


def _address(value: AddressLike, what: str) -> _Mailbox:
    """One address, checked strictly; the domain in IDNA (ASCII) form."""
    if isinstance(value, HeaderAddress):
        display, spec = value.display_name, value.addr_spec
    elif isinstance(value, str):
        check_header_value(value, what)
        text = value.strip()
        if text.endswith(">") and "<" in text:
            cut = text.rindex("<")
            display, spec = _unquote(text[:cut].strip()), text[cut + 1 : -1].strip()
        else:
            display, spec = "", text
    else:
        raise AddressError(f"{what}: expected an address string, not {type(value).__name__}")
    check_header_value(display, f"{what} display name")
    parsed = parse_address(check_header_value(spec, what))
    if not parsed.local.isascii():
        raise AddressError(f"{what}: non-ASCII local part in {spec!r} needs SMTPUTF8")
    domain = parsed.domain
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise AddressError(f"{what}: bad domain in {spec!r}: {exc}") from None
    return _Mailbox(display.strip(), f"{parsed.local}@{domain}")


def _attachment(item: Attachment) -> tuple[str, bytes, str]:
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise HatoError(f"attachment {str(path)!r}: {exc.strerror or exc}") from None
        filename, mimetype = path.name, None
    elif isinstance(item, tuple) and len(item) in (2, 3):
        filename, content = item[0], item[1]
        mimetype = item[2] if len(item) == 3 else None
    else:
        raise TypeError("an attachment is (filename, bytes[, mimetype]) or a path")
    if not isinstance(filename, str) or not isinstance(content, bytes | bytearray):
        raise TypeError("an attachment is (filename, bytes[, mimetype]) or a path")
    check_header_value(filename, "attachment filename")
    if not filename.strip() or len(filename) > MAX_FILENAME:
        raise AddressError(f"attachment filename must be 1 to {MAX_FILENAME} characters")
    if mimetype is None:
        mimetype = mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"
    check_header_value(mimetype, "attachment MIME type")
    if not _MIMETYPE_RE.match(mimetype):
        raise AddressError(f"attachment MIME type {mimetype!r} is not type/subtype")
    if mimetype.lower().startswith(("message/", "multipart/")):
        # Such parts may not be base64-encoded (RFC 2046 5.2.1), and opaque bytes cannot
        # be anything else: send them as what they are to us.
        mimetype = "application/octet-stream"
    return filename, bytes(content), mimetype.lower()


def _timestamp(send_at: datetime | float | None) -> float | None:
    if send_at is None:
        return None
    if isinstance(send_at, datetime):
        return send_at.timestamp()  # naive means local time, as datetime does
    value = float(send_at)
    if not math.isfinite(value):
        raise ValueError("send_at must be a finite timestamp")
    return value


def _message_id(domain: str, idempotency_key: str | None, sender: str) -> str:
    if idempotency_key is None:
        token = secrets.token_hex(16)
    else:
        # The same key gives the same Message-ID: even a copy stored twice (another
        # queue, a lost key) reads as one message to the recipient's software.
        token = hashlib.sha256(f"{sender}\0{idempotency_key}".encode()).hexdigest()[:32]
    return f"<hato.{token}@{domain}>"


# -- writing MIME ----------------------------------------------------------------------------
#
# The structure (text, HTML, multipart/alternative, multipart/mixed with attachments) is
# written here, with the email package's own encoders for the parts that need care:
# email.header.Header for RFC 2047 words and folding, email.quoprimime and base64 for
# bodies, email.utils for RFC 2231 parameters and the Date. EmailMessage with policy.SMTP
# builds the same shapes but costs ~0.8 ms for a text + HTML message (most of the 2 ms
# budget of send()), and its refolding of long non-ASCII subjects drops spaces and emits
# whitespace-only lines (CPython 3.11). The tests parse every shape back with the email
# package and compare.


def _header(name: str, value: str) -> str:
    """An unstructured header line: as it is when short printable ASCII, else folded
    (and RFC 2047-encoded when not ASCII) by :class:`email.header.Header`."""
    if len(name) + len(value) <= 76 and _PRINTABLE_RE.match(value):
        return f"{name}: {value}\r\n"
    charset = "us-ascii" if value.isascii() else "utf-8"
    encoded = Header(value, charset, maxlinelen=76, header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n"


def _address_header(name: str, boxes: Sequence[_Mailbox]) -> str:
    """An address-list header, folded between addresses when it is long."""
    items = [box.header_text() for box in boxes]
    one_line = ", ".join(items)
    if len(name) + len(one_line) <= 76 and "\r\n" not in one_line:
        return f"{name}: {one_line}\r\n"
    return f"{name}: " + ",\r\n ".join(items) + "\r\n"


def _text_body(text: str) -> tuple[str, str]:
    """(Content-Transfer-Encoding, body with CRLF lines) for a text part, 7-bit clean."""
    lines = _LINE_END_RE.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    if text.isascii() and all(len(line) <= 78 for line in lines):
        return "7bit", "".join(line + "\r\n" for line in lines)
    raw = "\n".join(lines).encode("utf-8")
    ascii_share = sum(b < 128 for b in raw) / max(1, len(raw))
    if ascii_share < 0.7:  # mostly non-Latin text (Japanese, ...): base64 is smaller
        return "base64", _base64(raw.replace(b"\n", b"\r\n") + b"\r\n")
    encoded = email.quoprimime.body_encode(raw.decode("latin-1"), 76, "\r\n")
    return "quoted-printable", encoded + "\r\n"


def _base64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").replace("\n", "\r\n")


def _text_part(text: str, subtype: str) -> str:
    cte, body = _text_body(text)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n\r\n{body}"
    )


def _param(name: str, value: str) -> str:
    if _TOKEN_VALUE_RE.match(value):
        return f'; {name}="{value}"'
    return f"; {name}*={email.utils.encode_rfc2231(value, 'utf-8')}"


def _attachment_part(filename: str, content: bytes, mimetype: str) -> str:
    return (
        f"Content-Type: {mimetype}{_param('name', filename)}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment{_param('filename', filename)}\r\n\r\n"
        f"{_base64(content)}"
    )


def _multipart(subtype: str, parts: Sequence[str]) -> str:
    boundary = f"=_hato_{secrets.token_hex(12)}"
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts)
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n{body}--{boundary}--\r\n'
    )


def _body(text: str | None, html: str | None, files: Sequence[tuple[str, bytes, str]]) -> str:
    if text is not None and html is not None:
        content = _multipart("alternative", [_text_part(text, "plain"), _text_part(html, "html")])
    elif html is not None:
        content = _text_part(html, "html")
    else:
        content = _text_part(text or "", "plain")
    if files:
        content = _multipart("mixed", [content, *(_attachment_part(*f) for f in files)])
    return content


def compose(
    to: AddressLike | Iterable[AddressLike],
    subject: str,
    text: str | None = None,
    html: str | None = None,
    *,
    from_: AddressLike | None = None,
    cc: AddressLike | Iterable[AddressLike] = (),
    bcc: AddressLike | Iterable[AddressLike] = (),
    reply_to: AddressLike | Iterable[AddressLike] | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[Attachment] = (),
    send_at: datetime | float | None = None,
    idempotency_key: str | None = None,
    default_from: str | None = None,
    clock: Clock = time.time,
) -> Composed:
    """Build a message and its envelope without storing it (what ``send`` stores).

    Raises :class:`~hato.errors.AddressError` for a bad or unsafe address or header,
    :class:`~hato.errors.ConfigError` when there is no sender at all.
    """
    sender_value = from_ if from_ is not None else default_from
    if sender_value is None or (isinstance(sender_value, str) and not sender_value.strip()):
        raise ConfigError("no sender: pass from_= or set HATO_DEFAULT_FROM")
    sender = _address(sender_value, "from_")
    rcpt_to = _addresses(to, "to")
    rcpt_cc = _addresses(cc, "cc")
    rcpt_bcc = _addresses(bcc, "bcc")
    replies = _addresses(reply_to, "reply_to")
    if not (rcpt_to or rcpt_cc or rcpt_bcc):
        raise AddressError("no recipients: pass to=, cc= or bcc=")
    if not isinstance(subject, str):
        raise TypeError("subject must be a string")
    check_header_value(subject, "subject")
    for body, what in ((text, "text"), (html, "html")):
        if body is not None and not isinstance(body, str):
            raise TypeError(f"{what} must be a string")
    if idempotency_key is not None:
        check_header_value(idempotency_key, "idempotency_key")
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise AddressError(f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    extra: dict[str, tuple[str, str]] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not _FIELD_NAME_RE.match(name):
            raise AddressError(f"header name {name!r} is not a valid field name")
        if name.lower() in _RESERVED_HEADERS:
            raise AddressError(f"header {name!r} is set by send()'s own parameters")
        extra[name.lower()] = (name, check_header_value(str(value), f"header {name}"))
    files = [_attachment(item) for item in attachments]
    not_before = _timestamp(send_at)

    message_id = _message_id(sender.domain, idempotency_key, sender.addr_spec)
    date = format_datetime(datetime.fromtimestamp(clock(), UTC))
    if "message-id" in extra:
        message_id = extra["message-id"][1]
    lines = [_address_header("From", [sender])]
    for name, boxes in (("To", rcpt_to), ("Cc", rcpt_cc), ("Reply-To", replies)):
        if boxes:
            lines.append(_address_header(name, boxes))
    lines.append(_header("Subject", subject))
    lines.append(_header("Date", extra.pop("date", ("Date", date))[1]))
    lines.append(_header("Message-ID", extra.pop("message-id", ("Message-ID", message_id))[1]))
    if idempotency_key is not None:
        lines.append(_header(IDEMPOTENCY_HEADER, idempotency_key))
    lines.extend(_header(name, value) for name, value in extra.values())
    lines.append("MIME-Version: 1.0\r\n")
    try:
        data = ("".join(lines) + _body(text, html, files)).encode("ascii")
    except (ValueError, TypeError, UnicodeError, IndexError) as exc:  # what email refuses
        raise AddressError(f"cannot build the message: {exc}") from None

    recipients: list[str] = []
    seen: set[str] = set()
    for box in (*rcpt_to, *rcpt_cc, *rcpt_bcc):
        if box.addr_spec.lower() not in seen:
            seen.add(box.addr_spec.lower())
            recipients.append(box.addr_spec)
    envelope = Envelope(sender=sender.addr_spec, recipients=recipients)
    return Composed(envelope, data, message_id, idempotency_key, not_before)


def _compose_email(
    item: Email | Mapping[str, Any], default_from: str | None, clock: Clock
) -> Composed:
    if isinstance(item, Email):
        return compose(
            item.to,
            item.subject,
            item.text,
            item.html,
            from_=item.from_,
            cc=item.cc,
            bcc=item.bcc,
            reply_to=item.reply_to,
            headers=item.headers,
            attachments=item.attachments,
            send_at=item.send_at,
            idempotency_key=item.idempotency_key,
            default_from=default_from,
            clock=clock,
        )
    if isinstance(item, Mapping):
        return _compose_email(Email(**item), default_from, clock)
    raise TypeError(f"send_many takes Email objects or mappings, not {type(item).__name__}")


# -- status --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """What became of a message.

    ``reply`` is the last reply that matters: the relay's ``250`` when ``sent``, the
    reason when ``failed``, the last temporary failure when ``deferred``.
    """

    id: MessageId
    state: State
    reply: str
    attempts: int
    created_at: float
    next_attempt_at: float | None
    recipients: tuple[RecipientStatus, ...] = field(default=())
    queue_state: str = ""  # the queue's own state (held, quarantined, ...), for operators

    @property
    def reason(self) -> str:
        """Why the message failed (empty unless ``state == "failed"``)."""
        return self.reply if self.state == "failed" else ""

    @property
    def done(self) -> bool:
        """True once the state is final (``sent`` or ``failed``)."""
        return self.state in ("sent", "failed")


_STATE_OF: dict[MessageState, State] = {
    MessageState.QUEUED: "queued",
    MessageState.HELD: "queued",
    MessageState.SENDING: "sending",
    MessageState.DEFERRED: "deferred",
    MessageState.SENT: "sent",
    MessageState.FAILED: "failed",
    MessageState.QUARANTINED: "failed",
}


def status_of(msg: StoredMessage) -> Status:
    """The application's view of a stored message."""
    state = _STATE_OF[msg.state]
    reply = msg.last_reply
    if msg.state is MessageState.QUARANTINED:
        detail = reply.removeprefix("quarantined: ") or "the stored record is unreadable"
        reply = f"quarantined: {detail}"
    elif msg.state is MessageState.FAILED:
        failed = [r.reply for r in msg.recipients if r.state is RecipientState.FAILED and r.reply]
        reply = failed[-1] if failed else reply
    elif msg.state is MessageState.HELD and not reply:
        reply = "held: waiting for hato queue release"
    waiting = state in ("queued", "deferred", "sending")
    return Status(
        id=msg.id,
        state=state,
        reply=reply,
        attempts=msg.attempts,
        created_at=msg.created_at,
        next_attempt_at=msg.next_attempt_at if waiting else None,
        recipients=tuple(
            RecipientStatus(r.address, r.state, r.reply, r.relay, r.attempts)
            for r in msg.recipients
        ),
        queue_state=msg.state.value,
    )


# -- the async mailer ----------------------------------------------------------------------


def _settings_values(
    queue_url: str | None, default_from: str | None
) -> tuple[str, str | None, Path | None]:
    if queue_url is not None and default_from is not None:
        return queue_url, default_from, None
    from hato.config import load_settings

    settings = load_settings()
    return (
        queue_url or settings.effective_queue_url,
        default_from if default_from is not None else settings.default_from,
        settings.template_dir,
    )


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class AsyncMailer:
    """:class:`Mailer` for asyncio: the same methods, as coroutines.

    One instance belongs to the event loop it is first used in (the queue's connections
    do); make one per loop. ``async with AsyncMailer(...) as mailer:`` opens and closes it,
    or it opens on first use and :meth:`aclose` closes it.
    """

    def __init__(
        self,
        queue_url: str | None = None,
        *,
        default_from: str | None = None,
        templates: str | os.PathLike[str] | Templates | None = None,
        clock: Clock = time.time,
        fsync: bool = True,
    ) -> None:
        url, sender, template_dir = _settings_values(queue_url, default_from)
        self.queue_url = url
        self.default_from = sender
        self._templates_arg = templates if templates is not None else template_dir
        self._templates: Templates | None = None
        self._clock = clock
        self._fsync = fsync
        self._queue: Queue | None = None
        self._outbox: Any = None  # an unopened PostgresQueue for connection= enqueues
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncMailer({_redact(self.queue_url)!r})"

    # Lifecycle.

    async def open(self) -> None:
        """Connect to the queue (and create its schema if needed). Idempotent."""
        await self._open_queue()

    async def _open_queue(self) -> Queue:
        if self._closed:
            raise QueueError("this mailer is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop, self._opening = loop, asyncio.Lock()
        elif self._loop is not loop:
            raise RuntimeError(
                "AsyncMailer is bound to the event loop it was first used in; make one per loop"
            )
        if self._queue is not None:
            return self._queue
        assert self._opening is not None
        async with self._opening:
            if self._queue is None:
                queue = open_queue(self.queue_url, clock=self._clock, fsync=self._fsync)
                await queue.open()
                self._queue = queue
        return self._queue

    async def aclose(self) -> None:
        """Close the queue connections; the mailer cannot be used afterwards."""
        self._closed = True
        queue, self._queue = self._queue, None
        if queue is not None:
            await queue.close()

    async def __aenter__(self) -> AsyncMailer:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # Sending.

    def compose(
        self, to: AddressLike | Iterable[AddressLike], subject: str, **kwargs: Any
    ) -> Composed:
        """:func:`compose` with this mailer's default sender and clock."""
        return compose(to, subject, default_from=self.default_from, clock=self._clock, **kwargs)

    async def send(
        self,
        to: AddressLike | Iterable[AddressLike],
        subject: str,
        text: str | None = None,
        html: str | None = None,
        *,
        from_: AddressLike | None = None,
        cc: AddressLike | Iterable[AddressLike] = (),
        bcc: AddressLike | Iterable[AddressLike] = (),
        reply_to: AddressLike | Iterable[AddressLike] | None = None,
        headers: Mapping[str, str] | None = None,
        attachments: Iterable[Attachment] = (),
        send_at: datetime | float | None = None,
        idempotency_key: str | None = None,
        connection: object | None = None,
    ) -> MessageId:
        """Enqueue one message; its id once it is durable (see the module docstring).

        ``connection``: a psycopg ``AsyncConnection`` (or ``Connection``) with an open
        transaction, PostgreSQL queues only; the message exists once the caller commits.
        """
        composed = compose(
            to,
            subject,
            text,
            html,
            from_=from_,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            headers=headers,
            attachments=attachments,
            send_at=send_at,
            idempotency_key=idempotency_key,
            default_from=self.default_from,
            clock=self._clock,
        )
        return await self.enqueue(composed, connection=connection)

    async def enqueue(self, composed: Composed, *, connection: object | None = None) -> MessageId:
        """Store a message built by :func:`compose`."""
        if connection is not None:
            return await self._enqueue_on(connection, composed)
        queue = await self._open_queue()
        return await queue.enqueue(
            composed.envelope,
            composed.data,
            not_before=composed.not_before,
            idempotency_key=composed.idempotency_key,
        )

    async def _enqueue_on(self, connection: object, composed: Composed) -> MessageId:
        if self._outbox is None:
            self._outbox = _postgres_queue(self.queue_url, self._clock)
        queue = self._outbox
        return cast(
            str,
            await queue.enqueue(
                composed.envelope,
                composed.data,
                not_before=composed.not_before,
                idempotency_key=composed.idempotency_key,
                connection=connection,
            ),
        )

    async def send_many(
        self, messages: Iterable[Email | Mapping[str, Any]], *, connection: object | None = None
    ) -> list[MessageId]:
        """Enqueue several messages; their ids in order.

        Every message is built (and checked) before any is stored, so a bad address
        stores nothing. Without ``connection`` the messages are enqueued concurrently (the
        backends commit them in groups); if one fails, others may be stored: call again
        with the same idempotency keys to finish without duplicates.
        """
        composed = [_compose_email(m, self.default_from, self._clock) for m in messages]
        if connection is not None:
            return [await self._enqueue_on(connection, c) for c in composed]
        queue = await self._open_queue()
        return list(
            await asyncio.gather(
                *(
                    queue.enqueue(
                        c.envelope,
                        c.data,
                        not_before=c.not_before,
                        idempotency_key=c.idempotency_key,
                    )
                    for c in composed
                )
            )
        )

    def _template_set(self) -> Templates:
        if self._templates is None:
            from hato.templates import Templates

            arg = self._templates_arg
            self._templates = arg if isinstance(arg, Templates) else Templates(arg or "templates")
        return self._templates

    async def send_template(
        self,
        name: str,
        *,
        to: AddressLike | Iterable[AddressLike],
        context: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> MessageId:
        """Render ``name`` (subject, text and/or HTML; see :mod:`hato.templates`) and send it.

        ``kwargs`` are ``send``'s other keyword arguments (``from_``, ``cc``, ...).
        """
        rendered = self._template_set().render(name, context or {})
        return await self.send(to, rendered.subject, rendered.text, rendered.html, **kwargs)

    # Reading.

    async def status(self, message_id: MessageId) -> Status:
        """The message's state and last reply; :class:`~hato.errors.MessageNotFound` if
        there is no such message (or its transaction was never committed)."""
        queue = await self._open_queue()
        return status_of(await queue.get(message_id))


def _check_postgres(url: str) -> None:
    if url.split(":", 1)[0].lower() not in ("postgres", "postgresql"):
        raise ConfigError(
            f"connection= needs a postgresql:// queue (this mailer uses {_redact(url)})"
        )


def _postgres_queue(url: str, clock: Clock) -> Any:
    """An unopened PostgresQueue: ``enqueue(connection=...)`` needs its table names only."""
    _check_postgres(url)
    try:
        from hato.queue.postgres import PostgresQueue
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ConfigError(f"connection= needs: pip install 'hato[postgres]' ({exc})") from exc
    return PostgresQueue(url, clock=clock)


# -- the sync mailer -----------------------------------------------------------------------


class _LoopThread:
    """An event loop running forever in a daemon thread; coroutines are submitted to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Mailer method was called from inside its own event loop")
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise QueueError("this mailer is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise QueueError(
                f"the queue did not answer within {timeout:g} s; the message may or may not "
                "be stored (send again with the same idempotency_key to be sure)"
            ) from None

    def stop(self) -> None:
        if self._thread.is_alive() and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join(10)


def _shutdown(runner: _LoopThread, inner: AsyncMailer, timeout: float) -> None:
    """Close the queue on the private loop, then stop the loop (also at interpreter exit)."""
    with contextlib.suppress(HatoError, RuntimeError):
        runner.call(inner.aclose(), timeout)
    runner.stop()


class Mailer:
    """Enqueue mail from synchronous code (Django, Flask, scripts) and read its status.

    ``queue_url`` and ``default_from`` fall back to ``HATO_QUEUE_URL`` and
    ``HATO_DEFAULT_FROM`` (through :func:`hato.config.load_settings`). ``templates`` is
    the folder for :meth:`send_template` (default ``HATO_TEMPLATE_DIR`` or
    ``./templates``). ``timeout`` bounds each queue operation. Thread-safe.
    """

    def __init__(
        self,
        queue_url: str | None = None,
        *,
        default_from: str | None = None,
        templates: str | os.PathLike[str] | Templates | None = None,
        timeout: float = 30.0,
        clock: Clock = time.time,
        fsync: bool = True,
    ) -> None:
        self._inner = AsyncMailer(
            queue_url, default_from=default_from, templates=templates, clock=clock, fsync=fsync
        )
        self.queue_url = self._inner.queue_url
        self.default_from = self._inner.default_from
        self.timeout = timeout
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._runner = _LoopThread("hato-mailer")
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._inner, self.timeout)

    def _after_fork(self) -> None:
        """A forked child (gunicorn, celery prefork) has no copy of the loop thread: start
        a new loop and queue connection, and leave the parent's connections alone."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._finalizer.detach()
            self._inner = AsyncMailer(
                self.queue_url,
                default_from=self.default_from,
                templates=self._inner._templates_arg,
                clock=self._clock,
                fsync=self._fsync,
            )
            self._start()

    def __repr__(self) -> str:
        return f"Mailer({_redact(self.queue_url)!r})"

    def _run(self, make: Callable[[AsyncMailer], Coroutine[Any, Any, T]]) -> T:
        """Run ``make(inner)`` on the private loop (built after a fork check, so the
        coroutine belongs to this process's loop)."""
        if self._pid != os.getpid():
            self._after_fork()
        return self._runner.call(make(self._inner), self.timeout)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the private loop (for tests and tools)."""
        return self._run(lambda _inner: coro)

    def open(self) -> None:
        """Connect now instead of on the first call (to fail early on a bad URL)."""
        self._run(lambda inner: inner.open())

    def close(self) -> None:
        """Close the queue connections and stop the private loop. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Mailer:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compose(
        self, to: AddressLike | Iterable[AddressLike], subject: str, **kwargs: Any
    ) -> Composed:
        """:func:`compose` with this mailer's default sender and clock."""
        return self._inner.compose(to, subject, **kwargs)

    def send(
        self,
        to: AddressLike | Iterable[AddressLike],
        subject: str,
        text: str | None = None,
        html: str | None = None,
        *,
        from_: AddressLike | None = None,
        cc: AddressLike | Iterable[AddressLike] = (),
        bcc: AddressLike | Iterable[AddressLike] = (),
        reply_to: AddressLike | Iterable[AddressLike] | None = None,
        headers: Mapping[str, str] | None = None,
        attachments: Iterable[Attachment] = (),
        send_at: datetime | float | None = None,
        idempotency_key: str | None = None,
        connection: object | None = None,
    ) -> MessageId:
        """Enqueue one message and return its id once it is durable.

        ``connection``: a psycopg ``Connection`` with an open transaction (PostgreSQL
        queues only): the INSERT runs on it, in the calling thread, and is not committed
        here; the caller's commit makes the message exist, a rollback discards it.
        """
        composed = compose(
            to,
            subject,
            text,
            html,
            from_=from_,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            headers=headers,
            attachments=attachments,
            send_at=send_at,
            idempotency_key=idempotency_key,
            default_from=self.default_from,
            clock=self._clock,
        )
        return self.enqueue(composed, connection=connection)

    def enqueue(self, composed: Composed, *, connection: object | None = None) -> MessageId:
        """Store a message built by :func:`compose`."""
        if connection is not None:
            return self._enqueue_sync(connection, composed)
        return self._run(lambda inner: inner.enqueue(composed))

    def _enqueue_sync(self, connection: object, composed: Composed) -> MessageId:
        _check_postgres(self.queue_url)
        try:
            import psycopg

            from hato.queue.postgres import enqueue_sync
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ConfigError(f"connection= needs: pip install 'hato[postgres]' ({exc})") from exc
        if not isinstance(connection, psycopg.Connection):
            raise TypeError(
                "Mailer.send(connection=...) takes a sync psycopg Connection; "
                "use AsyncMailer for an AsyncConnection"
            )
        # In the calling thread, on the caller's connection: its transaction decides.
        return enqueue_sync(
            connection,
            composed.envelope,
            composed.data,
            queue_url=self.queue_url,
            clock=self._clock,
            not_before=composed.not_before,
            idempotency_key=composed.idempotency_key,
        )

    def send_many(
        self, messages: Iterable[Email | Mapping[str, Any]], *, connection: object | None = None
    ) -> list[MessageId]:
        """Enqueue several messages; see :meth:`AsyncMailer.send_many`."""
        if connection is not None:
            composed = [_compose_email(m, self.default_from, self._clock) for m in messages]
            return [self._enqueue_sync(connection, c) for c in composed]
        batch = list(messages)
        return self._run(lambda inner: inner.send_many(batch))

    def send_template(
        self,
        name: str,
        *,
        to: AddressLike | Iterable[AddressLike],
        context: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> MessageId:
        """Render template ``name`` and send it; see :meth:`AsyncMailer.send_template`."""
        rendered = self._inner._template_set().render(name, context or {})
        return self.send(to, rendered.subject, rendered.text, rendered.html, **kwargs)

    def status(self, message_id: MessageId) -> Status:
        """The message's state and last reply (see :class:`Status`)."""
        return self._run(lambda inner: inner.status(message_id))

    def wait(
        self,
        message_id: MessageId,
        *,
        states: Sequence[State] = ("sent", "failed"),
        timeout: float = 30.0,
        interval: float = 0.05,
    ) -> Status:
        """Poll :meth:`status` until its state is one of ``states``; raise
        :class:`TimeoutError` (with the last status) at the deadline. For scripts and tests."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(message_id)
            if status.state in states:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{message_id} is still {status.state} ({status.reply})")
            time.sleep(min(interval, left))
