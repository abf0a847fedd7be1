"""SMTP replies as values: ``Reply(code, enhanced, text)`` and the named replies Hato sends.

Every reply Hato puts on the wire carries an RFC 3463 enhanced status code. Handlers
return these values; exactly one place (the server glue) turns them into bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a 3-digit code, an enhanced status code (``"2.1.0"``) and text.

    ``text`` may hold several lines separated by ``\\n``; they become a multi-line reply.
    An empty ``enhanced`` is allowed only for the greeting (220), where RFC 2034 forbids it.
    """

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply's text lines, each prefixed by the enhanced code when there is one."""
        texts = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return [f"{prefix}{t}".rstrip() for t in texts]

    def to_bytes(self) -> bytes:
        """Wire form: ``250-first\\r\\n250 last\\r\\n``."""
        lines = self.lines()
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return " / ".join(f"{self.code} {line}" for line in self.lines())


# Named replies. Keep the wording stable: dialog tests compare bytes.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
VRFY_DISABLED = Reply(252, "2.5.2", "VRFY disabled; send some mail and I'll try my best")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
QUEUE_ERROR = Reply(451, "4.3.0", "Queue write failed, try again later")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNRECOGNIZED = Reply(500, "5.5.1", "Command unrecognized")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
PARAM_NOT_IMPLEMENTED = Reply(504, "5.5.4", "Command parameter not implemented")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
SENDER_DOMAIN_DENIED = Reply(553, "5.7.1", "Sender address rejected: domain not allowed")
NO_SUCH_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
BAD_ADDRESS = Reply(553, "5.1.3", "Address syntax error")
BAD_ADDRESS_LITERAL = Reply(501, "5.1.3", "Bad recipient address syntax: invalid address literal")
PRIVATE_ADDRESS_LITERAL = Reply(
    550,
    "5.4.4",
    "Recipient address rejected: address literal in loopback, private or reserved space",
)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many Received headers: mail loop detected")
BARE_LINE_ENDING = Reply(
    554, "5.6.11", "Bare CR or LF in message data; use CRLF line endings (RFC 5321 2.3.8)"
)
NON_ASCII_WITHOUT_8BIT = Reply(554, "5.6.7", "8-bit data needs BODY=8BITMIME or SMTPUTF8")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")

# Intake (smtp/protocol.py); the dialogs in tests/dialogs/ pin their exact wording.
HELP = Reply(
    214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
)
AUTH_CHALLENGE_EMPTY = Reply(334, "", "")
AUTH_CHALLENGE_USERNAME = Reply(334, "", "VXNlcm5hbWU6")
AUTH_CHALLENGE_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
PREGREET = Reply(554, "5.5.1", "Protocol error: talking before the greeting, closing connection")
TOO_MANY_JUNK_COMMANDS = Reply(421, "4.7.0", "Too many junk commands, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
# RFC 4954 6: the per-user lock; the same words whether the user exists or not.
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Server shutting down, closing connection")
BARE_LINE_ENDING_COMMAND = Reply(
    500, "5.5.2", "Bare CR or LF in command; use CRLF line endings (RFC 5321 2.3.8)"
)
INVALID_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
NUL_IN_COMMAND = Reply(501, "5.5.2", "NUL character not allowed in command")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER_ADDRESS = Reply(501, "5.1.7", "Bad sender address syntax")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode authentication response")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Authentication not enabled")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
PARAM_UNRECOGNIZED = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")
NEED_FQDN = Reply(553, "5.1.3", "Recipient address rejected: need fully-qualified address")
CROSS_PROTOCOL = Reply(554, "5.7.0", "Not an SMTP command, closing connection")
NUL_IN_DATA = Reply(554, "5.6.0", "NUL character not allowed in message data")
TEXT_LINE_TOO_LONG = Reply(
    554, "5.6.0", "Message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)"
)


BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST], closing connection")
BDAT_AFTER_FAILURE = Reply(503, "5.5.1", "BDAT after a failed chunk; send RSET")
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS session; send STARTTLS first")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed in a BDAT transaction; send RSET")


def chunk_received(total: int) -> Reply:
    """The answer to a BDAT chunk that is not the last: the octets received so far."""
    return Reply(250, "2.0.0", f"{total} octets received")


def queued_as(queue_id: str) -> Reply:
    """The final DATA reply once the queue has committed the message."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


MESSAGE_REFUSED = Reply(554, "5.6.0", "Message content rejected: cannot be signed")
LOCAL_LOOKUP_FAILED = Reply(451, "4.3.0", "Recipient lookup failed, try again later")


def param_invalid(name: str, reason: str) -> Reply:
    """``501 5.5.4`` for a MAIL or RCPT parameter with a bad value (RFC 3461 DSN
    parameters); ``reason`` is one line of ours, never the client's text."""
    return Reply(501, "5.5.4", f"Invalid {name} parameter: {reason}")


def param_duplicate(name: str) -> Reply:
    """``501 5.5.4`` for a MAIL or RCPT parameter given twice."""
    return Reply(501, "5.5.4", f"Duplicate {name} parameter")
