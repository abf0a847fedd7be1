"""``hato queue``: look at queued messages, act on them, and create the queue's schema.

Every command opens the queue of the settings (``HATO_QUEUE_URL``, default the SQLite
file under ``HATO_DATA_DIR``), so it sees what ``hato serve`` or ``hato worker`` sees,
also while they run. ``list`` and ``show`` print text, or JSON with ``--json``;
``release``, ``retry`` and ``delete`` take ids and print one line per id, or act on every
message a filter matches (``--all``, ``--sender``, ``--recipient``, ``--domain``,
``--older-than``; ``--dry-run`` counts them), with a progress bar on a terminal; ``check``
proves an SQLite spool readable (``--repair`` copies what is readable to a new file);
``init`` creates or upgrades the schema (``hato worker``'s outbox needs it on PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hato.app import build_queue
from hato.cli import friendly, main, make_settings, run, settings_options
from hato.config import parse_duration
from hato.errors import ConfigError, QueueError
from hato.events import DeliveryEvent
from hato.message import META_ENVID
from hato.queue import redact_url
from hato.queue.base import MessageState, Queue, StoredMessage
from hato.queue.select import (
    Action,
    BulkResult,
    MessageFilter,
    Progress,
    act,
    bulk,
    summary,
)

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


_summary = summary


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
    """Show one message: envelope, per-recipient state (with the last attempt's TLS),
    headers and body."""

    async def action(q: Queue) -> tuple[StoredMessage, dict[str, DeliveryEvent]]:
        m = await q.get(message_id)
        try:
            return m, await _last_attempts(q, message_id)
        except QueueError:  # the events are extra: the message is shown without them
            return m, {}

    m, last = _with_queue(config_file, data_dir, queue_url, action)
    text = m.data.decode("utf-8", "replace")
    if as_json:
        summary = _summary(m)
        for status in summary["recipient_status"]:
            event = last.get(status["address"])
            if event is not None:
                status.update(
                    tls_version=event.tls_version,
                    tls_verified=event.tls_verified,
                    tls_policy=event.tls_policy,
                )
        click.echo(json.dumps({**summary, "message": text}, indent=2, ensure_ascii=False))
        return
    click.echo(f"id:       {m.id}")
    click.echo(f"state:    {m.state}")
    click.echo(f"from:     <{m.sender}>")
    if m.meta.get(META_ENVID):
        click.echo(f"envid:    {_printable(m.meta[META_ENVID])}")
    for r in m.recipients:
        reply = f" ({r.reply})" if r.reply else ""
        click.echo(f"to:       <{r.address}> {r.state}{reply}")
        event = last.get(r.address)
        if event is not None:
            verified = "yes" if event.tls_verified else "no"
            click.echo(
                f"          tls={event.tls_version or 'none'} verified={verified} "
                f"policy={event.tls_policy or 'none'}"
            )
    click.echo(f"attempts: {m.attempts}")
    click.echo("")
    click.echo(text.replace("\r\n", "\n"), nl=False)


async def _last_attempts(q: Queue, message_id: str) -> dict[str, DeliveryEvent]:
    """Each recipient's last delivery attempt that reached a next hop or made a TLS
    decision (from the queue's delivery events; bounded)."""
    last: dict[str, DeliveryEvent] = {}
    cursor = ""
    for _page in range(100):
        page = await q.events(after=cursor, queue_id=message_id, limit=500)
        for event in page.events:
            if event.relay_host or event.tls_policy:
                last[event.recipient] = event
        if not page.events or page.cursor == cursor:
            break
        cursor = page.cursor
    return last


def _printable(text: str) -> str:
    """A value from a damaged record, with control characters shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Progress:
    """A progress line on stderr, on a terminal only (big queues take a while)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        of = f"/{total}" if total >= done else ""
        click.echo(f"\r{self.what}: {done}{of} rows", err=True, nl=False)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            click.echo("", err=True)


def _progress(what: str) -> _Progress | None:
    return _Progress(what) if sys.stderr.isatty() else None


@queue.command("check")
@settings_options
@click.option(
    "--repair",
    is_flag=True,
    help="Copy the readable rows to a new file and swap it in (the old file is kept).",
)
@friendly
def queue_check(
    config_file: Path | None, data_dir: Path | None, queue_url: str | None, repair: bool
) -> None:
    """Check the SQLite queue file: pages, indexes and every row. Exit status 0 when it is
    healthy (or was repaired), 1 otherwise. --repair needs every hato using it stopped."""
    from hato.queue.sqlite import SQLiteQueue
    from hato.queue.sqlite_check import check
    from hato.queue.sqlite_check import repair as repair_file

    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)
    q = build_queue(settings)
    if not isinstance(q, SQLiteQueue):
        raise ConfigError(
            "hato queue check reads SQLite queue files; PostgreSQL and Redis queues"
            " quarantine unreadable records themselves (at start-up and when they meet one)"
        )
    progress = _progress("checking")
    report = check(q.path, progress=progress)
    if progress is not None:
        progress.end()
    _show_check(report)
    if not repair:
        click.echo("healthy" if report.healthy else "damaged: run hato queue check --repair")
        sys.exit(0 if report.healthy else 1)
    if report.healthy and not report.leaked_pages:
        click.echo("healthy: nothing to repair")
        return
    progress = _progress("copying")
    done = repair_file(q.path, progress=progress)
    if progress is not None:
        progress.end()
    if done.finished_earlier:
        click.echo("finished an interrupted repair")
    else:
        quarantined = f" ({len(done.quarantined)} quarantined now)" if done.quarantined else ""
        click.echo(f"repaired:    copied {done.copied} row(s){quarantined}, {len(done.lost)} lost")
        for seq, why in done.lost[:20]:
            click.echo(f"  lost #{seq}: {_printable(why)}")
    click.echo(f"kept:        {done.kept_as} (the damaged file, as it was)")
    after = check(q.path)
    click.echo("healthy" if after.healthy else "still damaged: see above")
    sys.exit(0 if after.healthy else 1)


def _show_check(report: Any) -> None:
    click.echo(f"queue:       {report.path}")
    if report.problems:
        click.echo(f"integrity:   {len(report.problems)} problem(s)")
        for problem in report.problems[:20]:
            click.echo(f"  {_printable(problem)}")
    else:
        click.echo("integrity:   ok")
    if report.leaked_pages:
        click.echo(f"unused pages: {report.leaked_pages} (--repair gives them back)")
    counts = report.counts
    order = [s.value for s in MessageState]
    parts = [f"{s} {counts[s]}" for s in order if counts.get(s)]
    click.echo(f"messages:    {sum(counts.values())}" + (f" ({', '.join(parts)})" if parts else ""))
    unreadable = [*report.unreadable, *((f"#{seq}", why) for seq, why in report.lost)]
    click.echo(f"unreadable:  {len(unreadable)}")
    for message_id, why in unreadable[:20]:
        click.echo(f"  {_printable(message_id)}: {_printable(why)}")
    if len(unreadable) > 20:
        click.echo(f"  ... and {len(unreadable) - 20} more")


def _bulk_queue_command(name: Action, help_text: str, done: str) -> None:
    @queue.command(name, help=help_text)
    @settings_options
    @click.argument("message_ids", nargs=-1)
    @click.option("--all", "every", is_flag=True, help="Every message the action applies to.")
    @click.option("--sender", default="", help="Only messages from this envelope sender.")
    @click.option("--recipient", default="", help="Only messages to this recipient.")
    @click.option("--domain", default="", help="Only messages to a recipient at this domain.")
    @click.option(
        "--older-than", default=None, help="Only messages queued at least this long ago (5m, 2h)."
    )
    @click.option("--dry-run", is_flag=True, help="Only count the messages that would be touched.")
    @friendly
    def command(
        config_file: Path | None,
        data_dir: Path | None,
        queue_url: str | None,
        message_ids: tuple[str, ...],
        every: bool,
        sender: str,
        recipient: str,
        domain: str,
        older_than: str | None,
        dry_run: bool,
    ) -> None:
        by_filter = every or sender or recipient or domain or older_than is not None
        if message_ids and by_filter:
            raise ConfigError("give message ids or a filter (--all, --sender, ...), not both")
        if not message_ids and not by_filter:
            raise ConfigError(f"name messages: hato queue {name} ID... or --all or a filter")
        if message_ids:
            if dry_run:
                raise ConfigError("--dry-run goes with a filter (--all, --sender, ...)")
            _act_on_ids(config_file, data_dir, queue_url, name, message_ids, done)
            return
        try:
            seconds = parse_duration(older_than) if older_than is not None else None
        except ValueError as exc:
            raise ConfigError(f"--older-than: {exc}") from exc
        message_filter = MessageFilter.parse(
            {"sender": sender, "recipient": recipient, "domain": domain, "older_than": seconds}
        )
        settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)

        async def action(q: Queue) -> BulkResult:
            with _BulkProgress(name) as progress:
                return await bulk(
                    q,
                    name,
                    message_filter,
                    dry_run=dry_run,
                    node=settings.hostname,
                    progress=progress,
                )

        result = _with_queue(config_file, data_dir, queue_url, action)
        if dry_run:
            click.echo(f"would {name} {result.matched} message(s)")
        else:
            click.echo(f"{name}: {result.done} of {result.matched} message(s) {done}")


def _act_on_ids(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    name: Action,
    message_ids: tuple[str, ...],
    done: str,
) -> None:
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)

    async def action(q: Queue) -> None:
        for message_id in message_ids:
            message = await q.get(message_id)
            await act(q, name, message, node=settings.hostname)
            click.echo(f"{message_id}: {done}")

    _with_queue(config_file, data_dir, queue_url, action)


class _BulkProgress:
    """A rich progress bar on stderr while a bulk action runs, on a terminal only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> Progress | None:
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import Progress as Bar

        self.bar = Bar(console=Console(stderr=True), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.name, total=None)
        return self.update

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


_bulk_queue_command(
    "release",
    "Deliver held messages now (route them as the settings say): by id, or every held"
    " message a filter matches.",
    "released",
)
_bulk_queue_command(
    "retry",
    "Retry deferred messages now: by id, or every queued or deferred message a filter matches.",
    "due now",
)
_bulk_queue_command(
    "delete",
    "Delete messages from the queue: by id, or every message a filter matches (except"
    " those being delivered).",
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
