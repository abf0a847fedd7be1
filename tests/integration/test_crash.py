"""Crash tests: ``kill -9`` of hato serve under load; every acknowledged message is delivered.

Clients keep a ledger of each message that got ``250`` (with its queue id). After the
kill, hato serve is restarted on the same data dir and port; the test waits until the
recording sink behind it has every ledger entry. A crash may cause duplicates (delivered
twice, or delivered though the client never saw the 250), never a loss: 250 means durable.
"""

from __future__ import annotations

import contextlib
import re
import signal
import smtplib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from peers.hato import HatoFactory, HatoServe
from peers.sinks import Received, RecordingSink

pytestmark = pytest.mark.slow

SENDER = "load@dbmx.net"
QUEUED_RE = re.compile(r"queued as (\S+)")
LEDGER_HEADER = "X-Ledger-Seq"


@dataclass
class Ledger:
    """Who got a 250 for what: shared by all client threads."""

    total: int
    deadline: float
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acked: dict[int, str] = field(default_factory=dict)
    unacked: set[int] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    _next: int = 0
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self.total or time.monotonic() > self.deadline:
                return None
            self._next += 1
            return self._next

    def ack(self, seq: int, queue_id: str) -> None:
        with self._lock:
            self.acked[seq] = queue_id
            self._lock.notify_all()

    def fail(self, seq: int, error: BaseException | str) -> None:
        with self._lock:
            self.unacked.add(seq)
            name = error if isinstance(error, str) else type(error).__name__
            self.errors[name] += 1

    def wait_acked(self, count: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.acked) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.2))
            return len(self.acked)

    def message(self, seq: int) -> bytes:
        return (
            f"From: <{SENDER}>\r\nTo: <sink@example.org>\r\nSubject: crash test {seq}\r\n"
            f"Message-ID: <crash-{self.run}-{seq}@test.dbmx.net>\r\n"
            f"{LEDGER_HEADER}: {self.run}-{seq}\r\n\r\n"
            f"message {seq} of run {self.run}\r\n" + ("x" * 74 + "\r\n") * 20
        ).encode()


def client_loop(host: str, port: int, ledger: Ledger, server_up: threading.Event) -> None:
    """One SMTP session sending messages back to back; reconnects after the crash."""
    conn: smtplib.SMTP | None = None
    try:
        while (seq := ledger.take()) is not None:
            try:
                if conn is None:
                    conn = smtplib.SMTP(host, port, timeout=15)
                    conn.ehlo("load.test")
                code, reply = conn.mail(SENDER)
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
                code, reply = conn.rcpt("sink@example.org")
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
                code, reply = conn.data(ledger.message(seq))
                match = QUEUED_RE.search(reply.decode(errors="replace"))
                if code == 250 and match:
                    ledger.ack(seq, match.group(1))
                else:
                    ledger.fail(seq, f"DATA {code}")
                    conn.rset()
            except (OSError, smtplib.SMTPException) as exc:
                ledger.fail(seq, exc)
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.close()
                    conn = None
                # Down (killed, not yet restarted): wait for the restart, not spin.
                server_up.wait(timeout=max(0.0, ledger.deadline - time.monotonic()))
    finally:
        if conn is not None:
            try:
                conn.quit()
            except (OSError, smtplib.SMTPException):
                conn.close()


def ledger_seq(data: bytes) -> str | None:
    match = re.search(rb"^" + LEDGER_HEADER.encode() + rb": (\S+)\r?$", data, re.M | re.I)
    return match.group(1).decode() if match else None


def run_and_kill(
    hato: HatoServe,
    ledger: Ledger,
    *,
    sessions: int,
    kill_after: int,
) -> tuple[int, int]:
    """Send with ``sessions`` clients, kill -9 after ``kill_after`` acks, restart, finish."""
    server_up = threading.Event()
    server_up.set()
    threads = [
        threading.Thread(
            target=client_loop, args=(hato.host, hato.port, ledger, server_up), daemon=True
        )
        for _ in range(sessions)
    ]
    for thread in threads:
        thread.start()
    acked_at_kill = ledger.wait_acked(kill_after, timeout=ledger.deadline - time.monotonic())
    server_up.clear()
    hato.kill(signal.SIGKILL)
    hato.start(timeout=30)
    server_up.set()
    for thread in threads:
        thread.join(timeout=max(1.0, ledger.deadline - time.monotonic() + 20))
    assert not any(t.is_alive() for t in threads), "client threads did not finish"
    return acked_at_kill, len(ledger.acked)


