"""HATO_TRACE_STAGES on a real ``hato serve`` relaying to a sink: one line per message."""

from __future__ import annotations

import json
import smtplib
import time
from pathlib import Path

from peers.hato import HatoFactory
from peers.sinks import RecordingSink


def test_relayed_messages_leave_one_line_with_every_stage(
    hato_serve: HatoFactory, recording_sink: RecordingSink, tmp_path: Path
) -> None:
    trace = tmp_path / "stages.jsonl"
    hato = hato_serve(
        env={
            "RELAYHOST": recording_sink.relayhost,
            "HATO_RELAY_TLS": "none",
            "HATO_TRACE_STAGES": str(trace),
        }
    )
    ids = []
    with smtplib.SMTP(hato.host, hato.port, timeout=15) as client:
        client.ehlo("trace.test")
        for n in range(3):
            assert client.mail("load@dbmx.net")[0] == 250
            assert client.rcpt("sink@example.org")[0] == 250
            code, reply = client.data(f"Subject: trace {n}\r\n\r\nbody {n}\r\n".encode())
            assert code == 250
            ids.append(reply.decode().rsplit(" ", 1)[-1])
    recording_sink.wait_for(lambda ms: len(ms) >= 3, timeout=30, what="three messages")

    deadline = time.monotonic() + 30
    records: dict[str, dict[str, object]] = {}
    while time.monotonic() < deadline and not set(ids) <= set(records):
        if trace.exists():
            records = {
                r["id"]: r for r in map(json.loads, trace.read_text().splitlines()) if "id" in r
            }
        time.sleep(0.05)
    assert set(ids) <= set(records), (ids, records)
    for queue_id in ids:
        record = records[queue_id]
        times = [record[s] for s in ("accepted", "committed", "claimed", "connected",
                                     "delivered", "recorded")]  # fmt: skip
        assert all(isinstance(t, float) for t in times), record
        assert times == sorted(times), record
        assert set(record["ms"]) == {"commit", "wait", "connect", "deliver", "record"}  # type: ignore[arg-type]
