"""DSN parameters across real peers: Debian's Postfix as Hato's next hop and as its
previous hop, and swaks as a client of both.

The chain is Hato's smarthost courier (or swaks) → a private Postfix (which offers DSN
and passes RET, ENVID, NOTIFY and ORCPT on to a next hop that does) → Hato's intake,
in-process, which stores what it was given. What Hato's intake stores is what Postfix
received from Hato and passed on.

swaks 20201014 (Debian 12) has no ``--dsn-*`` options; the parameters ride after the
address (``--from 'a@b> ENVID=x'`` makes ``MAIL FROM:<a@b> ENVID=x>``), so the last
parameter of each command ends in ``>``, a valid xtext character; and as swaks splits
``--to`` at commas, a NOTIFY list is one keyword here.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from hato.delivery.base import Result
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from hato.dsn_params import META_RCPT, META_RET, DsnRequest, RecipientDsn
from hato.maillog import MailLog
from hato.message import META_ENVID
from hato.queue.base import StoredMessage
from hato.queue.memory import MemoryQueue
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.server import SMTPListener, start_listener
from peers import require_tool
from peers.postfix import PostfixInstance, plain_relay
from peers.sinks import RecordingSink

MSG = b"From: app@dbmx.net\r\nTo: user@example.org\r\nSubject: dsn\r\n\r\nhello\r\n"


@dataclass
class HatoIntake:
    listener: SMTPListener
    queue: MemoryQueue
    log: io.StringIO

    @property
    def port(self) -> int:
        return self.listener.port

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[StoredMessage]:
        async with asyncio.timeout(timeout):
            while len(listed := await self.queue.list()) < count:
                await asyncio.sleep(0.05)
        return [await self.queue.get(m.id) for m in listed]


@pytest.fixture
async def intake() -> AsyncIterator[HatoIntake]:
    """Hato's intake on 127.0.0.1, trusting loopback (so it relays what Postfix gives)."""
    queue = MemoryQueue()
    await queue.open()
    log = io.StringIO()
    listener = await start_listener(
        ListenerConfig("127.0.0.1", 0, ListenerRole.SMTP),
        queue=queue,
        policy=Policy(role=ListenerRole.SMTP, mynetworks=parse_networks(["127.0.0.0/8"])),
        log=MailLog(log),
        hostname="hato.example.net",
    )
    yield HatoIntake(listener, queue, log)
    await listener.aclose(timeout=2)
    await queue.close()


@pytest.fixture
def postfix_to_hato(
    intake: HatoIntake, request: pytest.FixtureRequest
) -> Iterator[PostfixInstance]:
    """A private Postfix relaying everything to ``intake``."""
    instance = plain_relay(("127.0.0.1", intake.port))
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()


def swaks_cmd(port: int, sender: str, rcpt: str) -> list[str]:
    return [
        require_tool("swaks", hint="apt-get install swaks"),
        "--server", f"127.0.0.1:{port}",
        "--ehlo", "client.example",
        "--from", sender,
        "--to", rcpt,
        "--header", "Subject: dsn via swaks",
        "--body", "hello",
    ]  # fmt: skip


