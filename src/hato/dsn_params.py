"""The DSN extension's SMTP parameters (RFC 3461): pure parsing, checks and encoding.

``MAIL FROM:<a> RET=FULL|HDRS ENVID=<xtext>`` and ``RCPT TO:<b> NOTIFY=<list>
ORCPT=<addr-type>;<xtext>``. Values are kept decoded (the ENVID as the sender meant it,
the ORCPT as ``rfc822;user@example.org``) and encoded again, as xtext, when they are
passed on to a next hop. Decoded values must be printable US-ASCII (RFC 3461 4.4, 4.2):
they end up in DSN header fields and log lines, so a control character (CR, LF, NUL)
hidden in ``+0D`` is refused, not carried.

Where they are kept: with the message, in ``Envelope.meta`` / ``StoredMessage.meta``
(every queue backend stores it as it is), under :data:`~hato.message.META_ENVID`,
:data:`META_RET`, :data:`META_NOTIFY` (the ``Mailer.send`` default for every recipient)
and :data:`META_RCPT` (JSON: recipient → ``{"notify": ..., "orcpt": ...}``).

Errors raise :class:`DsnError` (a ``ValueError``); intake answers them ``501 5.5.4``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hato.errors import HatoError
from hato.message import META_ENVID

MAX_ENVID = 100
"""RFC 3461 4.4: an ENVID value (as sent, xtext) is at most 100 characters."""
MAX_ORCPT = 500
"""RFC 3461 4.2: an ORCPT value (as sent, ``addr-type;xtext``) is at most 500 characters."""

NOTIFY_NEVER = "NEVER"
NOTIFY_SUCCESS = "SUCCESS"
NOTIFY_FAILURE = "FAILURE"
NOTIFY_DELAY = "DELAY"
NOTIFY_KEYWORDS = (NOTIFY_SUCCESS, NOTIFY_FAILURE, NOTIFY_DELAY)
DEFAULT_NOTIFY: frozenset[str] = frozenset({NOTIFY_FAILURE, NOTIFY_DELAY})
"""Without NOTIFY: failures and delays are reported (RFC 3461 4.1 leaves it to the MTA;
this is Postfix's and Hato's old behaviour)."""

RET_VALUES = ("FULL", "HDRS")

META_RET = "dsn_ret"
META_NOTIFY = "dsn_notify"
META_RCPT = "dsn_rcpt"

_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR_RE = re.compile(r"\+([0-9A-Fa-f]{2})")
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]*")


class DsnError(HatoError, ValueError):
    """A DSN parameter that cannot be used: bad xtext, an ENVID or ORCPT too long or not
    printable, a NOTIFY list that mixes NEVER with others or names an unknown keyword."""


def xtext_decode(text: str) -> str:
    """The value an xtext stands for (RFC 3461 4): ``+HH`` is the octet HH, every other
    character is itself; the octets are read as UTF-8 (Postfix writes a UTF-8 ORCPT
    that way). Raises :class:`DsnError` for anything but xtext of UTF-8."""
    if not text.isascii() or _XTEXT_RE.fullmatch(text) is None:
        raise DsnError("not xtext")
    if "+" not in text:
        return text
    octets = _HEXCHAR_RE.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1")
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        raise DsnError("xtext is not UTF-8") from None


def xtext_encode(value: str) -> str:
    """``value`` as xtext: ``+``, ``=``, and every octet outside ``!``..``~`` (of its
    UTF-8 form) as ``+HH`` (upper-case hex)."""
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8", "surrogatepass")
    )


def _printable(value: str, what: str) -> str:
    if _PRINTABLE_RE.fullmatch(value) is None:
        raise DsnError(f"{what} holds a character that is not printable US-ASCII")
    return value


def _printable_address(value: str) -> str:
    # isprintable() is False for controls, line separators and lone surrogates; the
    # ASCII space (a quoted local part may hold one) is the only space it allows.
    if not value.isprintable():
        raise DsnError("ORCPT holds a character that is not printable")
    return value


def parse_ret(value: str) -> str:
    """``FULL`` or ``HDRS`` (any case), upper-cased."""
    upper = value.upper()
    if upper not in RET_VALUES:
        raise DsnError("RET is FULL or HDRS")
    return upper


def parse_envid(value: str) -> str:
    """The decoded ENVID of ``ENVID=value``: xtext, at most :data:`MAX_ENVID` characters,
    printable once decoded."""
    if not value:
        raise DsnError("ENVID is empty")
    if len(value) > MAX_ENVID:
        raise DsnError(f"ENVID is longer than {MAX_ENVID} characters")
    return _printable(xtext_decode(value), "ENVID")


def parse_notify(value: str) -> frozenset[str]:
    """The keywords of ``NOTIFY=value`` (upper-cased): ``NEVER`` alone, or one or more of
    ``SUCCESS``, ``FAILURE``, ``DELAY``, each at most once."""
    words = value.upper().split(",")
    if words == [NOTIFY_NEVER]:
        return frozenset(words)
    if any(w not in NOTIFY_KEYWORDS for w in words):
        raise DsnError("NOTIFY is NEVER or a list of SUCCESS, FAILURE, DELAY")
    if len(set(words)) != len(words):
        raise DsnError("NOTIFY names a keyword twice")
    return frozenset(words)


def parse_orcpt(value: str) -> str:
    """The decoded ORCPT of ``ORCPT=value``: ``addr-type;address`` (the address part
    xtext-decoded), at most :data:`MAX_ORCPT` characters as sent.

    The ``utf-8`` address type (RFC 6533, what Postfix sends for an SMTPUTF8 recipient)
    carries UTF-8 as it is or as ``\\x{HEX}`` escapes instead of xtext; its address is
    kept as Unicode, without control or line-separator characters."""
    if len(value) > MAX_ORCPT:
        raise DsnError(f"ORCPT is longer than {MAX_ORCPT} characters")
    addr_type, sep, xtext = value.partition(";")
    if not sep or _ADDR_TYPE_RE.fullmatch(addr_type) is None or not xtext:
        raise DsnError("ORCPT is addr-type;xtext")
    if addr_type.lower() == "utf-8":
        return f"{addr_type};" + _utf8_addr_decode(xtext)
    return f"{addr_type};" + _printable_address(xtext_decode(xtext))


def encode_orcpt(orcpt: str) -> str:
    """A decoded ORCPT (``rfc822;a@b``) as it goes on the wire: the address as xtext
    (``utf-8``: RFC 6533's ASCII form, ``\\x{HEX}`` for what is not a plain character)."""
    addr_type, _, address = orcpt.partition(";")
    if addr_type.lower() == "utf-8":
        return f"{addr_type};" + "".join(
            c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address
        )
    return f"{addr_type};{xtext_encode(address)}"


_UTF8_ADDR_RE = re.compile(
    r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\x\{[0-9A-Fa-f]{1,6}\})+"
)
_EMBEDDED_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _utf8_addr_decode(text: str) -> str:
    if _UTF8_ADDR_RE.fullmatch(text) is None:
        raise DsnError("not a utf-8 address")
    try:
        address = _EMBEDDED_RE.sub(lambda m: chr(int(m.group(1), 16)), text)
    except (ValueError, OverflowError):
        raise DsnError("not a utf-8 address") from None
    if any(c.isspace() for c in address):
        raise DsnError("ORCPT holds a character that is not printable")
    return _printable_address(address)


