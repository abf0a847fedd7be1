"""``hato queue``: look at queued messages, act on them, and create the queue's schema.

Every command opens the queue of the settings (``HATO_QUEUE_URL``, default the SQLite
file under ``HATO_DATA_DIR``), so it sees what ``hato serve`` or ``hato worker`` sees,
also while they run. ``list`` and ``show`` print text, or JSON with ``--json``;
``release``, ``retry`` and ``delete`` take ids and print one line per id; ``init``
creates or upgrades the schema (``hato worker``'s outbox needs it on PostgreSQL).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hato.app import build_queue
from hato.cli import friendly, main, make_settings, run, settings_options
from hato.errors import ConfigError
from hato.queue import redact_url
from hato.queue.base import MessageState, Queue, StoredMessage

T = TypeVar("T")


@main.group()
def queue() -> None:
    """Look at and act on queued messages."""


def _with_queue(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    action: Callable[[Queue], Awaitable[T]],
) -> T:
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)

    async def go() -> T:
        q = build_queue(settings)
        await q.open()
        try:
            return await action(q)
        finally:
            await q.close()

    return run(go())


def _summary(msg: StoredMessage) -> dict[str, Any]:
    return {
        "id": msg.id,
        "sender": msg.sender,
        "recipients": [r.address for r in msg.recipients],
        "state": str(msg.state),
        # Backends may list without the bytes; then the size is unknown here.
        "size": msg.size if msg.data else None,
        "created_at": msg.created_at,
        "next_attempt_at": msg.next_attempt_at,
        "attempts": msg.attempts,
        "last_reply": msg.last_reply,
        "recipient_status": [
            {"address": r.address, "state": str(r.state), "reply": r.reply, "relay": r.relay}
            for r in msg.recipients
        ],
    }


@queue.command("list")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--state", "states", multiple=True, help="Only these states; repeatable.")
@click.option("--limit", default=1000, show_default=True, help="At most this many.")
@friendly
def queue_list(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    as_json: bool,
    states: tuple[str, ...],
    limit: int,
) -> None:
    """List messages, newest first."""
    try:
        wanted = [MessageState(s) for s in states] or None
    except ValueError as exc:
        raise ConfigError(f"unknown state: {exc}") from exc

    async def action(q: Queue) -> list[StoredMessage]:
        return await q.list(states=wanted, limit=limit)

    messages = _with_queue(config_file, data_dir, queue_url, action)
    if as_json:
        click.echo(json.dumps([_summary(m) for m in messages], indent=2, ensure_ascii=False))
        return
    if not messages:
        click.echo("queue is empty")
        return
    for m in messages:
        rcpts = ", ".join(r.address for r in m.recipients)
        size = str(m.size) if m.data else "-"
        click.echo(f"{m.id}  {m.state!s:9} {size:>8}  <{m.sender}> -> {rcpts}")
        if m.last_reply:
            click.echo(f"{'':18}({m.last_reply})")


@queue.command("show")
@settings_options
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (message as text).")
@friendly
def queue_show(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    message_id: str,
    as_json: bool,
) -> None:
    """Show one message: envelope, per-recipient state, headers and body."""

    async def action(q: Queue) -> StoredMessage:
        return await q.get(message_id)

    m = _with_queue(config_file, data_dir, queue_url, action)
    text = m.data.decode("utf-8", "replace")
    if as_json:
        click.echo(json.dumps({**_summary(m), "message": text}, indent=2, ensure_ascii=False))
        return
    click.echo(f"id:       {m.id}")
    click.echo(f"state:    {m.state}")
    click.echo(f"from:     <{m.sender}>")
    for r in m.recipients:
        reply = f" ({r.reply})" if r.reply else ""
        click.echo(f"to:       <{r.address}> {r.state}{reply}")
    click.echo(f"attempts: {m.attempts}")
    click.echo("")
    click.echo(text.replace("\r\n", "\n"), nl=False)


def _simple_queue_command(
    name: str, help_text: str, act: Callable[[Queue, str], Awaitable[None]], done: str
) -> None:
    @queue.command(name, help=help_text)
    @settings_options
    @click.argument("message_ids", nargs=-1, required=True)
    @friendly
    def command(
        config_file: Path | None,
        data_dir: Path | None,
        queue_url: str | None,
        message_ids: tuple[str, ...],
    ) -> None:
        async def action(q: Queue) -> None:
            for message_id in message_ids:
                await act(q, message_id)
                click.echo(f"{message_id}: {done}")

        _with_queue(config_file, data_dir, queue_url, action)


_simple_queue_command(
    "release",
    "Deliver held messages now (route them as the settings say).",
    lambda q, message_id: q.requeue(message_id),
    "released",
)
_simple_queue_command(
    "retry", "Retry deferred messages now.", lambda q, message_id: q.requeue(message_id), "due now"
)
_simple_queue_command(
    "delete",
    "Delete messages from the queue.",
    lambda q, message_id: q.delete(message_id),
    "deleted",
)


@queue.command("init")
@settings_options
@friendly
def queue_init(config_file: Path | None, data_dir: Path | None, queue_url: str | None) -> None:
    """Create or upgrade the queue's schema (PostgreSQL tables, SQLite file)."""
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)
    # The pool logs each failed connection attempt; the one error below says it all.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

    async def init() -> int | None:
        q = build_queue(settings)
        await q.open()  # every backend creates or upgrades its schema here
        try:
            # Only PostgreSQL keeps a schema version; the other backends have none to report.
            migrate = getattr(q, "migrate", None)
            return int(await migrate()) if migrate is not None else None
        finally:
            await q.close()

    version = run(init())
    suffix = f" (schema version {version})" if version is not None else ""
    click.echo(f"queue ready: {redact_url(settings.effective_queue_url)}{suffix}")
