"""SASL for the SMTP server: pure PLAIN/LOGIN decoding, the ``Authenticator`` seam, throttling.

Decoding never raises: a malformed response gives ``None`` and the state machine answers
``501 5.5.2``. The credential check itself is the :class:`Authenticator` protocol (one
coroutine); the user store of the relay server (:mod:`hato.users`) plugs in there.
Passwords are carried in values whose ``repr`` hides them, so they cannot leak into a log
by accident. :class:`AuthThrottle` counts failures per client address and per user name
across connections and listeners (password guessing, also spread over many addresses), so
the server can slow a guesser down, then refuse it.
"""

from __future__ import annotations

import binascii
import hmac
import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

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


@dataclass(frozen=True, slots=True)
class AuthEvent:
    """A failure or a successful login as :class:`AuthThrottle` records it."""

    kind: Literal["failed", "succeeded"]
    client_ip: str
    username: str | None
    locked: bool
    at: float  # time.monotonic(): one clock for every process of the machine


class AuthThrottle:
    """Failed AUTH attempts within sliding windows, per client address and per user name,
    shared by every listener of a process (one instance, built by the composition root).

    Per client address (``limit`` within ``window``): each failure below ``limit`` costs
    the client a delay before its ``535`` that doubles with every failure (``base_delay``,
    ``2 * base_delay``, … at most ``max_delay``); the failure that reaches ``limit``
    blocks the address until enough failures have left the window, and a blocked address
    is refused at connect and at AUTH. Trusted networks are not exempt. IPv6 clients are
    counted per /64, since a host usually owns a whole /64.

    Per user name (``user_limit`` within ``user_window``), across all clients, so that
    guessing spread over many addresses is slowed too: the delay grows with the name's
    failures as well, and once they reach ``user_limit`` the name is *locked*: AUTH as it
    is answered ``454 4.7.0`` without looking at the password, until enough failures have
    left the window. Names are counted as given, whether such a user exists or not, so
    the lock (its replies, its timing) tells nothing about which users exist. The lock
    never applies to clients in trusted networks, nor to a client address that logged in
    successfully as that user within ``user_window``: the one SASL account that carries
    a site's mail keeps working while someone guesses its password. Attempts refused by
    the lock count as failures of the client address, not of the name (the lock expires).

    Successful logins do not wipe any count: a valid account must not become a way to
    keep guessing others. Bounded: at most ``max_clients`` addresses, names and logins
    each are tracked. For metrics: :attr:`failure_counts` (failures per listener),
    :attr:`client_blocks`, :attr:`user_locks` (times an address was blocked, a name
    locked) and :attr:`locked_refusals` (attempts refused by a lock).
    """

    def __init__(
        self,
        limit: int = 5,
        window: float = 600.0,
        *,
        user_limit: int = 10,
        user_window: float = 600.0,
        base_delay: float = 0.5,
        max_delay: float = 5.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or user_limit < 1 or user_window <= 0:
            raise ValueError("AuthThrottle needs limits >= 1 and windows > 0")
        self.limit = limit
        self.window = window
        self.user_limit = user_limit
        self.user_window = user_window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_clients = max_clients
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._user_failures: dict[str, list[float]] = {}
        # (name key, address key) -> time of the last successful login.
        self._logins: dict[tuple[str, str], float] = {}
        self.failure_counts: dict[str, int] = {}
        self.client_blocks = 0
        self.user_locks = 0
        self.locked_refusals = 0
        # Told of every failure and login recorded here (the intake processes of one
        # supervisor tell each other: hato.smtp.auth_share); see :meth:`replay`.
        self.publish: Callable[[AuthEvent], None] | None = None

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

    @staticmethod
    def user_key(username: str) -> str:
        """The counting key of a user name: case-folded, so that ``Alice`` and ``alice``
        are one name to a guesser as they are to the user store; bounded in length."""
        return username.strip().casefold()[:320]

    def _recent(
        self, table: dict[str, list[float]], key: str, window: float, now: float
    ) -> list[float]:
        times = table.get(key)
        if not times:
            return []
        horizon = now - window
        if times[0] <= horizon:
            times = [t for t in times if t > horizon]
            if times:
                table[key] = times
            else:
                del table[key]
        return times

    def failures(self, client_ip: str) -> int:
        """Failures of this client within the window."""
        return len(self._recent(self._failures, self.key(client_ip), self.window, self._clock()))

    def user_failures(self, username: str) -> int:
        """Failures of this user name, from any client, within the user window."""
        return len(
            self._recent(
                self._user_failures, self.user_key(username), self.user_window, self._clock()
            )
        )

    def blocked(self, client_ip: str) -> bool:
        """Is this client refused (``421 4.7.0``) until failures leave the window?"""
        return self.failures(client_ip) >= self.limit

    def _exempt(self, username: str, client_ip: str, trusted: bool, now: float) -> bool:
        if trusted:
            return True
        last = self._logins.get((self.user_key(username), self.key(client_ip)))
        return last is not None and now - last < self.user_window

    def locked(self, username: str, client_ip: str, *, trusted: bool = False) -> bool:
        """Is AUTH as ``username`` from this client refused (``454 4.7.0``) for now?"""
        now = self._clock()
        if self._exempt(username, client_ip, trusted, now):
            return False
        key = self.user_key(username)
        return len(self._recent(self._user_failures, key, self.user_window, now)) >= (
            self.user_limit
        )

    def failed(
        self,
        client_ip: str,
        username: str | None = None,
        *,
        trusted: bool = False,
        listener: str = "",
        locked: bool = False,
    ) -> float | None:
        """Record a failure. Returns the delay (seconds) to wait before answering, or
        ``None`` when this failure blocks the client (answer ``421`` and close).

        ``username``: the name tried (counted against it unless ``locked``, which says the
        attempt was refused by the lock without a check); ``trusted``: the client is in
        a trusted network; ``listener``: where it happened, for :attr:`failure_counts`.
        """
        now = self._clock()
        self.failure_counts[listener] = self.failure_counts.get(listener, 0) + 1
        if locked:
            self.locked_refusals += 1
        user_count = 0
        if username is not None and not locked:
            user_count = self._record(
                self._user_failures, self.user_key(username), self.user_window, now
            )
            if user_count == self.user_limit:
                self.user_locks += 1
            if self._exempt(username, client_ip, trusted, now):
                user_count = 0  # others' guesses do not slow down whoever knows the password
        count = self._record(self._failures, self.key(client_ip), self.window, now)
        if self.publish is not None:
            self.publish(AuthEvent("failed", client_ip, username, locked, now))
        if count >= self.limit:
            if count == self.limit:
                self.client_blocks += 1
            return None
        count = max(count, user_count)
        return min(self.max_delay, self.base_delay * 2.0 ** (count - 1))

    def succeeded(self, client_ip: str, username: str) -> None:
        """Record a successful login: this address is exempt from ``username``'s lock for
        the user window."""
        self._logged_in(client_ip, username, self._clock())
        if self.publish is not None:
            self.publish(AuthEvent("succeeded", client_ip, username, False, self._clock()))

    def replay(self, event: AuthEvent) -> None:
        """Record a failure or login another process saw (at ``event.at`` on the same
        monotonic clock), without counting it in this process's metrics."""
        if event.kind == "succeeded" and event.username is not None:
            self._logged_in(event.client_ip, event.username, event.at)
        elif event.kind == "failed":
            if event.username is not None and not event.locked:
                key = self.user_key(event.username)
                self._record(self._user_failures, key, self.user_window, event.at)
            self._record(self._failures, self.key(event.client_ip), self.window, event.at)

    def _logged_in(self, client_ip: str, username: str, at: float) -> None:
        key = (self.user_key(username), self.key(client_ip))
        if key not in self._logins and len(self._logins) >= self.max_clients:
            horizon = self._clock() - self.user_window
            for old in [k for k, t in self._logins.items() if t <= horizon]:
                del self._logins[old]
            if len(self._logins) >= self.max_clients:
                del self._logins[min(self._logins, key=self._logins.__getitem__)]
        self._logins[key] = at

    def _record(self, table: dict[str, list[float]], key: str, window: float, now: float) -> int:
        times = self._recent(table, key, window, now)
        if not times:
            self._make_room(table, window, now)
            times = table.setdefault(key, [])
        times.append(now)
        return len(times)

    def _make_room(self, table: dict[str, list[float]], window: float, now: float) -> None:
        if len(table) < self.max_clients:
            return
        for key in list(table):
            self._recent(table, key, window, now)
        overflow = len(table) - self.max_clients + 1
        if overflow > 0:
            # Forget the keys whose last failure is oldest.
            stale = sorted(table, key=lambda k: table[k][-1])[:overflow]
            for key in stale:
                del table[key]
