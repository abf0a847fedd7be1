"""``hato worker``: the application's mail worker, which delivers the outbox over SMTP.

``hato worker`` is the guide's ``mailworker`` service: it claims due messages from the
outbox (``HATO_QUEUE_URL``) under a lease (``HATO_LEASE_SECONDS``) and delivers every one
of them through one SMTP server, ``HATO_SMTP_HOST``:``HATO_SMTP_PORT`` (the local relay,
``hato serve``, or an SMTP service, with ``HATO_SMTP_TLS``/``HATO_SMTP_USERNAME``/
``HATO_SMTP_PASSWORD``), over a pool of reused connections, ``HATO_WORKER_CONCURRENCY``
messages at a time. Temporary failures are retried on the shared schedule
(``HATO_RETRY_*``); a permanent one, or running out of ``HATO_MAX_QUEUE_LIFETIME``,
leaves the message ``failed`` with the reply. No bounce (DSN) is sent by default: an
outbox's sender is a ``noreply@`` address, and the app reads failures with
``Mailer.status``; ``--bounces`` turns DSNs to the envelope sender on.

SIGTERM or SIGINT: no more claims, deliveries in flight finish (or are released for
another worker after ten seconds), exit 0. SIGKILL loses nothing either: the leases run
out and another worker (or this one, restarted) delivers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from hato.app import work
from hato.cli import friendly, main, make_settings, run, settings_options


@main.command("worker")
@settings_options
@click.option("--smtp-host", help="Where to deliver (HATO_SMTP_HOST).")
@click.option("--smtp-port", type=int, help="Its port (HATO_SMTP_PORT).")
@click.option("--concurrency", type=int, help="Messages at once (HATO_WORKER_CONCURRENCY).")
@click.option("--lease-seconds", help="Claim lease (HATO_LEASE_SECONDS).")
@click.option(
    "--bounces/--no-bounces",
    default=False,
    show_default=True,
    help="Send a DSN to the envelope sender when a message fails.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="HATO_LOG_FORMAT.")
@friendly
def worker_command(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    smtp_host: str | None,
    smtp_port: int | None,
    concurrency: int | None,
    lease_seconds: str | None,
    bounces: bool,
    log_format: str | None,
) -> None:
    """Deliver the application's outbox through HATO_SMTP_HOST:HATO_SMTP_PORT."""
    # Driver warnings (a database restarting, connections replaced) as stderr lines that
    # say where they come from; the operator log has the delivery events.
    logging.basicConfig(level=logging.WARNING, format="hato: %(name)s: %(message)s")
    settings = make_settings(
        config_file,
        data_dir=data_dir,
        queue_url=queue_url,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        worker_concurrency=concurrency,
        lease_seconds=lease_seconds,
        log_format=log_format,
    )
    run(work(settings, bounces=bounces), fast=True)
