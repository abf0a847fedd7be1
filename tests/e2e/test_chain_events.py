"""The application sees the truth three hops away (issue 10, section 5, test 1).

    Mailer.send ──> outbox (PostgreSQL) ──> hato worker ──> Hato local relay
        ──(STARTTLS + AUTH)──> Hato relay server ──(MX in the test DNS)──> Postfix (MX)

``Mailer.status(id)`` must say ``delivered`` with the MX's reply, with the events of all
three hops in order: once by pull alone (no webhook anywhere, so the relay server never
reaches the app: the local relay pulls the relay server's events with its SASL
credentials, ``hato worker`` pulls the local relay's), once by signed webhooks from both
relays to ``uvicorn hato.webhooks:app`` in front of the outbox.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_outbox_peers import WORKER_DEFAULTS, HatoWorker, postgres_schema

from hato import Mailer, Status
from hato.events import DeliveryEvent
from peers import free_port
from peers.hato import HatoServe, run_hato
from peers.http import UvicornProcess
from peers.postfix_mx import PostfixMX

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayFactory, RelayServer

SENDER = "noreply@dbmx.net"
RECIPIENT = "someone@example.net"
WORKER_NODE = "app.worker.internal"
LOCAL_NODE = "smtp.app.internal"
RELAY_NODE = "relay.dbmx.net"
SECRET = "e2e-webhook-secret"
POLL = "0.2"
FINAL = ("delivered", "bounced", "failed")


@pytest.fixture
def outbox_url(tmp_path: Path) -> Iterator[str]:
    with postgres_schema() as url:
        run_hato(["queue", "init", "--queue", url], data_dir=tmp_path)
        yield url


def start_worker(
    tmp_path: Path, outbox_url: str, local: HatoServe | tuple[str, int], **env: str
) -> HatoWorker:
    """``hato worker`` sending to ``local``: a Hato local relay, or (host, port) of another."""
    host, port = (local.host, local.port) if isinstance(local, HatoServe) else local
    settings = {
        **WORKER_DEFAULTS,
        "HATO_QUEUE_URL": outbox_url,
        "HATO_SMTP_HOST": host,
        "HATO_SMTP_PORT": str(port),
        "HATO_HOSTNAME": WORKER_NODE,
        **env,
    }
    return HatoWorker(tmp_path / "worker", settings).start()


HOPS = [
    (LOCAL_NODE, "accepted"),
    (WORKER_NODE, "relayed"),
    (LOCAL_NODE, "relayed"),
    (RELAY_NODE, "accepted"),
    (RELAY_NODE, "delivered"),
]


def wait_for_steps(
    mailer: Mailer, message_id: str, steps: list[tuple[str, str]], timeout: float
) -> Status:
    """The status once its events include every one of ``steps`` (node, event)."""
    deadline = time.monotonic() + timeout
    while True:
        status = mailer.status(message_id)
        seen = {(e.node, e.event) for e in status.events}
        if all(step in seen for step in steps) or time.monotonic() > deadline:
            return status  # check_three_hops says what is missing
        time.sleep(0.1)


def check_three_hops(status: Status) -> None:
    """``delivered`` with Postfix's reply, and every hop's events in their order."""
    assert status.state == "delivered", status
    # Postfix's answer to DATA, or to BDAT LAST ("Ok: 1606 bytes queued as ...").
    assert re.fullmatch(r"250 2\.0\.0 Ok: (\d+ bytes )?queued as \w+", status.reply), status.reply
    assert status.final and status.done
    [rcpt] = status.recipients
    assert (rcpt.address, rcpt.state) == (RECIPIENT, "delivered")
    steps = [(e.node, e.event) for e in status.events]
    for step in HOPS:
        assert step in steps, (step, steps)
    at = {step: steps.index(step) for step in steps}
    # Oldest first; each hop accepts before it passes the message on, and a hop accepts
    # only while the previous one is handing it over.
    assert [e.time for e in status.events] == sorted(e.time for e in status.events)
    assert at[(LOCAL_NODE, "accepted")] < at[(WORKER_NODE, "relayed")]
    assert at[(LOCAL_NODE, "accepted")] < at[(RELAY_NODE, "accepted")]
    assert at[(RELAY_NODE, "accepted")] < at[(LOCAL_NODE, "relayed")]
    assert at[(RELAY_NODE, "accepted")] < at[(RELAY_NODE, "delivered")]
    assert steps[-1] == (RELAY_NODE, "delivered")
    delivered: DeliveryEvent = status.events[-1]
    assert (delivered.route, delivered.relay_host, delivered.recipient) == (
        "mx",
        "mx.example.net",
        RECIPIENT,
    )
    assert delivered.reply_code == 250 and delivered.reply_enhanced == "2.0.0"
    # One envelope id from the outbox to the last hop.
    assert {e.envid for e in status.events if e.node != WORKER_NODE} == {status.id}


def test_delivered_after_three_hops_by_pull_alone(
    tmp_path: Path,
    relay_server_factory: RelayFactory,
    local_relay_factory: Callable[..., HatoServe],
    postfix_mx: PostfixMX,
    outbox_url: str,
) -> None:
    relay_http, local_http = free_port(), free_port()
    relay: RelayServer = relay_server_factory(
        postfix_mx.port, HATO_HTTP_LISTEN=f"127.0.0.1:{relay_http}"
    )
    local = local_relay_factory(
        relay,
        HATO_HTTP_LISTEN=f"127.0.0.1:{local_http}",
        HATO_RELAY_EVENTS_URL=f"http://127.0.0.1:{relay_http}/api/v1/events",
        HATO_EVENTS_POLL_INTERVAL=POLL,
    )
    worker = start_worker(
        tmp_path,
        outbox_url,
        local,
        HATO_SMTP_EVENTS_URL=f"http://127.0.0.1:{local_http}/api/v1/events",
        HATO_EVENTS_POLL_INTERVAL=POLL,
    )
    try:
        with Mailer(outbox_url, default_from=SENDER) as mailer:
            message_id = mailer.send(RECIPIENT, "Confirm your address", text="Welcome!")
            status = mailer.wait(message_id, states=FINAL, timeout=120)
            status = wait_for_steps(mailer, message_id, HOPS, timeout=60)
        postfix_mx.wait_for(RECIPIENT, timeout=60)
    finally:
        worker.stop()
    check_three_hops(status)


def test_delivered_after_three_hops_by_webhooks(
    tmp_path: Path,
    relay_server_factory: RelayFactory,
    local_relay_factory: Callable[..., HatoServe],
    postfix_mx: PostfixMX,
    outbox_url: str,
) -> None:
    receiver = UvicornProcess(
        "hato.webhooks:app",
        free_port(),
        {"HATO_QUEUE_URL": outbox_url, "HATO_WEBHOOK_SECRET": SECRET},
    )
    receiver.start()
    try:
        hook = {"HATO_WEBHOOK_URL": receiver.url + "/hato/events", "HATO_WEBHOOK_SECRET": SECRET}
        relay: RelayServer = relay_server_factory(
            postfix_mx.port, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook
        )
        local = local_relay_factory(relay, HATO_HTTP_LISTEN=f"127.0.0.1:{free_port()}", **hook)
        worker = start_worker(tmp_path, outbox_url, local)
        try:
            with Mailer(outbox_url, default_from=SENDER) as mailer:
                message_id = mailer.send(RECIPIENT, "Confirm your address", text="Welcome!")
                status = mailer.wait(message_id, states=FINAL, timeout=120)
                # Each relay pushes on its own: the local relay's may come after the MX's.
                status = wait_for_steps(mailer, message_id, HOPS, timeout=60)
        finally:
            worker.stop()
    finally:
        receiver.stop()
    check_three_hops(status)
