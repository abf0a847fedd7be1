"""Composition of an outgoing message: one :class:`Email` in, envelope and 7-bit bytes out (pure).

:func:`compose_email` is what ``send`` stores, built before anything touches a queue:

* Every header value and address is checked for CR, LF and NUL before anything is built
  (:class:`~hato.errors.AddressError`): no header injection through a subject, a name or
  an address; ambiguous address input is refused (see :mod:`hato.mailer.addresses`).
* ``Bcc`` recipients go into the envelope only, never into the headers.
* ``Date`` and ``Message-ID`` are added; with an ``idempotency_key`` the Message-ID is
  derived from the key, which also travels in the ``Hato-Idempotency-Key`` header.
* The bytes are 7-bit clean (non-ASCII text is quoted-printable or base64, non-ASCII
  header text RFC 2047 encoded, non-ASCII domains IDNA 2008 A-labels), so no relay needs
  8BITMIME or SMTPUTF8, unless an address has a non-ASCII local part: then the address
  headers carry it as UTF-8 (RFC 6532) and the envelope is marked ``smtputf8``, so every
  hop sends with SMTPUTF8, and a next hop without it bounces the message (5.6.7).
* ``require_tls=True`` marks the message REQUIRETLS (RFC 8689, ``META_REQUIRETLS``): it
  goes only over verified TLS to next hops that offer REQUIRETLS (docs/security.md).
* ``send_at`` more than a year (366 days) ahead of the clock is refused with
  :class:`ValueError`: it is a mistake (milliseconds for seconds, a wrong year), and a
  message held that long would outlive any retry or lease setting.
* ``notify`` (RFC 3461 NOTIFY for every recipient, default ``("failure", "delay")``) is
  ``"never"`` alone or any of ``"success"``, ``"failure"``, ``"delay"``; anything else
  raises :class:`~hato.dsn_params.DsnError` (a ``ValueError``). It is kept in the
  message's meta; ``hato worker`` sends it on with ``ENVID=<the outbox id>``.

The message is written with the email package's encoders (:mod:`email.header`,
:mod:`email.quoprimime`, :mod:`email.utils`) rather than ``EmailMessage`` with
``policy.SMTP``, for speed (see the comment that opens the MIME writers below); the
tests parse every shape back with ``EmailMessage``. Attachments given as paths are the one I/O: they are
read here.
"""

from __future__ import annotations

import base64
import email.quoprimime
import email.utils
import hashlib
import math
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict

from hato.clock import Clock
from hato.dsn_params import META_NOTIFY, notify_option, notify_text
from hato.errors import AddressError, ConfigError, HatoError
from hato.mailer.addresses import AddressLike, Mailbox, mailbox, mailboxes
from hato.message import META_REQUIRETLS, Envelope, check_header_value

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MAX_FILENAME",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_SEND_AT_DELAY",
    "Attachment",
    "Composed",
    "Composer",
    "Email",
    "EmailOptions",
    "as_email",
    "compose",
    "compose_email",
]

Attachment: TypeAlias = "tuple[str, bytes] | tuple[str, bytes, str | None] | str | os.PathLike[str]"
"""``(filename, content)``, ``(filename, content, mimetype)`` or a path to read."""

IDEMPOTENCY_HEADER = "Hato-Idempotency-Key"

MAX_IDEMPOTENCY_KEY = 200
MAX_FILENAME = 255
MAX_SEND_AT_DELAY = 366 * 86_400.0
"""How far ahead ``send_at`` may be, in seconds: a year, leap day included."""

_PRINTABLE_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
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


@dataclass(frozen=True, slots=True)
class Email:
    """One message to send: ``Mailer.send``'s parameters as a value (``send_many`` takes these)."""

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
    # RFC 3461 NOTIFY for every recipient: "never", or any of "success", "failure",
    # "delay"; sent on with ENVID=<the outbox id> (see docs/dsn.md).
    notify: str | Iterable[str] = ("failure", "delay")
    require_tls: bool = False


