"""The outbox end to end on PostgreSQL: Mailer.send → PostgreSQL → hato worker → hato serve
(local relay) → a recording sink, with the relay down, the relay answering 5xx, the worker
killed with SIGKILL, and PostgreSQL restarted under the worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_outbox_peers import (
    Chain,
    build_chain,
    parse,
    postgres_schema,
    scenario_end_to_end,
    scenario_kill_mid_batch,
    scenario_queue_restart,
    subjects_received,
)

from hato import AddressError
from peers.datastores import PrivatePostgres
from peers.hato import HatoServe
from peers.sinks import RecordingSink


@pytest.fixture
def chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    recording_sink: RecordingSink,
) -> Iterator[Chain]:
    with postgres_schema() as url:
        yield from build_chain(request, tmp_path, hato_serve, recording_sink, url)


def test_end_to_end_status_sent_with_the_relays_reply(chain: Chain) -> None:
    scenario_end_to_end(chain)


def test_delivered_bytes_bcc_non_ascii_attachments(chain: Chain, tmp_path: Path) -> None:
    chain.start_worker()
    with pytest.raises(AddressError):
        chain.send("Hi\r\nBcc: victim@evil.example")
    with pytest.raises(AddressError):
        chain.send("Hi", to="user@example.net\r\nX-Evil: 1")
    picture = tmp_path / "hato.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    text = "こんにちは、ハトです。\nパスワードを再設定してください。\n"
    queue_id = chain.send(
        "パスワードの再設定 — Ünïcödé ✓",
        to=["Jöhn Dœ <john@example.net>"],
        cc="Zoë <zoe@example.org>",
        bcc=["Secret Auditor <audit@example.org>"],
        from_="Hato Team <noreply@app.example>",
        text=text,
        html="<p>こんにちは <b>Ünïcödé</b></p>",
        attachments=[("報告書.pdf", b"%PDF-1.7\n\x00\xff\xfe"), picture],
        headers={"X-Campaign": "spring"},
    )
    received = chain.delivered(queue_id)
    assert chain.wait(queue_id).state == "sent"
    assert len(chain.sink.messages) == 1  # the refused ones never left
    assert received.rcpt_tos == ("john@example.net", "zoe@example.org", "audit@example.org")
    assert received.data.isascii()
    msg = parse(received.data)
    assert msg["Bcc"] is None and b"audit@" not in received.data
    assert msg["Subject"] == "パスワードの再設定 — Ünïcödé ✓"
    assert msg["To"].addresses[0].display_name == "Jöhn Dœ"
    assert msg["Cc"].addresses[0].display_name == "Zoë"
    assert msg["X-Campaign"] == "spring"
    assert msg["Message-ID"] == chain.ids[queue_id]
    plain = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert plain is not None and plain.get_content().replace("\r\n", "\n") == text
    assert html is not None and "Ünïcödé" in html.get_content()
    files = {p.get_filename(): p for p in msg.iter_attachments()}
    assert files["報告書.pdf"].get_content_type() == "application/pdf"
    assert files["報告書.pdf"].get_payload(decode=True) == b"%PDF-1.7\n\x00\xff\xfe"
    assert files["hato.png"].get_content_type() == "image/png"
    assert files["hato.png"].get_payload(decode=True) == picture.read_bytes()


def test_relay_down_deferred_then_sent(chain: Chain) -> None:
    chain.relay.stop()
    chain.start_worker()
    queue_id = chain.send("While the relay is down")
    deferred = chain.wait(queue_id, "deferred", "sent", "failed")
    assert deferred.state == "deferred", deferred
    assert deferred.reply.startswith("4"), deferred.reply
    chain.relay.start()
    chain.delivered(queue_id)
    sent = chain.wait(queue_id)
    assert sent.state == "sent" and sent.reply.startswith("250 ")
    assert sent.attempts >= 2


def test_relay_answering_5xx_fails_with_the_reason(
    chain: Chain, hato_serve: Callable[..., HatoServe]
) -> None:
    strict = hato_serve(env={"RELAYHOST": chain.sink.relayhost, "HATO_MESSAGE_SIZE_LIMIT": "4096"})
    chain.start_worker(HATO_SMTP_PORT=str(strict.port))
    big = chain.send("Too big", attachments=[("big.bin", b"\x00" * 20_000)])
    small = chain.send("Small enough")
    failed = chain.wait(big)
    assert failed.state == "failed", failed
    assert failed.reason.startswith("552"), failed.reason
    assert chain.wait(small).state == "sent"
    chain.delivered(small)
    assert set(subjects_received(chain.sink)) == {"Small enough"}
    worker_log = chain.workers[0].log
    assert "status=bounced" in worker_log and "552" in worker_log
    assert "notification=" not in worker_log  # no DSN to noreply@


def test_worker_killed_mid_batch_loses_nothing(
    chain: Chain, request: pytest.FixtureRequest
) -> None:
    duplicates = scenario_kill_mid_batch(chain)
    # Reported (junit user property and -s output), not asserted: at least once allows them.
    request.node.user_properties.append(("duplicate_deliveries", sum(duplicates.values())))


@pytest.fixture
def private_chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    recording_sink: RecordingSink,
) -> Iterator[tuple[Chain, PrivatePostgres]]:
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        url = f"{server.url}?pool_timeout=2"
        for chain in build_chain(request, tmp_path, hato_serve, recording_sink, url):
            yield chain, server
    finally:
        server.cleanup()


def test_postgres_restarted_under_a_running_worker(
    private_chain: tuple[Chain, PrivatePostgres],
) -> None:
    chain, server = private_chain

    def restart() -> None:
        server.stop()
        server.start()

    scenario_queue_restart(chain, restart)
    # It did see the server go away (the pool replaced its connections).
    assert "psycopg" in chain.workers[0].log or "claim failed" in chain.workers[0].log
