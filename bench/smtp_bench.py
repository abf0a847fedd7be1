"""Intake/relay benchmark: smtp-source → hato serve or Postfix → smtp-sink, side by side.

Usage (as root: Postfix's master and smtp-sink need it)::

    /work/venv/bin/python bench/smtp_bench.py                 # 1, 20, 100 sessions, 3 runs
    /work/venv/bin/python bench/smtp_bench.py --quick         # short smoke run
    /work/venv/bin/python bench/smtp_bench.py --sessions 20 --messages 5000 --runs 1 \\
        --systems hato --profile /tmp/hato-profile

For every run, session count and system (interleaved, so that drift on the machine hits
both alike) it starts a fresh ``smtp-sink -c`` on a free loopback port, a fresh system
under test relaying to it, and then ``smtp-source -s SESSIONS -m N -l 2048`` (one message
per connection) against the system:

* **hato**: ``python -m hato serve`` on a fresh data dir, SQLite queue with fsync on,
  ``RELAYHOST=[127.0.0.1]:SINKPORT``, ``HATO_RELAY_TLS=none``, operator log (stderr)
  to a file in the data dir.
* **postfix**: a private instance (``tests/peers/postfix.plain_relay``): smtpd trusting
  127.0.0.0/8, ``relayhost=[127.0.0.1]:SINKPORT``, queue in /tmp (the same disk), its
  default fsync behaviour, mail log to a file.

Measured: *accepted* msg/s = N / wall time of smtp-source (every message got its 250);
*end-to-end* msg/s = N / time from smtp-source's start until the sink has counted N
messages. The median of ``--runs`` is reported, with CPU used per process group
(CPU seconds / end-to-end seconds, so 1.00 = one core busy for the whole run).

A short warm-up (one message per session, fully delivered) precedes each measurement
so that Postfix has its smtpd processes and both have their relay connections.

Only 127.0.0.1 is used. Every child is bounded by ``--timeout`` and killed on exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from peers import free_port  # noqa: E402
from peers.postfix import PostfixInstance, plain_relay  # noqa: E402

HOST = "127.0.0.1"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
MESSAGE_SIZE = 2048
SENDER = "from@example.org"
RECIPIENT = "to@example.net"
DEFAULT_MESSAGES = {1: 2000}
DEFAULT_MESSAGES_MANY = 5000
DOC = REPO / "docs" / "performance.md"
BEGIN = "<!-- smtp_bench:begin -->"
END = "<!-- smtp_bench:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A run could not be set up or did not finish in time."""


# Children: every process started here is registered so that an exit of any kind
# (exception, Ctrl-C, SIGTERM) kills it by its own id.

_children: list[subprocess.Popen[bytes]] = []
_postfixes: list[PostfixInstance] = []


def _spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, **kwargs)
    _children.append(proc)
    return proc


