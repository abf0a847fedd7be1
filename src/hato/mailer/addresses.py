"""Address input of ``Mailer.send``: one mailbox per value, checked strictly (pure).

A value is ``"user@example.net"``, ``"Name <user@example.net>"``, ``'"Name, Q." <user@…>'``
or an :class:`email.headerregistry.Address`. What comes out is a :class:`Mailbox`: a
display name (free text, written back quoted or RFC 2047-encoded as needed) and an
addr-spec (the domain in IDNA 2008 A-labels, :func:`hato.message.normalize_domain`; a
local part may be UTF-8, which makes the message need SMTPUTF8, RFC 6531).

Input a reader could take for two different addresses is refused with
:class:`~hato.errors.AddressError` rather than guessed at, because the envelope is
built from our reading and the recipient's mail client shows theirs:

* more than one ``<...>``, or text after the ``>``
  (``alice@good.example <bob@evil.example> <c@x.example>``);
* an ``@``, ``<`` or ``>`` in an unquoted display name (``alice@good.example
  <c@x.example>`` reads as alice in many clients; quote it to mean it);
* a quoted display name without its closing quote, or followed by anything but
  ``<addr-spec>``;
* CR, LF or NUL anywhere (header injection).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from typing import TypeAlias

from hato.errors import AddressError
from hato.message import check_header_value, normalize_domain, parse_address

__all__ = ["AddressLike", "Mailbox", "mailbox", "mailboxes"]

AddressLike: TypeAlias = "str | HeaderAddress"
"""``"user@example.net"``, ``"Name <user@example.net>"`` or an
:class:`email.headerregistry.Address`."""

# A display name that needs no quoting: atext and spaces (RFC 5322 phrase of atoms).
# Display names up to this long go plain or quoted; longer ones as encoded words.
_LONGEST_PLAIN_NAME = 64
_PHRASE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ \-]+$")
_QUOTED_PAIR_RE = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A checked address: ``display`` (may be empty or non-ASCII) and an addr-spec whose
    domain is ASCII (its local part is ASCII unless the message needs SMTPUTF8)."""

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
        # A long name as encoded words, which fold within it (plain or quoted it would
        # make one line however long: a fuzz finding).
        short = len(self.display) <= _LONGEST_PLAIN_NAME
        if short and _PHRASE_RE.match(self.display):
            return f"{self.display} <{self.addr_spec}>"
        if short and self.display.isascii():
            quoted = self.display.replace("\\", "\\\\").replace('"', '\\"')
            return f'"{quoted}" <{self.addr_spec}>'
        words = Header(self.display, "utf-8", maxlinelen=76).encode(linesep="\r\n")
        return f"{words} <{self.addr_spec}>"


def mailboxes(value: AddressLike | Iterable[AddressLike] | None, what: str) -> list[Mailbox]:
    """One value or several (``what`` names the parameter in errors); ``None`` is none."""
    if value is None:
        return []
    items: Iterable[AddressLike] = [value] if isinstance(value, str | HeaderAddress) else value
    return [mailbox(item, what) for item in items]


def mailbox(value: AddressLike, what: str) -> Mailbox:
    """One address, checked strictly; the domain in IDNA 2008 (ASCII) form."""
    if isinstance(value, str):
        check_header_value(value, what)  # and so every part of it
        display, spec = _split(value.strip(), what)
    elif isinstance(value, HeaderAddress):
        display, spec = value.display_name, value.addr_spec
        check_header_value(display, f"{what} display name")
        check_header_value(spec, what)
    else:
        raise AddressError(f"{what}: expected an address string, not {type(value).__name__}")
    parsed = parse_address(spec)
    domain = parsed.domain
    if not domain.isascii():
        domain = normalize_domain(domain)
        if not domain.isascii():  # what IDNA refuses comes back as it was
            raise AddressError(f"{what}: bad international domain in {spec!r}")
    return Mailbox(display.strip(), f"{parsed.local}@{domain}")


def _split(text: str, what: str) -> tuple[str, str]:
    """``(display name, addr-spec)`` of one address as text; ambiguous forms refused."""
    if "<" not in text and ">" not in text:
        return "", text  # a bare addr-spec: parse_address judges it
    quoted = text.startswith('"')
    if quoted:
        end = _closing_quote(text)
        if end < 0:
            raise AddressError(f"{what}: unterminated quoted name in {text!r}")
        rest = text[end + 1 :].lstrip()
        if rest.startswith("@"):
            return "", text  # a quoted local part ("a<b"@example.org)
        display = _QUOTED_PAIR_RE.sub(r"\1", text[1:end])
    else:
        cut = text.find("<")
        if cut < 0:
            raise AddressError(f"{what}: '>' without '<' in {text!r}")
        display, rest = text[:cut].strip(), text[cut:]
    if rest.count("<") > 1 or rest.count(">") > 1:
        raise AddressError(f"{what}: ambiguous address {text!r}: more than one <...>")
    if not rest.startswith("<") or not rest.endswith(">"):
        raise AddressError(f"{what}: ambiguous address {text!r}: text outside the <...>")
    if not quoted and ("@" in display or ">" in display):
        raise AddressError(
            f"{what}: ambiguous address {text!r}: '@' or '>' in an unquoted name"
            " (quote the name to mean it)"
        )
    return display, rest[1:-1].strip()


def _closing_quote(text: str) -> int:
    """The index of the quote that closes the quoted string opening ``text``, or -1."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1
