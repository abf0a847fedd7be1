"""``hato dkim``: make DKIM keys, rotate them, and show the DNS records that publish them.

``hato dkim rotate --domain D`` makes the next key (pending), prints its record; the
server signs with it once ``hato dns check D`` (or ``hato serve``'s hourly look) sees it
published, and the key it replaces is retired: still published for a grace period.

Keys are written under HATO_DKIM_DIR (default ``DATA_DIR/dkim``), where ``hato serve``
finds them. The records are printed in zone-file form; the ``;`` comment lines above each
give the name and the value as one string, for a registrar's web form.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import click

from hato.cli import friendly, main, make_settings, settings_options
from hato.dkim import (
    DEFAULT_RSA_BITS,
    GRACE_DAYS,
    RSA_BITS,
    DKIMRecord,
    generate_key,
    key_order,
    key_path,
    load_keys,
    rotate_key,
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
    keys = sorted(load_keys(directory), key=lambda ks: key_order(ks[0]))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "domain": k.domain,
                        "selector": k.selector,
                        "algorithm": k.algorithm.value,
                        "state": st.state.value,
                        "path": str(k.path),
                        "name": k.record.name,
                        "txt": k.record.txt,
                        "zone": k.record.zone_line(),
                    }
                    for k, st in keys
                ],
                indent=2,
            )
        )
        return
    if not keys:
        click.echo(f"no DKIM keys in {directory} (make one with hato dkim keygen)")
        return
    blocks = []
    for k, st in keys:
        note = f"{k.domain} selector {k.selector} ({k.algorithm.value}, {st.state.value}), key {k.path}"
        until = st.remove_after()
        if until is not None:
            day = datetime.datetime.fromtimestamp(until, datetime.UTC)
            note += f"; keep published until at least {day:%Y-%m-%d}"
        blocks.append(_describe(k.record, note))
    click.echo("\n\n".join(blocks))


@dkim.command("rotate")
@settings_options
@_dir_option
@click.option("--domain", required=True, help="The domain whose key to replace.")
@click.option(
    "--algorithm",
    type=click.Choice(["rsa", "ed25519"]),
    default=None,
    help="Rotate only this algorithm's key (default: every algorithm in use).",
)
@click.option("--selector", default=None, help="The new selector (default: date-based).")
@click.option(
    "--bits",
    type=click.Choice([str(b) for b in RSA_BITS]),
    default=None,
    help=f"RSA key size (default {DEFAULT_RSA_BITS}).",
)
@friendly
def rotate(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    dkim_dir: Path | None,
    domain: str,
    algorithm: str | None,
    selector: str | None,
    bits: str | None,
) -> None:
    """Make the next key (pending) and print its record to publish; the server switches
    to it once hato dns check sees it in DNS."""
    directory = _key_dir(config_file, data_dir, queue_url, dkim_dir)
    size = int(bits) if bits else DEFAULT_RSA_BITS
    records = rotate_key(
        directory, domain, now=time.time(), algorithm=algorithm, selector=selector, bits=size
    )
    for record in records:
        click.echo(
            _describe(record, f"new DKIM key {record.selector} for {record.domain} (pending)")
        )
        click.echo()
    name = records[0].domain
    click.echo(
        f"Next: publish the record above, then run: hato dns check {name}\n"
        "Once DNS shows it, the new key signs (hato dns check switches at once; hato serve "
        "looks at start and every hour) and the old key is retired. Keep the old key's "
        f"record published for {GRACE_DAYS} days after that, so mail signed with it still "
        "verifies; then remove the record and the old key file (hato dkim list shows the "
        "dates)."
    )