def _reap(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    with contextlib.suppress(ValueError):
        _children.remove(proc)


def _cleanup_all() -> None:
    for instance in list(_postfixes):
        with contextlib.suppress(Exception):
            instance.cleanup()
        _postfixes.remove(instance)
    for proc in list(_children):
        with contextlib.suppress(Exception):
            _reap(proc, signal.SIGKILL, grace=5.0)


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# CPU accounting from /proc: utime+stime of a process tree. Children that already
# ended are in their parent's cutime/cstime once reaped, so a delta over the tree of
# the root stays right while processes come and go.


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own ticks, reaped children's ticks) of one process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime is field 14 → index 11.
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root`` and all its descendants (alive or reaped)."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    if root not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = stats[root][1] + stats[root][2]
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        # A descendant's own reaped children are already inside its cutime only once
        # it is reaped itself; while it lives, count its own time and its cutime.
        total += stats[pid][1] + stats[pid][2]
        stack.extend(children.get(pid, []))
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all CPUs of the machine spent busy so far (not idle, not iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(limit: float, budget: float) -> float:
    """Wait (up to ``budget`` s) until the machine is busy less than ``limit`` cores.

    Other work on the machine (a test suite, a build) skews a benchmark badly on two
    cores; returns the load seen last, in cores.
    """
    start = time.monotonic()
    deadline = start + budget
    said = False
    while True:
        busy0, own0, t0 = machine_busy(), own_cpu(), time.monotonic()
        time.sleep(1.0)
        load = (machine_busy() - busy0 - (own_cpu() - own0)) / (time.monotonic() - t0)
        if load < limit or time.monotonic() >= deadline:
            if said:
                waited = time.monotonic() - start
                print(f"  (waited {waited:.0f}s; other work now {load:.2f} cores)", flush=True)
            return load
        if not said:
            print(f"  (machine busy with {load:.2f} cores of other work; waiting)", flush=True)
            said = True


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of one process: ``main`` (the event loop) and ``others``."""
    result = {"main": 0.0, "others": 0.0}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = raw[raw.rindex(")") + 2 :].split()
                ticks = int(fields[11]) + int(fields[12])
                result["main" if int(tid) == pid else "others"] += ticks / CLK_TCK
    return result


# The sink: smtp-sink -c prints "sess=… quit=… mesg=N\r" after every "."; a reader
# thread keeps the latest count and the time it reached a target.


class Sink:
    def __init__(self, backlog: int = 1024) -> None:
        self.port = free_port(HOST)
        self.proc = _spawn(
            [SMTP_SINK, "-u", "postfix", "-c", f"{HOST}:{self.port}", str(backlog)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.count = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True, name="sink-reader")
        self._reader.start()
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BenchError(f"smtp-sink exited {self.proc.returncode}: {err}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((HOST, self.port), 1.0) as s,
            ):
                s.settimeout(2.0)
                if s.recv(64).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
            time.sleep(0.02)
        raise BenchError("smtp-sink did not answer")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            tail = (tail + chunk)[-256:]
            found = re.findall(rb"mesg=(\d+)", tail)
            if found:
                with self._cond:
                    self.count = int(found[-1])
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, target: int, deadline: float) -> float | None:
        """Monotonic time at which the count reached ``target`` (None: not by the deadline)."""
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    return None
                self._cond.wait(min(left, 0.05))
            return time.monotonic()

    def close(self) -> None:
        _reap(self.proc, signal.SIGKILL)
        self._reader.join(timeout=5)


# Systems under test.


class System:
    """A system under test: started on a free port, relaying to the sink."""

    name = "?"
    port = 0

    def __init__(self, sink_port: int, sessions: int, args: argparse.Namespace) -> None:
        raise NotImplementedError

    def pid(self) -> int:
        raise NotImplementedError

    def spooled(self) -> int | None:
        """Messages accepted and not yet delivered, now (None: cannot tell)."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class Hato(System):
    name = "hato"

    def __init__(self, sink_port: int, sessions: int, args: argparse.Namespace) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hato-bench-", dir=args.workdir))
        self.port = free_port(HOST)
        env = {key: os.environ[key] for key in ("PATH", "LANG", "TZ") if key in os.environ}
        env.update(
            PYTHONPATH=str(args.src),
            HATO_LISTEN=f"{HOST}:{self.port}",
            HATO_DATA_DIR=str(self.dir),
            HATO_HOSTNAME="hato.bench.invalid",
            RELAYHOST=f"[{HOST}]:{sink_port}",
            HATO_RELAY_TLS="none",
            HATO_LOG_FORMAT="text",
            HATO_FSYNC="true",
            HATO_MAX_CONNECTIONS_PER_CLIENT=str(max(200, 2 * sessions)),
            HATO_MAX_CONNECTIONS=str(max(500, 2 * sessions)),
        )
        if args.accept_only:
            del env["RELAYHOST"]  # the hold route: intake and queue only
        # The HTTP listener (console, /metrics) on a free port, or off.
        # (latency.py, idle_sessions.py and multinode.py have no --http: off.)
        http = getattr(args, "http", "off")
        env["HATO_HTTP_LISTEN"] = f"{HOST}:0" if http == "on" else ""
        env.update(args.hato_env)
        self.log_path = self.dir / "hato.log"
        log = self.log_path.open("wb") if args.hato_log == "file" else open(os.devnull, "wb")  # noqa: SIM115
        argv = [*args.hato_cmd, "serve"]
        self.proc = _spawn(argv, env=env, cwd=self.dir, stdout=log, stderr=log)
        log.close()
        self.ready_log = args.hato_log == "file"
        try:
            self._wait_ready(args.start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"hato serve exited {self.proc.returncode}:\n{self._log()}")
            if self.ready_log:
                if "hato: ready" in self._log():
                    return
            elif _answers_220(self.port):
                return
            time.sleep(0.05)
        raise BenchError(f"hato serve not ready in {timeout}s:\n{self._log()}")

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def pid(self) -> int:
        return self.proc.pid

    def spooled(self) -> int | None:
        # Read-only and without a lock of its own: WAL readers never block the writers.
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.dir / 'queue.db'}?mode=ro", uri=True, timeout=1.0)
            ) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM messages WHERE state IN ('queued', 'sending', 'deferred')"
                ).fetchone()
        except sqlite3.Error:
            return None
        return int(row[0])

    def close(self) -> None:
        _reap(self.proc, signal.SIGTERM, grace=20.0)
        shutil.rmtree(self.dir, ignore_errors=True)


