"""The ``hato`` command: ``serve``, ``config check`` and what every command shares.

Each other command or group is a module beside this one (``send``, ``queue``,
``worker``, ``user``, ``dkim``, ``dns``, ``tls``) that registers itself on :func:`main`
when imported. The modules of ``cli/`` parse arguments and print; what a command does
lives in the room it belongs to (:mod:`hato.app` builds, :mod:`hato.records` knows the
DNS records, :mod:`hato.users` the users file, …). ``hato send`` is the exception: a
test client for people, its small smtplib client is part of the command.

Every error a user can cause ends as one line on stderr and a non-zero exit status
(2 for bad settings or usage, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
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


def _say(line: str) -> None:
    click.echo(f"hato: {line}", err=True)


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
    from hato.app import ServeRole, check_serve, recover_queue
    from hato.app import serve as serve_forever
    from hato.supervisor import Supervisor, effective_processes

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
    # What is loaded by now (modules, settings) lives as long as the process: frozen out
    # of the collector's way, a full collection does not walk it (a pause of 30-160 ms
    # on a busy 2-CPU machine, docs/performance.md "Latency"). Before a fork too: the
    # children share those pages instead of copying them on the first collection.
    gc.freeze()
    processes = effective_processes(settings)
    if processes <= 1:
        run(serve_forever(settings), fast=True)
        return
    # What can refuse the settings, and the queue's start-up recovery, run here, once,
    # before the fork (no thread or event loop is left behind: forking stays safe).
    check_serve(settings)
    run(recover_queue(settings, say=_say))

    @friendly
    def child(role: str, sockets: Sequence[socket.socket]) -> None:
        part: ServeRole = "intake" if role == "intake" else "delivery"

        def say(line: str) -> None:
            # "hato: ready" is the supervisor's, said once every child is.
            _say(f"{role} process {os.getpid()} ready" if line == "ready" else line)

        serving = serve_forever(
            settings,
            role=part,
            sockets=sockets,
            shared=supervisor.shared,
            auth_share=supervisor.auth_share,
            reports=supervisor.reports,
            ready=lambda _bound: supervisor.child_ready(),
            say=say,
            committer_socket=supervisor.committer_socket if part == "delivery" else None,
            committer_address=supervisor.committer_address if part == "intake" else None,
        )
        run(serving, fast=True)

    supervisor = Supervisor(settings, processes, child, say=_say)
    status = supervisor.run()
    if status:
        sys.exit(status)


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
    relay = settings.relay
    if relay is not None:
        # Reads the secret files, as hato serve would at start: "would it start?"
        click.echo(f"route:       relay to {settings.relay_host} ({relay.resolve().describe()})")
    else:
        click.echo(f"route:       {settings.effective_route}")
    click.echo(f"queue:       {settings.effective_queue_url}")
    click.echo(f"size limit:  {settings.message_size_limit} bytes")
    click.echo("ok")


# The other command groups register themselves on ``main`` when imported.
from hato.cli import dkim, dns, events, health, queue, send, tls, user, worker  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
