"""``hato events`` as a user runs it, on an SQLite queue another process writes."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from hato.events import DeliveryEvent, new_event_id
from hato.message import Envelope
from hato.queue import open_queue

SRC = str(Path(__file__).resolve().parents[2] / "src")
FIELDS = {
    "event_id", "event", "time", "node", "queue_id", "envid", "message_id", "recipient",
    "route", "relay_host", "relay_ip", "reply_code", "reply_enhanced", "reply_text",
    "tls_version", "tls_verified", "attempt", "tls_policy",
}  # fmt: skip


def env_for(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["HATO_QUEUE_URL"] = f"sqlite:///{tmp_path / 'q.db'}"
    return env


def hato(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hato", "events", *args],
        capture_output=True,
        text=True,
        env=env_for(tmp_path),
        timeout=60,
    )


def event(name: str, envid: str, when: float) -> DeliveryEvent:
    return DeliveryEvent(
        event_id=new_event_id(),
        event=name,
        time=when,
        node="relay.dbmx.net",
        queue_id="",
        recipient="someone@example.net",
        envid=envid,
        message_id="<m1@dbmx.net>",
        route="smtp",
        relay_host="web.app.internal",
        relay_ip="127.0.0.1",
        reply_code=250,
        reply_enhanced="2.0.0",
        reply_text="queued",
    )


async def fill(tmp_path: Path) -> str:
    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
    await queue.open()
    try:
        now = time.time()
        qid = await queue.enqueue(
            Envelope("a@dbmx.net", ["someone@example.net"]),
            b"Subject: x\r\n\r\nbody\r\n",
            events=[event("accepted", "OUTBOX-1", now)],
        )
        old = event("accepted", "OUTBOX-0", now - 3 * 3600)
        await queue.add_events([old])
    finally:
        await queue.close()
    return qid


def test_json_lines_with_the_exact_fields_and_the_filters(tmp_path: Path) -> None:
    qid = asyncio.run(fill(tmp_path))
    everything = hato(tmp_path, "--json")
    assert everything.returncode == 0, everything.stderr
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    assert [(e["event"], e["envid"]) for e in lines] == [
        ("accepted", "OUTBOX-1"),
        ("accepted", "OUTBOX-0"),
    ]
    assert set(lines[0]) == FIELDS and lines[0]["queue_id"] == qid
    by_envid = hato(tmp_path, "--json", "--envid", "OUTBOX-0")
    assert [json.loads(x)["envid"] for x in by_envid.stdout.splitlines()] == ["OUTBOX-0"]
    recent = hato(tmp_path, "--json", "--since", "2h")
    assert [json.loads(x)["envid"] for x in recent.stdout.splitlines()] == ["OUTBOX-1"]
    text = hato(tmp_path, "--envid", "OUTBOX-1")
    [line] = text.stdout.splitlines()
    assert f"relay.dbmx.net {qid} accepted to=<someone@example.net> envid=OUTBOX-1" in line
    assert line.endswith("(250 2.0.0 queued)")


def test_a_bad_since_is_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    result = hato(tmp_path, "--since", "last tuesday")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("hato: --since: not a time")


def test_follow_prints_events_as_they_are_stored(tmp_path: Path) -> None:
    asyncio.run(fill(tmp_path))
    follower = subprocess.Popen(
        [sys.executable, "-m", "hato", "events", "--follow", "--json", "--envid", "LATER"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(tmp_path),
    )
    try:

        async def add() -> None:
            queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
            await queue.open()
            try:
                await queue.add_events([event("delivered", "LATER", time.time())])
            finally:
                await queue.close()

        asyncio.run(add())
        assert follower.stdout is not None
        ready, _, _ = select.select([follower.stdout], [], [], 60)
        assert ready, "hato events --follow printed nothing within 60 s"
        line = follower.stdout.readline()
        assert json.loads(line)["event"] == "delivered", follower.stderr
    finally:
        follower.terminate()
        follower.wait(10)
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()
