"""The application API: ``Mailer.send`` enqueues a message into the outbox, ``status`` reads it back.

A web app never talks SMTP inside a request. It calls :meth:`Mailer.send`, which builds
the message with the standard library's :mod:`email` encoders and stores it in the queue
(SQLite, PostgreSQL, Redis, or memory for tests); ``hato worker`` (or ``hato serve``)
delivers it later, with retries, and :meth:`Mailer.status` says what became of it.

::

    mailer = hato.Mailer("postgresql://app@db/app")          # or HATO_QUEUE_URL
    message_id = mailer.send("user@example.net", "Welcome", text="Hello!")
    mailer.status(message_id).state                         # "queued" … "sent"

:class:`AsyncMailer` has the same methods as coroutines, for asyncio apps;
:class:`hato.testing.CaptureMailer` the same as :class:`Mailer`, for an app's tests.

One job per module:

* :mod:`~hato.mailer.addresses`: address input, checked strictly (pure);
* :mod:`~hato.mailer.composition`: one :class:`Email` in, envelope and 7-bit MIME bytes
  out (pure), and what it refuses;
* :mod:`~hato.mailer.async_mailer`: :class:`AsyncMailer` and the :class:`Status` it reads;
* :mod:`~hato.mailer.sync_mailer`: :class:`Mailer`, a facade over it on a private loop
  thread;
* :mod:`~hato.mailer.transaction`: ``connection=``, the INSERT inside the caller's
  PostgreSQL transaction (imported only when used: it needs the postgres extra).

What ``send`` promises: it returns only once the message is durable in the queue (with
``connection=``, the message is part of the caller's transaction instead); nothing is
stored when an address, header or attachment is refused; every retry delivers the same
bytes, with the same ``Message-ID``; a second ``send`` with the same ``idempotency_key``
returns the first message's id and stores nothing.
"""

from hato.mailer.addresses import AddressLike
from hato.mailer.async_mailer import (
    STATES,
    AsyncMailer,
    MessageId,
    RecipientPhase,
    RecipientReport,
    State,
    Status,
    status_of,
)
from hato.mailer.composition import (
    IDEMPOTENCY_HEADER,
    MAX_FILENAME,
    MAX_IDEMPOTENCY_KEY,
    MAX_SEND_AT_DELAY,
    Attachment,
    Composed,
    Email,
    EmailOptions,
    compose,
    compose_email,
)
from hato.mailer.sync_mailer import Mailer, MailerBase

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MAX_FILENAME",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_SEND_AT_DELAY",
    "STATES",
    "AddressLike",
    "AsyncMailer",
    "Attachment",
    "Composed",
    "Email",
    "EmailOptions",
    "Mailer",
    "MailerBase",
    "MessageId",
    "RecipientPhase",
    "RecipientReport",
    "State",
    "Status",
    "compose",
    "compose_email",
    "status_of",
]
