"""Latency benchmark: accept → delivered at a steady rate, hato serve and Postfix side by side.

Usage (as root: Postfix's master needs it)::

    /work/venv/bin/python bench/latency.py                  # 100 msg/s, 20 clients, 60 s each
    /work/venv/bin/python bench/latency.py --quick          # short smoke run (10 s each)
    /work/venv/bin/python bench/latency.py --rate 100 --clients 20 --seconds 120 --runs 3 \\
        --trace-stages /tmp/stages.jsonl        # hato: one JSON line per message per stage

For every run and system (interleaved, as in ``smtp_bench.py``, whose ``Hato`` and
``Postfix`` starters are used here) it starts a fresh timestamping sink (an aiosmtpd
server in a child process), the system relaying to it, and ``--clients`` SMTP sessions
that together send ``--rate`` messages a second on a fixed schedule (open loop: a client
that falls behind sends its next message at once, it does not skip), bounded by
``--seconds`` and ``--messages``. Each message carries ``X-Bench-Sent: <unix time>``,
taken just before MAIL FROM; the sink subtracts it from the time DATA completed there.
So the figure is *accept → delivered* as the sender and the next hop see it: the client's
whole SMTP transaction (including the 250 after fsync), the queue, and the relay hop.

Printed per system: p50, p90, p99 and max of the messages sent after the first
``--warmup`` seconds, how many arrived of how many were sent, the durability settings it
ran with. Only 127.0.0.1 is used; every child is bounded
and killed on exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import smtp_bench
from smtp_bench import HOST, REPO, BenchError, Hato, Postfix, System, free_port

HEADER = "X-Bench-Sent"
SENDER = "from@example.org"
RECIPIENT = "to@example.net"


# --- the sink: a child process, so that its timestamps do not wait on our GIL ------------


def sink_main(port: int) -> int:
    """``latency.py --sink-child PORT``: print ``ready``, then one line per message:
    ``<sent> <arrived>`` (unix seconds)."""
    from aiosmtpd.controller import Controller

    out = sys.stdout

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            arrived = time.time()
            data: bytes = getattr(envelope, "content", b"") or b""
            head = data.split(b"\r\n\r\n", 1)[0]
            for line in head.split(b"\r\n"):
                if line.lower().startswith(HEADER.lower().encode() + b":"):
                    out.write(f"{line.split(b':', 1)[1].strip().decode()} {arrived:.6f}\n")
                    out.flush()
                    break
            return "250 2.0.0 Ok"

    controller = Controller(Handler(), hostname=HOST, port=port, ready_timeout=10.0)
    controller.start()
    out.write("ready\n")
    out.flush()
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        controller.stop()
    return 0


class StampSink:
    """The sink child and a reader thread collecting (sent, arrived) pairs."""

    def __init__(self, python: str) -> None:
        self.port = free_port(HOST)
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--sink-child", str(self.port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,  # closed by us: the child's cue to stop
        )
        smtp_bench._children.append(self.proc)  # killed by smtp_bench._cleanup_all on exit
        self.samples: list[tuple[float, float]] = []
        self._cond = threading.Condition()
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if first.strip() != b"ready":
            raise BenchError(f"latency sink did not start: {first!r}")
        self._reader = threading.Thread(target=self._read, daemon=True, name="stamp-sink")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 2:
                with self._cond:
                    self.samples.append((float(parts[0]), float(parts[1])))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, count: int, deadline: float) -> bool:
        with self._cond:
            while len(self.samples) < count:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        smtp_bench._reap(self.proc, signal.SIGTERM, grace=5.0)
        self._reader.join(timeout=5)


# --- the load: a fixed schedule over persistent sessions --------------------------------


@dataclass
class Load:
    sent: int = 0
    failed: int = 0
    late: int = 0  # sends that started more than 50 ms after their slot
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _body(size: int) -> str:
    return ("x" * 70 + "\r\n") * max(1, size // 72)


def client(port: int, slots: list[float], start: float, load: Load, size: int) -> None:
    """Send one message at each of ``slots`` (seconds after ``start``, monotonic)."""
    conn: smtplib.SMTP | None = None
    body = _body(size)
    try:
        for slot in slots:
            wait = start + slot - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.05:
                with load.lock:
                    load.late += 1
            try:
                if conn is None:
                    conn = smtplib.SMTP(HOST, port, timeout=30)
                    conn.ehlo("latency.bench")
                sent = time.time()
                msg = (
                    f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency\r\n"
                    f"{HEADER}: {sent:.6f}\r\n\r\n{body}"
                )
                conn.sendmail(SENDER, [RECIPIENT], msg.encode())
                with load.lock:
                    load.sent += 1
            except (OSError, smtplib.SMTPException) as exc:
                with load.lock:
                    load.failed += 1
                    load.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.close()
                conn = None
    finally:
        if conn is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                conn.quit()


def schedule(rate: float, clients: int, total: int) -> list[list[float]]:
    """Message i at i/rate seconds, dealt round robin to the clients."""
    per: list[list[float]] = [[] for _ in range(clients)]
    for i in range(total):
        per[i % clients].append(i / rate)
    return per


# --- one measurement -------------------------------------------------------------------


@dataclass
class Result:
    system: str
    latencies_ms: list[float]  # of the messages sent after the warm-up
    arrived: int  # every message, warm-up included
    expected: int
    load: Load
    durability: str
    other_cores: float = 0.0  # busy CPU of the machine's other work during the run

    def pct(self, p: float) -> float | None:
        data = sorted(self.latencies_ms)
        if not data:
            return None
        return data[min(len(data) - 1, max(0, round(p / 100 * len(data)) - 1))]


def durability_of(system: str, args: argparse.Namespace) -> str:
    if system == "hato":
        env = {"HATO_FSYNC": "true", **args.hato_env}
        return (
            f"SQLite queue, HATO_FSYNC={env['HATO_FSYNC']}: 250 after fsync"
            if "HATO_QUEUE_URL" not in env
            else f"queue {env['HATO_QUEUE_URL'].split('?')[0]}: 250 after commit"
        )
    return "Postfix defaults: queue file fsync'd before 250 (smtpd, cleanup)"


def measure(system_name: str, args: argparse.Namespace) -> Result:
    sink = StampSink(args.python)
    system: System | None = None
    try:
        cls = {"hato": Hato, "postfix": Postfix}[system_name]
        system = cls(sink.port, args.clients, args)
        total = args.total
        load = Load()
        plan = schedule(args.rate, args.clients, total)
        busy0, own0, t0 = smtp_bench.machine_busy(), smtp_bench.own_cpu(), time.monotonic()
        system0, sink0 = smtp_bench.tree_cpu(system.pid()), smtp_bench.tree_cpu(sink.proc.pid)
        start = time.monotonic() + 0.2
        counted_from = time.time() + 0.2 + args.warmup
        threads = [
            threading.Thread(
                target=client, args=(system.port, slots, start, load, args.size), daemon=True
            )
            for slots in plan
        ]
        for thread in threads:
            thread.start()
        deadline = start + args.seconds + args.timeout
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        sink.wait_for(load.sent, deadline + args.drain)
        with sink._cond:
            samples = list(sink.samples)
        # The machine's busy CPU less this process (the load), the system and the sink.
        busy = smtp_bench.machine_busy() - busy0 - (smtp_bench.own_cpu() - own0)
        system_cpu = smtp_bench.tree_cpu(system.pid()) - system0
        system_cpu += smtp_bench.tree_cpu(sink.proc.pid) - sink0
        return Result(
            system_name,
            [(arrived - sent) * 1000 for sent, arrived in samples if sent >= counted_from],
            len(samples),
            load.sent,
            load,
            durability_of(system_name, args),
            max(0.0, (busy - system_cpu) / (time.monotonic() - t0)),
        )
    finally:
        if system is not None:
            system.close()
        sink.close()


# --- report ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"steady {args.rate:g} msg/s from {args.clients} clients, {args.total} messages"
        f" ({args.total / args.rate:.0f} s) per run, {args.size} bytes, {args.runs} run(s);"
        f" percentiles of the messages sent after the first {args.warmup:g} s (warm-up:"
        " sessions and relay connections opening)",
        "",
        f"{'system':<8} {'run':>3} {'delivered':>11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
        f" {'max ms':>8} {'late':>5} {'failed':>6} {'other CPU':>9}",
    ]
    for number, r in enumerate(results):
        lines.append(
            f"{r.system:<8} {number // len(args.system_list) + 1:>3}"
            f" {r.arrived:>5}/{r.expected:<5} {_ms(r.pct(50)):>8} {_ms(r.pct(90)):>8}"
            f" {_ms(r.pct(99)):>8} {_ms(max(r.latencies_ms, default=None)):>8}"
            f" {r.load.late:>5} {r.load.failed:>6} {r.other_cores:>9.2f}"
        )
    by_system: dict[str, list[Result]] = {}
    for r in results:
        by_system.setdefault(r.system, []).append(r)
    lines += ["", "median over runs:"]
    for name, runs in by_system.items():
        p50 = statistics.median([r.pct(50) or 0.0 for r in runs])
        p99 = statistics.median([r.pct(99) or 0.0 for r in runs])
        lines.append(f"  {name:<8} p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    lines += ["", "durability:"]
    for name, runs in by_system.items():
        lines.append(f"  {name}: {runs[0].durability}")
    for r in results:
        if r.load.errors:
            lines.append(f"  {r.system} client errors (first 3): {r.load.errors[:3]}")
    return "\n".join(lines)


def write_json(path: Path, results: list[Result], args: argparse.Namespace) -> None:
    """Every run and the median p50/p99 per system, for ``bench/targets.py``."""
    systems: dict[str, dict[str, object]] = {}
    for name in args.system_list:
        runs = [r for r in results if r.system == name]
        if not runs:
            continue
        systems[name] = {
            "p50_ms": statistics.median([r.pct(50) or 0.0 for r in runs]),
            "p99_ms": statistics.median([r.pct(99) or 0.0 for r in runs]),
            "other_cores_max": max(r.other_cores for r in runs),
            "durability": runs[0].durability,
            "runs": [
                {
                    "p50_ms": r.pct(50),
                    "p90_ms": r.pct(90),
                    "p99_ms": r.pct(99),
                    "max_ms": max(r.latencies_ms, default=None),
                    "arrived": r.arrived,
                    "expected": r.expected,
                    "failed": r.load.failed,
                    "late": r.load.late,
                    "other_cores": r.other_cores,
                }
                for r in runs
            ],
        }
    data = {
        "script": "latency",
        "rate": args.rate,
        "clients": args.clients,
        "messages": args.total,
        "runs": args.runs,
        "systems": systems,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: 10 s per system, 1 run")
    parser.add_argument("--rate", type=float, default=100.0, help="messages a second, all clients")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the schedule")
    parser.add_argument("--messages", type=int, help="cap on messages per run")
    parser.add_argument("--size", type=int, default=2048, help="body bytes, roughly")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--systems", default="hato,postfix")
    parser.add_argument("--timeout", type=float, default=60.0, help="sending may overrun by this")
    parser.add_argument("--drain", type=float, default=60.0, help="wait for stragglers this long")
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--workdir", help="where the hato data dirs go (default: $TMPDIR)")
    parser.add_argument("--hato-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--postfix-conf", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trace-stages", metavar="PATH",
                        help="hato: HATO_TRACE_STAGES=PATH (per-message stage timestamps)")  # fmt: skip
    parser.add_argument("--python", default="/work/venv/bin/python"
                        if Path("/work/venv/bin/python").exists() else sys.executable)  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each run, wait up to this long for other work to stop")  # fmt: skip
    parser.add_argument("--quiet-limit", type=float, default=0.25,
                        help="cores of other work that count as quiet")  # fmt: skip
    parser.add_argument("--json", metavar="PATH",
                        help="also write every run's percentiles and the medians as JSON")  # fmt: skip
    parser.add_argument("--sink-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 10.0)
        args.warmup = min(args.warmup, 1.0)
        args.quiet_wait = min(args.quiet_wait, 5.0)
        args.runs = 1
    args.total = int(args.rate * args.seconds)
    if args.messages:
        args.total = min(args.total, args.messages)
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.hato_env = smtp_bench._pairs(args.hato_env)
    if args.trace_stages:
        args.hato_env["HATO_TRACE_STAGES"] = args.trace_stages
    args.postfix_conf = smtp_bench._pairs(args.postfix_conf)
    # What smtp_bench's Hato and Postfix starters read.
    args.src = REPO / "src"
    args.hato_cmd = [args.python, "-m", "hato"]
    args.hato_log = "file"
    args.accept_only = False
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.sink_child is not None:
        return sink_main(args.sink_child)
    atexit.register(smtp_bench._cleanup_all)
    signal.signal(signal.SIGTERM, smtp_bench._on_signal)
    results: list[Result] = []
    for _ in range(args.runs):
        for name in args.system_list:
            smtp_bench.wait_for_quiet(args.quiet_limit, args.quiet_wait)
            print(f"{name}: {args.total} messages at {args.rate:g}/s ...", flush=True)
            results.append(measure(name, args))
    print()
    print(report(results, args))
    if args.json:
        write_json(Path(args.json), results, args)
    lost = [r for r in results if r.arrived < r.expected]
    return 1 if lost else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
    sys.exit(130)
