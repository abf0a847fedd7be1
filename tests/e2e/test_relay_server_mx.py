"""MX delivery through ``hato serve`` (a real subprocess with ``HATO_ROUTE=mx``).

Every MX host is a recording sink on its own loopback address (127.0.0.11, .12, …), all
on one port, the relay server's ``HATO_OUTBOUND_PORT``, as real MX hosts all listen on
25; an address with nothing on it refuses connections. Names resolve only through the
test DNS. Mail comes in on the ``smtp`` listener from 127.0.0.1, a trusted network here
(``HATO_MYNETWORKS=127.0.0.1/32``), from ``postfix@dbmx.net``, a user of the relay
server, so bounces land in its Maildir under ``DATA_DIR/mail/dbmx.net/postfix``.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller

from peers import free_port
from peers.dns import TestDNS
from peers.sinks import RecordingSink

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayFactory, RelayServer

SENDER = "postfix@dbmx.net"


class _Busy:
    """Answers 451 to every MAIL FROM: a greylisting or overloaded MX."""

    def __init__(self) -> None:
        self.attempts = 0
        self.lock = threading.Lock()

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.attempts += 1
        return "451 4.3.0 Busy, try again later"


@dataclass
class BusyMX:
    host: str
    port: int
    handler: _Busy = field(default_factory=_Busy)
    controller: Controller | None = None

    def start(self) -> BusyMX:
        controller = Controller(
            self.handler,
            hostname=self.host,
            port=self.port,
            server_hostname="busy.test",
            ready_timeout=10.0,
        )
        controller.start()
        self.controller = controller
        return self

    def stop(self) -> None:
        controller, self.controller = self.controller, None
        if controller is not None:
            controller.stop()


@dataclass
class Fleet:
    """The MX hosts of every destination domain of this module, on one port."""

    port: int
    sinks: dict[str, RecordingSink]
    busy: BusyMX

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.busy.stop()


SINK_HOSTS = {
    "mx-a.pref.example": "127.0.0.11",
    "mx-b.pref.example": "127.0.0.12",
    "mx-live.fallback.example": "127.0.0.14",
    "mx-ok.busy.example": "127.0.0.16",
    "amx.example": "127.0.0.17",
    "mx.private.example": "127.0.0.18",
}
DEAD_HOST = "127.0.0.13"  # MX 10 of fallback.example: nothing listens there
BUSY_HOST = "127.0.0.15"  # MX 10 of busy.example: answers 451 to MAIL


def _start_fleet() -> Fleet:
    for _attempt in range(20):
        port = free_port()
        started: list[RecordingSink] = []
        busy = BusyMX(BUSY_HOST, port)
        try:
            for name, host in SINK_HOSTS.items():
                started.append(RecordingSink(host=host, port=port, hostname=name).start())
            busy.start()
        except Exception:  # the port is taken on one of the addresses: try another
            for sink in started:
                sink.stop()
            busy.stop()
            continue
        return Fleet(port, dict(zip(SINK_HOSTS, started, strict=True)), busy)
    raise RuntimeError("no port free on every loopback address of the fleet")


def _zone(dns: TestDNS) -> None:
    dns.mx("pref.example", (20, "mx-b.pref.example"), (10, "mx-a.pref.example"))
    dns.mx("fallback.example", (10, "mx-dead.fallback.example"), (20, "mx-live.fallback.example"))
    dns.a("mx-dead.fallback.example", DEAD_HOST)
    dns.mx("busy.example", (10, "mx-busy.busy.example"), (20, "mx-ok.busy.example"))
    dns.a("mx-busy.busy.example", BUSY_HOST)
    dns.null_mx("nullmx.example")
    dns.mx("private.example", (10, "mx.private.example"))
    for name, host in SINK_HOSTS.items():
        dns.a(name, host)  # amx.example has an A record and no MX


@pytest.fixture
def fleet(dns_server: TestDNS) -> Iterator[Fleet]:
    _zone(dns_server)
    started = _start_fleet()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def relay(relay_server_factory: RelayFactory, fleet: Fleet) -> RelayServer:
    return relay_server_factory(fleet.port, HATO_MYNETWORKS="127.0.0.1/32")


def send(relay: RelayServer, recipient: str, subject: str) -> None:
    message = (
        f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@dbmx.net>\r\n\r\nHello.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", relay.port("smtp"), timeout=30) as client:
        client.ehlo("app.test")
        assert client.sendmail(SENDER, [recipient], message) == {}


def bounces(relay: RelayServer, *, count: int = 1, timeout: float = 30.0) -> list[bytes]:
    """The DSNs in the sender's Maildir (``postfix@dbmx.net``), waited for."""
    new = relay.maildir(SENDER) / "new"
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(new.glob("*")) if new.is_dir() else []
        if len(found) >= count:
            return [p.read_bytes() for p in found]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no bounce in {new} after {timeout}s; hato log:\n{relay.serve.log}"
            )
        time.sleep(0.1)