def verify_delivered(
    hato: HatoServe, sink: RecordingSink, ledger: Ledger, timeout: float
) -> dict[str, int]:
    wanted = {f"{ledger.run}-{seq}" for seq in ledger.acked}

    def have_all(messages: Sequence[Received]) -> bool:
        return wanted <= {ledger_seq(m.data) for m in messages}

    # On timeout fall through: the report below names what is missing.
    with contextlib.suppress(AssertionError):
        sink.wait_for(have_all, timeout=timeout, what="every acknowledged message")
    counts = Counter(ledger_seq(m.data) for m in sink.messages)
    missing = sorted(wanted - set(counts))
    acked_keys = {f"{ledger.run}-{seq}" for seq in ledger.acked}
    report = {
        "acknowledged": len(ledger.acked),
        "unacknowledged": len(ledger.unacked),
        "delivered_distinct": len(counts),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "delivered_without_ack": len([k for k in counts if k not in acked_keys]),
        "missing": len(missing),
    }
    print(f"crash test report: {report}; client errors: {dict(ledger.errors)}")
    if missing:
        ids = [ledger.acked[int(m.rsplit("-", 1)[1])] for m in missing]
        queued = [item for item in hato.queue_list() if item["id"] in ids]
        log_lines = [line for line in hato.lines() if any(i in line for i in ids[:10])]
        raise AssertionError(
            f"{len(missing)} acknowledged message(s) never delivered: {ids[:20]}; report {report}\n"
            f"in hato's queue: {queued}\nlog lines naming them:\n" + "\n".join(log_lines)
        )
    return report


def relay_env(sink: RecordingSink) -> dict[str, str]:
    return {"RELAYHOST": sink.relayhost, "HATO_RELAY_TLS": "none", "HATO_MAX_QUEUE_LIFETIME": "300"}


def test_kill_9_under_load_loses_no_acknowledged_message(
    hato_serve: HatoFactory,
    recording_sink: RecordingSink,
    record_property: Callable[[str, object], None],
) -> None:
    total, sessions, cap = 300, 20, 60.0
    hato = hato_serve(env=relay_env(recording_sink))
    ledger = Ledger(total=total, deadline=time.monotonic() + cap)

    acked_at_kill, acked = run_and_kill(hato, ledger, sessions=sessions, kill_after=total // 3)

    assert acked_at_kill >= total // 3, f"only {acked_at_kill} acks before the kill"
    assert acked > acked_at_kill, "no message was acknowledged after the restart"
    report = verify_delivered(hato, recording_sink, ledger, timeout=60)
    for key, value in report.items():
        record_property(key, value)


def test_kill_9_with_a_backlog_delivers_it_after_restart(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """Queued and deferred (upstream down) at the kill; delivered once both are back."""
    recording_sink.stop()
    hato = hato_serve(env=relay_env(recording_sink))
    ledger = Ledger(total=60, deadline=time.monotonic() + 60)
    server_up = threading.Event()
    server_up.set()
    threads = [
        threading.Thread(target=client_loop, args=(hato.host, hato.port, ledger, server_up))
        for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert len(ledger.acked) == ledger.total, dict(ledger.errors)
    hato.wait_for_log(r"status=deferred", timeout=30)

    hato.kill(signal.SIGKILL)
    recording_sink.start()
    hato.start()

    verify_delivered(hato, recording_sink, ledger, timeout=60)


def test_kill_9_while_delivering_to_a_slow_upstream(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """Killed with deliveries in flight (some accepted upstream, not yet marked): resent."""
    hato = hato_serve(env=relay_env(recording_sink))
    ledger = Ledger(total=100, deadline=time.monotonic() + 60)
    # Hold the deliveries back with 4xx so that many are in flight or due at the kill.
    recording_sink.fail_data("451 4.3.0 Slow down", times=40)
    server_up = threading.Event()
    server_up.set()
    threads = [
        threading.Thread(target=client_loop, args=(hato.host, hato.port, ledger, server_up))
        for _ in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert len(ledger.acked) == ledger.total, dict(ledger.errors)
    recording_sink.wait_for(lambda ms: len(ms) >= 10, timeout=30, what="some deliveries")

    hato.kill(signal.SIGKILL)
    hato.start()

    report = verify_delivered(hato, recording_sink, ledger, timeout=60)
    assert report["delivered_without_ack"] == 0
