"""``hato events``: the delivery events of this node's queue, as text or JSON lines.

It reads the queue of the settings (``HATO_QUEUE_URL``), so it sees what ``hato serve``
or ``hato worker`` records, also while they run. ``--envid`` and ``--since`` (ISO 8601,
or a duration back from now such as ``2h``, ``30m``, ``1d``) filter; ``--follow`` keeps
printing new events as they are stored, until interrupted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from hato.app import build_queue
from hato.cli import friendly, main, make_settings, run, settings_options
from hato.errors import ConfigError
from hato.event_reader import follow, read_all
from hato.events import DeliveryEvent, describe, parse_since


def _line(event: DeliveryEvent, as_json: bool) -> str:
    if as_json:
        return json.dumps(event.to_json(), ensure_ascii=False)
    return describe(event)


@main.command("events")
@settings_options
@click.option("--follow", "following", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--envid", help="Only the events of this envelope id (ENVID).")
@click.option("--since", help="Only events from this time: ISO 8601, or a duration (2h, 30m).")
@friendly
def events_command(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    following: bool,
    as_json: bool,
    envid: str | None,
    since: str | None,
) -> None:
    """Print the delivery events of the queue."""
    try:
        start = parse_since(since, time.time()) if since else None
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)

    async def go() -> None:
        queue = build_queue(settings)
        await queue.open()
        try:
            if following:
                async for event, _ in follow(queue, envid=envid, since=start):
                    click.echo(_line(event, as_json))
            else:
                page = await read_all(queue, envid=envid, since=start)
                for event in page.events:
                    click.echo(_line(event, as_json))
        finally:
            await queue.close()

    run(go())
