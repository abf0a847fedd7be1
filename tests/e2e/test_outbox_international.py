"""SMTPUTF8 and REQUIRETLS end to end: Mailer.send → outbox → hato worker → hato serve → sink.

* An internationalised address (UTF-8 local part, IDN domain) from the application
  reaches the sink with SMTPUTF8 on every hop; a next hop without SMTPUTF8 makes the
  relay bounce the message (5.6.7) to the sender.
* ``require_tls=True``: the worker hands the message to its relay in plaintext only as a
  trusted first hop (``HATO_SMTP_REQUIRETLS=trusted``); the relay then refuses to pass it
  to a next hop without verified TLS and REQUIRETLS and bounces it (5.7.10). With the
  default ``verify`` the worker itself fails it.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_outbox_peers import FROM, Chain, build_chain

from peers.hato import HatoServe
from peers.sinks import Received, RecordingSink

RECIPIENT = "jörg@bücher.example"
RECIPIENT_ACE = "jörg@xn--bcher-kva.example"


def make_chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    sink: RecordingSink,
) -> Iterator[Chain]:
    yield from build_chain(
        request, tmp_path, hato_serve, sink, f"sqlite:///{tmp_path / 'outbox.db'}"
    )


@pytest.fixture
def utf8_sink() -> Iterator[RecordingSink]:
    sink = RecordingSink(smtputf8=True).start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def ascii_sink() -> Iterator[RecordingSink]:
    """A next hop that does not offer SMTPUTF8."""
    sink = RecordingSink(smtputf8=False).start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def utf8_chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    utf8_sink: RecordingSink,
) -> Iterator[Chain]:
    yield from make_chain(request, tmp_path, hato_serve, utf8_sink)


@pytest.fixture
def chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    ascii_sink: RecordingSink,
) -> Iterator[Chain]:
    yield from make_chain(request, tmp_path, hato_serve, ascii_sink)


def bounce_to_sender(chain: Chain) -> Received:
    [dsn] = chain.sink.wait_for(
        lambda ms: any(FROM in m.rcpt_tos for m in ms), 60, what="a bounce to the sender"
    )
    return dsn


def test_international_address_from_the_app_to_the_sink(utf8_chain: Chain) -> None:
    chain = utf8_chain
    chain.start_worker()
    queue_id = chain.send("Grüße", to=f"Jörg <{RECIPIENT}>")
    received = chain.delivered(queue_id)
    status = chain.wait(queue_id)
    assert status.state == "sent", status
    assert received.rcpt_tos == (RECIPIENT_ACE,)
    assert "SMTPUTF8" in received.mail_options
    # RFC 6532: the address is UTF-8 in the header itself.
    msg = email.message_from_string(received.data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    [to] = msg["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Jörg", RECIPIENT_ACE)
    assert msg["Subject"] == "Grüße"


def test_next_hop_without_smtputf8_bounces_with_567(chain: Chain) -> None:
    chain.start_worker()
    queue_id = chain.send("Grüße", to=RECIPIENT)
    assert chain.wait(queue_id).state == "sent"  # the relay took it
    dsn = bounce_to_sender(chain)
    assert not any(RECIPIENT_ACE in m.rcpt_tos for m in chain.sink.messages)
    body = dsn.data.decode("utf-8", "replace")
    assert "5.6.7" in body and "SMTPUTF8" in body


def test_require_tls_is_enforced_by_the_relay_after_a_trusted_first_hop(chain: Chain) -> None:
    chain.start_worker(HATO_SMTP_REQUIRETLS="trusted")
    queue_id = chain.send("secret", require_tls=True)
    assert chain.wait(queue_id).state == "sent"  # the first, trusted hop
    dsn = bounce_to_sender(chain)
    assert not any("user@example.net" in m.rcpt_tos for m in chain.sink.messages)
    assert "5.7.10" in dsn.data.decode("utf-8", "replace")


def test_require_tls_fails_at_the_worker_without_a_verified_first_hop(chain: Chain) -> None:
    chain.start_worker()
    queue_id = chain.send("secret", require_tls=True)
    status = chain.wait(queue_id)
    assert status.state == "failed", status
    assert "5.7.10" in status.reply and "not verified" in status.reply
    assert chain.sink.messages == []