def dsn_status(data: bytes) -> str:
    """The ``Status:`` of the DSN's per-recipient part (RFC 3464)."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload():
                if isinstance(block, email.message.Message) and block.get("Status"):
                    return str(block["Status"])
    raise AssertionError(f"no delivery-status part in:\n{data.decode(errors='replace')}")


def test_lowest_preference_gets_the_mail(relay: RelayServer, fleet: Fleet) -> None:
    send(relay, "user@pref.example", "pref")
    [got] = fleet.sinks["mx-a.pref.example"].wait_for_count(1)
    assert got.rcpt_tos == ("user@pref.example",) and got.mail_from == SENDER
    relay.serve.wait_for_log(
        r"to=<user@pref\.example>, relay=mx-a\.pref\.example\[127\.0\.0\.11\]:\d+.*status=sent"
    )
    assert fleet.sinks["mx-b.pref.example"].messages == []


def test_refused_connection_falls_back_to_the_next_mx(relay: RelayServer, fleet: Fleet) -> None:
    send(relay, "user@fallback.example", "fallback")
    [got] = fleet.sinks["mx-live.fallback.example"].wait_for_count(1)
    assert got.rcpt_tos == ("user@fallback.example",)
    relay.serve.wait_for_log(
        r"to=<user@fallback\.example>, relay=mx-live\.fallback\.example.*status=sent"
    )


def test_4xx_from_the_first_mx_then_success_on_the_second(relay: RelayServer, fleet: Fleet) -> None:
    send(relay, "user@busy.example", "busy")
    [got] = fleet.sinks["mx-ok.busy.example"].wait_for_count(1)
    assert got.rcpt_tos == ("user@busy.example",)
    assert fleet.busy.handler.attempts >= 1  # it was asked first, and said 451
    relay.serve.wait_for_log(r"to=<user@busy\.example>, relay=mx-ok\.busy\.example.*status=sent")


def test_no_mx_falls_back_to_the_domain_address(relay: RelayServer, fleet: Fleet) -> None:
    send(relay, "user@amx.example", "implicit")
    [got] = fleet.sinks["amx.example"].wait_for_count(1)
    assert got.rcpt_tos == ("user@amx.example",)
    relay.serve.wait_for_log(
        r"to=<user@amx\.example>, relay=amx\.example\[127\.0\.0\.17\].*status=sent"
    )


def test_null_mx_bounces_at_once(relay: RelayServer, fleet: Fleet) -> None:
    send(relay, "user@nullmx.example", "nullmx")
    match = relay.serve.wait_for_log(
        r"to=<user@nullmx\.example>, relay=none,.*dsn=5\.1\.10, status=bounced \((.+)\)"
    )
    assert match.group(1).startswith("556 5.1.10"), match.group(0)  # the operator's why
    [dsn] = bounces(relay)
    assert dsn_status(dsn) == "5.1.10"
    assert b"user@nullmx.example" in dsn
    assert all(sink.messages == [] for sink in fleet.sinks.values())


def test_mx_in_loopback_space_is_refused_by_default(
    relay_server_factory: RelayFactory, fleet: Fleet
) -> None:
    # The same world, but without the test-only HATO_ALLOW_PRIVATE_MX.
    relay = relay_server_factory(fleet.port, allow_private_mx=False, HATO_MYNETWORKS="127.0.0.1/32")
    assert "HATO_ALLOW_PRIVATE_MX" not in relay.serve.env
    send(relay, "user@private.example", "private")
    relay.serve.wait_for_log(r"to=<user@private\.example>.*dsn=5\.4\.4, status=bounced")
    [dsn] = bounces(relay)
    assert dsn_status(dsn) == "5.4.4"
    assert fleet.sinks["mx.private.example"].messages == []
