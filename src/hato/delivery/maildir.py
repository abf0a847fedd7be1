"""The Maildir courier: delivers mail for our own domains to ``ROOT/DOMAIN/USER/`` Maildirs.

Each recipient is resolved by :class:`~hato.aliases.LocalRecipients` (users, aliases,
recipient delimiter, postmaster and abuse), the same instance the intake's RCPT check
uses; before a recipient is bounced as unknown, ``refresh`` brings the users snapshot up
to date (in a thread) and it is resolved once more, so mail for a user added a moment ago
is never bounced. Local targets are written the Maildir way:
into ``tmp/`` under a unique name ``SECONDS.M<usec>P<pid>Q<n>.<host>``, fsync'd, linked
into ``new/`` and the directory fsync'd, so a reader never sees a partial message and a
message counted as delivered survives a crash. Files get Unix line endings (what Maildir
readers expect) and, on top, ``Return-Path:`` and ``Delivered-To:`` (the envelope
recipient as it arrived, as Postfix does).

External alias targets are not delivered here: the courier hands them, with the message,
to a ``forward`` callable that queues a new message for them (the worker then routes it
like any other mail) under an idempotency key, so a retry never forwards twice. The
recipient counts as delivered only when all its Maildirs are written and its forward is
queued. A message that already carries ``Delivered-To:`` for the recipient has been here
before through a forwarding loop and is bounced (``554 5.4.6``), as Postfix's local(8)
does.

Failures: unknown user ``550 5.1.1`` and loops are permanent; a full disk or quota is
``452 4.2.2`` and any other error ``451 4.3.0``, both temporary.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from hato.aliases import UNKNOWN_USER, Expansion, LocalRecipients, Mailbox
from hato.clock import Clock
from hato.delivery.base import DeliveryResult, Result
from hato.dsn_params import DsnRequest
from hato.reply import Reply

# (envelope sender, external recipients, message bytes, idempotency key) -> queued id.
Forward = Callable[[str, Sequence[str], bytes, str], Awaitable[str]]

# Brings the users snapshot behind LocalRecipients up to date (off the event loop).
Refresh = Callable[[], Awaitable[object]]

DELIVERED = Reply(250, "2.0.0", "delivered to maildir")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full or disk quota exceeded")
FORWARD_LOOP = Reply(
    554, "5.4.6", "Mail forwarding loop: message already delivered to this recipient"
)
FORWARD_UNAVAILABLE = Reply(451, "4.3.5", "Forwarding to external addresses is not configured")

_RELAY = "maildir"
_DELIVERED_TO_RE = re.compile(rb"^delivered-to[ \t]*:(.*)$", re.IGNORECASE)


def _delivered_to(data: bytes) -> set[str]:
    """Lower-cased values of the Delivered-To fields in the header section."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    found: set[str] = set()
    for line in head.split(b"\r\n"):
        m = _DELIVERED_TO_RE.match(line)
        if m is not None:
            found.add(m.group(1).strip().decode("utf-8", "replace").lower())
    return found


