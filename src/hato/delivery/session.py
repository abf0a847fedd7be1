"""One outbound SMTP session (aiosmtplib), shared by the smarthost and MX couriers.

What both couriers do the same way lives here: turning a remote reply into a
:class:`~hato.reply.Reply`, EHLO with the HELO fallback, RSET before reusing a pooled
connection, and one mail transaction (MAIL, one RCPT per recipient, DATA) that records a
per-recipient result as each reply comes, so a connection lost half-way keeps what was
already decided. How a session is opened (which TLS, AUTH or not) is the courier's own
business.

The body goes out with CRLF line endings and dot-stuffing (aiosmtplib's ``data``), so no
end-of-data sequence other than the final ``CRLF.CRLF`` can leave Hato.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Sequence

import aiosmtplib

from hato.delivery.base import DeliveryResult, Result
from hato.reply import Reply

_MAX_REPLY_TEXT = 2000
_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:[ \t]+|$)")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Characters that would break the MAIL/RCPT command line; intake never queues them, but
# a courier is a boundary and refuses them on its own.
_BAD_PATH_RE = re.compile(r"[\x00-\x20\x7f<>]")
_QUOTED_LOCAL_RE = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


def reply_from_response(code: int, message: str) -> Reply:
    """A remote reply as a :class:`Reply`: the enhanced code split off, control
    characters dropped, the text bounded (it goes into logs and bounces)."""
    lines = [_CONTROL_RE.sub("", line).strip() for line in message.split("\n")]
    enhanced = ""
    m = _ENHANCED_RE.match(lines[0]) if lines else None
    if m is not None and m.group(1) == str(code)[:1]:
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        lines = [
            line[len(enhanced) :].strip() if line.startswith(enhanced) else line for line in lines
        ]
    text = "\n".join(lines)[:_MAX_REPLY_TEXT]
    return Reply(code, enhanced, text)


def classify(reply: Reply) -> Result:
    """4xx temporary, 5xx permanent; anything else where a success was due is temporary."""
    if reply.is_permanent:
        return Result.PERMANENT
    return Result.TEMPORARY


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bad_path(address: str) -> bool:
    """Whether ``address`` cannot be put between ``<`` and ``>`` on a command line."""
    return bool(_BAD_PATH_RE.search(_QUOTED_LOCAL_RE.sub("", address, count=1))) or any(
        c in address for c in "\r\n\0"
    )


def header_section(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[:end]
    return data


class SessionFailure(Exception):
    """A session could not be set up; ``reply`` says why (always temporary)."""

    def __init__(self, reply: Reply, relay: str = "") -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay


class Session:
    """One open SMTP connection, ready for MAIL.

    ``verified`` says the peer's certificate was checked against its name, so a pooled
    session can be matched with a destination that requires it.
    """

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        relay: str,
        encrypted: bool,
        now: float,
        *,
        verified: bool = False,
    ) -> None:
        self.smtp = smtp
        self.relay = relay
        self.encrypted = encrypted
        self.verified = verified
        self.opened_at = now
        self.last_used = now
        self.stage = "sending MAIL FROM"
        self.messages = 0

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def close(self) -> None:
        self.smtp.close()

    async def quit(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.smtp.quit(), timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError):
            pass
        finally:
            self.smtp.close()

    async def reset(self) -> bool:
        """RSET before reuse; False when the peer dropped the idle connection."""
        try:
            response = await self.smtp.execute_command(b"RSET")
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return response.code == 250 and self.alive


async def ehlo(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO when the server refuses EHLO (but not when it is closing)."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not smtp.is_connected or exc.code == 421:
            raise
        await smtp.helo()


async def transact(
    session: Session,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    results: dict[int, DeliveryResult],
) -> Reply | None:
    """One MAIL, one RCPT per recipient, DATA if any was accepted.

    Fills ``results`` (recipient index → result) as replies come, so a connection lost
    half-way keeps what was decided. Returns the reply to MAIL when MAIL was refused (then
    every recipient carries that reply and nothing else was sent), else None; the MX
    courier uses it to try the next MX on a 4xx.
    """
    smtp, relay = session.smtp, session.relay

    def decide(i: int, result: Result, reply: Reply) -> None:
        results[i] = DeliveryResult(recipients[i], result, reply, relay)

    if bad_path(sender):
        for i in range(len(recipients)):
            decide(i, Result.PERMANENT, Reply(553, "5.1.7", f"bad sender address {sender!r}"))
        return None
    utf8_envelope = not (sender.isascii() and all(r.isascii() for r in recipients))
    offers_utf8 = smtp.supports_extension("smtputf8")
    if utf8_envelope and not offers_utf8:
        reply = Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {relay}")
        for i in range(len(recipients)):
            decide(i, Result.PERMANENT, reply)
        return None
    options: list[bytes] = []
    if smtp.supports_extension("size"):
        options.append(b"SIZE=%d" % len(data))
    if not data.isascii() and smtp.supports_extension("8bitmime"):
        options.append(b"BODY=8BITMIME")
    if offers_utf8 and (utf8_envelope or not header_section(data).isascii()):
        options.append(b"SMTPUTF8")

    session.stage = "sending MAIL FROM"
    response = await smtp.execute_command(
        b"MAIL", b"FROM:<" + sender.encode("utf-8") + b">", *options
    )
    if response.code != 250:
        reply = reply_from_response(response.code, response.message)
        for i in range(len(recipients)):
            decide(i, classify(reply), reply)
        return reply

    accepted: list[int] = []
    session.stage = "sending RCPT TO"
    for i, rcpt in enumerate(recipients):
        if bad_path(rcpt):
            decide(i, Result.PERMANENT, Reply(553, "5.1.3", f"bad recipient address {rcpt!r}"))
            continue
        response = await smtp.execute_command(b"RCPT", b"TO:<" + rcpt.encode("utf-8") + b">")
        if response.code in (250, 251):
            accepted.append(i)
            continue
        reply = reply_from_response(response.code, response.message)
        decide(i, classify(reply), reply)
        if response.code == 421:
            # The server is closing: whoever was not asked yet is deferred with its words.
            for j in range(i + 1, len(recipients)):
                decide(j, Result.TEMPORARY, reply)
            break
    if not accepted or not smtp.is_connected:
        return None

    session.stage = "sending message body"
    try:
        response = await smtp.data(data)
    except aiosmtplib.SMTPDataError as exc:
        response = aiosmtplib.SMTPResponse(exc.code, exc.message)
    reply = reply_from_response(response.code, response.message)
    result = Result.OK if response.code == 250 else classify(reply)
    for i in accepted:
        decide(i, result, reply)
    return None


def broken_reply(exc: Exception, session: Session) -> Reply:
    """The (temporary) reply for a session that failed mid-transaction."""
    relay, stage = session.relay, session.stage
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Reply(421, "4.4.2", f"conversation with {relay} timed out while {stage}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        return Reply(421, "4.4.2", f"lost connection with {relay} while {stage}")
    return Reply(
        451, "4.3.0", f"error talking to {relay} while {stage}: {type(exc).__name__}: {exc}"
    )
