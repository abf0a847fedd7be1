"""Conversion of 8-bit mail to 7 bit: for a next hop without 8BITMIME, and before DKIM signing.

A client may send 8-bit data only to a server that offers 8BITMIME (RFC 6152); to any
other it must convert the message or return it. A DKIM signer should convert before it
signs (RFC 6376 5.3), so that no later hop has to change what the signature covers.
:func:`to_7bit` converts as Postfix's SMTP client does, and a little more:

* A leaf part whose body holds 8-bit bytes (labelled ``7bit``, ``8bit``, ``binary`` or not
  at all) is re-encoded as quoted-printable line by line, so its line breaks stay hard
  line breaks, and labelled so. A message without MIME headers also gets
  ``MIME-Version`` and a ``Content-Type`` of ``text/plain`` with the charset of its body
  (``utf-8``, or RFC 1428's ``unknown-8bit``).
* A multipart is converted part by part, its boundaries and 7-bit parts untouched; its own
  ``8bit``/``binary`` label becomes ``7bit``.
* A header field holding raw 8-bit bytes is rewritten with RFC 2047 encoded words (RFC
  2231 for parameters such as ``filename``) by the standard library's folding, and
  accepted only when it decodes back to what it said before. Other fields keep their bytes.

It refuses (:class:`NotConvertible`, the reason in words) where no faithful 7-bit form
exists: 8-bit data inside a ``message/*`` part (whose encoding must stay 7bit, 8bit or
binary, RFC 2046 5.2), in a multipart's preamble or epilogue, or in a part already
labelled ``base64`` or ``quoted-printable``; a non-ASCII address, message id or other
field that encoded words cannot carry; MIME nesting deeper than 32 levels. It also
refuses a conversion that would change what a DKIM-Signature of the message covers (the
body, or a header field its ``h=`` tag names): Hato converts before it signs, so such a
signature is someone else's, and returning the message beats delivering it with a
broken signature.

Pure: bytes in, bytes out. The result has CRLF line endings only, no line longer than 998
octets that was not already in the input, and only ASCII.
"""

from __future__ import annotations

import binascii
import email.message
import email.policy
import re
from dataclasses import dataclass, field

_MAX_DEPTH = 32
_MAX_LINE = 998
_FIELD_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_FOLD_RE = re.compile(rb"\r\n(?=[ \t])")
_IDENTITY = ("7bit", "8bit", "binary")
_FOLDING = email.policy.SMTP.clone(refold_source="all")


class NotConvertible(ValueError):
    """The message has no faithful 7-bit form; the text says why."""


def to_7bit(data: bytes) -> bytes:
    """``data`` with no 8-bit byte left (unchanged when it has none).

    Raises :class:`NotConvertible` when the message cannot be converted, or not without
    breaking a DKIM signature.
    """
    if data.isascii():
        return data
    top = _Entity.parse(data.splitlines())
    converted = top.converted(default_type="text/plain", depth=0)
    _check_signatures(top, converted)
    return b"".join(line + b"\r\n" for line in converted.lines())


@dataclass(slots=True)
class _Entity:
    """A MIME entity as lines: header fields (each its lines), then the body."""

    fields: list[list[bytes]]
    body: list[bytes]
    separated: bool  # an empty line stands between the header and the body
    changed: set[str] = field(default_factory=set)  # names of fields rewritten or added

    @classmethod
    def parse(cls, lines: list[bytes]) -> _Entity:
        fields: list[list[bytes]] = []
        for n, line in enumerate(lines):
            if not line:
                return cls(fields, lines[n + 1 :], separated=True)
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1].append(line)
            elif _FIELD_RE.match(line):
                fields.append([line])
            else:  # not a header line: the body starts without the empty line
                return cls(fields, lines[n:], separated=False)
        return cls(fields, [], separated=False)

    def lines(self) -> list[bytes]:
        out = [line for f in self.fields for line in f]
        if self.separated:
            out.append(b"")
        return out + self.body

    def get(self, name: str) -> str | None:
        for f in self.fields:
            if _name(f) == name:
                return _value(f).decode("ascii", "surrogateescape").strip()
        return None

    def set(self, name: str, value: str, *, canonical: str) -> None:
        """Replace every ``name`` field by one ``canonical: value`` (added at the end
        when there was none)."""
        new = [f"{canonical}: {value}".encode("ascii")]
        at = next((n for n, f in enumerate(self.fields) if _name(f) == name), None)
        self.fields = [f for f in self.fields if _name(f) != name]
        self.fields.insert(len(self.fields) if at is None else at, new)
        self.changed.add(name)

    def converted(self, *, default_type: str, depth: int) -> _Entity:
        if depth > _MAX_DEPTH:
            raise NotConvertible(f"MIME parts are nested more than {_MAX_DEPTH} deep")
        out = _Entity([_encoded(f) for f in self.fields], self.body, self.separated)
        out.changed = {_name(f) for f, g in zip(self.fields, out.fields, strict=True) if f != g}
        content_type = _content_type(self.get("content-type"), default_type)
        if content_type.get_content_maintype() == "multipart":
            out._convert_multipart(content_type, depth)
        else:
            out._convert_leaf(content_type.get_content_type(), depth)
        return out

    def _convert_leaf(self, content_type: str, depth: int) -> None:
        if _ascii(self.body):
            return
        encoding = (self.get("content-transfer-encoding") or "7bit").lower()
        if content_type.startswith("message/"):
            raise NotConvertible(f"8-bit data in a {content_type} part cannot be re-encoded")
        if encoding not in _IDENTITY:
            raise NotConvertible(f"8-bit data in a part labelled {encoding}")
        if self.get("content-type") is None:
            charset = "utf-8" if _utf8(self.body) else "unknown-8bit"
            self.set("content-type", f"text/plain; charset={charset}", canonical="Content-Type")
        if depth == 0 and self.get("mime-version") is None:
            self.set("mime-version", "1.0", canonical="MIME-Version")
        self.set(
            "content-transfer-encoding", "quoted-printable", canonical="Content-Transfer-Encoding"
        )
        self.body = [
            encoded for line in self.body for encoded in _quoted_printable(line).split(b"\n")
        ]

    def _convert_multipart(self, content_type: email.message.Message, depth: int) -> None:
        if _ascii(self.body):
            return
        boundary = content_type.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise NotConvertible("8-bit data in a multipart without a boundary")
        preamble, parts, epilogue = _split(self.body, boundary.encode("ascii", "surrogateescape"))
        if not (_ascii(preamble) and _ascii(epilogue)):
            raise NotConvertible("8-bit data in a multipart's preamble or epilogue")
        digest = content_type.get_content_type() == "multipart/digest"
        inner = "message/rfc822" if digest else "text/plain"
        delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
        body = list(preamble)
        for part in parts:
            entity = _Entity.parse(part).converted(default_type=inner, depth=depth + 1)
            body += [delimiter, *entity.lines()]
        self.body = [*body, delimiter + b"--", *epilogue]
        if (self.get("content-transfer-encoding") or "7bit").lower() in ("8bit", "binary"):
            self.set("content-transfer-encoding", "7bit", canonical="Content-Transfer-Encoding")