def _safe_host(hostname: str) -> str:
    # The Maildir spec's escapes, so the name stays one path component without ':'.
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirCourier:
    """Delivers to Maildirs under ``root``; a :class:`~hato.delivery.base.Courier`."""

    name = "maildir"

    def __init__(
        self,
        root: Path,
        recipients: LocalRecipients,
        *,
        clock: Clock = time.time,
        forward: Forward | None = None,
        refresh: Refresh | None = None,
        hostname: str | None = None,
        fsync: bool = True,
    ) -> None:
        self.root = Path(root)
        self.recipients = recipients
        self.forward = forward
        self.refresh = refresh
        self.fsync = fsync
        self._clock = clock
        self._host = _safe_host(hostname if hostname is not None else socket.gethostname())
        self._pid = os.getpid()
        self._counter = itertools.count(1)
        self._ready: set[Path] = set()

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: DsnRequest | None = None,
        require_tls: bool = False,
    ) -> list[DeliveryResult]:
        seen = _delivered_to(data)
        results: list[DeliveryResult] = []
        for rcpt in recipients:
            reply = await self._deliver_one(sender, rcpt, data, message_id, seen)
            if reply.code < 300:
                result = Result.OK
            elif reply.code < 500:
                result = Result.TEMPORARY
            else:
                result = Result.PERMANENT
            results.append(DeliveryResult(rcpt, result, reply, _RELAY))
        return results

    async def close(self) -> None:
        return None

    async def _deliver_one(
        self, sender: str, rcpt: str, data: bytes, message_id: str, seen: set[str]
    ) -> Reply:
        try:
            expansion = self.recipients.expand(rcpt)
            if expansion.error is UNKNOWN_USER and self.refresh is not None:
                await self.refresh()
                expansion = self.recipients.expand(rcpt)
        except Exception as exc:  # the user store failed: retry rather than bounce
            return Reply(451, "4.3.0", f"cannot resolve recipient: {type(exc).__name__}: {exc}")
        if expansion.error is not None:
            return expansion.error
        if rcpt.lower() in seen:
            return FORWARD_LOOP
        stamped = b"Delivered-To: " + rcpt.encode("utf-8") + b"\r\n" + data
        if expansion.forwards:
            reply = await self._forward(sender, rcpt, expansion, stamped, message_id, data)
            if reply is not None:
                return reply
        envelope_from = f"Return-Path: <{sender}>\r\n".encode()
        file_data = (envelope_from + stamped).replace(b"\r\n", b"\n")
        written: list[Mailbox] = []
        for mailbox in expansion.mailboxes:
            try:
                await asyncio.to_thread(self._write, mailbox, file_data)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return MAILBOX_FULL
                return Reply(451, "4.3.0", f"cannot write to {mailbox}: {exc.strerror or exc}")
            written.append(mailbox)
        return _summary(written, expansion.forwards)

    async def _forward(
        self,
        sender: str,
        rcpt: str,
        expansion: Expansion,
        stamped: bytes,
        message_id: str,
        data: bytes,
    ) -> Reply | None:
        if self.forward is None:
            return FORWARD_UNAVAILABLE
        basis = message_id or hashlib.sha256(data).hexdigest()[:32]
        key = f"fwd:{basis}:{rcpt.lower()}"
        try:
            await self.forward(sender, list(expansion.forwards), stamped, key)
        except Exception as exc:  # the queue is down: try the whole recipient again later
            return Reply(451, "4.3.0", f"cannot queue forward: {type(exc).__name__}: {exc}")
        return None

    # Maildir I/O (runs in a thread).

    def _maildir(self, mailbox: Mailbox) -> Path:
        path = self.root / mailbox.domain / mailbox.user
        if path in self._ready:
            return path
        created: list[Path] = []
        for part in (
            self.root,
            self.root / mailbox.domain,
            path,
            path / "tmp",
            path / "new",
            path / "cur",
        ):
            if not part.is_dir():
                part.mkdir(mode=0o700, parents=True, exist_ok=True)
                created.append(part)
        if self.fsync:
            # A new directory is durable once its parent's entry is.
            for parent in dict.fromkeys(p.parent for p in created):
                _fsync_dir(parent)
        self._ready.add(path)
        return path

    def _unique_name(self) -> str:
        now = self._clock()
        seconds = int(now)
        usec = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{usec}P{self._pid}Q{next(self._counter)}.{self._host}"

    def _write(self, mailbox: Mailbox, data: bytes) -> Path:
        try:
            return self._write_once(mailbox, data)
        except FileNotFoundError:
            # The Maildir was removed under us (an operator cleaning up): make it again.
            self._ready.discard(self.root / mailbox.domain / mailbox.user)
            return self._write_once(mailbox, data)

    def _write_once(self, mailbox: Mailbox, data: bytes) -> Path:
        path = self._maildir(mailbox)
        while True:
            name = self._unique_name()
            tmp = path / "tmp" / name
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # another process or courier picked the same name: next Q
            break
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            while True:
                # link, not rename: never replace a message that already has this name.
                target = path / "new" / name
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    name = self._unique_name()
                    continue
                break
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if self.fsync:
            _fsync_dir(path / "new")
        return target


def _summary(mailboxes: Sequence[Mailbox], forwards: Sequence[str]) -> Reply:
    parts = []
    if mailboxes:
        parts.append("delivered to " + ", ".join(str(m) for m in mailboxes))
    if forwards:
        parts.append("forwarded to " + ", ".join(forwards))
    return Reply(250, "2.0.0", "; ".join(parts) or DELIVERED.text)
