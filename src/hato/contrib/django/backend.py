"""The email backend of :mod:`hato.contrib.django` (see the package docstring)."""

from __future__ import annotations

import email.utils
import io
import secrets
import threading
from collections.abc import Sequence
from email.generator import BytesGenerator
from typing import Any

from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import EmailMessage, sanitize_address

from hato.errors import AddressError, HatoError
from hato.mailer import IDEMPOTENCY_HEADER, Composed, Mailer
from hato.message import Envelope, check_header_value, parse_address

__all__ = ["EmailBackend", "close_mailers", "shared_mailer"]

_mailers: dict[tuple[str | None, str | None], Mailer] = {}
_mailers_lock = threading.Lock()


def shared_mailer(queue_url: str | None, default_from: str | None) -> Mailer:
    """One Mailer per (queue URL, default sender) for the process (see the module doc)."""
    key = (queue_url, default_from)
    with _mailers_lock:
        mailer = _mailers.get(key)
        if mailer is None:
            mailer = _mailers[key] = Mailer(queue_url, default_from=default_from)
        return mailer


_shared_mailer = shared_mailer  # the name it had before the package


def close_mailers() -> None:
    """Close the shared mailers (tests, or a process that forks workers after using mail)."""
    with _mailers_lock:
        mailers = list(_mailers.values())
        _mailers.clear()
    for mailer in mailers:
        mailer.close()


def _envelope_address(address: str, encoding: str, what: str) -> str:
    check_header_value(address, what)
    try:
        sanitized = sanitize_address(address, encoding)
    except ValueError as exc:  # Django's own refusal (bad syntax, CR/LF)
        raise AddressError(f"{what}: {exc}") from None
    spec = email.utils.parseaddr(sanitized)[1]
    parsed = parse_address(spec)  # AddressError if it is not a plain mailbox
    return f"{parsed.local}@{parsed.domain}"


class EmailBackend(BaseEmailBackend):
    """``EMAIL_BACKEND = "hato.contrib.django.EmailBackend"``: enqueue into Hato's outbox."""

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        queue_url: str | None = None,
        default_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)
        self.queue_url: str | None = queue_url or getattr(settings, "HATO_QUEUE_URL", None)
        self.default_from: str | None = default_from or getattr(settings, "HATO_DEFAULT_FROM", None)

    @property
    def mailer(self) -> Mailer:
        return shared_mailer(self.queue_url, self.default_from)

    def compose(self, message: EmailMessage) -> Composed:
        """The envelope and bytes Hato stores for one Django message."""
        encoding = message.encoding or settings.DEFAULT_CHARSET
        from_email = message.from_email or self.default_from
        if not from_email:
            raise AddressError("no sender: set DEFAULT_FROM_EMAIL or HATO_DEFAULT_FROM")
        sender = _envelope_address(from_email, encoding, "from_email")
        recipients: list[str] = []
        for address in message.recipients():  # to + cc + bcc
            spec = _envelope_address(address, encoding, "recipient")
            if spec not in recipients:
                recipients.append(spec)
        if not recipients:
            raise AddressError("no recipients")
        headers = {name.lower(): value for name, value in message.extra_headers.items()}
        original_headers = message.extra_headers
        message_id = headers.get("message-id")
        if message_id is None:
            # Django's own would look up this host's FQDN (a DNS query) on first use.
            message_id = f"<hato.{secrets.token_hex(16)}@{sender.rpartition('@')[2]}>"
            message.extra_headers = {**original_headers, "Message-ID": message_id}
        try:
            mime = message.message()
        except ValueError as exc:  # BadHeaderError: CR/LF in a header
            raise AddressError(str(exc)) from None
        finally:
            message.extra_headers = original_headers
        del mime["Bcc"]  # never delivered, however it was set
        key = headers.get(IDEMPOTENCY_HEADER.lower())
        out = io.BytesIO()
        # What Django's SMTP backend sends: as_bytes(linesep="\r\n") of the same message.
        BytesGenerator(out, mangle_from_=False).flatten(mime, linesep="\r\n")
        data = out.getvalue()
        envelope = Envelope(sender, recipients, body_8bit=not data.isascii())
        return Composed(envelope, data, str(message_id), key or None)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Enqueue each message; the number enqueued. Errors raise unless ``fail_silently``."""
        if not email_messages:
            return 0
        sent = 0
        for message in email_messages:
            try:
                self.mailer.enqueue(self.compose(message))
            except HatoError:
                if not self.fail_silently:
                    raise
            else:
                sent += 1
        return sent
