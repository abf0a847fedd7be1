"""Envelopes and addresses: pure parsing and checks, no I/O.

An address here is the RFC 5321 ``Mailbox`` of MAIL FROM / RCPT TO without the angle
brackets; the null sender is ``""``. Domains are compared in one form everywhere (policy,
config, router, aliases, DKIM): :func:`normalize_domain`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import idna

from hato.errors import AddressError

# RFC 5321 4.1.2 / RFC 6531: a local part of atext dot-atoms or a quoted string; a domain
# of LDH labels (UTF-8 allowed for SMTPUTF8) or an address literal.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[^\[\]\\\s]+\]"
_MAILBOX_RE = re.compile(rf"^(?P<local>{_DOT_ATOM}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})$")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed mailbox: ``local@domain``; ``domain`` is lower-cased, no trailing dot."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")


def parse_address(text: str, *, allow_utf8: bool = True) -> Address:
    """Parse a mailbox strictly. Raises :class:`AddressError` for anything else.

    Refused on purpose (open-relay tricks): source routes (``@a:b@c``), bang paths and
    percent hacks are only *parsed* as local parts, so policy decides on the real domain;
    unqualified names (no ``@``) and trailing-dot domains are refused here.
    """
    if any(c in text for c in "\r\n\0"):
        raise AddressError("address contains CR, LF or NUL")
    if len(text) > MAX_PATH:
        raise AddressError("address too long")
    if not allow_utf8 and not text.isascii():
        raise AddressError("non-ASCII address needs SMTPUTF8")
    m = _MAILBOX_RE.match(text)
    if m is None:
        raise AddressError(f"bad address syntax: {text!r}")
    local, domain = m.group("local"), m.group("domain")
    if len(local.encode()) > MAX_LOCAL_PART or len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("address part too long")
    return Address(local, domain.lower())


def normalize_domain(domain: str) -> str:
    """The one comparable form of a domain: lower case, no trailing dot, A-labels.

    International names go through IDNA 2008 with the UTS #46 mapping (the ``idna``
    package, non-transitional), so ``Bücher.example``, ``bücher.example`` and
    ``xn--bcher-kva.example`` are one domain, and ``faß.de`` stays ``xn--fa-hia.de``
    (the standard library's ``idna`` codec is IDNA 2003 and would make it ``fass.de``,
    another domain). Address literals (``[192.0.2.1]``) and names IDNA refuses are only
    lower-cased: they never match a configured domain by accident.
    """
    domain = domain.strip().rstrip(".")
    if domain.isascii() or domain.startswith("["):
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain.lower()


def domain_of(address: str) -> str:
    """The lower-cased domain of an address, ``""`` for the null sender."""
    if not address:
        return ""
    return address.rpartition("@")[2].lower().rstrip(".")


# Control characters other than TAB, and the characters Python's str.splitlines (and so
# the email package's header folding) treats as line breaks: \x0b \x0c \x1c-\x1e \x85
# U+2028 U+2029. Any of them in a header value could end the header line.
_HEADER_UNSAFE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def check_header_value(value: str, what: str = "header value") -> str:
    """Refuse a value that could break out of its header line (header injection): CR, LF,
    NUL, any other control character but TAB, and the Unicode line separators."""
    m = _HEADER_UNSAFE_RE.search(value)
    if m is not None:
        char = m.group(0)
        name = {"\r": "CR", "\n": "LF", "\0": "NUL"}.get(char, f"U+{ord(char):04X}")
        raise AddressError(
            f"{what} contains {name} (CR, LF, NUL and control characters are refused)"
        )
    return value


# Envelope facts beyond sender and recipients travel in ``Envelope.meta`` (stored by
# every queue backend as it is): these are its keys.
META_ENVID = "envid"
"""The RFC 3461 envelope id (``ENVID=``) the message travels with, ``""`` for none."""
META_AUTH_USER = "auth_user"
"""The SASL user that submitted the message (who may read its events over the API)."""
META_REQUIRETLS = "requiretls"
"""``"yes"`` when the message must travel only over verified TLS to next hops that offer
REQUIRETLS (RFC 8689): ``MAIL FROM ... REQUIRETLS`` or ``Mailer.send(require_tls=True)``."""

_MESSAGE_ID_RE = re.compile(rb"(?:^|\r?\n)message-id[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


def message_id_of(data: bytes) -> str:
    """The ``Message-ID`` header of a message (its first line only), ``""`` if it has
    none. Only the header section is read."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    m = _MESSAGE_ID_RE.search(head)
    if m is None:
        return ""
    return m.group(1).strip().decode("utf-8", "replace")[:998]


@dataclass(slots=True)
class Envelope:
    """What SMTP (or ``Mailer.send``) says about a message besides its bytes."""

    sender: str
    recipients: list[str]
    # Facts about how the message arrived, for logs and the Received header.
    client_address: str = ""
    client_helo: str = ""
    auth_user: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    meta: dict[str, str] = field(default_factory=dict)
