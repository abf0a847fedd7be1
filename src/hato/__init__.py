"""Hato (鳩): a mail system for web services — SMTP intake, durable queue, relay and delivery."""

from hato.errors import (
    AddressError,
    ConfigError,
    DeliveryError,
    HatoError,
    MessageNotFound,
    QueueError,
    QueueFullError,
)

__version__ = "0.1.0"

__all__ = [
    "AddressError",
    "ConfigError",
    "DeliveryError",
    "HatoError",
    "MessageNotFound",
    "QueueError",
    "QueueFullError",
    "__version__",
]
