"""Bounce parsing: what a delivery status notification says about a message we sent (pure).

:func:`parse_bounce` reads a message and, when it is a bounce, returns a :class:`Bounce`:
which original message it reports on (the RFC 3461 envelope id, the VERP token of the
address it came to, the returned message's ``Message-ID``) and, per recipient, the action
(``failed``, ``delayed``, ``delivered``, ``relayed``, ``expanded``), the RFC 3463 status,
the diagnostic and the remote MTA. Anything else (mail, auto-replies, read receipts) is
``None``.

The forms understood, most trusted first:

* RFC 3464/6522: ``multipart/report; report-type=delivery-status`` with a
  ``message/delivery-status`` part (``Original-Envelope-Id``, ``Reporting-MTA``, then per
  recipient ``Final-Recipient``, ``Original-Recipient``, ``Action``, ``Status``,
  ``Diagnostic-Code``, ``Remote-MTA``). Postfix, Exim 4, Sendmail, Gmail, Exchange and
  Microsoft 365 all send it; a ``message/delivery-status`` part inside another multipart
  (no ``report-type``, as some gateways rewrite it) is read the same way.
* The text forms still met in the wild, read from the human-readable part: qmail's
  ("Hi. This is the qmail-send program"), old Exim's ("This message was created
  automatically by mail delivery software"), Exchange 2003-2010 NDRs, Gmail's older ones,
  Postfix's text part on its own (``<rcpt>: host ... said: 550 ...``), and any message
  with an ``X-Failed-Recipients`` header.

Nothing here trusts what it reads: a bounce is a message anyone can send. The caller
(:mod:`hato.delivery.bounce`) matches it against what this node sent, and only a signed
VERP token (:mod:`hato.verp`) proves the bounce is about that message.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import quopri
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from typing import Final

from hato.verp import split_token

FAILED: Final = "failed"
DELAYED: Final = "delayed"
DELIVERED: Final = "delivered"
RELAYED: Final = "relayed"
EXPANDED: Final = "expanded"
ACTIONS: Final = frozenset({FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED})

# The forms :attr:`Bounce.form` names.
FORM_RFC3464: Final = "rfc3464"
FORM_QMAIL: Final = "qmail"
FORM_EXIM: Final = "exim"
FORM_EXCHANGE: Final = "exchange"
FORM_GMAIL: Final = "gmail"
FORM_POSTFIX: Final = "postfix"
FORM_OTHER: Final = "x-failed-recipients"

MAX_RECIPIENTS = 1000
# Text beyond this is not searched (a bounce's explanation is short; the returned
# message may be large).
MAX_TEXT = 256 * 1024

_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY_RE = re.compile(r"^\s*#?\s*([245]\d\d)(?:[ -]|$)(?:\s*#?([245]\.\d{1,3}\.\d{1,3})\b)?")
_ADDRESS_RE = re.compile(r"[^\s<>\"'(),;:\[\]]+@[A-Za-z0-9\-.\[\]:\u0080-\U0010ffff]+[A-Za-z0-9\]]")
# A reply inside a line (``...RCPT TO:<x>: host mx [ip]: 550 5.7.1 ...``): with an
# enhanced code, or right after a colon.
_INNER_REPLY_RE = re.compile(r"\b[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b|(?<=: )[245]\d\d(?= )")
_ANGLE_BLOCK_RE = re.compile(r"^<([^<>\s]+@[^<>\s]+)>:?[ \t]*(.*)$")
_XTEXT_RE = re.compile(r"\+([0-9A-Fa-f]{2})")
_UTF8_ESCAPE_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_MESSAGE_ID_LINE_RE = re.compile(r"^(?:x-original-)?message-id:[ \t]*(<[^<>\s]+>)", re.I | re.M)
_HOST_IP_RE = re.compile(r"\[[^\]]*\]|\(.*?\)")
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class BouncedRecipient:
    """One recipient a bounce reports on.

    ``address`` is the final recipient (where the reporting MTA tried to deliver),
    ``original`` the recipient as first given (RFC 3461 ORCPT), ``""`` when not told.
    ``status`` is the RFC 3463 code (``5.1.1``); ``reply_code`` the SMTP code the remote
    MTA answered, ``0`` when the report does not say; ``diagnostic`` its text, one line.
    """

    address: str
    action: str
    status: str
    original: str = ""
    diagnostic: str = ""
    reply_code: int = 0
    remote_mta: str = ""

    @property
    def hard(self) -> bool:
        """A permanent failure: mail to this address will not work later either."""
        return self.action == FAILED and self.status.startswith("5")

    @property
    def soft(self) -> bool:
        """A failure or delay that may clear up (``4.x.x``, or a delay report)."""
        return self.action in (FAILED, DELAYED) and not self.hard


@dataclass(frozen=True, slots=True)
class Bounce:
    """What a bounce says, and the clues to the message it is about.

    ``envid`` is the RFC 3461 ``Original-Envelope-Id`` (decoded from xtext);
    ``verp_token`` the token of a VERP address the bounce came to (unverified);
    ``message_id`` the ``Message-ID`` of the returned message (or an
    ``Original-Message-ID`` field); ``hato_queue_id`` the queue id a Hato node writes in
    its own DSNs; ``reporting_mta`` who wrote the report; ``form`` which of the forms in
    the module docstring it was read as.
    """

    form: str
    recipients: tuple[BouncedRecipient, ...]
    envid: str = ""
    verp_token: str = ""
    message_id: str = ""
    reporting_mta: str = ""
    hato_queue_id: str = ""

    @property
    def hard(self) -> bool:
        """Whether any recipient failed for good."""
        return any(r.hard for r in self.recipients)

    @property
    def failed(self) -> tuple[BouncedRecipient, ...]:
        return tuple(r for r in self.recipients if r.action == FAILED)


# --- small field parsers ------------------------------------------------------------------


def _text(value: object) -> str:
    """A header value as one clean line (folding, control characters and undecodable
    bytes turned into spaces or replacement characters)."""
    text = str(value) if value is not None else ""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _SPACE_RE.sub(" ", "".join(c if c >= " " or c == "\t" else " " for c in text)).strip()


def decode_xtext(text: str) -> str:
    """RFC 3461 xtext (``+HH`` escapes) decoded; malformed escapes are left as they are."""
    return _XTEXT_RE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _typed_address(value: str) -> str:
    """``user@example.net`` from ``rfc822; <user@example.net>`` (or RFC 6533's
    ``utf-8; us\\x{E9}r@example.net``); ``""`` when there is no address."""
    kind, sep, rest = value.partition(";")
    address = rest if sep else kind
    kind = kind.strip().lower() if sep else ""
    address = address.strip().strip("<>").strip()
    if kind in ("utf-8", "unknown"):
        address = _UTF8_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), address)
    if kind == "x-ms-exchange" or "@" not in address:
        return ""
    return address


def _typed_text(value: str) -> str:
    """The text of a typed field: ``smtp; 550 ...`` → ``550 ...``; ``dns; host`` → host."""
    kind, sep, rest = value.partition(";")
    if sep and kind.strip() and " " not in kind.strip():
        return rest.strip()
    return value.strip()


def _host(value: str) -> str:
    """A host name from ``dns; mx.example.net [192.0.2.1]`` or ``mx.example.net[ip]``."""
    text = _HOST_IP_RE.sub(" ", _typed_text(value)).strip()
    return text.split()[0].rstrip(".").lower() if text else ""


def _reply_parts(diagnostic: str) -> tuple[int, str]:
    """The SMTP code and enhanced status at the start of a diagnostic, ``(0, "")`` when
    there is none."""
    m = _REPLY_RE.match(diagnostic)
    if m is None:
        return 0, ""
    return int(m.group(1)), m.group(2) or ""


def _status(value: str) -> str:
    m = _STATUS_RE.search(value)
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}" if m else ""


def _settled_status(action: str, status: str, reply_code: int) -> str:
    """A status for every report: the one given, else the reply's class, else by action."""
    if status:
        return status
    if 200 <= reply_code < 600:
        return f"{reply_code // 100}.0.0"
    if action == FAILED:
        return "5.0.0"
    if action == DELAYED:
        return "4.0.0"
    return "2.0.0"


