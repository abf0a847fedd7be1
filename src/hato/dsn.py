"""Delivery status notifications: RFC 3464 bounce messages, built as bytes (pure).

A bounce is a ``multipart/report; report-type=delivery-status`` message with three parts:
a human-readable explanation, a ``message/delivery-status`` part (one per-message block,
then one block per recipient) and the original message's headers as
``text/rfc822-headers``. It comes from ``MAILER-DAEMON@hostname``, travels with the null
envelope sender (so it can never be bounced in turn) and goes to the original envelope
sender. A message whose sender is null gets no bounce at all (RFC 5321 §6.1, §4.5.5).

The same builder makes the other DSNs RFC 3461 asks for: ``delayed`` (a warning, once,
while retries go on), ``relayed`` (handed to a next hop that does not offer DSN, for a
recipient that asked NOTIFY=SUCCESS) and ``delivered`` (stored in our own Maildir). They
carry the sender's ``Original-Envelope-Id`` (ENVID) and each recipient's
``Original-Recipient`` (ORCPT). A failure report returns the whole original message
(``message/rfc822``) when the sender asked RET=FULL and it is at most
:data:`MAX_FULL_RETURNED` bytes, else its headers.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Literal

from hato.dsn_params import encode_orcpt, xtext_encode
from hato.message import Envelope
from hato.reply import Reply

Action = Literal["failed", "delayed", "delivered", "relayed"]

MAX_HEADERS_RETURNED = 64 * 1024
MAX_FULL_RETURNED = 50_000
"""RET=FULL returns the message up to this size, else its headers (Postfix
``bounce_size_limit``)."""
_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f]+")
_POLICY = email.policy.SMTP.clone(max_line_length=998)


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient to report: the reply that decided it and where it came from.

    ``relay`` is the courier's ``host[ip]:port`` (empty when no remote host answered).
    """

    address: str
    reply: Reply
    relay: str = ""
    action: Action = "failed"
    # RFC 3461 ORCPT, decoded (``rfc822;a@b``): reported as Original-Recipient.
    orcpt: str = ""


@dataclass(frozen=True, slots=True)
class Bounce:
    """A ready-to-queue DSN: enqueue ``envelope`` with ``data``."""

    envelope: Envelope
    data: bytes


def status_of(reply: Reply, action: Action = "failed") -> str:
    """The RFC 3463 status for a reply: its enhanced code if valid, else the class of its
    code. A ``delayed`` report always carries a 4.x.x status, a ``delivered`` or
    ``relayed`` one a 2.x.x status."""
    status = reply.enhanced if _STATUS_RE.match(reply.enhanced or "") else ""
    if action in ("delivered", "relayed"):
        return status if status.startswith("2") else "2.0.0"
    if not status:
        klass = str(reply.code)[:1] if reply.code >= 400 else "5"
        status = f"{klass}.0.0"
    if action == "delayed" and not status.startswith("4"):
        status = "4" + status[1:]
    return status


def remote_mta_of(relay: str) -> str:
    """``relay.example.org`` from ``relay.example.org[192.0.2.1]:587``; empty for local
    couriers (``hold``, ``maildir``) that name no host."""
    host = relay.partition("[")[0] if "[" in relay else ""
    return _clean(host)


def _clean(text: str) -> str:
    """One header-safe line: control characters (CR, LF, ...) collapse to a space."""
    return " ".join(_UNSAFE_RE.sub(" ", text).split())


def _diagnostic(reply: Reply) -> str:
    """``550 5.1.1 first line second line``: one header-safe line, bounded."""
    prefix = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    return _clean(prefix + " ".join(reply.text.split("\n")))[:900]