def notify_text(notify: Iterable[str]) -> str:
    """The wire form of a NOTIFY set: keywords in RFC order, comma-separated."""
    words = set(notify)
    if NOTIFY_NEVER in words:
        return NOTIFY_NEVER
    return ",".join(w for w in NOTIFY_KEYWORDS if w in words)


def notify_option(notify: str | Iterable[str]) -> frozenset[str]:
    """``Mailer.send(notify=...)``: ``"never"``, or any of ``"success"``, ``"failure"``,
    ``"delay"`` (a string or an iterable of them, any case). Raises :class:`DsnError` for
    an unknown word, an empty set, or ``"never"`` with another."""
    words = [notify] if isinstance(notify, str) else list(notify)
    if not words or not all(isinstance(w, str) for w in words):
        raise DsnError('notify is "never" or one or more of "success", "failure", "delay"')
    try:
        return parse_notify(",".join(words))
    except DsnError:
        raise DsnError(
            f"notify={tuple(words)!r}: use 'never' alone, or any of 'success', 'failure', 'delay'"
        ) from None


@dataclass(frozen=True, slots=True)
class RecipientDsn:
    """One recipient's DSN parameters: ``notify`` empty means not given."""

    notify: frozenset[str] = frozenset()
    orcpt: str = ""

    def wants(self, keyword: str) -> bool:
        """Does this recipient ask for a ``keyword`` (SUCCESS, FAILURE, DELAY) DSN?"""
        return keyword in (self.notify or DEFAULT_NOTIFY)


