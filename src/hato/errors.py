"""The exception tree of Hato: every error a caller may catch, in one place.

::

    HatoError
    ├── ConfigError            invalid settings (the CLI prints it as one line, exit 2)
    │   └── FilterError        (hato.queue.select) a message filter or cursor that does not parse
    ├── AddressError           an address or header value that cannot be sent (CR/LF, syntax)
    ├── TemplateError          a mail template is missing or fails to render
    ├── UserError              (hato.users) a ``hato user`` request that cannot be done
    ├── SigningError           (hato.dkim) DKIM cannot sign the message; intake answers 554 5.6.0
    ├── SendError              (hato.cli.send) ``hato send`` failed: the step and the reply
    ├── SignatureError         a webhook's ``Hato-Signature`` is missing, forged or stale
    ├── DsnError               (hato.dsn_params) a bad ``notify=``, ENVID, ORCPT or xtext
    ├── TLSPolicyError         an MTA-STS policy or TLSA record that cannot be used as written
    ├── TLSReportError         (hato.tlsrpt) a TLS-RPT record, report or the report store cannot be read
    ├── QueueError             the queue backend failed (database down, disk full, ...)
    │   ├── QueueFullError     storage exhausted; intake answers 452 4.3.1
    │   ├── QueueDamaged       the queue's file is damaged or missing; says how to repair it
    │   └── MessageNotFound    no message with that id
    └── DeliveryError          a courier failed; carries ``temporary`` and the remote reply
        ├── TemporaryDeliveryError   4xx, connection refused, timeout, unknown: retry
        └── PermanentDeliveryError   5xx: bounce

A class marked with a module lives beside the code that raises it and is not re-exported
here. ``HatoError`` itself is raised for an attachment ``Mailer.send`` cannot read.

Foreign exceptions (sqlite3, aiosmtplib, dnspython, redis, psycopg, OSError) are caught
in the module that calls the foreign library and re-raised as one of these.

Outside the tree, on purpose:

* Misuse of the library API raises the builtin Python code expects: ``TypeError`` for an
  argument of the wrong type (a ``Mailer.send`` attachment, a ``send_many`` item, a
  ``connection=`` that is not psycopg's), ``ValueError`` for an impossible value (no
  recipients, a ``send_at`` that is not finite, a worker, retry schedule or AUTH
  throttle with limits below one, a listener ``Settings.listeners`` cannot parse),
  ``RuntimeError`` for an ``AsyncMailer`` used from a second event loop or a ``Mailer``
  called from inside its own, and ``Mailer.wait`` raises ``TimeoutError`` at its deadline.
* ``SessionFailure`` (hato.delivery.session) carries the reply of an SMTP session that
  could not be set up from the session code to its courier, which turns it into a
  temporary result; it never leaves ``delivery/``.
* ``ProtocolViolation`` (hato.delivery.session) says a server broke a pipelined reply
  stream (a reply to no command, more replies than commands, a malformed or over-long
  reply); the session closes the connection and defers the undecided recipients, so it
  never leaves ``delivery/``.
* ``PolicyFetchError`` (hato.delivery.mta_sts) says an MTA-STS policy could not be
  fetched or parsed, with its TLS-RPT result type; ``MTASTS.policy_for`` turns it into
  a lookup without a policy, so it never leaves ``delivery/``.
* ``NotConvertible`` (hato.mime7bit) says an 8-bit message has no faithful 7-bit form;
  the session turns it into a 554 5.6.3 result and DKIM signing into "sign as it is".
  It never leaves the package.
* ``DamagedSchema`` (hato.queue.sqlite_records) says an SQLite spool's schema cannot
  be read, ``Unreadable`` (hato.queue.sqlite_records) that one record cannot; the queue
  turns them into ``QueueDamaged`` or a quarantine, and neither leaves ``queue/``.
* ``FrameError`` (hato.committer) says a frame between an intake process and the
  committer does not parse; the committer answers it as a ``QueueError`` and the intake
  turns a connection that sends one into a ``QueueError``, so it never leaves the module.
  Private exceptions (a leading underscore) never leave
  their module.
"""

from __future__ import annotations

from hato.reply import Reply


class HatoError(Exception):
    """Base of every error Hato raises on purpose."""


class ConfigError(HatoError):
    """The settings are invalid; the message says which one and why."""


class TLSPolicyError(HatoError):
    """A recipient domain's transport policy (an MTA-STS policy file, a TLSA record)
    cannot be used as written; the message says what is wrong."""


class AddressError(HatoError, ValueError):
    """An address or header value is malformed or unsafe (CR/LF injection, bad syntax)."""


class TemplateError(HatoError):
    """A mail template (``Mailer.send_template``) is missing or fails to render."""


class SignatureError(HatoError, ValueError):
    """A webhook's ``Hato-Signature`` header is missing or malformed, matches none of the
    secrets, or is older (or newer) than the tolerance allows (a replay); the message
    says which. Raised by :func:`hato.webhooks.verify`."""


class QueueError(HatoError):
    """The queue backend failed; nothing was acknowledged."""


class QueueFullError(QueueError):
    """The queue has no room (disk full, quota): answer 452 4.3.1 and retry later."""


class QueueDamaged(QueueError):
    """The queue's storage cannot be trusted (a damaged or vanished SQLite file): the
    message names the file and the command that repairs it. Start-up stops on it."""


class MessageNotFound(QueueError, KeyError):
    """No message with the given id exists in the queue."""


class DeliveryError(HatoError):
    """A delivery attempt failed. ``reply`` is the remote (or synthesised) reply."""

    temporary: bool = True

    def __init__(self, reply: Reply, *, relay: str = "") -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay


class TemporaryDeliveryError(DeliveryError):
    """4xx, connection failure, timeout or anything unknown: the message will be retried."""

    temporary = True


class PermanentDeliveryError(DeliveryError):
    """5xx: the message (or recipient) is bounced."""

    temporary = False
