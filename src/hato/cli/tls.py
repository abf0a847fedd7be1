"""``hato tls``: certificates for the SMTP listeners (a self-signed one for development),
and TLS-RPT (RFC 8460) reports.

``hato tls report [--date D] [--send]`` shows (or sends now) the aggregate reports of a
day's deliveries; ``hato serve`` sends them by itself once a day. ``hato tls reports``
lists the reports other servers sent to our own ``rua`` address (read from its Maildir,
or from files given with ``--import``).

In production the listeners use the Let's Encrypt files (``fullchain.pem``,
``privkey.pem``) named by ``HATO_TLS_CERT_FILE`` and ``HATO_TLS_KEY_FILE``; ``hato tls
self-signed`` writes files of the same layout so that development looks the same.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from pathlib import Path

import click

from hato.cli import friendly, main, make_settings, run, settings_options
from hato.errors import ConfigError
from hato.smtp.tls import self_signed_certificate
from hato.tlsrpt import build_report, import_reports, summarize


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
    """TLS certificates for the SMTP listeners; TLS-RPT reports."""


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


def _day(value: str | None) -> datetime.date:
    if value is None:
        return datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--date {value!r} is not a date (YYYY-MM-DD)") from None


@tls.command("report")
@settings_options
@click.option("--date", "date", help="The UTC day (YYYY-MM-DD); default yesterday.")
@click.option("--send", is_flag=True, help="Send the reports now (mail and HTTPS).")
@click.option("--force", is_flag=True, help="With --send: send again a day already sent.")
@friendly
def report(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    date: str | None,
    send: bool,
    force: bool,
) -> None:
    """Show (or --send) the TLS-RPT reports of a day's deliveries, one per recipient
    domain; without --send, the JSON each would carry."""
    from hato.app import (
        build_queue,
        build_report_config,
        build_tlsrpt_store,
        send_tls_reports,
    )

    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)
    day = _day(date)
    store = build_tlsrpt_store(settings)
    try:
        if not send:
            config = build_report_config(settings)
            reports = [
                build_report(
                    domain=domain,
                    day=day,
                    rows=store.rows(day, domain),
                    organization=config.organization,
                    contact=config.contact,
                    report_id=f"(assigned when sent) {day.isoformat()} {domain}",
                )
                for domain in store.domains(day)
            ]
            click.echo(json.dumps(reports, indent=2))
            return
        queue = build_queue(settings)

        async def go() -> list[str]:
            await queue.open()
            try:
                outcomes = await send_tls_reports(settings, queue, store, day=day, force=force)
            finally:
                await queue.close()
            return [f"{o.domain} {o.day.isoformat()}: {o.status} {o.detail}" for o in outcomes]

        lines = run(go())
        for line in lines:
            click.echo(line)
        if not lines:
            click.echo(f"no TLS-RPT report due for {day.isoformat()}")
        if any(": failed " in line for line in lines):
            raise SystemExit(1)
    finally:
        store.close()


@tls.command("reports")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option(
    "--import",
    "files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Read a report from a file (message, .json or .json.gz); repeatable.",
)
@friendly
def reports(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    as_json: bool,
    files: tuple[Path, ...],
) -> None:
    """List the TLS-RPT reports other servers sent about our domains: per reporting
    organization and date range, each policy's successful and failed sessions and the
    failure details. New reports in the Maildir of our rua address are read first."""
    from hato.app import build_tlsrpt_store, import_tls_reports

    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)
    store = build_tlsrpt_store(settings)
    try:
        _added, skipped = import_tls_reports(settings, store)
        if files:
            outcome = import_reports(store, files)
            skipped += outcome.skipped
        for line in skipped:
            click.echo(f"hato: skipped {line}", err=True)
        summaries = [s for r in store.received() for s in summarize(r)]
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in summaries], indent=2))
        return
    if not summaries:
        click.echo("no TLS-RPT reports received")
        return
    for s in summaries:
        line = (
            f"{s.organization}  {s.start} .. {s.end}  {s.policy_type} {s.policy_domain}: "
            f"{s.successful} successful, {s.failed} failed  (report {s.report_id})"
        )
        click.echo(_printable(line))
        for detail in s.failure_details:
            where = detail.get("receiving-mx-hostname") or detail.get("receiving-ip") or ""
            line = (
                f"    {detail.get('failed-session-count', 0)} x {detail.get('result-type', '?')}"
                + (f" at {where}" if where else "")
                + (f" from {detail['sending-mta-ip']}" if detail.get("sending-mta-ip") else "")
            )
            click.echo(_printable(line))


def _printable(text: str) -> str:
    """A report is other people's text: no control characters reach the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)
