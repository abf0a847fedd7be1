"""``hato dkim``: make DKIM keys and show the DNS records that publish them.

Keys are written under HATO_DKIM_DIR (default ``DATA_DIR/dkim``), where ``hato serve``
finds them. The records are printed in zone-file form; the ``;`` comment lines above each
give the name and the value as one string, for a registrar's web form.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hato.cli import friendly, main, make_settings, settings_options
from hato.dkim import (
    DEFAULT_RSA_BITS,
    RSA_BITS,
    DKIMRecord,
    generate_key,
    key_path,
    load_signers,
)
from hato.errors import ConfigError


def _dir_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--dkim-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Key directory (HATO_DKIM_DIR; default DATA_DIR/dkim).",
    )(func)


def _key_dir(
    config_file: Path | None, data_dir: Path | None, queue_url: str | None, dkim_dir: Path | None
) -> Path:
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url, dkim_dir=dkim_dir)
    return settings.effective_dkim_dir


def _describe(record: DKIMRecord, note: str) -> str:
    return "\n".join(
        [
            f"; {note}",
            f"; name: {record.name}  type: TXT  value (one string):",
            f"; {record.txt}",
            record.zone_line(),
        ]
    )


@main.group()
def dkim() -> None:
    """DKIM keys: make them, list them with their DNS records."""


@dkim.command("keygen")
@settings_options
@_dir_option
@click.option("--domain", required=True, help="The From domain to sign for.")
@click.option(
    "--selector", required=True, help="Selector: the DNS name SELECTOR._domainkey.DOMAIN."
)
@click.option(
    "--algorithm",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="Key type; make one of each (two selectors) to sign with both.",
)
@click.option(
    "--bits",
    type=click.Choice([str(b) for b in RSA_BITS]),
    default=None,
    help=f"RSA key size (default {DEFAULT_RSA_BITS}).",
)
@click.option("--force", is_flag=True, help="Replace an existing key of that selector.")
@friendly
def keygen(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    dkim_dir: Path | None,
    domain: str,
    selector: str,
    algorithm: str,
    bits: str | None,
    force: bool,
) -> None:
    """Write a new key (mode 0600) and print the TXT record to publish."""
    if bits is not None and algorithm != "rsa":
        raise ConfigError("--bits applies to RSA keys only")
    directory = _key_dir(config_file, data_dir, queue_url, dkim_dir)
    size = int(bits) if bits else DEFAULT_RSA_BITS
    record = generate_key(domain, selector, algorithm, directory=directory, bits=size, force=force)
    kind = f"rsa {size}" if algorithm == "rsa" else "ed25519"
    path = key_path(directory, record.domain, record.selector, algorithm)
    click.echo(
        _describe(
            record, f"DKIM key {record.selector} for {record.domain} ({kind}) written to {path}"
        )
    )


@dkim.command("list")
@settings_options
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@friendly
def list_keys(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    dkim_dir: Path | None,
    as_json: bool,
) -> None:
    """Show every key and its TXT record (checks each key as hato serve would)."""
    directory = _key_dir(config_file, data_dir, queue_url, dkim_dir)
    keys = load_signers(directory).keys
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "domain": k.domain,
                        "selector": k.selector,
                        "algorithm": k.algorithm.value,
                        "path": str(k.path),
                        "name": k.record.name,
                        "txt": k.record.txt,
                        "zone": k.record.zone_line(),
                    }
                    for k in keys
                ],
                indent=2,
            )
        )
        return
    if not keys:
        click.echo(f"no DKIM keys in {directory} (make one with hato dkim keygen)")
        return
    blocks = [
        _describe(k.record, f"{k.domain} selector {k.selector} ({k.algorithm.value}), key {k.path}")
        for k in keys
    ]
    click.echo("\n\n".join(blocks))