def _recipient(
    address: str,
    action: str,
    diagnostic: str,
    *,
    status: str = "",
    original: str = "",
    remote_mta: str = "",
) -> BouncedRecipient:
    diagnostic = _text(diagnostic)[:1000]
    reply_code, enhanced = _reply_parts(diagnostic)
    status = status or enhanced or _status(diagnostic)
    return BouncedRecipient(
        address=address,
        action=action,
        status=_settled_status(action, status, reply_code),
        original=original,
        diagnostic=diagnostic,
        reply_code=reply_code,
        remote_mta=remote_mta,
    )


# --- the message's parts -----------------------------------------------------------------


def _walk(msg: Message, depth: int = 0) -> Iterator[Message]:
    """Every part, depth first, not descending into returned messages (a bounce of a
    bounce must not read as the inner one) and not deeper than 8 levels."""
    yield msg
    if depth >= 8 or msg.get_content_type() in ("message/rfc822", "message/global"):
        return
    payload = msg.get_payload()
    if isinstance(payload, list) and msg.get_content_maintype() == "multipart":
        for part in payload:
            if isinstance(part, Message):
                yield from _walk(part, depth + 1)


def _part_text(part: Message) -> str:
    """A text part decoded (transfer encoding and charset), bounded."""
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        payload = part.get_payload()
        return payload[:MAX_TEXT] if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = raw[:MAX_TEXT].decode(charset, "replace")
    except LookupError:
        text = raw[:MAX_TEXT].decode("utf-8", "replace")
    if part.get_content_subtype() == "html":
        text = _html_to_text(text)
    return text.replace("\r\n", "\n").replace("\r", "\n")