class Postfix(System):
    name = "postfix"

    def __init__(self, sink_port: int, sessions: int, args: argparse.Namespace) -> None:
        self.instance = plain_relay((HOST, sink_port))
        _postfixes.append(self.instance)
        limit = max(200, 2 * sessions)
        settings = {
            "smtpd_client_connection_count_limit": "0",
            "default_process_limit": str(limit),
            # Accept-only: everything stays deferred in the queue, nothing is relayed.
            **({"defer_transports": "relay smtp"} if args.accept_only else {}),
            **args.postfix_conf,
        }
        subprocess.run(
            ["postconf", "-c", str(self.instance.config_dir), "-e"]
            + [f"{k}={v}" for k, v in settings.items()],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.instance.start(timeout=args.start_timeout)
        self.port = self.instance.port("smtp")

    def pid(self) -> int:
        assert self.instance._proc is not None
        return self.instance._proc.pid

    def spooled(self) -> int | None:
        # One file per message in these queues (hold and bounce logs not counted).
        total = 0
        for name in ("maildrop", "incoming", "active", "deferred"):
            for _, _, files in os.walk(self.instance.root / "queue" / name):
                total += len(files)
        return total

    def close(self) -> None:
        self.instance.cleanup()
        with contextlib.suppress(ValueError):
            _postfixes.remove(self.instance)


SYSTEMS: dict[str, type[System]] = {"hato": Hato, "postfix": Postfix}


def _answers_220(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            ok = sock.recv(512).startswith(b"220")
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


# The load generator.


@dataclasses.dataclass
class SourceResult:
    seconds: float
    cpu: float
    returncode: int
    stderr: str


def smtp_source(port: int, sessions: int, messages: int, timeout: float) -> SourceResult:
    """Run smtp-source to completion; its rusage comes from wait4 on its own pid."""
    argv = [
        SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(MESSAGE_SIZE),
        "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        _children.append(proc)
        box: dict[str, Any] = {}

        def waiter() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            box["end"] = time.monotonic()
            box["status"] = status
            box["cpu"] = usage.ru_utime + usage.ru_stime

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            proc.kill()
            thread.join(10)
            raise BenchError(f"smtp-source did not finish in {timeout:.0f}s")
        proc.returncode = os.waitstatus_to_exitcode(box["status"])
        _children.remove(proc)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return SourceResult(box["end"] - start, box["cpu"], proc.returncode, text)


# One measurement.


@dataclasses.dataclass
class Sample:
    system: str
    sessions: int
    messages: int
    accepted: float  # msg/s
    end_to_end: float  # msg/s
    accept_s: float
    e2e_s: float
    cpu_sut: float  # cores (CPU s / e2e s)
    cpu_source: float
    cpu_sink: float
    cpu_loop: float = 0.0  # hato only: its main (event loop) thread, in cores
    cpu_other: float = 0.0  # the rest of the machine during the run, in cores
    spool_peak: int | None = None  # most messages accepted and not yet delivered
    errors: str = ""


class SpoolSampler:
    """Sample ``system.spooled()`` every ``interval`` seconds in a thread; keep the peak."""

    def __init__(self, system: System, interval: float = 0.1) -> None:
        self.system = system
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="spool-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            count = self.system.spooled()
            if count is not None:
                self.peak = count if self.peak is None else max(self.peak, count)
            self._stop.wait(self.interval)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.peak


def measure(system_name: str, sessions: int, messages: int, args: argparse.Namespace) -> Sample:
    sink = Sink()
    system: System | None = None
    try:
        system = SYSTEMS[system_name](sink.port, sessions, args)
        deadline = time.monotonic() + args.timeout
        if args.warmup:
            smtp_source(system.port, sessions, sessions, args.timeout)
            if not args.accept_only and sink.wait_for(sessions, deadline) is None:
                raise BenchError(f"{system_name}: warm-up not delivered ({sink.count}/{sessions})")
        base = sink.count
        target = base if args.accept_only else base + messages
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_limit, args.quiet_wait)
        sut_cpu0, sink_cpu0 = tree_cpu(system.pid()), tree_cpu(sink.proc.pid)
        loop_cpu0 = thread_cpu(system.pid())["main"]
        busy0, own0 = machine_busy(), own_cpu()
        profiler = _start_profiler(system, sessions, args)
        deadline = time.monotonic() + args.timeout
        start = time.monotonic()
        sampler = SpoolSampler(system)
        src = smtp_source(system.port, sessions, messages, args.timeout)
        done = sink.wait_for(target, deadline)
        spool_peak = sampler.stop()
        if done is None:
            raise BenchError(
                f"{system_name} at {sessions} sessions: sink has {sink.count - base}/{messages} "
                f"after {args.timeout:.0f}s; smtp-source said: {src.stderr[-500:]}"
            )
        sut_cpu, sink_cpu = tree_cpu(system.pid()) - sut_cpu0, tree_cpu(sink.proc.pid) - sink_cpu0
        loop_cpu = thread_cpu(system.pid())["main"] - loop_cpu0
        other = machine_busy() - busy0 - (own_cpu() - own0) - sut_cpu - sink_cpu - src.cpu
        if profiler is not None:
            _stop_profiler(profiler)
        # Accept-only: "end-to-end" is the intake time; the table shows it as such.
        e2e = done - start if not args.accept_only else src.seconds
        errors = src.stderr.strip()
        if src.returncode != 0 and not errors:
            errors = f"smtp-source exited {src.returncode}"
        # Anything beyond the target would be a duplicate delivery: the sink had no
        # other client. Give it a moment to show up, then note it.
        time.sleep(0.2)
        if sink.count > target:
            errors += f" sink counted {sink.count - target} extra message(s)"
        return Sample(
            system=system_name,
            sessions=sessions,
            messages=messages,
            accepted=messages / src.seconds,
            end_to_end=messages / e2e,
            accept_s=src.seconds,
            e2e_s=e2e,
            cpu_sut=sut_cpu / e2e,
            cpu_source=src.cpu / e2e,
            cpu_sink=sink_cpu / e2e,
            cpu_loop=loop_cpu / e2e if system_name == "hato" else 0.0,
            cpu_other=max(0.0, other / e2e),
            spool_peak=spool_peak,
            errors=errors.strip(),
        )
    finally:
        if system is not None:
            system.close()
        sink.close()


# Optional py-spy profile of hato during the measured phase.


def _start_profiler(
    system: System, sessions: int, args: argparse.Namespace
) -> subprocess.Popen[bytes] | None:
    if args.profile is None or system.name != "hato" or sessions != args.profile_sessions:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    argv = [py_spy, "record", "--pid", str(system.pid()), "--rate", "250"]
    argv += args.py_spy_arg
    argv += [
        "--format",
        args.profile_format,
        "-o",
        str(out / f"hato-{sessions}s-{stamp}.{_ext(args)}"),
    ]
    proc = _spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches asynchronously; it needs a moment before the load
    return proc


def _ext(args: argparse.Namespace) -> str:
    return {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[args.profile_format]


def _stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    _reap(proc, signal.SIGINT, grace=30.0)


# Report.


@dataclasses.dataclass
class Cell:
    accepted: float
    end_to_end: float
    cpu_sut: float
    cpu_source: float
    cpu_sink: float
    cpu_loop: float
    cpu_other: float
    runs: int
    errors: list[str]
    spool_peak: int | None = None


def summarise(samples: list[Sample]) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    keys = sorted({(s.system, s.sessions) for s in samples})
    for key in keys:
        group = [s for s in samples if (s.system, s.sessions) == key]
        cells[key] = Cell(
            accepted=statistics.median(s.accepted for s in group),
            end_to_end=statistics.median(s.end_to_end for s in group),
            cpu_sut=statistics.median(s.cpu_sut for s in group),
            cpu_source=statistics.median(s.cpu_source for s in group),
            cpu_sink=statistics.median(s.cpu_sink for s in group),
            cpu_loop=statistics.median(s.cpu_loop for s in group),
            cpu_other=max(s.cpu_other for s in group),
            runs=len(group),
            errors=[s.errors for s in group if s.errors],
            spool_peak=max((s.spool_peak for s in group if s.spool_peak is not None), default=None),
        )
    return cells


def table_rows(cells: dict[tuple[str, int], Cell], sessions: list[int]) -> list[list[str]]:
    rows = []
    for n in sessions:
        h, p = cells.get(("hato", n)), cells.get(("postfix", n))
        row = [str(n)]
        for metric in ("accepted", "end_to_end"):
            hv = getattr(h, metric) if h else None
            pv = getattr(p, metric) if p else None
            row += [_num(hv), _num(pv), f"{hv / pv:.2f}×" if hv and pv else "–"]
        row += [
            f"{h.cpu_sut:.2f} ({h.cpu_loop:.2f})" if h else "–",
            f"{p.cpu_sut:.2f}" if p else "–",
            f"{statistics.mean(c.cpu_source for c in (h, p) if c):.2f}" if h or p else "–",
            f"{max(c.cpu_other for c in (h, p) if c):.2f}" if h or p else "–",
            _peak(h),
            _peak(p),
        ]
        rows.append(row)
    return rows


HEADER = [
    "sessions",
    "hato accepted",
    "postfix accepted",
    "ratio",
    "hato end-to-end",
    "postfix end-to-end",
    "ratio",
    "hato CPU (loop thread)",
    "postfix CPU",
    "smtp-source CPU",
    "other CPU (max)",
    "hato spool peak",
    "postfix spool peak",
]


def _peak(cell: Cell | None) -> str:
    return "–" if cell is None or cell.spool_peak is None else f"{cell.spool_peak:,}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    fs = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        fs = subprocess.run(
            ["df", "--output=fstype,source", args.workdir or tempfile.gettempdir()],
            capture_output=True, text=True, timeout=10,
        ).stdout.split("\n")[1].strip()  # fmt: skip
    postfix_version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        postfix_version = subprocess.run(
            ["postconf", "-dh", "mail_version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    probe = subprocess.run(
        [args.python, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(args.src), "PATH": os.environ.get("PATH", "")},
    ).stdout.strip()
    return {
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.system()} "
        f"{platform.release()}",
        "disk": f"{fs} (hato data dir and Postfix queue both under "
        f"{args.workdir or tempfile.gettempdir()})",
        "postfix": postfix_version,
        "hato runtime": probe,
        "durability": durability(args),
    }


def durability(args: argparse.Namespace) -> str:
    """What a 250 waits for on each side, and how many processes Hato ran."""
    env = {"HATO_FSYNC": "true", **args.hato_env}
    queue = env.get("HATO_QUEUE_URL", "sqlite (the data dir)")
    processes = env.get("HATO_PROCESSES", "0 (auto: the CPUs, at most 4)")
    return (
        f"hato: queue {queue}, HATO_FSYNC={env['HATO_FSYNC']} (the 250 after the fsync'd "
        f"commit), HATO_PROCESSES={processes}; postfix: defaults (the queue file fsync'd "
        "before the 250)"
    )


_PROBE = (
    "import sys, sqlite3, importlib.metadata as m\n"
    "def v(n):\n"
    "    try: return m.version(n)\n"
    "    except Exception: return 'absent'\n"
    "print(f'Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, '"
    'f\'uvloop {v("uvloop")}, aiosmtplib {v("aiosmtplib")}\')'
)


def write_markdown(path: Path, section: str) -> None:
    block = f"{BEGIN}\n{section}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Performance\n\n" + block + "\n")


def markdown_section(
    rows: list[list[str]],
    env: dict[str, str],
    args: argparse.Namespace,
    counts: dict[int, int],
    cells: dict[tuple[str, int], Cell],
) -> str:
    out = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} by `bench/smtp_bench.py "
        f"{' '.join(args.argv)}`",
        "",
    ]
    out += [f"- **{k}**: {v}" for k, v in env.items()]
    out += [
        "- **load**: `smtp-source -s SESSIONS -m N -l 2048` (one message per connection), "
        "N = "
        + ", ".join(f"{n} at {s} session{'s' if s > 1 else ''}" for s, n in counts.items())
        + f"; median of {args.runs} run{'s' if args.runs > 1 else ''}"
        + (", after a warm-up of one message per session" if args.warmup else ""),
        "- **accepted** = N / smtp-source wall time; **end-to-end** = N / time until "
        "smtp-sink counted all N; **CPU** = CPU seconds of the process tree / end-to-end "
        "seconds (1.00 = one core busy throughout; the machine has "
        f"{os.cpu_count()})",
        f"- hato log: {args.hato_log}; hato env extra: "
        + (", ".join(f"{k}={v}" for k, v in args.hato_env.items()) or "none")
        + "; postfix extra: "
        + (", ".join(f"{k}={v}" for k, v in args.postfix_conf.items()) or "none"),
        "",
        render_markdown(rows),
    ]
    errors = [(key, e) for key, cell in cells.items() for e in cell.errors]
    if errors:
        out += ["", "Errors reported during the runs:", ""]
        out += [f"- {k[0]} at {k[1]} sessions: `{e[:300]}`" for k, e in errors]
    return "\n".join(out)


