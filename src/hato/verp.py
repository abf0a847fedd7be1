"""VERP return paths: ``local+<queue id>.<signature>@domain``, signed so forged bounces miss.

With ``HATO_VERP=true`` a message from one of our own domains leaves with the envelope
sender ``local+<token>@domain`` instead of ``local@domain``. A bounce comes back to that
address even from an upstream that drops RFC 3461's ENVID or returns no DSN at all, and
the token names the queue id of the message it is about. The token is the queue id in
lower case, a dot and 16 hex digits of HMAC-SHA256 over the plain sender and the id,
under a secret of this node: a token with a wrong signature (forged, or made by another
node) matches nothing. The secret is ``HATO_VERP_SECRET`` or, without it, a random one
kept in ``DATA_DIR/verp.key`` (made on first use).

The local part stays within RFC 5321's 64 octets: a sender whose local part is too long
for the token keeps its plain address. Everything here is pure but :func:`load_secret`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from hato.message import MAX_LOCAL_PART, normalize_domain

DELIMITER = "+"
MAC_DIGITS = 16
_TOKEN_RE = re.compile(rf"^(?P<id>[0-9a-z]{{8,40}})\.(?P<mac>[0-9a-f]{{{MAC_DIGITS}}})$")


def split_token(address: str) -> tuple[str, str] | None:
    """``("local@domain", "token")`` for an address of VERP form, else ``None``. The
    token is not checked here, only its shape."""
    local, at, domain = address.rpartition("@")
    if not at:
        return None
    base, plus, token = local.rpartition(DELIMITER)
    if not plus or not base or _TOKEN_RE.match(token.lower()) is None:
        return None
    return f"{base}@{domain}", token.lower()


class Verp:
    """Makes and checks VERP return paths for the senders of ``domains``."""

    def __init__(self, secret: bytes, domains: Iterable[str]) -> None:
        if len(secret) < 16:
            raise ValueError("a VERP secret needs at least 16 bytes")
        self._secret = secret
        self.domains = frozenset(normalize_domain(d) for d in domains if d.strip())

    def _mac(self, sender: str, queue_id: str) -> str:
        text = f"{sender.lower()}\0{queue_id.lower()}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()[:MAC_DIGITS]

    def _ours(self, sender: str) -> bool:
        domain = sender.rpartition("@")[2]
        return bool(domain) and normalize_domain(domain) in self.domains

    def return_path(self, sender: str, queue_id: str) -> str:
        """The envelope sender to use for ``queue_id``'s message from ``sender``: the VERP
        form for a sender of our own domains, ``sender`` itself otherwise (the null
        sender, a foreign domain, a local part too long for the token)."""
        if not sender or not queue_id or not self._ours(sender):
            return sender
        local, _, domain = sender.rpartition("@")
        token = f"{queue_id.lower()}.{self._mac(sender, queue_id)}"
        if _TOKEN_RE.match(token) is None:
            return sender
        verp_local = f"{local}{DELIMITER}{token}"
        if len(verp_local.encode()) > MAX_LOCAL_PART:
            return sender
        return f"{verp_local}@{domain}"

    def queue_id(self, address: str) -> str | None:
        """The queue id (lower case) a VERP ``address`` names when its signature is ours;
        ``None`` for any other address, a forged token included."""
        split = split_token(address)
        if split is None or not self._ours(split[0]):
            return None
        base, token = split
        queue_id, _, mac = token.partition(".")
        if not hmac.compare_digest(mac, self._mac(base, queue_id)):
            return None
        return queue_id

    def is_signed(self, address: str) -> bool:
        return self.queue_id(address) is not None


def load_secret(path: Path) -> bytes:
    """The node's VERP secret from ``path``, made (32 random bytes, hex, mode 0600) when
    the file does not exist yet."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = secrets.token_hex(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return path.read_text(encoding="ascii").strip().encode()
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    return text.encode()