_TAG_RE = re.compile(r"<(br|/p|/div|/tr|/li|p|div)\b[^>]*>", re.I)
_ANY_TAG_RE = re.compile(r"<[^>]*>")
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&nbsp;": " ", "&amp;": "&"}


def _html_to_text(html: str) -> str:
    text = _TAG_RE.sub("\n", html)
    text = _ANY_TAG_RE.sub("", text)
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    return text


def _status_blocks(part: Message) -> list[Message]:
    """The field blocks of a ``message/delivery-status`` part: the per-message one first."""
    payload = part.get_payload()
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if isinstance(payload, list):
        if encoding not in ("base64", "quoted-printable"):
            blocks = [p for p in payload if isinstance(p, Message) and len(p.keys())]
            if blocks:
                return blocks
        # The email package parsed the encoded text as field blocks: take it back.
        payload = "\n".join(p.as_string() for p in payload if isinstance(p, Message))
    # Encoded (base64, quoted-printable) or unparsed: decode, split the text into blocks.
    if not isinstance(payload, str):
        return []
    text = payload[:MAX_TEXT]
    if encoding == "base64":
        try:
            text = base64.b64decode("".join(text.split()), validate=False).decode(
                "utf-8", "replace"
            )
        except (binascii.Error, ValueError):
            return []
    elif encoding == "quoted-printable":
        text = quopri.decodestring(text.encode("utf-8", "replace")).decode("utf-8", "replace")
    text = text.replace("\r\n", "\n")
    parser = HeaderParser(policy=email.policy.compat32)
    blocks = [parser.parsestr(b.strip("\n") + "\n") for b in re.split(r"\n[ \t]*\n", text)]
    return [b for b in blocks if len(b.keys())]


def _returned_message_id(msg: Message) -> str:
    """The Message-ID of the returned original: from a ``message/rfc822`` part or a
    ``text/rfc822-headers`` part."""
    for part in _walk(msg):
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found = _text(payload[0].get("Message-ID", ""))
                if found:
                    return found
        elif kind in ("text/rfc822-headers", "message/rfc822-headers", "message/global-headers"):
            m = _MESSAGE_ID_LINE_RE.search(_part_text(part))
            if m:
                return m.group(1)
    return ""


# --- the standard form ---------------------------------------------------------------------