class EmailOptions(TypedDict, total=False):
    """The keyword options of ``send`` and ``compose``: the :class:`Email` fields after
    ``to``, ``subject``, ``text`` and ``html``. ``send(to, subject, **options)`` is
    ``Email(to, subject, **options)``: a new field is added here and to :class:`Email`."""

    from_: AddressLike | None
    cc: AddressLike | Iterable[AddressLike]
    bcc: AddressLike | Iterable[AddressLike]
    reply_to: AddressLike | Iterable[AddressLike] | None
    headers: Mapping[str, str] | None
    attachments: Iterable[Attachment]
    send_at: datetime | float | None
    idempotency_key: str | None
    notify: str | Iterable[str]
    require_tls: bool


@dataclass(frozen=True, slots=True)
class Composed:
    """A message ready for the queue: envelope, bytes and queue options."""

    envelope: Envelope
    data: bytes
    message_id: str
    idempotency_key: str | None = None
    not_before: float | None = None


def as_email(item: Email | Mapping[str, Any]) -> Email:
    """An :class:`Email`, or a mapping of its fields (``{"to": ..., "subject": ...}``)."""
    if isinstance(item, Email):
        return item
    if isinstance(item, Mapping):
        return Email(**item)
    raise TypeError(f"send_many takes Email objects or mappings, not {type(item).__name__}")


def compose(
    to: AddressLike | Iterable[AddressLike],
    subject: str,
    text: str | None = None,
    html: str | None = None,
    *,
    default_from: str | None = None,
    clock: Clock = time.time,
    **options: Unpack[EmailOptions],
) -> Composed:
    """Build a message and its envelope without storing it (what ``send`` stores).

    :func:`compose_email` with ``send``'s parameters (:class:`EmailOptions`). Raises
    :class:`~hato.errors.AddressError` for a bad or unsafe address or header,
    :class:`~hato.errors.ConfigError` when there is no sender at all.
    """
    return compose_email(
        Email(to, subject, text, html, **options), default_from=default_from, clock=clock
    )


class Composer:
    """The half of a mailer that composes: a default sender, a clock, and :meth:`compose`.

    :class:`~hato.mailer.AsyncMailer` and the synchronous mailers share it.
    """

    default_from: str | None
    _clock: Clock

    def compose(
        self,
        to: AddressLike | Iterable[AddressLike],
        subject: str,
        text: str | None = None,
        html: str | None = None,
        **options: Unpack[EmailOptions],
    ) -> Composed:
        """:func:`compose` with this mailer's default sender and clock."""
        return compose_email(
            Email(to, subject, text, html, **options),
            default_from=self.default_from,
            clock=self._clock,
        )

    def compose_all(self, messages: Iterable[Email | Mapping[str, Any]]) -> list[Composed]:
        """Compose every message (``send_many``'s input) before anything is stored."""
        return [
            compose_email(as_email(m), default_from=self.default_from, clock=self._clock)
            for m in messages
        ]


