"""The queue: the one store of messages in flight, for the MTA spool and the app outbox."""

from hato.queue.base import (
    MessageState,
    Outcome,
    Queue,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
    StoredMessage,
    new_message_id,
    open_queue,
)

__all__ = [
    "MessageState",
    "Outcome",
    "Queue",
    "RecipientState",
    "RecipientStatus",
    "RecoveryReport",
    "StoredMessage",
    "new_message_id",
    "open_queue",
]
