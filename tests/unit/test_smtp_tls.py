"""TLS contexts: loading, minimum version, reload on certificate renewal."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme

from hato.errors import ConfigError
from hato.smtp.tls import TLSContextProvider, load_server_context


def write_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(name)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def test_load_server_context(tmp_path: Path) -> None:
    cert_file, key_file = write_cert(trustme.CA(), tmp_path, "mx.test")
    ctx = load_server_context(cert_file, key_file)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        load_server_context(tmp_path / "missing.pem", key_file)
    with pytest.raises(ConfigError):
        TLSContextProvider()


def test_provider_reloads_when_files_change(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = write_cert(ca, tmp_path, "old.test")
    provider = TLSContextProvider(cert_file, key_file)
    first = provider.context()
    assert provider.context() is first
    write_cert(ca, tmp_path, "new.test")
    stamp = first_stamp = os.stat(cert_file).st_mtime + 10
    os.utime(cert_file, (stamp, stamp))
    second = provider.context()
    assert second is not first
    # A broken renewal keeps the old context.
    cert_file.write_text("garbage")
    os.utime(cert_file, (first_stamp + 10, first_stamp + 10))
    assert provider.context() is second
    assert provider.reload_errors == 1


def test_provider_with_fixed_context() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    provider = TLSContextProvider(context=ctx)
    assert provider.context() is ctx
    assert provider.listening_context() is ctx


def test_reload_on_demand(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = write_cert(ca, tmp_path, "a.test")
    provider = TLSContextProvider(cert_file, key_file)
    first = provider.context()
    provider.reload()
    assert provider.context() is not first
    second = provider.context()
    key_file.write_text("garbage")
    provider.reload()
    assert provider.reload_errors == 1
    assert provider.context() is second  # the broken files are never used