def compose_email(
    message: Email, *, default_from: str | None = None, clock: Clock = time.time
) -> Composed:
    """Build ``message`` and its envelope (see the module docstring for what is refused).

    ``default_from`` is the sender when ``message.from_`` is not set; ``clock`` dates it.
    """
    sender_value = message.from_ if message.from_ is not None else default_from
    if sender_value is None or (isinstance(sender_value, str) and not sender_value.strip()):
        raise ConfigError("no sender: pass from_= or set HATO_DEFAULT_FROM")
    sender = mailbox(sender_value, "from_")
    rcpt_to = mailboxes(message.to, "to")
    rcpt_cc = mailboxes(message.cc, "cc")
    rcpt_bcc = mailboxes(message.bcc, "bcc")
    replies = mailboxes(message.reply_to, "reply_to")
    if not (rcpt_to or rcpt_cc or rcpt_bcc):
        raise AddressError("no recipients: pass to=, cc= or bcc=")
    subject, text, html = message.subject, message.text, message.html
    if not isinstance(subject, str):
        raise TypeError("subject must be a string")
    check_header_value(subject, "subject")
    for body, what in ((text, "text"), (html, "html")):
        if body is not None and not isinstance(body, str):
            raise TypeError(f"{what} must be a string")
    idempotency_key = message.idempotency_key
    if idempotency_key is not None:
        check_header_value(idempotency_key, "idempotency_key")
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise AddressError(f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    extra: dict[str, tuple[str, str]] = {}
    for name, value in (message.headers or {}).items():
        if not isinstance(name, str) or not _FIELD_NAME_RE.match(name):
            raise AddressError(f"header name {name!r} is not a valid field name")
        if name.lower() in _RESERVED_HEADERS:
            raise AddressError(f"header {name!r} is set by send()'s own parameters")
        extra[name.lower()] = (name, check_header_value(str(value), f"header {name}"))
    notify = notify_option(message.notify)
    files = [_attachment(item) for item in message.attachments]
    now = clock()
    not_before = _not_before(message.send_at, now)

    message_id = _message_id(sender.domain, idempotency_key, sender.addr_spec)
    date = _date(now)
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
        smtputf8 = not all(box.addr_spec.isascii() for box in (sender, *rcpt_to, *rcpt_cc))
        smtputf8 = smtputf8 or not all(box.addr_spec.isascii() for box in (*rcpt_bcc, *replies))
        text_out = "".join(lines) + _body(text, html, files)
        data = text_out.encode("utf-8" if smtputf8 else "ascii")
    except (ValueError, TypeError, UnicodeError, IndexError) as exc:  # what email refuses
        raise AddressError(f"cannot build the message: {exc}") from None

    recipients: list[str] = []
    seen: set[str] = set()
    for box in (*rcpt_to, *rcpt_cc, *rcpt_bcc):
        if box.addr_spec.lower() not in seen:
            seen.add(box.addr_spec.lower())
            recipients.append(box.addr_spec)
    envelope = Envelope(sender=sender.addr_spec, recipients=recipients, smtputf8=smtputf8)
    envelope.meta[META_NOTIFY] = notify_text(notify)
    if message.require_tls:
        envelope.meta[META_REQUIRETLS] = "yes"
    return Composed(envelope, data, message_id, idempotency_key, not_before)


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


def _not_before(send_at: datetime | float | None, now: float) -> float | None:
    if send_at is None:
        return None
    if isinstance(send_at, datetime):
        value = send_at.timestamp()  # naive means local time, as datetime does
    else:
        value = float(send_at)
        if not math.isfinite(value):
            raise ValueError("send_at must be a finite timestamp")
    if value - now > MAX_SEND_AT_DELAY:
        ahead = (value - now) / 86_400
        raise ValueError(
            f"send_at is {ahead:.0f} days ahead; at most 366 are allowed"
            " (a timestamp in milliseconds, or the wrong year?)"
        )
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
# bodies, email.utils for RFC 2231 parameters. EmailMessage with policy.SMTP
# builds the same shapes but costs ~0.8 ms for a text + HTML message (most of the 2 ms
# budget of send()), and its refolding of long non-ASCII subjects drops spaces and emits
# whitespace-only lines (CPython 3.11). The tests parse every shape back with the email
# package and compare.


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date(now: float) -> str:
    """The Date header value: what ``email.utils.format_datetime`` writes for ``now`` in
    UTC, at under half its cost (it goes through ``timetuple`` and ``strftime("%z")``;
    it was a tenth of all of ``compose``)."""
    d = datetime.fromtimestamp(now, UTC)
    return (
        f"{_DAYS[d.weekday()]}, {d.day:02d} {_MONTHS[d.month - 1]} {d.year:04d}"
        f" {d.hour:02d}:{d.minute:02d}:{d.second:02d} +0000"
    )


# The longest word an ASCII header value keeps as it is (folding happens between words).
_LONGEST_WORD = 64


def _header(name: str, value: str) -> str:
    """An unstructured header line: as it is when short printable ASCII, else folded
    (and RFC 2047-encoded when not ASCII) by :class:`email.header.Header`."""
    if len(name) + len(value) <= 76 and _PRINTABLE_RE.match(value):
        return f"{name}: {value}\r\n"
    # Header folds ASCII text only between words: a word too long for a line (a fuzz
    # finding: one over 998 octets made an illegal line) goes as encoded words instead,
    # which may be split anywhere.
    longest = max((len(word) for word in value.split()), default=0)
    charset = "us-ascii" if value.isascii() and longest <= _LONGEST_WORD else "utf-8"
    encoded = Header(value, charset, maxlinelen=76, header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n"


def _address_header(name: str, boxes: Sequence[Mailbox]) -> str:
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
