"""The Maildir courier on a real file system, and with the worker and the memory queue."""

from __future__ import annotations

import errno
import io
import mailbox
import os
import random
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from hato.aliases import LocalRecipients, parse_aliases
from hato.delivery.base import Result
from hato.delivery.hold import HoldCourier
from hato.delivery.maildir import MaildirCourier
from hato.delivery.router import RouteKind, Router
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue.base import MessageState
from hato.queue.memory import MemoryQueue
from hato.queue.retry import RetrySchedule
from hato.worker import Worker

T0 = 1_700_000_000.25
MSG = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"line one\r\n"
    b".dotted line\r\n"
    b"From the start of a line\r\n"
    b"8-bit \xe3\x81\x82\r\n"
)
ALIASES = parse_aliases(
    "postmaster: root\n"
    "root: alice\n"
    "sales: bob, carol@elsewhere.test, dave@elsewhere.test\n"
    "outside: ext@elsewhere.test\n"
)
USERS = {"alice", "bob"}


class Forwards:
    """Records forwards like a queue would: one id per idempotency key."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, list[str], bytes, str]] = []
        self.fail = fail

    async def __call__(self, sender: str, rcpts: Sequence[str], data: bytes, key: str) -> str:
        if self.fail:
            raise ConnectionError("queue down")
        self.calls.append((sender, list(rcpts), data, key))
        return f"id-{key}"


def courier(root: Path, forwards: Forwards | None = None, **kw: object) -> MaildirCourier:
    return MaildirCourier(
        root,
        LocalRecipients(
            ["example.org", "Example.NET"],
            ALIASES,
            "+",
            user_exists=lambda local, _domain: local in USERS,
        ),
        clock=lambda: T0,
        forward=forwards,
        hostname="mx.example.org",
        **kw,  # type: ignore[arg-type]
    )


def messages(root: Path, domain: str, user: str) -> list[bytes]:
    new = root / domain / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


async def test_delivers_into_new_with_headers_and_unix_lines(tmp_path: Path) -> None:
    c = courier(tmp_path)
    [res] = await c.deliver("sender@example.net", ["alice@example.org"], MSG, message_id="q1")
    assert res.result is Result.OK and res.relay == "maildir"
    assert str(res.reply) == "250 2.0.0 delivered to alice@example.org"
    box = tmp_path / "example.org" / "alice"
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []
    [path] = list((box / "new").iterdir())
    assert re.fullmatch(rf"1700000000\.M250000P{os.getpid()}Q\d+\.mx\.example\.org", path.name)
    assert path.read_bytes() == (
        b"Return-Path: <sender@example.net>\n"
        b"Delivered-To: alice@example.org\n" + MSG.replace(b"\r\n", b"\n")
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (box, box / "new", box / "tmp", box / "cur", tmp_path / "example.org"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


async def test_python_mailbox_reads_what_we_wrote(tmp_path: Path) -> None:
    c = courier(tmp_path)
    await c.deliver("", ["alice+news@example.org", "bob@example.org"], MSG)
    md = mailbox.Maildir(tmp_path / "example.org" / "alice", create=False)
    [msg] = list(md)
    assert msg["Return-Path"] == "<>"
    assert msg["Delivered-To"] == "alice+news@example.org"
    assert msg["Subject"] == "hello"
    assert msg.get_subdir() == "new"
    assert len(messages(tmp_path, "example.org", "bob")) == 1


async def test_unknown_user_is_permanent_and_writes_nothing(tmp_path: Path) -> None:
    c = courier(tmp_path)
    results = await c.deliver("s@example.net", ["nobody@example.org", "alice@example.org"], MSG)
    assert [r.result for r in results] == [Result.PERMANENT, Result.OK]
    assert str(results[0].reply) == "550 5.1.1 Recipient address rejected: user unknown"
    assert not (tmp_path / "example.org" / "nobody").exists()


async def test_aliases_deliver_locally_and_forward_outside(tmp_path: Path) -> None:
    fwd = Forwards()
    c = courier(tmp_path, fwd)
    [res] = await c.deliver("s@example.net", ["sales@example.org"], MSG, message_id="q1")
    assert res.result is Result.OK
    assert "delivered to bob@example.org" in res.reply.text
    assert "forwarded to carol@elsewhere.test, dave@elsewhere.test" in res.reply.text
    assert len(messages(tmp_path, "example.org", "bob")) == 1
    [(sender, rcpts, data, key)] = fwd.calls
    assert sender == "s@example.net"
    assert rcpts == ["carol@elsewhere.test", "dave@elsewhere.test"]
    assert data == b"Delivered-To: sales@example.org\r\n" + MSG  # CRLF kept for the wire
    assert key == "fwd:q1:sales@example.org"


async def test_postmaster_resolves_through_root(tmp_path: Path) -> None:
    c = courier(tmp_path)
    [res] = await c.deliver("s@example.net", ["postmaster@example.org"], MSG)
    assert res.result is Result.OK
    [data] = messages(tmp_path, "example.org", "alice")
    assert b"Delivered-To: postmaster@example.org\n" in data
    assert c.recipients.exists("abuse@example.net")
    assert c.recipients.exists("Alice+x@EXAMPLE.ORG")
    assert not c.recipients.exists("carol@example.org")
    assert not c.recipients.exists("alice@elsewhere.test")


async def test_forward_key_is_stable_across_retries(tmp_path: Path) -> None:
    fwd = Forwards()
    c = courier(tmp_path, fwd)
    await c.deliver("s@example.net", ["outside@example.org"], MSG, message_id="q7")
    await c.deliver("s@example.net", ["outside@example.org"], MSG, message_id="q7")
    assert [call[3] for call in fwd.calls] == ["fwd:q7:outside@example.org"] * 2
    await c.deliver("s@example.net", ["outside@example.org"], MSG)
    await c.deliver("s@example.net", ["outside@example.org"], MSG)
    assert fwd.calls[2][3] == fwd.calls[3][3] != fwd.calls[0][3]


async def test_failed_forward_is_temporary_and_delivers_nothing_yet(tmp_path: Path) -> None:
    c = courier(tmp_path, Forwards(fail=True))
    [res] = await c.deliver("s@example.net", ["sales@example.org"], MSG, message_id="q1")
    assert res.result is Result.TEMPORARY
    assert res.reply.code == 451 and "queue down" in res.reply.text
    assert messages(tmp_path, "example.org", "bob") == []


async def test_external_target_without_forwarding_is_temporary(tmp_path: Path) -> None:
    c = courier(tmp_path)
    [res] = await c.deliver("s@example.net", ["outside@example.org"], MSG)
    assert res.result is Result.TEMPORARY and res.reply.enhanced == "4.3.5"


async def test_delivered_to_loop_is_bounced(tmp_path: Path) -> None:
    fwd = Forwards()
    c = courier(tmp_path, fwd)
    looped = b"Delivered-To: Outside@example.org\r\n" + MSG
    [res] = await c.deliver("s@example.net", ["outside@example.org"], looped)
    assert res.result is Result.PERMANENT
    assert str(res.reply).startswith("554 5.4.6 Mail forwarding loop")
    assert fwd.calls == []
    # Another recipient's Delivered-To is no loop; one in the body is not a header.
    [ok] = await c.deliver("s@example.net", ["alice@example.org"], looped)
    assert ok.result is Result.OK
    body_only = MSG + b"Delivered-To: alice@example.org\r\n"
    [ok] = await c.deliver("s@example.net", ["alice@example.org"], body_only)
    assert ok.result is Result.OK


async def test_names_are_unique_under_a_frozen_clock(tmp_path: Path) -> None:
    c = courier(tmp_path)
    for _ in range(50):
        await c.deliver("s@example.net", ["alice@example.org"], MSG)
    other = courier(tmp_path)  # a second courier in the same process starts at Q1 again
    for _ in range(5):
        await other.deliver("s@example.net", ["alice@example.org"], MSG)
    assert len(messages(tmp_path, "example.org", "alice")) == 55


async def test_write_failure_is_temporary(tmp_path: Path) -> None:
    (tmp_path / "example.org").write_text("a file where the domain directory should be")
    c = courier(tmp_path)
    [res] = await c.deliver("s@example.net", ["alice@example.org"], MSG)
    assert res.result is Result.TEMPORARY and res.reply.code == 451


async def test_full_disk_is_452(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    c = courier(tmp_path)
    monkeypatch.setattr(os, "write", full)
    [res] = await c.deliver("s@example.net", ["alice@example.org"], MSG)
    monkeypatch.undo()
    assert res.result is Result.TEMPORARY
    assert str(res.reply) == "452 4.2.2 Mailbox full or disk quota exceeded"
    assert list((tmp_path / "example.org" / "alice" / "tmp").iterdir()) == []
    assert messages(tmp_path, "example.org", "alice") == []


async def test_removed_maildir_is_made_again(tmp_path: Path) -> None:
    c = courier(tmp_path)
    await c.deliver("s@example.net", ["alice@example.org"], MSG)
    for sub in ("tmp", "new", "cur"):
        for p in (tmp_path / "example.org" / "alice" / sub).iterdir():
            p.unlink()
        (tmp_path / "example.org" / "alice" / sub).rmdir()
    [res] = await c.deliver("s@example.net", ["alice@example.org"], MSG)
    assert res.result is Result.OK
    assert len(messages(tmp_path, "example.org", "alice")) == 1


async def test_user_store_failure_is_temporary(tmp_path: Path) -> None:
    def broken(_local: str, _domain: str) -> bool:
        raise OSError("users.json unreadable")

    c = MaildirCourier(tmp_path, LocalRecipients(["example.org"], user_exists=broken))
    [res] = await c.deliver("s@example.net", ["alice@example.org"], MSG)
    assert res.result is Result.TEMPORARY and "users.json unreadable" in res.reply.text


async def test_unknown_recipient_is_looked_up_again_before_it_bounces(tmp_path: Path) -> None:
    users: set[str] = set()
    refreshes: list[str] = []

    async def refresh() -> None:  # the users file named a newcomer since the last read
        refreshes.append("refresh")
        users.add("newcomer")

    recipients = LocalRecipients(["example.org"], user_exists=lambda local, _d: local in users)
    c = MaildirCourier(tmp_path, recipients, refresh=refresh)
    [res] = await c.deliver("s@example.net", ["newcomer@example.org"], MSG)
    assert res.result is Result.OK and refreshes == ["refresh"]
    [res] = await c.deliver("s@example.net", ["stranger@example.org"], MSG)
    assert res.result is Result.PERMANENT and res.reply.enhanced == "5.1.1"
    [res] = await c.deliver("s@example.net", ["newcomer@example.org"], MSG)
    assert res.result is Result.OK and len(refreshes) == 2  # known: no second look


async def test_idn_domain_maildir_uses_the_a_label(tmp_path: Path) -> None:
    c = MaildirCourier(
        tmp_path, LocalRecipients(["bücher.example"], user_exists=lambda u, d: u == "a")
    )
    [res] = await c.deliver("s@example.net", ["a@BÜCHER.example"], MSG)
    assert res.result is Result.OK
    assert len(messages(tmp_path, "xn--bcher-kva.example", "a")) == 1


# --- with the worker and a queue --------------------------------------------------------


async def test_worker_delivers_locally_and_forwards_through_the_queue(tmp_path: Path) -> None:
    clock = lambda: T0  # noqa: E731
    queue = MemoryQueue(clock=clock)
    await queue.open()

    async def forward(sender: str, rcpts: Sequence[str], data: bytes, key: str) -> str:
        return await queue.enqueue(Envelope(sender, list(rcpts)), data, idempotency_key=key)

    maildir = courier(tmp_path, None)
    maildir.forward = forward
    hold = HoldCourier()
    worker = Worker(
        queue,
        {RouteKind.LOCAL: maildir, RouteKind.HOLD: hold},
        Router(["example.org", "example.net"], "hold"),
        RetrySchedule(min_delay=60, max_delay=600, max_lifetime=3600),
        MailLog(io.StringIO(), clock=clock),
        hostname="mx.example.org",
        clock=clock,
        rng=random.Random(1),
        owner="w",
    )
    mid = await queue.enqueue(
        Envelope("s@example.net", ["sales@example.org", "nobody@example.org"]), MSG
    )
    await worker.run_once()
    msg = await queue.get(mid)
    assert [r.state.value for r in msg.recipients] == ["sent", "failed"]
    assert len(messages(tmp_path, "example.org", "bob")) == 1

    forwarded = [m for m in await queue.list() if m.id != mid and m.sender == "s@example.net"]
    assert len(forwarded) == 1
    assert [r.address for r in forwarded[0].recipients] == [
        "carol@elsewhere.test",
        "dave@elsewhere.test",
    ]
    assert forwarded[0].data.startswith(b"Delivered-To: sales@example.org\r\n")
    # The forwarded copy is routed like any other mail (held here: route hold).
    await worker.run_once()
    again = await queue.get(forwarded[0].id)
    assert again.state is MessageState.HELD