def _from_delivery_status(msg: Message) -> Bounce | None:
    status_part = next(
        (
            p
            for p in _walk(msg)
            if p.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
        ),
        None,
    )
    if status_part is None:
        return None
    blocks = _status_blocks(status_part)
    if not blocks:
        return None
    per_message = blocks[0] if "Final-Recipient" not in blocks[0] else Message()
    recipient_blocks = [b for b in blocks if "Final-Recipient" in b or "Original-Recipient" in b]
    recipients = []
    for block in recipient_blocks[:MAX_RECIPIENTS]:
        original = _typed_address(_text(block.get("Original-Recipient", "")))
        final = _typed_address(_text(block.get("Final-Recipient", ""))) or original
        if not final:
            continue
        action = _text(block.get("Action", "")).lower().split(" ")[0]
        if action not in ACTIONS:
            action = FAILED
        diagnostic = _typed_text(_text(block.get("Diagnostic-Code", "")))
        recipients.append(
            _recipient(
                final,
                action,
                diagnostic,
                status=_status(_text(block.get("Status", ""))),
                original=original,
                remote_mta=_host(_text(block.get("Remote-MTA", ""))),
            )
        )
    if not recipients:
        return None
    return Bounce(
        form=FORM_RFC3464,
        recipients=tuple(recipients),
        envid=decode_xtext(_text(per_message.get("Original-Envelope-Id", ""))),
        reporting_mta=_host(_text(per_message.get("Reporting-MTA", ""))),
        hato_queue_id=_text(per_message.get("X-Hato-Queue-ID", "")),
        message_id=(
            _returned_message_id(msg)
            or _text(per_message.get("Original-Message-ID", ""))
            or _text(msg.get("Original-Message-ID", ""))
        ),
    )


# --- the text forms -------------------------------------------------------------------------

_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (FORM_QMAIL, ("this is the qmail-send program",)),
    (FORM_EXIM, ("this message was created automatically by mail delivery software",)),
    (
        FORM_EXCHANGE,
        (
            "delivery has failed to these recipients or groups",
            "did not reach some or all of the intended recipients",
            "the following recipient(s) could not be reached",
            "couldn't be delivered",
        ),
    ),
    (
        FORM_GMAIL,
        (
            "delivery to the following recipient failed permanently",
            "delivery to the following recipients failed permanently",
            "delivery to the following recipient has been delayed",
            "** address not found **",
            "** message not delivered **",
            "your message wasn't delivered to",
        ),
    ),
    (
        FORM_POSTFIX,
        (
            "this is the mail system at host",
            "i'm sorry to have to inform you that your message could not",
        ),
    ),
)

_DELAY_HINTS = (
    "has not yet been delivered",
    "has been delayed",
    "delivery is delayed",
    "still being retried",
    "will keep trying",
    "will continue to try",
    "will retry",
    "this is only a warning",
)

_COPY_MARKERS = (
    "--- below this line is a copy of the message",
    "------ this is a copy of the message",
    "------ this is a copy of the body of the message",
    "----- original message -----",
    "original message headers:",
    "----- message header follows -----",
)

# Lines that introduce the remote server's answer in Gmail's and Exchange's texts.
_ANSWER_INTROS = (
    "the error that the other server returned was:",
    "the response from the remote server was:",
    "the response was:",
    "remote server returned",
    "diagnostic information for administrators:",
)


def _human_text(msg: Message) -> str:
    """The explanation a person would read: the first text part, plain before HTML."""
    texts = [p for p in _walk(msg) if p.get_content_maintype() == "text"]
    for wanted in ("text/plain", "text/html"):
        for part in texts:
            if part.get_content_type() == wanted:
                return _part_text(part)
    return ""


def _before_copy(text: str) -> str:
    """The explanation without the copy of the original that many text bounces append."""
    lower = text.lower()
    ends = [i for i in (lower.find(m) for m in _COPY_MARKERS) if i >= 0]
    return text[: min(ends)] if ends else text


def _addresses_in(text: str) -> list[str]:
    return [a.strip(".").strip("<>") for a in _ADDRESS_RE.findall(text)]


def _first_reply_line(lines: Sequence[str]) -> str:
    """The first line that reads as an SMTP reply (``550 5.1.1 ...``, ``#550 ...``) or
    an Exchange ``<host #5.1.1>`` note; ``""`` when none does."""
    for line in lines:
        if _REPLY_RE.match(line):
            return line.strip().lstrip("#").strip()
    for line in lines:
        m = _INNER_REPLY_RE.search(line)
        if m:
            return line[m.start() :].strip()
    for line in lines:
        m = re.search(r"#([245]\.\d{1,3}\.\d{1,3})", line)
        if m:
            return f"{m.group(1)} {line.strip()}"
    return ""


def _answer(text: str) -> str:
    """The remote server's answer in a text bounce: the reply after one of the usual
    introductions, else the first line that reads as an SMTP reply."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        lower = line.strip().lower()
        for intro in _ANSWER_INTROS:
            if lower.startswith(intro):
                rest = line.strip()[len(intro) :].strip().strip("'\"")
                found = _first_reply_line([rest, *lines[i + 1 : i + 12]])
                if found:
                    return found.strip("'\"")
    return _first_reply_line(lines)


def _angle_blocks(text: str) -> list[tuple[str, str]]:
    """``<rcpt>: text`` blocks (qmail, Postfix's text part): the address and the block's
    text, up to the next empty line or block."""
    out: list[tuple[str, str]] = []
    current: tuple[str, list[str]] | None = None
    for line in text.split("\n"):
        m = _ANGLE_BLOCK_RE.match(line.strip()) if not line[:1].isspace() else None
        if m is not None:
            if current is not None:
                out.append((current[0], " ".join(current[1])))
            current = (m.group(1), [m.group(2)] if m.group(2) else [])
        elif current is not None:
            if not line.strip():
                out.append((current[0], " ".join(current[1])))
                current = None
            else:
                current[1].append(line.strip())
    if current is not None:
        out.append((current[0], " ".join(current[1])))
    return out


def _qmail_diagnostic(text: str) -> str:
    """qmail's ``Remote host said: 550 ...`` inside a block; the block itself else."""
    m = re.search(r"remote host said:\s*(.*)", text, re.I)
    said = m.group(1) if m else text
    return re.sub(r"\s*Giving up on \S+\s*$", "", said).strip()


def _postfix_diagnostic(text: str) -> tuple[str, str]:
    """``host mx.example.net[192.0.2.1] said: 550 ... (in reply to RCPT TO command)``:
    the reply and the host."""
    m = re.match(r"host\s+(\S+?)\[[^\]]*\](?::\d+)?\s+said:\s*(.*)", text, re.I | re.S)
    if m is None:
        return text, ""
    return m.group(2).strip(), m.group(1).lower()


def _indented_addresses(text: str, heading: str) -> list[tuple[str, str]]:
    """Addresses listed under ``heading`` (Exim, Gmail, Exchange), each with the indented
    lines under it, up to the next heading-level line."""
    lower = text.lower()
    start = lower.find(heading)
    if start < 0:
        return []
    lines = text[start:].split("\n")[1:]
    out: list[tuple[str, list[str]]] = []
    blank_run = 0
    for line in lines:
        if not line.strip():
            blank_run += 1
            if out and blank_run >= 2:
                break
            continue
        if any(line.strip().lower().startswith(m) for m in _COPY_MARKERS):
            break
        found = _addresses_in(line)
        stripped = line.strip()
        if found and stripped.split()[0].strip("<>") == found[0] and "said" not in stripped.lower():
            out.append((found[0], [stripped[len(stripped.split()[0]) :].strip()]))
            blank_run = 0
        elif out and (line[:1].isspace() or blank_run == 0):
            out[-1][1].append(stripped)
            blank_run = 0
        elif out:
            break
        else:
            blank_run = 0
    return [(address, " ".join(t for t in texts if t)) for address, texts in out]


def _from_text(msg: Message) -> Bounce | None:
    human = _human_text(msg)
    explanation = _before_copy(human)
    lower = explanation.lower()
    form = next(
        (name for name, signs in _SIGNATURES if any(s in lower for s in signs)),
        "",
    )
    failed_header = ",".join(_text(v) for v in msg.get_all("X-Failed-Recipients") or [])
    header_addresses = _addresses_in(failed_header)
    if not form and not header_addresses:
        return None
    subject = _text(msg.get("Subject", "")).lower()
    delayed = any(h in lower for h in _DELAY_HINTS) or "delay" in subject
    action = DELAYED if delayed else FAILED

    found: list[tuple[str, str, str]] = []  # (address, diagnostic, remote host)
    if form in (FORM_QMAIL, FORM_POSTFIX, ""):
        for address, block in _angle_blocks(explanation):
            if form == FORM_QMAIL:
                m = re.search(r"giving up on (\S+?)\.?$", block, re.I)
                found.append((address, _qmail_diagnostic(block), m.group(1) if m else ""))
            else:
                diagnostic, host = _postfix_diagnostic(block)
                found.append((address, diagnostic, host))
    for heading in (
        "the following address(es) failed:",
        "the following address(es) have not yet been delivered",
        "delivery has failed to these recipients or groups:",
        "the following recipient(s) could not be reached:",
        "delivery to the following recipient failed permanently:",
        "delivery to the following recipients failed permanently:",
        "delivery to the following recipient has been delayed:",
    ):
        for address, block in _indented_addresses(explanation, heading):
            if not any(address.lower() == f[0].lower() for f in found):
                host = ""
                m = re.search(r"\bhost\s+(\S+)\s+\[", block)
                if m:
                    host = m.group(1).lower()
                found.append((address, block, host))
    if not found and form == FORM_GMAIL:
        m = re.search(r"wasn't delivered to\s+(\S+@\S+?)\s+because", explanation, re.I)
        if m:
            found.append((m.group(1).strip("<>"), "", ""))
    for address in header_addresses:
        if not any(address.lower() == f[0].lower() for f in found):
            found.append((address, "", ""))
    if not found:
        return None

    general = _answer(explanation)
    recipients = []
    for address, block, host in found[:MAX_RECIPIENTS]:
        if form in (FORM_EXCHANGE, FORM_GMAIL):  # the details follow the list
            diagnostic = _answer(block) or general or block
        else:  # each address's block holds its own details
            diagnostic = _answer(block) or block or general
        recipients.append(_recipient(address, action, diagnostic, remote_mta=host))
    copy = human[len(explanation) :]
    m = _MESSAGE_ID_LINE_RE.search(copy)
    message_id = (
        _returned_message_id(msg)
        or (m.group(1) if m else "")
        or _text(msg.get("Original-Message-ID", ""))
        or _text(msg.get("X-Original-Message-ID", ""))
    )
    return Bounce(
        form=form or FORM_OTHER,
        recipients=tuple(recipients),
        message_id=message_id,
        reporting_mta=_reporting_host(msg),
    )


def _reporting_host(msg: Message) -> str:
    """The host in the bounce's ``From`` (``MAILER-DAEMON@mx.example.net``)."""
    sender = _text(msg.get("From", ""))
    found = _addresses_in(sender)
    return found[0].rpartition("@")[2].lower() if found else ""


# --- the entry point ------------------------------------------------------------------------


def _is_mdn(msg: Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and (msg.get_param("report-type") or "") == "disposition-notification"
    )


def parse_bounce(data: bytes, recipients: Iterable[str] = ()) -> Bounce | None:
    """What ``data`` says as a bounce, or ``None`` when it is not one.

    ``recipients`` are the envelope recipients it came to: a VERP address among them gives
    :attr:`Bounce.verp_token` (not verified here: see :class:`hato.verp.Verp`).
    """
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if _is_mdn(msg):
        return None
    bounce = _from_delivery_status(msg) or _from_text(msg)
    if bounce is None:
        return None
    token = ""
    for address in recipients:
        split = split_token(address)
        if split is not None:
            token = split[1]
            break
    return Bounce(
        form=bounce.form,
        recipients=bounce.recipients,
        envid=bounce.envid,
        verp_token=token,
        message_id=bounce.message_id,
        reporting_mta=bounce.reporting_mta,
        hato_queue_id=bounce.hato_queue_id,
    )
