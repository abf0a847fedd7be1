"""Hato (鳩): a mail system for web services — SMTP intake, durable queue, relay and delivery."""

from hato.errors import (
    AddressError,
    ConfigError,
    DeliveryError,
    HatoError,
    MessageNotFound,
    QueueError,
    QueueFullError,
    SignatureError,
    TemplateError,
)
from hato.mailer import (
    AsyncMailer,
    Attachment,
    Composed,
    Email,
    Mailer,
    MessageId,
    State,
    Status,
    compose,
)

__version__ = "0.1.0"

__all__ = [
    "AddressError",
    "AsyncMailer",
    "Attachment",
    "Composed",
    "ConfigError",
    "DeliveryError",
    "Email",
    "HatoError",
    "Mailer",
    "MessageId",
    "MessageNotFound",
    "QueueError",
    "QueueFullError",
    "SignatureError",
    "State",
    "Status",
    "TemplateError",
    "__version__",
    "compose",
]
