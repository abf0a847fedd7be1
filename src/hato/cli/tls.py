"""``hato tls``: certificates for the SMTP listeners (a self-signed one for development).

In production the listeners use the Let's Encrypt files (``fullchain.pem``,
``privkey.pem``) named by ``HATO_TLS_CERT_FILE`` and ``HATO_TLS_KEY_FILE``; ``hato tls
self-signed`` writes files of the same layout so that development looks the same.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from pathlib import Path

import click

from hato.cli import friendly, main, make_settings
from hato.errors import ConfigError
from hato.smtp.tls import self_signed_certificate


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from the first byte."""
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = ""
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@main.group()
def tls() -> None:
    """TLS certificates for the SMTP listeners."""


@tls.command("self-signed")
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    required=True,
    help="Name (or IP) the certificate is for; repeatable, the first is the subject.",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to write fullchain.pem and privkey.pem (default DATA_DIR/tls).",
)
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
@click.option("--force", is_flag=True, help="Replace existing files.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="State directory (HATO_DATA_DIR).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML settings file (default: ./hato.toml if present).",
)
@friendly
def self_signed(
    hostnames: tuple[str, ...],
    out_dir: Path | None,
    days: int,
    force: bool,
    data_dir: Path | None,
    config_file: Path | None,
) -> None:
    """Write a self-signed certificate and key for development (not for real mail:
    other servers and clients will not trust it)."""
    if out_dir is None:
        out_dir = make_settings(config_file, data_dir=data_dir).data_dir / "tls"
    out_dir = out_dir.absolute()
    cert_file, key_file = out_dir / "fullchain.pem", out_dir / "privkey.pem"
    if not force:
        for path in (cert_file, key_file):
            if path.exists():
                raise ConfigError(f"{path} exists; use --force to replace it")
    cert_pem, key_pem = self_signed_certificate(
        list(hostnames), days=days, now=datetime.datetime.now(datetime.UTC)
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create {out_dir}: {exc.strerror}") from exc
    # The key first: a reloading server must never see a new certificate with the old key
    # for longer than it takes to write the second file.
    _write(key_file, key_pem, 0o600)
    _write(cert_file, cert_pem, 0o644)
    click.echo(f"hato: self-signed certificate for {', '.join(hostnames)}, {days} days", err=True)
    click.echo(f"HATO_TLS_CERT_FILE={cert_file}")
    click.echo(f"HATO_TLS_KEY_FILE={key_file}")
