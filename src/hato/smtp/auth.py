"""SASL for the SMTP server: pure PLAIN/LOGIN decoding, the ``Authenticator`` seam, throttling.

Decoding never raises: a malformed response gives ``None`` and the state machine answers
``501 5.5.2``. The credential check itself is the :class:`Authenticator` protocol (one
coroutine); the user store of the relay server (:mod:`hato.users`) plugs in there.
Passwords are carried in values whose ``repr`` hides them, so they cannot leak into a log
by accident. :class:`AuthThrottle` counts failures per client address across connections
and listeners (password guessing), so the server can slow a guesser down, then refuse it.
"""

from __future__ import annotations

import binascii
import hmac
import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

MECHANISMS = ("PLAIN", "LOGIN")

# RFC 4954 4: the longest response a server must accept is 12288 octets of base64.
MAX_RESPONSE = 12288


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a SASL exchange yielded. ``authzid`` is ``""`` unless the client asked to act
    as someone else (PLAIN only)."""

    authzid: str
    username: str
    password: str = field(repr=False)


def decode_response(text: bytes) -> bytes | None:
    """Decode one base64 SASL response line (``=`` is the empty response, RFC 4954 4).

    Returns ``None`` for anything that is not strict base64.
    """
    if text == b"=":
        return b""
    if not text or len(text) > MAX_RESPONSE:
        return None
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _text(blob: bytes) -> str | None:
    if b"\0" in blob:
        return None
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_plain(blob: bytes) -> Credentials | None:
    """RFC 4616 PLAIN: ``[authzid] NUL authcid NUL passwd``, UTF-8. ``None`` if malformed."""
    parts = blob.split(b"\0")
    if len(parts) != 3:
        return None
    authzid, username, password = (_text(p) for p in parts)
    if authzid is None or username is None or password is None or not username:
        return None
    return Credentials(authzid, username, password)


def parse_login_text(blob: bytes) -> str | None:
    """One LOGIN step (user name or password) as text; ``None`` if not UTF-8 or has NUL."""
    return _text(blob)


def encode_plain(username: str, password: str, authzid: str = "") -> str:
    """The PLAIN initial response for ``username``/``password`` (for tests and clients)."""
    raw = f"{authzid}\0{username}\0{password}".encode()
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


@runtime_checkable
class Authenticator(Protocol):
    """Checks credentials. Returns the authenticated user name, or ``None`` if refused.

    ``authzid`` is the identity the client asked to act as (``""`` for itself); an
    implementation that does not support proxy authorisation refuses a non-empty one that
    differs from ``username``.
    """

    async def authenticate(self, username: str, password: str, *, authzid: str = "") -> str | None:
        """Check the credentials."""
        ...


class StaticAuthenticator:
    """An in-memory user table for tests and development: ``{username: password}``."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    async def authenticate(self, username: str, password: str, *, authzid: str = "") -> str | None:
        if authzid and authzid != username:
            return None
        expected = self._users.get(username)
        # Compare even for unknown users so timing does not tell which names exist.
        ok = hmac.compare_digest(
            (expected if expected is not None else "\0unknown").encode(), password.encode()
        )
        return username if ok and expected is not None else None


class AuthThrottle:
    """Failed AUTH attempts per client address within a sliding window, shared by every
    listener of a process (one instance, built by the composition root).

    Each failure below ``limit`` costs the client a delay before its ``535`` that doubles
    with every failure (``base_delay``, ``2 * base_delay``, … at most ``max_delay``); the
    failure that reaches ``limit`` blocks the address until enough failures have left the
    window, and a blocked address is refused at connect and at AUTH. Successful logins do
    not wipe the count: a valid account must not become a way to keep guessing others.
    Trusted networks are not exempt. IPv6 clients are counted per /64, since a host
    usually owns a whole /64. Bounded: at most ``max_clients`` addresses are tracked.
    """

    def __init__(
        self,
        limit: int = 5,
        window: float = 600.0,
        *,
        base_delay: float = 0.5,
        max_delay: float = 5.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("AuthThrottle needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_clients = max_clients
        self._clock = clock
        self._failures: dict[str, list[float]] = {}

    @staticmethod
    def key(client_ip: str) -> str:
        """The counting key of an address: itself for IPv4, its /64 for IPv6."""
        try:
            ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return client_ip
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def _recent(self, key: str, now: float) -> list[float]:
        times = self._failures.get(key)
        if not times:
            return []
        horizon = now - self.window
        if times[0] <= horizon:
            times = [t for t in times if t > horizon]
            if times:
                self._failures[key] = times
            else:
                del self._failures[key]
        return times

    def failures(self, client_ip: str) -> int:
        """Failures of this client within the window."""
        return len(self._recent(self.key(client_ip), self._clock()))

    def blocked(self, client_ip: str) -> bool:
        """Is this client refused (``421 4.7.0``) until failures leave the window?"""
        return self.failures(client_ip) >= self.limit

    def failed(self, client_ip: str) -> float | None:
        """Record a failure. Returns the delay (seconds) to wait before answering ``535``,
        or ``None`` when this failure blocks the client (answer ``421`` and close)."""
        now = self._clock()
        key = self.key(client_ip)
        times = self._recent(key, now)
        if not times:
            self._make_room(now)
            times = self._failures.setdefault(key, [])
        times.append(now)
        count = len(times)
        if count >= self.limit:
            return None
        return min(self.max_delay, self.base_delay * 2.0 ** (count - 1))

    def _make_room(self, now: float) -> None:
        if len(self._failures) < self.max_clients:
            return
        for key in list(self._failures):
            self._recent(key, now)
        overflow = len(self._failures) - self.max_clients + 1
        if overflow > 0:
            # Forget the clients whose last failure is oldest.
            stale = sorted(self._failures, key=lambda k: self._failures[k][-1])[:overflow]
            for key in stale:
                del self._failures[key]
