"""``hato user``: the relay server's SASL users (what ``saslpasswd2`` and
``sasldblistusers2`` do in the guide).

Passwords come from a hidden prompt (asked twice) or, with ``--password-stdin``, from the
first line of standard input; never from the command line, where ``ps`` and the shell
history would show them. The file is the one ``hato serve`` reads
(``HATO_USERS_FILE``, default ``HATO_DATA_DIR/users.json``); a running server picks up
changes at the next AUTH.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hato.cli import friendly, main, make_settings
from hato.users import User, UserError, UserStore, check_password


def _store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--users-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="User file (HATO_USERS_FILE; default DATA_DIR/users.json).",
    )(func)
    func = click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="State directory (HATO_DATA_DIR).",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="TOML settings file (default: ./hato.toml if present).",
    )(func)
    return func


def _store(config_file: Path | None, data_dir: Path | None, users_file: Path | None) -> UserStore:
    settings = make_settings(config_file, data_dir=data_dir, users_file=users_file)
    return UserStore(settings.effective_users_file).load()


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return check_password(line.removesuffix("\n").removesuffix("\r"))
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for the password on; use --password-stdin")
    password: str = click.prompt(
        "Password", hide_input=True, confirmation_prompt="Password (again)", err=True
    )
    return check_password(password)


def _grant_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--only",
        "only",
        multiple=True,
        metavar="ADDR|@DOMAIN",
        help="May send only as these (drops the own-domain default); repeatable.",
    )(func)
    func = click.option(
        "--allow",
        "allow",
        multiple=True,
        metavar="ADDR|@DOMAIN",
        help="May also send as this address or any address of @domain; repeatable.",
    )(func)
    return func


def _senders(user: User) -> str:
    return f"sends as {user.describe_senders()}"


@main.group()
def user() -> None:
    """Manage SASL users of the relay server (AUTH on the submission listeners).

    A user NAME@DOMAIN may send as any address of DOMAIN; --allow and --only change that.
    """


@user.command("add")
@_store_options
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@_grant_options
@friendly
def user_add(
    config_file: Path | None,
    data_dir: Path | None,
    users_file: Path | None,
    name: str,
    password_stdin: bool,
    allow: tuple[str, ...],
    only: tuple[str, ...],
) -> None:
    """Add a user (like saslpasswd2 -c)."""
    store = _store(config_file, data_dir, users_file)
    if store.get(name) is not None:
        raise UserError(f"user {name.strip().lower()} exists (use hato user passwd)")
    password = _read_password(password_stdin)
    added = store.add(name, password, allow=[*only, *allow], only=bool(only))
    click.echo(f"user {added.name} added, {_senders(added)} ({store.path})")


@user.command("passwd")
@_store_options
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@friendly
def user_passwd(
    config_file: Path | None,
    data_dir: Path | None,
    users_file: Path | None,
    name: str,
    password_stdin: bool,
) -> None:
    """Change a user's password."""
    store = _store(config_file, data_dir, users_file)
    if store.get(name) is None:
        raise UserError(f"no such user: {name.strip().lower()}")
    changed = store.set_password(name, _read_password(password_stdin))
    click.echo(f"password of {changed.name} changed")


@user.command("senders")
@_store_options
@click.argument("name")
@_grant_options
@click.option("--revoke", multiple=True, metavar="ADDR|@DOMAIN", help="Remove a grant; repeatable.")
@click.option("--reset", is_flag=True, help="Back to the default: the user's own domain.")
@friendly
def user_senders(
    config_file: Path | None,
    data_dir: Path | None,
    users_file: Path | None,
    name: str,
    allow: tuple[str, ...],
    only: tuple[str, ...],
    revoke: tuple[str, ...],
    reset: bool,
) -> None:
    """Show or change the sender addresses a user may use (smtpd_sender_login_maps)."""
    store = _store(config_file, data_dir, users_file)
    found = store.get(name)
    if found is None:
        raise UserError(f"no such user: {name.strip().lower()}")
    if allow or only or revoke or reset:
        found = store.set_senders(name, allow=allow, only=only, revoke=revoke, reset=reset)
    click.echo(f"{found.name} {_senders(found)}")


@user.command("del")
@_store_options
@click.argument("name")
@friendly
def user_del(
    config_file: Path | None, data_dir: Path | None, users_file: Path | None, name: str
) -> None:
    """Delete a user (like saslpasswd2 -d)."""
    store = _store(config_file, data_dir, users_file)
    store.remove(name)
    click.echo(f"user {name.strip().lower()} deleted")


@user.command("list")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@friendly
def user_list(
    config_file: Path | None, data_dir: Path | None, users_file: Path | None, as_json: bool
) -> None:
    """List users and the senders each may use (like sasldblistusers2)."""
    store = _store(config_file, data_dir, users_file)
    users = store.users()
    if as_json:
        rows = [
            {
                "name": u.name,
                "allow": list(u.allow),
                "only": u.only,
                "senders": u.describe_senders(),
            }
            for u in users
        ]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not users:
        click.echo(f"no users in {store.path}")
        return
    width = max(len(u.name) for u in users)
    for u in users:
        click.echo(f"{u.name:<{width}}  {_senders(u)}")
