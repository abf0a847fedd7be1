"""One envelope id from the outbox to the next node: ``Mailer.send(notify=...)`` into an
SQLite outbox, ``hato worker``'s composition (``work``) relaying to a Hato intake
in-process, which keeps ENVID=<outbox id> and the NOTIFY beside its own queue id."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from test_worker_cli import FROM, running_worker, settings_for, wait_status

from hato import AsyncMailer
from hato.dsn_params import META_RCPT, DsnError
from hato.maillog import MailLog
from hato.message import META_ENVID
from hato.queue.memory import MemoryQueue
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.server import start_listener


async def test_worker_sends_envid_of_the_outbox_id_and_the_apps_notify(tmp_path: Path) -> None:
    relay_queue = MemoryQueue()
    await relay_queue.open()
    relay_log = io.StringIO()
    listener = await start_listener(
        ListenerConfig("127.0.0.1", 0, ListenerRole.SMTP),
        queue=relay_queue,
        policy=Policy(role=ListenerRole.SMTP, mynetworks=parse_networks(["127.0.0.0/8"])),
        log=MailLog(relay_log),
        hostname="relay.example.net",
    )
    try:
        settings = settings_for(tmp_path, listener.port)
        async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
            with pytest.raises(DsnError):
                await mailer.send("taro@example.net", "Hi", "x", notify=("never", "success"))
            default = await mailer.send("taro@example.net", "Hi", "default notify")
            success = await mailer.send(
                "hanako@example.net", "Hi", "success too", notify=("success", "failure")
            )
            async with running_worker(settings):
                await wait_status(mailer, default, "sent")
                await wait_status(mailer, success, "sent")
        async with asyncio.timeout(10):
            while len(await relay_queue.list()) < 2:
                await asyncio.sleep(0.02)
        by_envid = {
            m.meta[META_ENVID]: m
            for m in [await relay_queue.get(x.id) for x in await relay_queue.list()]
        }
        assert set(by_envid) == {default, success}
        assert json.loads(by_envid[default].meta[META_RCPT]) == {
            "taro@example.net": {"notify": "FAILURE,DELAY"}
        }
        assert json.loads(by_envid[success].meta[META_RCPT]) == {
            "hanako@example.net": {"notify": "SUCCESS,FAILURE"}
        }
        # The relay's log names its own queue id and the outbox id on one line.
        for envid, msg in by_envid.items():
            assert any(
                line.split(": ", 2)[1].startswith(msg.id) and f"envid={envid}" in line
                for line in relay_log.getvalue().splitlines()
            ), relay_log.getvalue()
    finally:
        await listener.aclose(timeout=2)
        await relay_queue.close()
