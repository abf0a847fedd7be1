"""Flow control (HATO_IN_FLOW_DELAY, HATO_QUEUE_HIGH_WATER) in ``hato serve``: while
delivery is stuck the replies to DATA are held back, yet every message is accepted,
and intake goes back to full speed once delivery has caught up."""

from __future__ import annotations

import smtplib

import pytest
from test_crash import relay_env

from peers.hato import HatoFactory
from peers.sinks import RecordingSink

pytestmark = pytest.mark.slow


def send(host: str, port: int, count: int, start: int = 0) -> list[int]:
    codes = []
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("flow.test")
        for n in range(start, start + count):
            client.mail("load@dbmx.net")
            client.rcpt("sink@example.org")
            code, _ = client.data(f"Subject: flow {n}\r\n\r\nmessage {n}\r\n".encode())
            codes.append(code)
    return codes


@pytest.mark.parametrize("processes", ["1", "2"])
def test_intake_slows_down_while_delivery_is_stuck(
    hato_serve: HatoFactory, recording_sink: RecordingSink, processes: str
) -> None:
    recording_sink.stop()  # delivery falls behind: everything stays unsent
    hato = hato_serve(
        env={
            **relay_env(recording_sink),
            "HATO_QUEUE_HIGH_WATER": "3",
            "HATO_IN_FLOW_DELAY": "0.5",
            "HATO_PROCESSES": processes,
        }
    )
    mark = hato.mark()
    assert send(hato.host, hato.port, 6) == [250] * 6  # slowed, never refused
    hato.wait_for_log(r"status=slowing intake \(\d+ unsent messages\)", timeout=30, since=mark)

    recording_sink.start()
    recording_sink.wait_for_count(6, timeout=60)
    mark = hato.mark()
    # One message per connection: with two processes, the one that held back may need a
    # few connections before the kernel gives it one.
    for n in range(6, 30):
        assert send(hato.host, hato.port, 1, start=n) == [250]
        if any("status=intake at full speed" in line for line in hato.lines(mark)):
            break
    hato.wait_for_log(r"status=intake at full speed", timeout=30, since=mark)
