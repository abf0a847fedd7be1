"""The ``hato`` command: serve, send, queue …, config check; other groups live beside it.

Every error a user can cause ends as one line on stderr and a non-zero exit status
(2 for bad settings or usage, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from hato import __version__
from hato.config import Settings, load_settings
from hato.errors import ConfigError, HatoError, MessageNotFound

P = ParamSpec("P")
T = TypeVar("T")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"hato: {message}", err=True)
    sys.exit(code)


def friendly(func: Callable[P, T]) -> Callable[P, T]:
    """Turn Hato's exceptions into one line and an exit status."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), 2)
        except MessageNotFound as exc:
            _fail(f"no such message: {exc.args[0] if exc.args else ''}", 1)
        except HatoError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        raise AssertionError("unreachable")

    return wrapper


def run(coro: Coroutine[Any, Any, T], *, fast: bool = False) -> T:
    """Run a coroutine; with ``fast``, on uvloop when it is installed (the ``fast`` extra)."""
    factory = None
    if fast:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# Options shared by every command that needs settings.
def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML settings file (default: ./hato.toml if present).",
    )(func)
    func = click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="State directory (HATO_DATA_DIR).",
    )(func)
    func = click.option("--queue", "queue_url", help="Queue URL (HATO_QUEUE_URL).")(func)
    return func


def make_settings(config_file: Path | None, **overrides: Any) -> Settings:
    return load_settings(config_file=config_file, **overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hato")
def main() -> None:
    """Hato (鳩): SMTP intake, durable queue and delivery for web services."""


# --- serve ------------------------------------------------------------------------------


@main.command()
@settings_options
@click.option("--listen", multiple=True, help="[ROLE=]HOST:PORT; repeatable (HATO_LISTEN).")
@click.option("--relayhost", help="Upstream relay [host]:port (RELAYHOST).")
@click.option("--route", type=click.Choice(["hold", "relay", "mx"]), help="HATO_ROUTE.")
@click.option("--hostname", help="Our host name (HATO_HOSTNAME).")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="HATO_LOG_FORMAT.")
@friendly
def serve(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    listen: tuple[str, ...],
    relayhost: str | None,
    route: str | None,
    hostname: str | None,
    log_format: str | None,
) -> None:
    """Run the SMTP server and its delivery worker."""
    from hato.app import serve as serve_forever

    settings = make_settings(
        config_file,
        data_dir=data_dir,
        queue_url=queue_url,
        listen=list(listen) or None,
        relay_host=relayhost,
        route=route,
        hostname=hostname,
        log_format=log_format,
    )
    settings.validate_for_serve()
    run(serve_forever(settings), fast=True)


# --- config -----------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("check")
@settings_options
@click.option("--listen", multiple=True, help="[ROLE=]HOST:PORT; repeatable.")
@friendly
def config_check(
    config_file: Path | None, data_dir: Path | None, queue_url: str | None, listen: tuple[str, ...]
) -> None:
    """Validate settings and print the effective role, listeners, networks and route."""
    settings = make_settings(
        config_file, data_dir=data_dir, queue_url=queue_url, listen=list(listen) or None
    )
    try:
        listeners = settings.listeners
    except ValueError as exc:
        raise ConfigError(f"HATO_LISTEN: {exc}") from exc
    settings.validate_for_serve()
    click.echo(f"role:        {settings.role}")
    click.echo(f"hostname:    {settings.hostname}")
    click.echo(f"listeners:   {', '.join(str(item) for item in listeners)}")
    click.echo(f"mynetworks:  {', '.join(settings.effective_mynetworks)}")
    click.echo(f"domains:     {', '.join(settings.domains) or '(none)'}")
    senders = ", ".join(settings.allowed_sender_domains) or (
        "any"
        if settings.allow_empty_sender_domains or all(item.is_loopback for item in listeners)
        else "(none)"
    )
    click.echo(f"senders:     {senders}")
    route = settings.effective_route
    if route == "relay":
        user = settings.effective_relay_username
        auth = f", AUTH as {user}" if user else ""
        verify = "verify" if settings.relay_tls_verify else "no verify"
        click.echo(
            f"route:       relay to {settings.relay_host} (tls {settings.effective_relay_tls}, "
            f"{verify}{auth})"
        )
    else:
        click.echo(f"route:       {route}")
    click.echo(f"queue:       {settings.effective_queue_url}")
    click.echo(f"size limit:  {settings.message_size_limit} bytes")
    click.echo("ok")