# Command line.


def _pairs(items: list[str]) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
        result[key] = value
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 1 and 20 sessions, 300 messages, 1 run"
    )
    parser.add_argument("--sessions", help="comma separated (default 1,20,100; --quick: 1,20)")
    parser.add_argument(
        "--messages", type=int, help="N per run (default 2000 at 1 session, 5000 otherwise)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--systems", default="hato,postfix")
    parser.add_argument("--timeout", type=float, default=180.0, help="per run, seconds")
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each run, wait up to this long for other work to stop")  # fmt: skip
    parser.add_argument("--quiet-limit", type=float, default=0.25,
                        help="cores of other work that count as quiet")  # fmt: skip
    parser.add_argument("--accept-only", action="store_true",
                        help="no relaying (hato: hold route; postfix: defer_transports): intake only")  # fmt: skip
    parser.add_argument("--noisy", type=float, default=0.3,
                        help="cores of other work during a run that make it count as noisy")  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a noisy run")
    parser.add_argument("--workdir", help="where the hato data dirs go (default: $TMPDIR)")
    parser.add_argument("--hato-log", choices=["file", "null"], default="file",
                        help="hato's stderr (operator log) to a file or to /dev/null")  # fmt: skip
    parser.add_argument(
        "--http",
        choices=("off", "on"),
        default="off",
        help="hato's HTTP listener (console, /metrics) on a free port, or off "
        "(default off; compare both for its cost)",
    )
    parser.add_argument("--hato-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for hato serve (repeatable)")  # fmt: skip
    parser.add_argument("--postfix-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra main.cf setting for Postfix (repeatable)")  # fmt: skip
    parser.add_argument("--python", default="/work/venv/bin/python"
                        if Path("/work/venv/bin/python").exists() else sys.executable)  # fmt: skip
    parser.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                        help="run src/ in place instead of a copy taken at start")  # fmt: skip
    parser.add_argument("--switch-interval", type=float,
                        help="experiment: run hato with sys.setswitchinterval(SECONDS)")  # fmt: skip
    parser.add_argument("--markdown", default=str(DOC), help="file to update ('' to skip)")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the medians per system and sessions as JSON"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy record hato during the measured phase"
    )
    parser.add_argument("--profile-sessions", type=int, default=20)
    parser.add_argument("--py-spy-arg", action="append", default=[],
                        help="extra py-spy record argument, e.g. --py-spy-arg=--gil")  # fmt: skip
    parser.add_argument(
        "--profile-format", choices=["flamegraph", "speedscope", "raw"], default="raw"
    )
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.sessions = args.sessions or "1,20"
        args.messages = args.messages or 300
        args.runs = 1
        args.timeout = min(args.timeout, 60.0)
    args.sessions = args.sessions or "1,20,100"
    args.session_list = [int(s) for s in args.sessions.split(",") if s.strip()]
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in args.system_list:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}")
    args.hato_env = _pairs(args.hato_env)
    args.postfix_conf = _pairs(args.postfix_conf)
    args.hato_cmd = [args.python, "-m", "hato"]
    if args.switch_interval is not None:
        # An experiment, not a setting of hato: the GIL hand-over interval (default 5 ms)
        # bounds how soon the queue's writer thread gets the GIL back from a busy loop.
        args.hato_cmd = [
            args.python,
            "-c",
            f"import sys, runpy; sys.setswitchinterval({args.switch_interval}); "
            "sys.argv[0] = 'hato'; runpy.run_module('hato', run_name='__main__')",
        ]
    return args