async def swaks(port: int, sender: str, rcpt: str) -> str:
    proc = await asyncio.to_thread(
        subprocess.run,
        swaks_cmd(port, sender, rcpt),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rcpt_params(msg: StoredMessage) -> dict[str, dict[str, str]]:
    value: dict[str, dict[str, str]] = json.loads(msg.meta[META_RCPT])
    return value


async def test_postfix_next_hop_gets_hatos_dsn_parameters_and_passes_them_on(
    intake: HatoIntake, postfix_to_hato: PostfixInstance
) -> None:
    courier = SmarthostCourier(
        SmarthostConfig(host="127.0.0.1", port=postfix_to_hato.port("smtp"), tls="none")
    )
    dsn = DsnRequest(
        ret="HDRS",
        envid="Q 4711+x",  # goes as xtext: Q+204711+2Bx
        recipients={
            "user@example.org": RecipientDsn(
                frozenset({"SUCCESS", "FAILURE"}), "rfc822;User+tag@example.org"
            ),
            "never@example.org": RecipientDsn(frozenset({"NEVER"})),
        },
    )
    try:
        results = await courier.deliver(
            "app@dbmx.net", ["user@example.org", "never@example.org"], MSG, dsn=dsn
        )
    finally:
        await courier.close()
    assert [r.result for r in results] == [Result.OK, Result.OK]
    assert all(r.next_hop_dsn for r in results)  # Postfix offers DSN
    (got,) = await intake.wait_for(1)
    assert got.meta[META_ENVID] == "Q 4711+x"
    assert got.meta[META_RET] == "HDRS"
    assert rcpt_params(got) == {
        "user@example.org": {"notify": "SUCCESS,FAILURE", "orcpt": "rfc822;User+tag@example.org"},
        # Postfix adds the ORCPT a recipient came without (RFC 3461 4.2 allows it).
        "never@example.org": {"notify": "NEVER", "orcpt": "rfc822;never@example.org"},
    }
    assert "envid=Q 4711+x" in intake.log.getvalue()


async def test_postfix_previous_hop_relays_swaks_dsn_parameters_to_hato(
    intake: HatoIntake, postfix_to_hato: PostfixInstance
) -> None:
    await swaks(
        postfix_to_hato.port("smtp"),
        "app@dbmx.net> RET=FULL ENVID=swaks+2D1",
        "user@example.org> NOTIFY=DELAY ORCPT=rfc822;orig@example.org",
    )
    (got,) = await intake.wait_for(1)
    assert got.sender == "app@dbmx.net"
    assert got.meta[META_ENVID] == "swaks-1>"
    assert got.meta[META_RET] == "FULL"
    assert rcpt_params(got) == {
        "user@example.org": {"notify": "DELAY", "orcpt": "rfc822;orig@example.org>"}
    }


async def test_swaks_to_hato_directly(intake: HatoIntake) -> None:
    out = await swaks(
        intake.port,
        "app@dbmx.net> RET=HDRS ENVID=direct",
        "user@example.org> NOTIFY=SUCCESS ORCPT=rfc822;u+2Bx@example.org",
    )
    assert "250-DSN" in out
    (got,) = await intake.wait_for(1)
    assert got.meta[META_ENVID] == "direct>"
    assert got.meta[META_RET] == "HDRS"
    assert rcpt_params(got) == {
        "user@example.org": {"notify": "SUCCESS", "orcpt": "rfc822;u+x@example.org>"}
    }
    assert f"{got.id}: " in intake.log.getvalue()
    assert "envid=direct>" in intake.log.getvalue()


async def test_swaks_bad_dsn_parameters_are_refused_by_hato(intake: HatoIntake) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        swaks_cmd(intake.port, "app@dbmx.net", "user@example.org> NOTIFY=SOMETIMES"),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "501 5.5.4 Invalid NOTIFY parameter" in proc.stdout, proc.stdout
    assert await intake.queue.list() == []


async def test_postfix_reports_back_with_hatos_envid_when_its_next_hop_lacks_dsn(
    postfix_plain_relay: PostfixInstance, recording_sink: RecordingSink
) -> None:
    """Hato → Postfix → a sink without DSN: Postfix sends the ``relayed`` report Hato
    asked for (NOTIFY=SUCCESS), with Hato's ENVID and ORCPT in it (to the sender, whose
    mail Postfix relays to the same sink)."""
    courier = SmarthostCourier(
        SmarthostConfig(host="127.0.0.1", port=postfix_plain_relay.port("smtp"), tls="none")
    )
    dsn = DsnRequest(
        envid="outbox-0042",
        recipients={
            "user@example.org": RecipientDsn(frozenset({"SUCCESS"}), "rfc822;User@example.org")
        },
    )
    try:
        (result,) = await courier.deliver("app@dbmx.net", ["user@example.org"], MSG, dsn=dsn)
    finally:
        await courier.close()
    assert result.result is Result.OK and result.next_hop_dsn
    messages = await asyncio.to_thread(recording_sink.wait_for_count, 2, 30.0)
    (report,) = [m for m in messages if m.mail_from == ""]
    assert report.rcpt_tos == ("app@dbmx.net",)
    parsed = email.message_from_bytes(report.data, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    per_message, per_rcpt = parsed.get_payload()[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "outbox-0042"
    assert per_rcpt["Action"] == "relayed"
    assert per_rcpt["Original-Recipient"] == "rfc822;User@example.org"


async def test_postfix_passes_a_utf8_recipients_orcpt_to_hato(
    intake: HatoIntake, postfix_to_hato: PostfixInstance
) -> None:
    """An SMTPUTF8 recipient: Postfix adds an ORCPT with the address's UTF-8 octets as
    xtext, which Hato's intake reads as UTF-8 (an ASCII-only reading refused the
    recipient with 501, and Postfix bounced the message)."""
    courier = SmarthostCourier(
        SmarthostConfig(host="127.0.0.1", port=postfix_to_hato.port("smtp"), tls="none")
    )
    rcpt = "j\u00f6rg@example.org"
    dsn = DsnRequest(envid="utf8-1", recipients={rcpt: RecipientDsn(frozenset({"FAILURE"}))})
    try:
        (result,) = await courier.deliver("app@dbmx.net", [rcpt], MSG, dsn=dsn)
    finally:
        await courier.close()
    assert result.result is Result.OK, result.reply
    (got,) = await intake.wait_for(1)
    assert [r.address for r in got.recipients] == [rcpt], got.data.decode(errors="replace")
    assert got.meta[META_ENVID] == "utf8-1"
    params = rcpt_params(got)[rcpt]
    assert params["notify"] == "FAILURE"
    # Postfix writes it as rfc822 with the UTF-8 octets in xtext (+C3+B6).
    assert params["orcpt"] == f"rfc822;{rcpt}"
