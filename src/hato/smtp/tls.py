"""Server TLS contexts for the SMTP listeners, reloaded when the certificate files change.

Certificates get renewed (Let's Encrypt every 60-90 days) while ``hato serve`` runs: the
:class:`TLSContextProvider` checks the files' modification times each time a context is
asked for and reloads them, keeping the previous context if the new files do not load
(a half-written renewal must not take TLS down).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from hato.errors import ConfigError


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
    """Hands out the current server context; reloads when the files' mtimes change."""

    def __init__(
        self,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        *,
        context: ssl.SSLContext | None = None,
    ) -> None:
        """Either ``cert_file`` and ``key_file`` (loaded now; :class:`ConfigError` if they
        cannot be), or a ready ``context`` that is never reloaded (tests)."""
        self._cert = Path(cert_file) if cert_file is not None else None
        self._key = Path(key_file) if key_file is not None else None
        if context is not None:
            self._context = context
            self._stamp: tuple[float, float] | None = None
        elif self._cert is not None and self._key is not None:
            self._stamp = self._mtimes()
            self._context = load_server_context(self._cert, self._key)
        else:
            raise ConfigError("TLS needs a certificate file and a key file")
        self.reload_errors = 0

    def _mtimes(self) -> tuple[float, float] | None:
        if self._cert is None or self._key is None:
            return None
        try:
            return (self._cert.stat().st_mtime, self._key.stat().st_mtime)
        except OSError:
            return None

    def context(self) -> ssl.SSLContext:
        """The context to use for the next handshake."""
        if self._cert is not None and self._key is not None:
            stamp = self._mtimes()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._context = load_server_context(self._cert, self._key)
                    self._stamp = stamp
                except ConfigError:
                    self.reload_errors += 1
        return self._context

    def reload(self) -> None:
        """Reload the files now (SIGHUP), whatever their mtimes say; keeps the old
        context if they do not load."""
        if self._cert is None or self._key is None:
            return
        try:
            self._context = load_server_context(self._cert, self._key)
            self._stamp = self._mtimes()
        except ConfigError:
            self.reload_errors += 1

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