def _address_field(address: str) -> str:
    """``rfc822; a@b`` or, for a non-ASCII address, RFC 6533's ``utf-8`` type with the
    ``\\x{HH}`` escapes that keep the field ASCII inside ``message/delivery-status``."""
    address = _clean(address)
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(c if c.isascii() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {escaped}"


def original_headers(data: bytes) -> bytes:
    """The header section of a message (up to the first empty line), bounded in size."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[: min(end, MAX_HEADERS_RETURNED)]
    return data[:MAX_HEADERS_RETURNED]


def _date(when: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(when, UTC))


def _boundary(seed: str, *contents: bytes | str) -> str:
    """A deterministic boundary that occurs in none of the parts (a crafted original
    header cannot end our parts early)."""
    seed = re.sub(r"[^A-Za-z0-9'()+_,./:=?-]", "_", seed)[:60]
    n = 0
    while True:
        candidate = f"{seed}.{n}" if n else seed
        encoded = candidate.encode()
        if not any(encoded in (c if isinstance(c, bytes) else c.encode()) for c in contents):
            return candidate
        n += 1


def _human_text(
    hostname: str, recipients: Sequence[FailedRecipient], delayed: bool, reason: str
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if all(r.action in ("delivered", "relayed") for r in recipients):
        lines += [
            "Your message was successfully delivered to the destination(s) listed below.",
            "If the message was relayed, no further notification may follow.",
        ]
    elif delayed:
        lines += [
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried; you do not need to send it again.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. Its headers are attached below.",
        ]
    if reason:
        lines += ["", reason]
    lines += ["", "For further assistance, please contact your postmaster.", ""]
    for r in recipients:
        said = f"host {r.relay} said: " if remote_mta_of(r.relay) else ""
        lines.append(f"<{_clean(r.address)}>: {said}{_diagnostic(r.reply)}")
    return "\n".join(lines) + "\n"


def build_bounce(
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival: float,
    now: float,
    reason: str = "",
    envid: str = "",
    ret: str = "",
) -> Bounce | None:
    """The DSN for ``recipients`` of the message ``queue_id``, or ``None`` when there is
    nobody to tell (null sender: never bounce a bounce; or no recipient to report).

    ``arrival`` and ``now`` are Unix times (the message's arrival, the report's date);
    ``reason`` adds a sentence to the human part (e.g. why the queue gave up);
    ``envid`` and ``ret`` are the message's RFC 3461 ENVID (decoded) and RET.
    """
    if not sender or not recipients:
        return None
    hostname = _clean(hostname) or "localhost"
    delayed = all(r.action == "delayed" for r in recipients)
    success = all(r.action in ("delivered", "relayed") for r in recipients)
    failed = any(r.action == "failed" for r in recipients)

    report = MIMEMultipart("report", report_type="delivery-status", policy=_POLICY)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{_clean(sender)}>"
    if success:
        report["Subject"] = "Successful Mail Delivery Report"
    elif delayed:
        report["Subject"] = "Delayed Mail (still being retried)"
    else:
        report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = _date(now)
    report["Message-ID"] = f"<{_clean(queue_id)}.{int(now)}.dsn@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a MIME-encapsulated message."

    human_text = _human_text(hostname, recipients, delayed, _clean(reason))
    human = MIMEText(human_text, "plain", "us-ascii" if human_text.isascii() else "utf-8")
    del human["MIME-Version"]
    human["Content-Description"] = "Notification"
    report.attach(human)

    per_message = Message(policy=_POLICY)
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Hato-Queue-ID"] = _clean(queue_id)
    if envid and envid.isascii():
        per_message["Original-Envelope-Id"] = xtext_encode(_clean(envid))
    per_message["Arrival-Date"] = _date(arrival)
    blocks = [per_message]
    for r in recipients:
        block = Message(policy=_POLICY)
        if r.orcpt:
            # A utf-8 ORCPT (RFC 6533) in its ASCII form: this part is message/delivery-status.
            orcpt = r.orcpt if r.orcpt.isascii() else encode_orcpt(r.orcpt)
            block["Original-Recipient"] = _clean(orcpt)
        block["Final-Recipient"] = _address_field(r.address)
        block["Action"] = r.action
        block["Status"] = status_of(r.reply, r.action)
        remote = remote_mta_of(r.relay)
        if remote:
            block["Remote-MTA"] = f"dns; {remote}"
        if remote or r.action == "failed" or r.action == "delayed":
            block["Diagnostic-Code"] = f"smtp; {_diagnostic(r.reply)}"
        block["Last-Attempt-Date"] = _date(now)
        blocks.append(block)
    status_part = Message(policy=_POLICY)
    status_part["Content-Type"] = "message/delivery-status"
    status_part["Content-Description"] = "Delivery report"
    status_part.set_payload(blocks)  # type: ignore[arg-type]
    report.attach(status_part)

    headers = original_headers(original)
    full = failed and ret == "FULL" and len(original) <= MAX_FULL_RETURNED
    if full:
        returned = Message(policy=_POLICY)
        returned["Content-Type"] = "message/rfc822"
        returned["Content-Description"] = "Undelivered Message"
        returned.set_payload([email.message_from_bytes(original, policy=_POLICY)])
        headers = original
    else:
        text = headers.decode("utf-8", "replace")
        returned = MIMEText(text, "rfc822-headers", "us-ascii" if text.isascii() else "utf-8")
        del returned["MIME-Version"]
        returned["Content-Description"] = (
            "Undelivered Message Headers" if failed else "Message Headers"
        )
    report.attach(returned)
    report.set_boundary(_boundary(f"{_clean(queue_id)}.{int(now)}/{hostname}", headers, human_text))

    data = report.as_bytes(policy=_POLICY)
    envelope = Envelope(sender="", recipients=[sender], smtputf8=not sender.isascii())
    envelope.meta["dsn_for"] = queue_id
    return Bounce(envelope=envelope, data=data)