def _field_name(f: list[bytes]) -> str:
    m = _FIELD_RE.match(f[0])
    assert m is not None  # _Entity.parse starts a field only on a line that matches
    return m.group(1).decode("ascii")


def _name(f: list[bytes]) -> str:
    return _field_name(f).lower()


def _value(f: list[bytes]) -> bytes:
    """The unfolded value of a field, after the colon."""
    return _FOLD_RE.sub(b"", b"\r\n".join(f)).partition(b":")[2]


def _ascii(lines: list[bytes]) -> bool:
    return all(line.isascii() for line in lines)


def _utf8(lines: list[bytes]) -> bool:
    try:
        b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _content_type(value: str | None, default: str) -> email.message.Message:
    """The parsed Content-Type (the default when absent or unparseable)."""
    holder = email.message.Message()
    if default != "text/plain":
        holder.set_default_type(default)
    if value is not None:
        holder["Content-Type"] = value
    return holder


def _split(
    body: list[bytes], boundary: bytes
) -> tuple[list[bytes], list[list[bytes]], list[bytes]]:
    """(preamble, parts, epilogue) of a multipart body; a missing close delimiter ends
    the last part at the end of the body."""
    delimiter, close = b"--" + boundary, b"--" + boundary + b"--"
    preamble: list[bytes] = []
    parts: list[list[bytes]] = []
    current = preamble
    for n, line in enumerate(body):
        bare = line.rstrip(b" \t")  # transport padding (RFC 2046 5.1.1)
        if bare == close:
            return preamble, parts, body[n + 1 :]
        if bare == delimiter:
            current = []
            parts.append(current)
        else:
            current.append(line)
    return preamble, parts, []


def _quoted_printable(line: bytes) -> bytes:
    """One line as quoted-printable, soft breaks as ``=\\n`` (no line over 76)."""
    return binascii.b2a_qp(line, quotetabs=False, istext=True, header=False)


def _encoded(f: list[bytes]) -> list[bytes]:
    """A header field with its 8-bit bytes in encoded words (unchanged when it has none)."""
    if all(line.isascii() for line in f):
        return f
    name = _field_name(f)
    raw = _value(f).strip()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("ascii", "surrogateescape")  # folded as unknown-8bit
    try:
        header = _FOLDING.header_factory(name, text)
        folded: str = header.fold(policy=_FOLDING)
        unfolded = re.sub(r"\r\n(?=[ \t])", "", folded[len(name) + 1 :]).strip()
        again = _FOLDING.header_factory(name, unfolded)
    except Exception as exc:  # the email package's parser gives up on some input
        raise NotConvertible(f"the {name} header cannot be encoded: {exc}") from None
    if any(not a.addr_spec.isascii() for a in getattr(header, "addresses", ())):
        raise NotConvertible(f"the {name} header has a non-ASCII address (needs SMTPUTF8)")
    if not folded.isascii() or str(again) != str(header):
        raise NotConvertible(f"the {name} header cannot be written in 7-bit form")
    lines = folded.encode("ascii").split(b"\r\n")[:-1]
    if any(len(line) > _MAX_LINE for line in lines):
        raise NotConvertible(f"the {name} header would need a line over {_MAX_LINE} octets")
    return lines


def _signed_names(signature: list[bytes]) -> tuple[str, set[str]]:
    """The ``d=`` domain and the ``h=`` field names of a DKIM-Signature field."""
    tags: dict[str, str] = {}
    for item in _value(signature).decode("ascii", "replace").split(";"):
        tag, _, value = item.partition("=")
        tags[tag.strip().lower()] = re.sub(r"\s+", "", value)
    names = {n.lower() for n in tags.get("h", "").split(":") if n}
    return tags.get("d", "?"), names


def _check_signatures(original: _Entity, converted: _Entity) -> None:
    body_changed = converted.body != original.body
    for f in original.fields:
        if _name(f) != "dkim-signature":
            continue
        domain, names = _signed_names(f)
        if body_changed or converted.changed & (names | {"dkim-signature"}):
            raise NotConvertible(
                f"converting it would break the DKIM signature of {domain} it carries"
            )
