"""One ``/metrics``, console and ``/readyz`` over every process of ``hato serve`` with
HATO_PROCESSES=2: the intake processes' SMTP counters reach the delivery process's
scrape, summed, one series per label set, monotonic across a kill -9 of an intake child;
a stopped child is answered for with its last known values."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_crash import relay_env
from test_processes import PROCESSES, STARTED_RE, child_pids, connected_pids

from peers import free_port, missing
from peers.hato import HatoFactory, HatoServe
from peers.sinks import RecordingSink

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def send(hato: HatoServe, connections: int, per_connection: int) -> None:
    """``connections`` SMTP sessions one after the other, each with ``per_connection``
    messages; every one must be answered 250."""
    for number in range(connections):
        with smtplib.SMTP(hato.host, hato.port, timeout=30) as client:
            for seq in range(per_connection):
                refused = client.sendmail(
                    "app@example.com",
                    ["sink@example.org"],
                    f"Subject: {number}.{seq}\r\n\r\nhello\r\n",
                )
                assert refused == {}


def scrape(url: str) -> tuple[str, Samples]:
    """The text of /metrics and its samples; a name and label set seen twice fails."""
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"{key} appears twice"
            samples[key] = s.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (apt package prometheus)")
        return
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_one_metrics_covers_every_process(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    port = free_port()
    hato = hato_serve(
        env={**relay_env(recording_sink), **PROCESSES, "HATO_HTTP_LISTEN": f"127.0.0.1:{port}"}
    )
    hato.wait_for_log(rf"http on 127\.0\.0\.1:{port}", timeout=30)
    url = f"http://127.0.0.1:{port}"
    listener = f"smtp=127.0.0.1:{hato.port}"

    def readyz() -> dict[str, dict[str, object]]:
        checks: dict[str, dict[str, object]] = httpx.get(url + "/readyz", timeout=30).json()[
            "checks"
        ]
        return checks

    wait(
        lambda: readyz().get("intake processes", {}).get("detail") == "2 of 2 answering",
        "both intake processes answering",
    )
    assert readyz()[f"listener {listener}"] == {"ok": True, "detail": "bound"}
    # Before any mail: the intake processes' series are there, at 0 (rates work at once).
    _, s = scrape(url)
    for name in ("hato_smtp_connections_total", "hato_smtp_connections_active"):
        assert s[(name, frozenset({("listener", listener)}))] == 0, name
    for result in ("accepted", "rejected"):
        key = ("hato_smtp_messages_total", frozenset({("listener", listener), ("result", result)}))
        assert s[key] == 0

    # 12 connections of 3 messages: the kernel gives both intake processes some.
    send(hato, connections=12, per_connection=3)
    assert len(connected_pids(hato, want=2)) == 2
    recording_sink.wait_for_count(36, timeout=60)

    def counted(accepted: int, connections: int) -> Callable[[], bool]:
        def check() -> bool:
            _, s = scrape(url)
            return (
                value(s, "hato_smtp_messages_total", listener=listener, result="accepted")
                == accepted
                and value(s, "hato_smtp_connections_total", listener=listener) == connections
                and value(s, "hato_smtp_connections_active", listener=listener) == 0
            )

        return check

    wait(counted(36, 12), "36 accepted over 12 connections in /metrics")
    text, s = scrape(url)
    assert value(s, "hato_events_total", event="accepted") == 36
    assert value(s, "hato_smtp_messages_total", listener=listener, result="rejected") == 0
    assert value(s, "hato_deliveries_total", route="relay", status="sent") == 36
    assert value(s, "hato_ready") == 1
    assert [k for k in s if k[0] == "hato_build_info"] == [
        ("hato_build_info", frozenset({("version", "0.1.0"), ("role", "serve")}))
    ]
    promtool_check(text)
    status = httpx.get(url + "/status", timeout=30).text
    assert f"127.0.0.1:{hato.port}" in status and "2 of 2 answering" in status

    # kill -9 of one intake child: its slot's counts stay, the new child's add to them.
    victim = child_pids(hato, "intake")[-1]
    mark = hato.mark()
    os.kill(victim, signal.SIGKILL)
    hato.wait_for_log(rf"intake process {victim} ended \(signal 9\)", timeout=30, since=mark)
    hato.wait_for_log(STARTED_RE.format(role="intake"), timeout=30, since=mark)
    _, s = scrape(url)
    assert value(s, "hato_smtp_messages_total", listener=listener, result="accepted") == 36
    wait(
        lambda: readyz().get("intake processes", {}).get("detail") == "2 of 2 answering",
        "the restarted intake process answering",
    )
    send(hato, connections=6, per_connection=2)
    wait(counted(48, 18), "48 accepted over 18 connections after the kill")
    text, s = scrape(url)
    assert value(s, "hato_events_total", event="accepted") == 48
    promtool_check(text)

    # A stopped intake child: the scrape still answers, with its last known counts.
    stopped = child_pids(hato, "intake")[-1]
    mark = hato.mark()
    os.kill(stopped, signal.SIGSTOP)
    try:
        _, s = scrape(url)
        assert value(s, "hato_smtp_messages_total", listener=listener, result="accepted") == 48
        hato.wait_for_log(
            rf"intake process {stopped} \(slot \d\) did not answer .*last known values",
            timeout=30,
            since=mark,
        )
        answer = httpx.get(url + "/readyz", timeout=30)
        assert answer.status_code == 503
        assert answer.json()["checks"]["intake processes"]["detail"] == "1 of 2 answering"
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert re.search(r"Traceback", hato.log) is None
