"""Mail for our own domains at intake: one domain form (IDNA 2008) through config, users,
policy, router and local recipients; the RCPT check answers from memory; the users file
watcher."""

from __future__ import annotations

import asyncio
import builtins
import io
import os
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from hato import reply
from hato.app import (
    build_local_recipients,
    build_policy,
    build_session_config,
    build_users,
    build_verp,
)
from hato.config import Settings, load_settings
from hato.delivery.router import RouteKind, Router
from hato.smtp.policy import ListenerRole, Policy
from hato.smtp.protocol import Send, ServerSession
from hato.users import UserStore, UserWatcher
from peers.asyncsinks import wait_until

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
OUTSIDER_IP = "192.0.2.1"  # not in the default trusted networks


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HATO_DOMAINS", "HATO_MYNETWORKS", "MYNETWORKS", "POSTFIX_mynetworks"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HATO_USERS_FILE", "HATO_ALIASES_FILE", "HATO_DATA_DIR", "HATO_ROUTE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray hato.toml or .env


def intake(settings: Settings, *users: str) -> tuple[Policy, Router]:
    """The RCPT check and the router as ``hato serve`` builds them, with these users."""
    store = UserStore(settings.effective_users_file, hasher=CHEAP)
    for name in users:
        store.add(name, "pw")
    loaded = build_users(settings)
    recipients = build_local_recipients(settings, loaded)
    policy = build_policy(settings, ListenerRole.SMTP, loaded, recipients)
    return policy, Router(settings.domains, settings.effective_route)


# --- one domain form ---------------------------------------------------------------


