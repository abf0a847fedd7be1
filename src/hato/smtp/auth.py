"""SASL for the SMTP server: pure PLAIN/LOGIN decoding and the ``Authenticator`` seam.

Decoding never raises: a malformed response gives ``None`` and the state machine answers
``501 5.5.2``. The credential check itself is the :class:`Authenticator` protocol (one
coroutine); the user store of the relay server plugs in there. Passwords are carried in
values whose ``repr`` hides them, so they cannot leak into a log by accident.
"""

from __future__ import annotations

import binascii
import hmac
from collections.abc import Mapping
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