@dataclass(frozen=True, slots=True)
class DsnRequest:
    """What a message's DSN parameters ask, as a courier passes them on: the decoded
    ``ret`` (``""`` not given), ``envid`` and per-recipient :class:`RecipientDsn`
    (read with :meth:`of`)."""

    ret: str = ""
    envid: str = ""
    recipients: Mapping[str, RecipientDsn] = field(default_factory=dict)
    # The message-wide NOTIFY (``Mailer.send(notify=)``) for recipients without their own.
    notify: frozenset[str] = frozenset()

    def of(self, recipient: str) -> RecipientDsn:
        rcpt = self.recipients.get(recipient) or _NOTHING
        if not rcpt.notify and self.notify:
            return RecipientDsn(self.notify, rcpt.orcpt)
        return rcpt

    def mail_options(self) -> list[bytes]:
        """The MAIL parameters for a next hop that offers DSN."""
        options = []
        if self.ret:
            options.append(b"RET=" + self.ret.encode("ascii"))
        if self.envid:
            options.append(b"ENVID=" + xtext_encode(self.envid).encode("ascii"))
        return options

    def rcpt_options(self, recipient: str) -> list[bytes]:
        """The RCPT parameters of ``recipient`` for a next hop that offers DSN."""
        rcpt = self.of(recipient)
        options = []
        if rcpt.notify:
            options.append(b"NOTIFY=" + notify_text(rcpt.notify).encode("ascii"))
        if rcpt.orcpt:
            options.append(b"ORCPT=" + encode_orcpt(rcpt.orcpt).encode("ascii"))
        return options


_NOTHING = RecipientDsn()


def store_recipients(meta: dict[str, str], recipients: Mapping[str, RecipientDsn]) -> None:
    """Keep per-recipient parameters in ``meta`` (only those that have any)."""
    kept = {
        address: {
            **({"notify": notify_text(r.notify)} if r.notify else {}),
            **({"orcpt": r.orcpt} if r.orcpt else {}),
        }
        for address, r in recipients.items()
        if r.notify or r.orcpt
    }
    if kept:
        meta[META_RCPT] = json.dumps(kept, separators=(",", ":"), sort_keys=True)


def request_of(meta: Mapping[str, str], *, envid: str | None = None) -> DsnRequest:
    """A stored message's :class:`DsnRequest`, read from its ``meta``; ``envid``
    overrides the stored one (the outbox sends its own id). Values that do not read
    back (a hand-edited record) are dropped rather than passed on."""
    default = frozenset[str]()
    if META_NOTIFY in meta:
        try:
            default = parse_notify(meta[META_NOTIFY])
        except DsnError:
            default = frozenset()
    recipients: dict[str, RecipientDsn] = {}
    try:
        stored = json.loads(meta.get(META_RCPT, "{}"))
    except ValueError:
        stored = {}
    if isinstance(stored, dict):
        for address, item in stored.items():
            if not isinstance(item, dict):
                continue
            try:
                notify = parse_notify(item["notify"]) if "notify" in item else frozenset()
                orcpt = str(item.get("orcpt", ""))
                if orcpt:
                    parse_orcpt(encode_orcpt(orcpt))  # what would go on must parse
            except (DsnError, AttributeError, TypeError):
                continue
            recipients[str(address)] = RecipientDsn(notify, orcpt)
    ret = meta.get(META_RET, "")
    if ret not in RET_VALUES:
        ret = ""
    env = meta.get(META_ENVID, "") if envid is None else envid
    if _PRINTABLE_RE.fullmatch(env) is None or len(xtext_encode(env)) > MAX_ENVID:
        env = ""
    return DsnRequest(ret=ret, envid=env, recipients=recipients, notify=default)