def test_an_idn_domain_is_one_domain_in_config_users_policy_and_router(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HATO_DOMAINS", "bücher.example")
    settings = load_settings(data_dir=tmp_path)
    assert settings.domains == ["xn--bcher-kva.example"]
    policy, router = intake(settings, "x@BÜCHER.example")  # hato user add, in either form
    outsider = policy.facts(OUTSIDER_IP)
    for address in ("x@xn--bcher-kva.example", "x@BÜCHER.example", "x@bücher.example"):
        assert isinstance(policy.check_recipient(outsider, address, smtputf8=True), str), address
        assert router.route(address) is RouteKind.LOCAL, address
    # Ours, so an unknown name is unknown (not "relay denied"), in either form.
    for address in ("y@xn--bcher-kva.example", "y@BÜCHER.example"):
        assert policy.check_recipient(outsider, address, smtputf8=True) == reply.NO_SUCH_USER
    assert policy.check_recipient(outsider, "x@bucher.example", smtputf8=True) == (
        reply.RELAY_DENIED
    )
    # The user owns its domain's addresses in either form.
    user = policy.facts(OUTSIDER_IP, tls=True)
    user.user = "x@xn--bcher-kva.example"
    for sender in ("noreply@bücher.example", "noreply@xn--bcher-kva.example"):
        assert policy.check_sender(user, sender, smtputf8=True) == sender
    assert policy.check_sender(user, "noreply@bucher.example", smtputf8=True) == (
        reply.SENDER_DENIED
    )


def test_fass_is_not_fa_sharp_s(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # IDNA 2008 keeps ß; the standard library's IDNA 2003 codec would make it "fass.de".
    monkeypatch.setenv("HATO_DOMAINS", "faß.de")
    settings = load_settings(data_dir=tmp_path)
    assert settings.domains == ["xn--fa-hia.de"]
    policy, router = intake(settings)
    outsider = policy.facts(OUTSIDER_IP)
    assert isinstance(policy.check_recipient(outsider, "postmaster@faß.de", smtputf8=True), str)
    assert router.route("postmaster@FASS.de") is RouteKind.HOLD
    assert router.route("postmaster@faß.de") is RouteKind.LOCAL
    assert policy.check_recipient(outsider, "postmaster@fass.de", smtputf8=True) == (
        reply.RELAY_DENIED
    )


# --- the RCPT check ------------------------------------------------------------------


def test_the_rcpt_check_does_no_file_io(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: alice, someone@example.net\n")
    settings = load_settings(data_dir=tmp_path, domains=["dbmx.net"], aliases_file=aliases)
    UserStore(settings.effective_users_file, hasher=CHEAP).add("alice@dbmx.net", "pw")
    users = build_users(settings)
    watcher = UserWatcher(users)
    policy = build_policy(
        settings, ListenerRole.SMTP, users, build_local_recipients(settings, users), watcher
    )
    session = ServerSession(build_session_config(settings), policy, client_ip=OUTSIDER_IP)
    session.greeting()

    def no_file_io(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"file I/O on the RCPT path: {args!r}")

    with pytest.MonkeyPatch.context() as patch:
        for module, name in (
            (os, "stat"),
            (os, "lstat"),
            (os, "open"),
            (os, "scandir"),
            (os, "listdir"),
            (io, "open"),
            (builtins, "open"),
        ):
            patch.setattr(module, name, no_file_io)
        events = session.receive(
            b"EHLO client.example\r\n"
            b"MAIL FROM:<someone@example.net>\r\n"
            b"RCPT TO:<alice@dbmx.net>\r\n"
            b"RCPT TO:<Alice+tag@DBMX.net>\r\n"
            b"RCPT TO:<sales@dbmx.net>\r\n"
            b"RCPT TO:<postmaster@dbmx.net>\r\n"
            b"RCPT TO:<nobody@dbmx.net>\r\n"
        )
    replies = [event.reply for event in events if isinstance(event, Send)]
    assert [r.code for r in replies] == [250, 250, 250, 250, 250, 250, 550]
    assert replies[-1] == reply.NO_SUCH_USER


def test_an_unknown_name_is_deferred_while_a_users_change_is_pending() -> None:
    pending = True
    policy = Policy(
        domains=["dbmx.net"],
        local_recipient_exists=lambda address: address.startswith("alice@"),
        recipients_pending=lambda: pending,
    )
    outsider = policy.facts(OUTSIDER_IP)
    assert policy.check_recipient(outsider, "alice@dbmx.net", smtputf8=False) == "alice@dbmx.net"
    assert policy.check_recipient(outsider, "bob@dbmx.net", smtputf8=False) == (
        reply.LOCAL_LOOKUP_FAILED
    )
    pending = False
    assert policy.check_recipient(outsider, "bob@dbmx.net", smtputf8=False) == reply.NO_SUCH_USER


# --- the users file watcher ----------------------------------------------------------


async def run_watcher(watcher: UserWatcher) -> asyncio.Task[None]:
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0)
    return task


async def stop_watcher(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
async def test_the_watcher_rereads_a_replaced_users_file_when_notified(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    server = UserStore(path, hasher=CHEAP).load()
    watcher = UserWatcher(server, interval=3600)  # no polling: only a notification tells it
    task = await run_watcher(watcher)
    try:
        await wait_until(lambda: watcher.notified, 10)
        writer = UserStore(path, hasher=CHEAP)  # what hato user add does, in its own process
        for name in ("first@dbmx.net", "second@dbmx.net"):
            # The second is added after the first was read, so after the watcher's first
            # check: only the notification can bring it in.
            writer.add(name, "pw")
            local, _, domain = name.partition("@")
            await wait_until(lambda: server.has(local, domain), 10)  # noqa: B023
        assert not watcher.pending()
    finally:
        await stop_watcher(task)
    assert not watcher.notified  # the descriptor is closed with the task


async def test_without_inotify_the_watcher_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hato.users.watch_directory", lambda _directory: None)
    path = tmp_path / "users.json"
    server = UserStore(path, hasher=CHEAP).load()
    watcher = UserWatcher(server, interval=0.05)
    task = await run_watcher(watcher)
    try:
        UserStore(path, hasher=CHEAP).add("late@dbmx.net", "pw")
        await wait_until(lambda: server.has("late", "dbmx.net"), 10)
        assert not watcher.notified and not watcher.pending()
    finally:
        await stop_watcher(task)


def test_a_signed_verp_address_is_accepted_without_a_user(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path, domains=["dbmx.net"], verp=True, verp_secret="k" * 32
    )
    users = build_users(settings)
    verp = build_verp(settings)
    assert verp is not None
    policy = build_policy(
        settings, ListenerRole.SMTP, users, build_local_recipients(settings, users), None, verp
    )
    signed = verp.return_path("noreply@dbmx.net", "0193A1B2C3D4E5F6A7B")
    forged = signed[:-20] + "0" + signed[-19:]
    session = ServerSession(build_session_config(settings), policy, client_ip=OUTSIDER_IP)
    session.greeting()
    events = session.receive(
        b"EHLO mx.example.net\r\nMAIL FROM:<>\r\n"
        + f"RCPT TO:<{signed}>\r\nRCPT TO:<{forged}>\r\n".encode()
        + b"RCPT TO:<noreply@dbmx.net>\r\n"
    )
    replies = [event.reply for event in events if isinstance(event, Send)]
    assert [r.code for r in replies] == [250, 250, 250, 550, 550]
    assert not (tmp_path / "verp.key").exists()  # HATO_VERP_SECRET given: no key file