def snapshot(args: argparse.Namespace, budget: float = 120.0) -> Path:
    """A private copy of src/ that imports cleanly, so that edits made while a long run
    goes on (or a half-saved file) neither mix versions nor break runs."""
    snap = Path(tempfile.mkdtemp(prefix="hato-bench-src-"))
    atexit.register(shutil.rmtree, snap, True)
    deadline = time.monotonic() + budget
    while True:
        shutil.rmtree(snap / "src", ignore_errors=True)
        shutil.copytree(
            REPO / "src", snap / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        check = subprocess.run(
            [args.python, "-c", "import hato.app, hato.cli"],
            env={"PYTHONPATH": str(snap / "src"), "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check.returncode == 0:
            return snap / "src"
        if time.monotonic() > deadline:
            raise BenchError(f"src/ does not import:\n{check.stderr[-2000:]}")
        print("  (src/ does not import right now; trying again in 5 s)", flush=True)
        time.sleep(5)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("smtp_bench: run as root (Postfix's master and smtp-sink need it)", file=sys.stderr)
        return 2
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            print(f"smtp_bench: {tool} missing (apt-get install postfix)", file=sys.stderr)
            return 2
    atexit.register(_cleanup_all)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        args.src = snapshot(args) if args.snapshot else REPO / "src"
    except BenchError as exc:
        print(f"smtp_bench: {exc}", file=sys.stderr)
        return 1
    counts = {
        s: args.messages or DEFAULT_MESSAGES.get(s, DEFAULT_MESSAGES_MANY)
        for s in args.session_list
    }
    samples: list[Sample] = []
    started = time.monotonic()
    try:
        for run in range(1, args.runs + 1):
            for sessions in args.session_list:
                for name in args.system_list:
                    for attempt in range(args.retries + 1):
                        sample = measure(name, sessions, counts[sessions], args)
                        if sample.cpu_other <= args.noisy or attempt == args.retries:
                            break
                        print(
                            f"  ({name} at {sessions} sessions: {sample.cpu_other:.2f} cores of "
                            "other work during the run; measuring again)",
                            flush=True,
                        )
                    samples.append(sample)
                    print(
                        f"run {run}/{args.runs} {name:7} {sessions:3} sessions N={sample.messages}: "
                        f"accepted {sample.accepted:7.0f}/s ({sample.accept_s:5.1f}s)  "
                        f"end-to-end {sample.end_to_end:7.0f}/s ({sample.e2e_s:5.1f}s)  "
                        f"CPU {name} {sample.cpu_sut:.2f} source {sample.cpu_source:.2f} "
                        f"sink {sample.cpu_sink:.2f}"
                        + (f" (loop thread {sample.cpu_loop:.2f})" if name == "hato" else "")
                        + f" other {sample.cpu_other:.2f}"
                        + (f"  ERR {sample.errors[:200]}" if sample.errors else ""),
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("smtp_bench: interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"smtp_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        _cleanup_all()
    cells = summarise(samples)
    rows = table_rows(cells, args.session_list)
    print()
    print(render_text(rows))
    print(
        f"\n(msg/s, median of {args.runs}; CPU in cores; total {time.monotonic() - started:.0f}s)"
    )
    print(f"durability: {durability(args)}")
    env = environment(args) if args.markdown or args.json else {}
    if args.markdown:
        write_markdown(Path(args.markdown), markdown_section(rows, env, args, counts, cells))
        print(f"wrote {args.markdown}")
    if args.json:
        write_json(Path(args.json), cells, counts, env, args)
    return 0


def write_json(
    path: Path,
    cells: dict[tuple[str, int], Cell],
    counts: dict[int, int],
    env: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """The medians for ``bench/targets.py``: ``{"sessions": {"20": {"hato": {...}, ...}}}``."""
    by_sessions: dict[str, dict[str, Any]] = {}
    for (system, sessions), cell in cells.items():
        by_sessions.setdefault(str(sessions), {})[system] = dataclasses.asdict(cell)
    data = {
        "script": "smtp_bench",
        "argv": args.argv,
        "runs": args.runs,
        "messages": {str(s): n for s, n in counts.items()},
        "accept_only": args.accept_only,
        "environment": env,
        "durability": durability(args),
        "sessions": by_sessions,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
