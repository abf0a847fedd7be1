"""What the SMTP listeners and the delivery worker report as they work, for metrics.

An :class:`Observer` is handed to them by ``app.py`` (never found through a global). The
calls are made on the hot path, so an implementation only bumps counters; this base
class does nothing, and is what runs when no HTTP listener asked for metrics.
"""

from __future__ import annotations


class Observer:
    """Plain calls, one per thing that happened; every label value is bounded."""

    def smtp_connected(self, listener: str) -> None:
        """A client connected to ``listener`` (``role=host:port``), refused or not."""

    def smtp_message(self, listener: str, accepted: bool) -> None:
        """A message's end of data was answered: queued (``accepted``) or refused."""

    def smtp_auth_failed(self, listener: str) -> None:
        """An AUTH attempt failed."""

    def event(self, name: str, count: int = 1) -> None:
        """``count`` delivery events ``name`` were recorded (``accepted``, ``relayed``...)."""

    def delivery(self, route: str, status: str, seconds: float) -> None:
        """One recipient's attempt ended ``status`` (``sent``, ``deferred``, ``bounced``,
        ``held``) on ``route``, ``seconds`` after the message was queued."""


NO_OBSERVER = Observer()
