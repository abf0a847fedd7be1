"""What the console shows of a stored message: headers, text, HTML and attachments.

Pure: bytes in, values out. A message that does not parse as MIME still shows its
headers and its body as text; nothing here raises for bad input.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.parser import BytesParser

_POLICY = email.policy.default.clone(raise_on_defect=False)


@dataclass(frozen=True, slots=True)
class Attachment:
    """One downloadable part: its position among the message's parts (``index``), the
    name to save it as, its type and size in bytes."""

    index: int
    filename: str
    content_type: str
    size: int


@dataclass(slots=True)
class Parsed:
    headers: list[tuple[str, str]] = field(default_factory=list)
    subject: str = ""
    text: str = ""
    html: str = ""
    attachments: list[Attachment] = field(default_factory=list)

    def header(self, name: str) -> str:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), "")


def parse(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=_POLICY).parsebytes(data)
    assert isinstance(parsed, EmailMessage)  # the default policy makes EmailMessage
    return parsed


def _str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a header the policy cannot decode shows as it was
        return repr(value)


def _content(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _is_attachment(part: Message) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disposition == "attachment" or (
        bool(part.get_filename()) and part.get_content_maintype() != "multipart"
    )


def leaves(message: Message) -> list[Message]:
    """Every non-multipart part, in order (the message itself when it is not multipart)."""
    return [p for p in message.walk() if not p.is_multipart()]


def summarize(data: bytes) -> Parsed:
    """Headers, the first text/plain and text/html bodies, and the attachments."""
    message = parse(data)
    out = Parsed(headers=[(k, _str(v)) for k, v in message.items()])
    out.subject = out.header("Subject")
    for index, part in enumerate(leaves(message)):
        kind = part.get_content_type()
        if _is_attachment(part):
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            name = part.get_filename() or f"part-{index}"
            out.attachments.append(Attachment(index, name, kind, size))
        elif kind == "text/plain" and not out.text:
            out.text = _content(part)
        elif kind == "text/html" and not out.html:
            out.html = _content(part)
        elif part.get_content_maintype() != "text" and part is not message:
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            out.attachments.append(Attachment(index, f"part-{index}", kind, size))
    if not out.text and not out.html and not message.is_multipart():
        out.text = _content(message)
    return out


def subject_of(data: bytes) -> str:
    """The Subject header alone (the list shows it), ``""`` when there is none."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    try:
        return _str(parse(head + b"\r\n\r\n").get("Subject", ""))
    except Exception:
        return ""


def part_bytes(data: bytes, index: int) -> tuple[Attachment, bytes] | None:
    """The decoded bytes of the part at ``index`` (as :class:`Attachment` numbers
    them), or ``None`` when there is no such attachment."""
    for attachment in summarize(data).attachments:
        if attachment.index == index:
            parts = leaves(parse(data))
            payload = parts[index].get_payload(decode=True)
            return attachment, payload if isinstance(payload, bytes) else b""
    return None