# --- queue ------------------------------------------------------------------------------


@main.group()
def queue() -> None:
    """Look at and act on queued messages."""


def _with_queue(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    action: Callable[[Any], Awaitable[T]],
) -> T:
    from hato.app import build_queue

    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)

    async def go() -> T:
        q = build_queue(settings)
        await q.open()
        try:
            return await action(q)
        finally:
            await q.close()

    return run(go())


def _summary(msg: Any) -> dict[str, Any]:
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
    from hato.queue.base import MessageState

    try:
        wanted = [MessageState(s) for s in states] or None
    except ValueError as exc:
        raise ConfigError(f"unknown state: {exc}") from exc

    async def action(q: Any) -> list[Any]:
        result: list[Any] = await q.list(states=wanted, limit=limit)
        return result

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

    async def action(q: Any) -> Any:
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
    from hato.app import build_queue
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
    from hato.queue.base import MessageState

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


def _simple_queue_command(name: str, help_text: str, method: str, done: str) -> None:
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
        async def action(q: Any) -> None:
            for message_id in message_ids:
                await getattr(q, method)(message_id)
                click.echo(f"{message_id}: {done}")

        _with_queue(config_file, data_dir, queue_url, action)


_simple_queue_command(
    "release", "Deliver held messages now (route them as the settings say).", "requeue", "released"
)
_simple_queue_command("retry", "Retry deferred messages now.", "requeue", "due now")
_simple_queue_command("delete", "Delete messages from the queue.", "delete", "deleted")


# --- send -------------------------------------------------------------------------------


@main.command()
@click.option("--server", default="127.0.0.1:2525", show_default=True, help="HOST:PORT.")
@click.option("--from", "sender", required=True, help="Envelope and From: address.")
@click.option("--to", "recipients", multiple=True, required=True, help="Recipient; repeatable.")
@click.option("--header", "headers", multiple=True, help="'Name: value'; repeatable.")
@click.option("--body", default="This is a test mailing from hato send.", help="Body text.")
@click.option("--starttls", is_flag=True, help="Require STARTTLS.")
@click.option("--tls", "implicit_tls", is_flag=True, help="Implicit TLS (port 465).")
@click.option("--auth-user", help="SASL user.")
@click.option(
    "--auth-password", help="SASL password (or HATO_SEND_PASSWORD).", envvar="HATO_SEND_PASSWORD"
)
@click.option("--insecure", is_flag=True, help="Do not verify the server's certificate.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA bundle.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per reply.")
@click.option("-v", "--verbose", is_flag=True, help="Print the SMTP dialog.")
@friendly
def send(
    server: str,
    sender: str,
    recipients: tuple[str, ...],
    headers: tuple[str, ...],
    body: str,
    starttls: bool,
    implicit_tls: bool,
    auth_user: str | None,
    auth_password: str | None,
    insecure: bool,
    ca_file: str | None,
    timeout: float,
    verbose: bool,
) -> None:
    """Send a test message, like swaks."""
    from hato.sendtool import SendOptions, send_test_message

    options = SendOptions(
        server=server,
        sender=sender,
        recipients=list(recipients),
        headers=list(headers),
        body=body,
        starttls=starttls,
        implicit_tls=implicit_tls,
        auth_user=auth_user,
        auth_password=auth_password,
        verify=not insecure,
        ca_file=ca_file,
        timeout=timeout,
    )
    trace = click.echo if verbose else None  # the dialog on stdout, as swaks prints it
    reply = send_test_message(options, trace=trace)
    click.echo(f"sent: {reply}")


# The other command groups register themselves on ``main`` when imported.
from hato.cli import dkim, dns, tls, user, worker  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
