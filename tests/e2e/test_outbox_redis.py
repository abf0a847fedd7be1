"""The outbox end to end on Redis: Mailer.send → Redis → hato worker → hato serve (local
relay) → a recording sink, with the worker killed with SIGKILL and Redis restarted
(a private redis-server with AOF, killed with SIGKILL) under the worker."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_outbox_peers import (
    Chain,
    build_chain,
    redis_prefix,
    scenario_end_to_end,
    scenario_kill_mid_batch,
    scenario_queue_restart,
)

from peers.datastores import PrivateRedis
from peers.hato import HatoServe
from peers.sinks import RecordingSink


@pytest.fixture
def chain(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    recording_sink: RecordingSink,
) -> Iterator[Chain]:
    with redis_prefix() as url:
        yield from build_chain(request, tmp_path, hato_serve, recording_sink, url)


def test_end_to_end_status_sent_with_the_relays_reply(chain: Chain) -> None:
    scenario_end_to_end(chain)


def test_relay_down_deferred_then_sent(chain: Chain) -> None:
    chain.relay.stop()
    chain.start_worker()
    queue_id = chain.send("While the relay is down")
    deferred = chain.wait(queue_id, "deferred", "sent", "failed")
    assert deferred.state == "deferred" and deferred.reply.startswith("4"), deferred
    chain.relay.start()
    chain.delivered(queue_id)
    assert chain.wait(queue_id).state == "sent"


def test_worker_killed_mid_batch_loses_nothing(
    chain: Chain, request: pytest.FixtureRequest
) -> None:
    duplicates = scenario_kill_mid_batch(chain)
    # Reported (junit user property and -s output), not asserted: at least once allows them.
    request.node.user_properties.append(("duplicate_deliveries", sum(duplicates.values())))


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_redis_restarted_under_a_running_worker(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hato_serve: Callable[..., HatoServe],
    recording_sink: RecordingSink,
    how: str,
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        for chain in build_chain(
            request, tmp_path, hato_serve, recording_sink, f"{server.url}?prefix=outbox:"
        ):

            def restart() -> None:
                # SIGKILL: only what the AOF (appendfsync always) holds survives.
                server.stop(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
                server.start()

            scenario_queue_restart(chain, restart)
    finally:
        server.stop()
