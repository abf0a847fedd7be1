"""Server TLS contexts for the SMTP listeners, reloaded when the certificate files change.

Certificates get renewed (Let's Encrypt every 60-90 days) while ``hato serve`` runs: the
:class:`TLSContextProvider` checks the files each time a context is asked for (or at
most every few seconds) and on :meth:`TLSContextProvider.reload` (SIGHUP), keeping the
previous context if the new files do not load (a half-written renewal must not take TLS
down). TLS 1.2 is the minimum.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hato.errors import ConfigError
from hato.message import normalize_domain

_debug = logging.getLogger(__name__)

# Modification time, size and inode of the certificate file, then of the key file.
_Stamp = tuple[int, int, int, int, int, int]


def load_server_context(
    cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A server context with the certificate chain and key; TLS 1.2 at least."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}"
        ) from exc
    return ctx


class TLSContextProvider:
    """Hands out the current server context; reloads when the certificate files change.

    A change is a new modification time, size or inode of either file (Let's Encrypt
    swaps symlinks; ``cp -p`` keeps the mtime but not the inode). The files are looked
    at on each handshake, or at most every ``check_interval`` seconds. A pair that does
    not load is reported once through ``notify`` and not retried until the files change
    again; the previous context stays in use.
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        *,
        context: ssl.SSLContext | None = None,
        check_interval: float = 0.0,
        notify: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Either ``cert_file`` and ``key_file`` (loaded now; :class:`ConfigError` if they
        cannot be), or a ready ``context`` that is never reloaded (tests). ``notify``
        receives one line per reload or failed reload (default: the ``logging`` module)."""
        self._cert = Path(cert_file) if cert_file is not None else None
        self._key = Path(key_file) if key_file is not None else None
        self._check_interval = check_interval
        self._notify = notify if notify is not None else _debug.warning
        self._clock = clock
        self._checked_at = clock()
        self._failed: _Stamp | None = None
        self.reload_errors = 0
        self.reloads = 0
        if context is not None:
            self._context = context
            self._stamp: _Stamp | None = None
        elif self._cert is not None and self._key is not None:
            self._stamp = self._stamps()
            self._context = load_server_context(self._cert, self._key)
        else:
            raise ConfigError("TLS needs a certificate file and a key file")

    def _stamps(self) -> _Stamp | None:
        if self._cert is None or self._key is None:
            return None
        try:
            a, b = self._cert.stat(), self._key.stat()
        except OSError:
            return None
        return (a.st_mtime_ns, a.st_size, a.st_ino, b.st_mtime_ns, b.st_size, b.st_ino)

    def _load(self, stamp: _Stamp | None, *, why: str) -> None:
        assert self._cert is not None and self._key is not None
        try:
            context = load_server_context(self._cert, self._key)
        except ConfigError as exc:
            self.reload_errors += 1
            self._failed = stamp
            self._notify(f"TLS certificate not reloaded ({why}), keeping the previous one: {exc}")
            return
        self._context = context
        self._stamp = stamp
        self._failed = None
        self.reloads += 1
        self._notify(f"TLS certificate reloaded ({why}): {self._cert}")

    def context(self) -> ssl.SSLContext:
        """The context to use for the next handshake."""
        if self._cert is None or self._key is None:
            return self._context
        if self._check_interval > 0:
            now = self._clock()
            if now - self._checked_at < self._check_interval:
                return self._context
            self._checked_at = now
        stamp = self._stamps()
        if stamp is not None and stamp != self._stamp and stamp != self._failed:
            self._load(stamp, why="files changed")
        return self._context

    def reload(self) -> None:
        """Reload the files now (SIGHUP), whatever their stamps say; keeps the old
        context if they do not load."""
        if self._cert is None or self._key is None:
            return
        self._load(self._stamps(), why="on request")

    def listening_context(self) -> ssl.SSLContext:
        """A context for a listener with TLS from the first byte (``submissions``).

        The listening socket keeps one context for its lifetime, so this one switches
        each handshake to the provider's current context from the SNI callback (which
        OpenSSL calls with or without a server name).
        """
        if self._cert is None or self._key is None:
            return self._context
        ctx = load_server_context(self._cert, self._key)

        def swap(sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            current = self.context()
            if current is not sock.context:
                sock.context = current

        ctx.sni_callback = swap
        return ctx


def self_signed_certificate(
    hostnames: Sequence[str], *, days: int, now: datetime.datetime
) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``hostnames`` (the first is the subject;
    IP addresses become IP SANs), valid ``days`` from ``now``: ``(cert_pem, key_pem)``.

    For development only: clients must be told to trust it (``swaks --tls`` does not
    verify; aiosmtplib and Python need it as their CA file).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hostnames:
        raise ConfigError("a self-signed certificate needs at least one host name")
    if days < 1:
        raise ConfigError("a certificate must be valid for at least one day")
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            dns_name = normalize_domain(name)
            if not dns_name.isascii() or not dns_name or dns_name.startswith("["):
                raise ConfigError(f"not a host name: {name!r}") from None
            names.append(x509.DNSName(dns_name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem
