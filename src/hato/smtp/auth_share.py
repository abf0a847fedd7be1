"""The AUTH throttle of one supervisor's intake processes, told to each other.

Each intake process keeps its own :class:`~hato.smtp.auth.AuthThrottle` and sends every
failure and login it records, as one datagram, to every other intake process, which
replays it (:meth:`AuthThrottle.replay`): a password guesser spread over the processes
by the kernel is counted once, as by one process. The supervisor makes one Unix
datagram socket pair per intake slot before it forks and keeps them across restarts;
a child reads its own slot's inbox and writes to the others'. Delivery is best effort
(a full inbox or a process restarting loses an event: the throttle then counts a little
less, never more). A restarted child starts with an empty throttle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

from hato.smtp.auth import AuthEvent, AuthThrottle

__all__ = ["AuthShare"]

_MAX_DATAGRAM = 4096


class AuthShare:
    """The inboxes of ``slots`` intake processes; :meth:`attach` in each child."""

    def __init__(self, slots: list[int]) -> None:
        self.pairs: dict[int, tuple[socket.socket, socket.socket]] = {}
        for slot in slots:
            inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            inbox.setblocking(False)
            outbox.setblocking(False)
            self.pairs[slot] = (inbox, outbox)
        self.slot: int | None = None

    def close(self) -> None:
        for inbox, outbox in self.pairs.values():
            inbox.close()
            outbox.close()

    def attach(self, slot: int) -> None:
        """In a child: this process is ``slot`` (no inbox of its own outside intake)."""
        self.slot = slot

    def start(self, throttle: AuthThrottle) -> None:
        """Publish what ``throttle`` records, and replay what the others send (call in
        the running event loop of the child)."""
        if self.slot not in self.pairs:
            return
        inbox = self.pairs[self.slot][0]
        others = [out for slot, (_, out) in self.pairs.items() if slot != self.slot]

        def publish(event: AuthEvent) -> None:
            data = json.dumps(
                [event.kind, event.client_ip, event.username, event.locked, event.at]
            ).encode()
            for out in others:
                with contextlib.suppress(OSError):  # full or gone: best effort
                    out.send(data[:_MAX_DATAGRAM])

        def receive() -> None:
            for _ in range(256):  # bounded per wake-up
                try:
                    data = inbox.recv(_MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                try:
                    kind, ip, username, locked, at = json.loads(data)
                    if kind in ("failed", "succeeded"):
                        throttle.replay(AuthEvent(kind, str(ip), username, bool(locked), at))
                except (ValueError, TypeError):
                    continue

        throttle.publish = publish
        asyncio.get_running_loop().add_reader(inbox.fileno(), receive)
