"""The merge of the processes' metrics (hato.web.process_metrics): sums, offsets on a
child's restart, gauges from the delivery process only; and one ask over a real socket."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hato.web.metrics import Metrics
from hato.web.process_metrics import (
    IntakeReporter,
    IntakeSockets,
    IntakeView,
    ListenerState,
    SlotTotals,
    merge,
    parse,
    read_answer,
    render,
)

LISTENER = "smtp=127.0.0.1:2525"


def intake(connections: int, accepted: int, active: int = 0) -> Metrics:
    metrics = Metrics(role="serve")
    metrics.listeners_known([LISTENER])
    for _ in range(connections):
        metrics.smtp_connected(LISTENER)
    for _ in range(accepted):
        metrics.smtp_message(LISTENER, accepted=True)
    metrics.event("accepted", accepted)
    metrics.connections_active.labels(LISTENER).set(active)
    return metrics


def delivery() -> Metrics:
    metrics = Metrics(role="serve", clock=lambda: 1000.0)
    metrics.listeners_known([])
    metrics.delivery("relay", "sent", 2.0)
    metrics.event("relayed")
    metrics.ready.set(1)
    metrics.queue_messages.labels("sent").set(7)
    return metrics


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape; a name and label set seen twice fails."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"{key} twice"
            out[key] = s.value
    return out


def value(
    s: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return s[(name, frozenset(labels.items()))]


def scrape(own: Metrics, *slots: SlotTotals) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples(render(merge(parse(own.render().decode()), [t.contribution() for t in slots])))


def test_one_process_alone_is_rendered_as_it_was() -> None:
    own = delivery()
    assert render(merge(parse(own.render().decode()), [])) == own.render()


def test_counters_and_active_connections_are_summed_gauges_are_the_delivery_s() -> None:
    first, second = SlotTotals(), SlotTotals()
    first.update("a", parse(intake(3, 2, active=1).render().decode()))
    second.update("b", parse(intake(4, 5, active=2).render().decode()))
    s = scrape(delivery(), first, second)
    assert value(s, "hato_smtp_connections_total", listener=LISTENER) == 7
    assert value(s, "hato_smtp_messages_total", listener=LISTENER, result="accepted") == 7
    assert value(s, "hato_smtp_messages_total", listener=LISTENER, result="rejected") == 0
    assert value(s, "hato_smtp_connections_active", listener=LISTENER) == 3
    assert value(s, "hato_events_total", event="accepted") == 7
    assert value(s, "hato_events_total", event="relayed") == 1
    assert value(s, "hato_delivery_seconds_count", route="relay") == 1
    assert value(s, "hato_deliveries_total", route="relay", status="sent") == 1
    # Gauges: the delivery process's alone (the intakes' hato_ready is 0, queue unread).
    assert value(s, "hato_ready") == 1
    assert value(s, "hato_queue_messages", state="sent") == 7
    assert value(s, "hato_last_delivery_timestamp_seconds") == 1000.0
    assert value(s, "hato_build_info", version=_version(s), role="serve") == 1
    created = [k for k in s if k[0] == "hato_smtp_connections_created"]
    assert len(created) == 1


def _version(s: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> str:
    (key,) = [k for k in s if k[0] == "hato_build_info"]
    return dict(key[1])["version"]


def test_a_restarted_child_adds_to_what_its_slot_counted_before() -> None:
    slot = SlotTotals()
    slot.update("pid-1", parse(intake(10, 8, active=3).render().decode()))
    slot.update("pid-2", parse(intake(1, 1, active=1).render().decode()))  # restarted: from 0
    s = scrape(delivery(), slot)
    assert value(s, "hato_smtp_connections_total", listener=LISTENER) == 11
    assert value(s, "hato_smtp_messages_total", listener=LISTENER, result="accepted") == 9
    assert value(s, "hato_events_total", event="accepted") == 9
    assert value(s, "hato_smtp_connections_active", listener=LISTENER) == 1  # not carried
    slot.update("pid-2", parse(intake(2, 2).render().decode()))
    slot.update("pid-3", parse(intake(0, 0).render().decode()))
    s = scrape(delivery(), slot)
    assert value(s, "hato_smtp_connections_total", listener=LISTENER) == 12
    assert value(s, "hato_smtp_messages_total", listener=LISTENER, result="accepted") == 10


def test_an_older_answer_of_the_same_child_does_not_move_a_sum_back() -> None:
    slot = SlotTotals()
    slot.update("pid-1", parse(intake(5, 5).render().decode()))
    slot.update("pid-1", parse(intake(3, 3).render().decode()))
    s = scrape(delivery(), slot)
    assert value(s, "hato_smtp_connections_total", listener=LISTENER) == 5


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_intake_s_answer_over_a_unix_socket_and_a_silent_one(loop: str) -> None:
    async def run() -> None:
        sockets = IntakeSockets([1, 2], owner=-12345)
        sockets.bind()
        try:
            metrics = intake(2, 1, active=1)
            state = ListenerState("smtp", "127.0.0.1", 2525, LISTENER, True, 1)
            assert sockets.sockets[1] is not None
            reporter = IntakeReporter(sockets.sockets[1], metrics.registry, lambda: [state])
            task = asyncio.create_task(reporter.run())
            warnings: list[str] = []
            view = IntakeView(sockets.addresses(), warn=warnings.append, timeout=0.5)
            await view.poll()  # slot 2 is bound, but nobody answers on it
            task.cancel()
            assert view.answering() == (1, 2)
            assert view.active_connections() == {LISTENER: 1}
            assert view.listeners() == [("smtp", "127.0.0.1", 2525)]
            assert view.serving() == [(LISTENER, True)]
            assert len(warnings) == 1 and "slot 2" in warnings[0], warnings
            assert "last known values" in warnings[0]
            s = samples(view.render(delivery().registry))
            assert value(s, "hato_smtp_connections_total", listener=LISTENER) == 2
            await asyncio.gather(task, return_exceptions=True)
            await view.poll()  # now slot 1 is silent too: its last values stay
            assert view.answering() == (0, 2)
            s = samples(view.render(delivery().registry))
            assert value(s, "hato_smtp_connections_total", listener=LISTENER) == 2
        finally:
            sockets.close()

    if loop == "uvloop":  # what hato serve runs on when the fast extra is installed
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run())
    else:
        asyncio.run(run())


def test_the_socket_names_are_abstract_and_carry_the_supervisor_pid() -> None:
    sockets = IntakeSockets([1, 3], owner=4242)
    assert sockets.addresses() == {1: "\0hato-4242-metrics-1", 3: "\0hato-4242-metrics-3"}
    sockets.bind()
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect("\0hato-4242-metrics-3")
        probe.close()
        sockets.attach(1)
        assert sockets.mine is sockets.sockets[1]
        assert sockets.sockets[3].fileno() == -1
    finally:
        sockets.close()


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'{"pid": 1}', b'{"pid": "x", "incarnation": "", "metrics": "", "listeners": []}'],
)
def test_what_is_not_an_intake_answer_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_answer(data)


def test_an_intake_answer_reads_back() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        state = ListenerState("submission", "::1", 587, "submission=[::1]:587", False, 4)
        reporter = IntakeReporter(sock, intake(1, 1).registry, lambda: [state])
        answer = read_answer(reporter.answer())
    assert answer.listeners == [state]
    assert answer.incarnation == reporter.incarnation
    family = answer.metrics["hato_smtp_connections"]
    assert family.kind == "counter"
    assert family.samples[("hato_smtp_connections_total", (("listener", LISTENER),))] == 1
    assert answer.metrics["hato_smtp_connections_created"].kind == "created"
    assert answer.metrics["hato_smtp_connections_active"].kind == "summed"
    assert answer.metrics["hato_ready"].kind == "own"
