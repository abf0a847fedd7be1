"""Issue 10, section 5, tests 2, 4 and 5: the chain of test 1, when something goes wrong
and with Postfix in place of the Hato local relay.

    Mailer.send ──> outbox (PostgreSQL) ──> hato worker ──> Hato local relay
        ──(STARTTLS + AUTH)──> Hato relay server ──(MX in the test DNS)──> Postfix (MX)

* The MX refuses the recipient at RCPT: the app reads ``bounced`` with Postfix's 5.x.x
  code and text, and the sender gets a DSN only when its NOTIFY asked for one.
* The relay server is down for a while: the app reads ``deferred`` events from the local
  relay, then ``delivered`` once the relay server is back.
* Postfix is the local relay (the guide's setup): it passes the outbox id on as ENVID, and
  the relay server's events reach the app by webhook.

Fixtures and helpers are test 1's (:mod:`test_chain_events`). Events travel by signed
webhooks to ``hato.webhooks:app``: pulling can lose a message's upstream events when a
pull falls between the relay server's 250 and the local relay's ``relayed`` step.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_chain_events import (
    FINAL,
    HOPS,
    LOCAL_NODE,
    RECIPIENT,
    RELAY_NODE,
    SECRET,
    SENDER,
    WORKER_NODE,
    check_three_hops,
    outbox_url,
    start_worker,
    wait_for_steps,
)

from hato import Mailer
from peers import free_port
from peers.hato import HatoServe
from peers.http import UvicornProcess
from peers.postfix_mx import PostfixMX, sasl_relay

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayFactory, RelayServer

__all__ = ["outbox_url"]  # the fixture, imported for pytest to find

UNKNOWN = "nobody@example.net"  # not in the MX's virtual mailbox table: 550 at RCPT
# The relay server's SASL user, who has a Maildir on it: where its DSNs land.
DSN_SENDER = "postfix@dbmx.net"
# The hops when Postfix is the local relay: it sends no events, the relay server's come
# by webhook.
POSTFIX_HOPS = [(WORKER_NODE, "relayed"), (RELAY_NODE, "accepted"), (RELAY_NODE, "delivered")]
SHORT_RETRY = {"HATO_RETRY_MIN_DELAY": "0.5", "HATO_RETRY_MAX_DELAY": "1"}


def sender_mailbox(relay: RelayServer, timeout: float = 0.0) -> list[bytes]:
    """The messages in the sender's Maildir on the relay server (its own domain)."""
    new = relay.maildir(DSN_SENDER) / "new"
    deadline = time.monotonic() + timeout
    while True:
        found = [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@contextlib.contextmanager
def webhook_receiver(outbox_url: str) -> Iterator[dict[str, str]]:
    """``uvicorn hato.webhooks:app`` in front of the outbox; yields the relays' settings."""
    receiver = UvicornProcess(
        "hato.webhooks:app",
        free_port(),
        {"HATO_QUEUE_URL": outbox_url, "HATO_WEBHOOK_SECRET": SECRET},
    )
    receiver.start()
    try:
        yield {"HATO_WEBHOOK_URL": receiver.url + "/hato/events", "HATO_WEBHOOK_SECRET": SECRET}
    finally:
        receiver.stop()


def test_refused_at_rcpt_is_bounced_with_a_dsn_only_when_asked(
    tmp_path: Path,
    relay_server_factory: RelayFactory,
    local_relay_factory: Callable[..., HatoServe],
    postfix_mx: PostfixMX,
    outbox_url: str,
) -> None:
    # By webhooks: pulling loses the upstream's events of a message when a pull falls
    # between the relay server's 250 and the local relay's "relayed" (see the report).
    bounced_hop = [(LOCAL_NODE, "relayed"), (RELAY_NODE, "bounced")]
    with webhook_receiver(outbox_url) as hook:
        relay: RelayServer = relay_server_factory(
            postfix_mx.port, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook
        )
        local = local_relay_factory(relay, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook)
        worker = start_worker(tmp_path, outbox_url, local)
        try:
            with Mailer(outbox_url, default_from=DSN_SENDER) as mailer:
                quiet = mailer.send(UNKNOWN, "No news", text="hi", notify=("never",))
                quiet_status = mailer.wait(quiet, states=FINAL, timeout=120)
                quiet_status = wait_for_steps(mailer, quiet, bounced_hop, timeout=60)
                relay.serve.wait_for_log(rf"to=<{UNKNOWN}>.*status=bounced")
                assert sender_mailbox(relay) == []  # NOTIFY=NEVER: no DSN
                asked = mailer.send(UNKNOWN, "Tell me", text="hi", notify=("failure",))
                asked_status = mailer.wait(asked, states=FINAL, timeout=120)
                asked_status = wait_for_steps(mailer, asked, bounced_hop, timeout=60)
        finally:
            worker.stop()

    for status in (quiet_status, asked_status):
        assert status.state == "bounced", status
        [rcpt] = status.recipients
        assert (rcpt.address, rcpt.state) == (UNKNOWN, "bounced")
        [bounced] = [e for e in status.events if e.event == "bounced"]
        assert bounced.node == RELAY_NODE and bounced.recipient == UNKNOWN
        assert bounced.reply_code == 550 and bounced.reply_enhanced == "5.1.1", bounced
        assert "User unknown" in bounced.reply_text, bounced
        assert bounced.envid == status.id

    # One DSN in the sender's mailbox: the one NOTIFY=FAILURE asked for.
    [raw] = sender_mailbox(relay, timeout=60)
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report", raw
    assert dsn.get_param("report-type") == "delivery-status", raw
    [status_part] = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"]
    report = status_part.as_bytes()
    assert f"Original-Envelope-Id: {asked_status.id}".encode() in report, report
    assert f"Final-Recipient: rfc822; {UNKNOWN}".encode() in report, report
    assert b"Status: 5.1.1" in report, report
    assert quiet_status.id.encode() not in raw


def test_relay_server_down_for_a_while_deferred_then_delivered(
    tmp_path: Path,
    relay_server_factory: RelayFactory,
    local_relay_factory: Callable[..., HatoServe],
    postfix_mx: PostfixMX,
    outbox_url: str,
) -> None:
    # By webhooks, for the race of pulling described in the first test.
    with webhook_receiver(outbox_url) as hook:
        relay: RelayServer = relay_server_factory(
            postfix_mx.port, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook
        )
        relay.serve.stop()  # down before the first attempt; back on the same ports later
        local = local_relay_factory(
            relay, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook, **SHORT_RETRY
        )
        worker = start_worker(tmp_path, outbox_url, local)
        try:
            with Mailer(outbox_url, default_from=SENDER) as mailer:
                message_id = mailer.send(RECIPIENT, "Confirm your address", text="Welcome!")
                # The failed attempts reach the app while the relay server is down.
                local.wait_for_log(r"status=deferred", timeout=60)
                waiting = wait_for_steps(mailer, message_id, [(LOCAL_NODE, "deferred")], 60)
                deferred = [e for e in waiting.events if e.event == "deferred"]
                assert deferred and all(e.node == LOCAL_NODE for e in deferred), waiting.events
                assert waiting.state not in FINAL, waiting
                assert deferred[0].envid == message_id
                relay.serve.start()
                status = mailer.wait(message_id, states=FINAL, timeout=120)
                status = wait_for_steps(mailer, message_id, HOPS, timeout=60)
            postfix_mx.wait_for(RECIPIENT, timeout=60)
        finally:
            worker.stop()
    check_three_hops(status)
    steps = [(e.node, e.event) for e in status.events]
    assert steps.index((LOCAL_NODE, "deferred")) < steps.index((LOCAL_NODE, "relayed")), steps


def test_postfix_local_relay_passes_envid_and_webhooks_reach_the_app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    relay_server_factory: RelayFactory,
    postfix_mx: PostfixMX,
    outbox_url: str,
) -> None:
    """The guide's setup: Postfix, not Hato, is the local relay (as in
    test_chain_postfix_relay.py); the relay server's webhooks find the message by ENVID."""
    from conftest import attach_log  # either conftest's: the e2e one hands on to the root's

    with webhook_receiver(outbox_url) as hook:
        relay: RelayServer = relay_server_factory(
            postfix_mx.port, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook
        )
        postfix = sasl_relay(relay.submission, relay.user, relay.password)
        attach_log(request, "postfix (local relay)", postfix.log)
        try:
            postfix.start()
            worker = start_worker(tmp_path, outbox_url, ("127.0.0.1", postfix.port("smtp")))
            try:
                with Mailer(outbox_url, default_from=SENDER) as mailer:
                    message_id = mailer.send(RECIPIENT, "Confirm your address", text="Welcome!")
                    status = mailer.wait(message_id, states=FINAL, timeout=120)
                    status = wait_for_steps(mailer, message_id, POSTFIX_HOPS, timeout=60)
            finally:
                worker.stop()
            [delivered] = postfix_mx.wait_for(RECIPIENT, timeout=60)
            log = postfix.log()
        finally:
            postfix.cleanup()

    assert status.state == "delivered", status
    assert status.final and status.done
    [rcpt] = status.recipients
    assert (rcpt.address, rcpt.state) == (RECIPIENT, "delivered")
    steps = [(e.node, e.event) for e in status.events]
    for step in POSTFIX_HOPS:
        assert step in steps, (step, steps)
    assert steps[-1] == (RELAY_NODE, "delivered"), steps
    last = status.events[-1]
    assert last.reply_code == 250 and last.reply_enhanced == "2.0.0", last
    assert (last.route, last.relay_host) == ("mx", "mx.example.net")
    # Postfix passed the outbox id on as ENVID: the relay server's events carry it.
    assert {e.envid for e in status.events if e.node == RELAY_NODE} == {message_id}
    assert f"envid={message_id}" in relay.serve.log, relay.serve.log
    assert f"relay=127.0.0.1[127.0.0.1]:{relay.port('submission')}" in log, log
    assert delivered.message["Subject"] == "Confirm your address"
