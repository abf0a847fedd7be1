"""The clock as a parameter: what every time-dependent piece takes instead of reading time.

``Clock`` is wall-clock seconds since the epoch (``time.time``); tests pass
:class:`hato.testing.FakeClock` instead of patching the ``time`` module.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
"""A function returning the current time in seconds since the epoch."""

__all__ = ["Clock"]
