"""Outbox benchmark: ``Mailer.send`` rate and latency, and ``hato worker`` → smtp-sink rate.

Usage::

    /work/venv/bin/python bench/outbox_bench.py              # full run, ~8 minutes
    /work/venv/bin/python bench/outbox_bench.py --quick      # smoke run, ~15 s
    /work/venv/bin/python bench/outbox_bench.py --runs 3 --write-doc   # docs/performance.md
    /work/venv/bin/python bench/outbox_bench.py --backends postgres,redis --messages 20000 \\
        --configs 1x64,2x64 --write-doc

For SQLite (a temp file), PostgreSQL (a fresh schema in ``--postgres``) and Redis (a fresh
key prefix in ``--redis``), each dropped or deleted afterwards:

* **enqueue**: ``Mailer.send`` called sequentially in this process (one message, text +
  HTML, one recipient), ``--enqueue`` times; calls/s and the p50/p99 latency of one call.
* **end to end**: ``--messages`` messages enqueued first (``send_many``), then ``hato
  worker`` started as real subprocesses (``python -m hato worker`` with
  ``HATO_QUEUE_URL``, ``HATO_SMTP_HOST``/``PORT`` of a fresh ``smtp-sink`` on loopback,
  ``HATO_SMTP_TLS=none``, operator log to a file), for every ``--configs`` entry
  (``WORKERSxCONCURRENCY``); msg/s = N / time from the first worker's ``ready`` until
  the sink has counted N messages. Each config gets a fresh queue and sink; with
  ``--runs N`` each config runs N times and the median is shown (all rates listed).
  ``--profile DIR`` runs the workers under ``py-spy record`` (collapsed stacks in DIR).
* **baseline**: the same message bytes sent with ``smtplib`` to a fresh sink, one
  connection per message and one connection for all.

Durability as shipped: SQLite with fsync, PostgreSQL with ``synchronous_commit`` as the
server has it, Redis as the server's ``appendonly``/``appendfsync`` say (printed).

``--write-doc`` replaces the table between the ``outbox_bench:table`` markers of
``docs/performance.md`` (the prose around it is kept), or appends the section.

Only 127.0.0.1 is used. Every phase is bounded by ``--timeout``; every child is killed
by its own id on any exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))

from hato.mailer import Composed, Email, Mailer  # noqa: E402

HOST = "127.0.0.1"
SMTP_SINK = "/usr/sbin/smtp-sink"
PY_SPY = (
    shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    or "py-spy"
)
SENDER = "noreply@bench.example"
DOC = REPO / "docs" / "performance.md"
BEGIN = "<!-- outbox_bench:begin -->"
END = "<!-- outbox_bench:end -->"
TABLE_BEGIN = "<!-- outbox_bench:table:begin -->"
TABLE_END = "<!-- outbox_bench:table:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SUBJECT = "Welcome to Fakebook, please confirm your address"
TEXT = (
    "Hello,\n\nthank you for signing up. Please confirm your address by opening this link:\n\n"
    "https://fakebook.example/confirm?token=0123456789abcdef0123456789abcdef\n\n"
    "If you did not sign up, ignore this mail.\n\n-- \nFakebook\n"
)
HTML = (
    "<!doctype html><html><body><p>Hello,</p><p>thank you for signing up. Please "
    '<a href="https://fakebook.example/confirm?token=0123456789abcdef0123456789abcdef">'
    "confirm your address</a>.</p><p>If you did not sign up, ignore this mail.</p>"
    "<p>Fakebook</p></body></html>\n"
)


class BenchError(RuntimeError):
    """A run could not be set up or did not finish in time."""


# Children are registered so that any exit (exception, Ctrl-C, SIGTERM) kills them by id.
_children: list[subprocess.Popen[bytes]] = []


def _spawn(argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    _children.append(proc)
    return proc  # type: ignore[no-any-return]


def _reap(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
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


def _cleanup_children() -> None:
    for proc in list(_children):
        with contextlib.suppress(Exception):
            _reap(proc, signal.SIGKILL, grace=5.0)


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by one live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_by_name(names: Sequence[str]) -> float:
    """CPU seconds used so far by every live process whose command name is in ``names``
    (the database server's processes: ``postgres``, ``redis-server``)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        if comm in names:
            fields = raw[raw.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy so far (not idle, not iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def wait_for_quiet(budget: float, limit: float = 0.3) -> float:
    """Wait (up to ``budget`` s) until other work on the machine uses under ``limit`` cores."""
    deadline = time.monotonic() + budget
    while True:
        busy0, t0 = machine_busy(), time.monotonic()
        own0 = time.process_time()
        time.sleep(0.5)
        load = (machine_busy() - busy0 - (time.process_time() - own0)) / (time.monotonic() - t0)
        if load < limit or time.monotonic() >= deadline:
            return load
        print(f"  (machine busy with {load:.2f} cores of other work; waiting)", flush=True)


# The sink: smtp-sink -c prints "... mesg=N\r" after every message; a reader thread keeps
# the latest count.


class Sink:
    def __init__(self, backlog: int = 1024) -> None:
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = _spawn(
            [SMTP_SINK, *user, "-c", f"{HOST}:{self.port}", str(backlog)],
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
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1) as s:
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
            cut = tail.rfind(b"mesg=")
            if cut >= 0:
                digits = tail[cut + 5 :].split(b"\r", 1)[0].split(b"\n", 1)[0]
                if digits.isdigit():
                    with self._cond:
                        self.count = int(digits)
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
                self._cond.wait(min(left, 0.02))
            return time.monotonic()

    def close(self) -> None:
        _reap(self.proc, signal.SIGKILL)
        self._reader.join(timeout=5)


# Backends: each hands out fresh queue URLs and removes what it made.


class Backend:
    name = "?"
    processes: tuple[str, ...] = ()  # command names of the server's processes

    def fresh_url(self) -> str:
        raise NotImplementedError

    def drop(self, url: str) -> None:
        raise NotImplementedError

    def durability(self) -> str:
        return ""


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir

    def fresh_url(self) -> str:
        return f"sqlite:///{self.dir / f'outbox-{secrets.token_hex(4)}.db'}"

    def drop(self, url: str) -> None:
        path = Path(url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                Path(f"{path}{suffix}").unlink()

    def durability(self) -> str:
        return "fsync on"


class PostgresBackend(Backend):
    name = "postgres"
    processes = ("postgres",)

    def __init__(self, server: str) -> None:
        import psycopg

        self.server = server
        self._psycopg = psycopg
        with psycopg.connect(server, connect_timeout=5) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            self._sync = str(row[0]) if row else "?"

    def fresh_url(self) -> str:
        sep = "&" if "?" in self.server else "?"
        return f"{self.server}{sep}schema=hato_bench_{secrets.token_hex(4)}"

    def drop(self, url: str) -> None:
        schema = url.rsplit("schema=", 1)[1].split("&", 1)[0]
        with self._psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    def durability(self) -> str:
        return f"synchronous_commit={self._sync}"


class RedisBackend(Backend):
    name = "redis"
    processes = ("redis-server",)

    def __init__(self, server: str) -> None:
        import redis

        self.server = server
        self._client = redis.Redis.from_url(server, socket_timeout=5)
        conf = self._client.config_get("append*")
        self._aof = f"appendonly={conf.get('appendonly')}, appendfsync={conf.get('appendfsync')}"

    def fresh_url(self) -> str:
        sep = "&" if "?" in self.server else "?"
        return f"{self.server}{sep}prefix=hatobench:{secrets.token_hex(4)}:"

    def drop(self, url: str) -> None:
        prefix = url.rsplit("prefix=", 1)[1].split("&", 1)[0]
        batch: list[bytes] = []
        for key in self._client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self._client.delete(*batch)
                batch.clear()
        if batch:
            self._client.delete(*batch)

    def durability(self) -> str:
        return self._aof


@contextlib.contextmanager
def fresh_queue(backend: Backend) -> Iterator[str]:
    url = backend.fresh_url()
    try:
        yield url
    finally:
        backend.drop(url)


# Measurements.


@dataclass
class EnqueueResult:
    calls: int
    seconds: float
    latencies: list[float]
    other_cpu: float = 0.0  # CPU seconds of everything but this process and the server

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class E2EResult:
    workers: int
    concurrency: int
    messages: int
    seconds: float | None  # None: did not finish by the deadline
    delivered: int
    worker_cpu: float = 0.0
    server_cpu: float = 0.0
    sink_cpu: float = 0.0
    machine_cpu: float = 0.0
    startup: float = 0.0
    all_rates: list[float] = field(default_factory=list)

    @property
    def config(self) -> str:
        return f"{self.workers}x{self.concurrency}"

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


@dataclass
class BackendReport:
    name: str
    durability: str
    enqueue: EnqueueResult | None = None
    e2e: list[E2EResult] = field(default_factory=list)

    def best(self) -> E2EResult | None:
        done = [r for r in self.e2e if r.seconds]
        return max(done, key=lambda r: r.rate) if done else None


def send_one(mailer: Mailer, i: int) -> str:
    return mailer.send(f"user{i}@example.net", SUBJECT, TEXT, HTML)


def bench_enqueue(backend: Backend, url: str, calls: int, timeout: float) -> EnqueueResult:
    with Mailer(url, default_from=SENDER) as mailer:
        for i in range(min(50, calls)):  # warm-up: connections, schema, code paths
            send_one(mailer, i)
        latencies: list[float] = []
        deadline = time.monotonic() + timeout
        clock = time.perf_counter
        busy0, own0, server0 = machine_busy(), time.process_time(), cpu_by_name(backend.processes)
        start = clock()
        for i in range(calls):
            t0 = clock()
            send_one(mailer, i)
            latencies.append(clock() - t0)
            if time.monotonic() > deadline:
                break
        seconds = clock() - start
        other = (
            machine_busy()
            - busy0
            - (time.process_time() - own0)
            - (cpu_by_name(backend.processes) - server0)
        )
    return EnqueueResult(len(latencies), seconds, latencies, max(0.0, other))


def fill(url: str, messages: int) -> None:
    """Enqueue ``messages`` sign-up mails (in batches, concurrently inside each batch)."""
    with Mailer(url, default_from=SENDER, timeout=120) as mailer:
        done = 0
        while done < messages:
            n = min(500, messages - done)
            mailer.send_many(
                Email(to=f"user{done + i}@example.net", subject=SUBJECT, text=TEXT, html=HTML)
                for i in range(n)
            )
            done += n


def worker_env(url: str, sink_port: int, concurrency: int, data_dir: Path) -> dict[str, str]:
    env = {key: os.environ[key] for key in ("PATH", "LANG", "TZ") if key in os.environ}
    env.update(
        PYTHONPATH=str(SRC),
        HATO_QUEUE_URL=url,
        HATO_SMTP_HOST=HOST,
        HATO_SMTP_PORT=str(sink_port),
        HATO_SMTP_TLS="none",
        HATO_WORKER_CONCURRENCY=str(concurrency),
        HATO_DATA_DIR=str(data_dir),
        HATO_HOSTNAME="worker.bench.invalid",
        HATO_LOG_FORMAT="text",
    )
    return env


def bench_e2e(
    backend: Backend,
    workers: int,
    concurrency: int,
    messages: int,
    timeout: float,
    workdir: Path,
    profile: Path | None = None,
) -> E2EResult:
    with fresh_queue(backend) as url:
        fill(url, messages)
        sink = Sink()
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            spawned = time.monotonic()
            for _ in range(workers):
                data_dir = workdir / f"worker-{secrets.token_hex(4)}"
                data_dir.mkdir()
                log_path = data_dir / "worker.log"
                argv = [sys.executable, "-m", "hato", "worker"]
                if profile is not None:
                    out = profile / f"{backend.name}-{workers}x{concurrency}-{len(procs)}.txt"
                    argv = [PY_SPY, "record", "-r", "250", "-f", "raw", "-o", str(out), "--", *argv]
                with log_path.open("wb") as log:
                    proc = _spawn(
                        argv,
                        env=worker_env(url, sink.port, concurrency, data_dir),
                        cwd=data_dir,
                        stdout=log,
                        stderr=log,
                    )
                procs.append((proc, log_path))
            deadline = time.monotonic() + timeout
            started = _first_ready(procs, deadline)
            # Start-up (imports, connecting) is not part of the rate, nor of its CPU.
            busy0, server0, sink0 = (
                machine_busy(),
                cpu_by_name(backend.processes),
                proc_cpu(sink.proc.pid),
            )
            cpu0 = sum(proc_cpu(p.pid) for p, _ in procs)
            finished = sink.wait_for(messages, deadline)
            busy1, server1, sink1 = (
                machine_busy(),
                cpu_by_name(backend.processes),
                proc_cpu(sink.proc.pid),
            )
            cpu = sum(proc_cpu(p.pid) for p, _ in procs) - cpu0
            seconds = finished - started if finished is not None else None
            return E2EResult(
                workers,
                concurrency,
                messages,
                seconds,
                sink.count,
                worker_cpu=cpu,
                server_cpu=server1 - server0,
                sink_cpu=sink1 - sink0,
                machine_cpu=busy1 - busy0,
                startup=started - spawned,
            )
        finally:
            for proc, _ in procs:
                # py-spy writes its profile on SIGINT (and passes it on to the worker).
                _reap(proc, signal.SIGINT if profile is not None else signal.SIGTERM)
            sink.close()
            for _, log_path in procs:
                shutil.rmtree(log_path.parent, ignore_errors=True)


def _first_ready(procs: Sequence[tuple[subprocess.Popen[bytes], Path]], deadline: float) -> float:
    while time.monotonic() < deadline:
        for proc, log_path in procs:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"hato worker exited {proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError):
                if b"hato: ready" in log_path.read_bytes()[:4096]:
                    return time.monotonic()
        time.sleep(0.005)
    raise BenchError("hato worker did not become ready")


@dataclass
class BaselineResult:
    name: str
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def baseline_messages(count: int) -> list[Composed]:
    # compose() needs no queue: the same bytes the Mailer stores.
    with Mailer("memory://", default_from=SENDER) as mailer:
        return [
            mailer.compose(f"user{i}@example.net", SUBJECT, text=TEXT, html=HTML)
            for i in range(count)
        ]


def bench_smtplib(messages: Sequence[Composed], timeout: float) -> list[BaselineResult]:
    results = []
    for name, reuse in (
        ("smtplib, one connection per message", False),
        ("smtplib, one connection reused", True),
    ):
        sink = Sink()
        try:
            deadline = time.monotonic() + timeout
            start = time.perf_counter()
            client = smtplib.SMTP(HOST, sink.port, timeout=30) if reuse else None
            for msg in messages:
                if client is None:
                    with smtplib.SMTP(HOST, sink.port, timeout=30) as one:
                        one.sendmail(msg.envelope.sender, list(msg.envelope.recipients), msg.data)
                else:
                    client.sendmail(msg.envelope.sender, list(msg.envelope.recipients), msg.data)
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: not done within {timeout}s")
            if client is not None:
                client.quit()
            seconds = time.perf_counter() - start
            if sink.wait_for(len(messages), time.monotonic() + 10) is None:
                raise BenchError(f"{name}: the sink counted {sink.count} of {len(messages)}")
            results.append(BaselineResult(name, len(messages), seconds))
        finally:
            sink.close()
    return results


# Output.


def render(
    reports: Sequence[BackendReport],
    baseline: Sequence[BaselineResult],
    args: argparse.Namespace,
    size: int,
) -> str:
    lines = [
        f"Machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.release()}; "
        f"{args.enqueue} sequential `send()` calls, {args.messages} messages end to end "
        f"(text + HTML, one recipient, {size:,} bytes).",
        "",
        "| backend | durability | `send()` calls/s | p50 ms | p99 ms | other work, cores "
        "| end to end msg/s (best) | best config (workers x concurrency) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        enq = r.enqueue
        best = r.best()
        lines.append(
            f"| {r.name} | {r.durability} "
            + (
                f"| {enq.rate:,.0f} | {enq.pct(0.50):.2f} | {enq.pct(0.99):.2f} "
                f"| {enq.other_cpu / enq.seconds:.2f} "
                if enq
                else "| – | – | – | – "
            )
            + (f"| {best.rate:,.0f} | {best.config} |" if best else "| – | – |")
        )
    for b in baseline:
        lines.append(f"| {b.name} (baseline) | – | – | – | – | – | {b.rate:,.0f} | 1 thread |")
    lines += [
        "",
        "End to end, every configuration (msg/s from the first worker's `ready` to the "
        f"sink's last message, the median of {args.runs} run(s), all runs listed; CPU of "
        "the median run in cores over that time: the worker processes, the "
        "database server's processes, smtp-sink, and everything else on the machine, "
        "other sessions included):",
        "",
        "| backend | workers x concurrency | msg/s | all runs | seconds | worker CPU "
        "| server CPU | sink CPU | other CPU | worker start-up s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        for e in r.e2e:
            if e.seconds:
                other = e.machine_cpu - e.worker_cpu - e.server_cpu - e.sink_cpu
                every = ", ".join(f"{rate:,.0f}" for rate in e.all_rates)
                lines.append(
                    f"| {r.name} | {e.config} | {e.rate:,.0f} | {every} | {e.seconds:.2f} "
                    f"| {e.worker_cpu / e.seconds:.2f} | {e.server_cpu / e.seconds:.2f} "
                    f"| {e.sink_cpu / e.seconds:.2f} | {max(0.0, other) / e.seconds:.2f} "
                    f"| {e.startup:.2f} |"
                )
            else:
                lines.append(
                    f"| {r.name} | {e.config} | timeout ({e.delivered}/{e.messages}) | – | – | – | – | – | – | – |"
                )
    return "\n".join(lines) + "\n"


def _replace_between(text: str, begin: str, end: str, block: str) -> str | None:
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


def write_doc(table: str, command: str) -> None:
    """Put the table into docs/performance.md: only between the table markers when the
    section is there (its prose is kept), else as a new "Application outbox" section."""
    generated = f"_Generated by `{command}` on {time.strftime('%Y-%m-%d')}._\n\n{table}"
    table_block = f"{TABLE_BEGIN}\n{generated}{TABLE_END}"
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    updated = _replace_between(text, TABLE_BEGIN, TABLE_END, table_block)
    if updated is None:
        section = f"{BEGIN}\n## Application outbox\n\n{table_block}\n{END}"
        updated = _replace_between(text, BEGIN, END, section)
        if updated is None:
            updated = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(updated)


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        workers, _, concurrency = item.strip().partition("x")
        configs.append((int(workers), int(concurrency)))
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--backends", default="sqlite,postgres,redis")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--enqueue", type=int, default=5000, help="send() calls per backend")
    parser.add_argument("--messages", type=int, default=20000, help="messages end to end")
    parser.add_argument("--configs", default="1x32,1x128,2x64,2x128", help="WORKERSxCONCURRENCY,…")
    parser.add_argument(
        "--baseline",
        type=int,
        default=None,
        help="smtplib messages (default: --messages, at most 5000)",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per phase")
    parser.add_argument(
        "--runs", type=int, default=1, help="end-to-end runs per config; the median is shown"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait, before each phase, for other work on the machine to calm down",
    )
    parser.add_argument(
        "--profile", type=Path, help="run workers under py-spy; collapsed stacks into this dir"
    )
    parser.add_argument("--write-doc", action="store_true", help=f"update {DOC.relative_to(REPO)}")
    parser.add_argument("--json", type=Path, help="also write the figures per backend as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.enqueue = min(args.enqueue, 300)
        args.messages = min(args.messages, 500)
        args.configs = "1x32"
        args.runs = 1
        args.timeout = min(args.timeout, 60.0)
        args.quiet_wait = min(args.quiet_wait, 3.0)
    baseline_count = args.baseline or min(args.messages, 5000)
    if not Path(SMTP_SINK).exists():
        print(f"{SMTP_SINK} is missing (apt install postfix)", file=sys.stderr)
        return 2

    atexit.register(_cleanup_children)
    signal.signal(signal.SIGTERM, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="hato-outbox-bench-"))
    atexit.register(shutil.rmtree, workdir, True)
    makers: dict[str, Callable[[], Backend]] = {
        "sqlite": lambda: SQLiteBackend(workdir),
        "postgres": lambda: PostgresBackend(args.postgres),
        "redis": lambda: RedisBackend(args.redis),
    }
    reports: list[BackendReport] = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        backend = makers[name]()
        report = BackendReport(name, backend.durability())
        reports.append(report)
        wait_for_quiet(args.quiet_wait)
        with fresh_queue(backend) as url:
            report.enqueue = bench_enqueue(backend, url, args.enqueue, args.timeout)
        enq = report.enqueue
        print(
            f"{name}: send() {enq.rate:,.0f}/s, p50 {enq.pct(0.5):.2f} ms, "
            f"p99 {enq.pct(0.99):.2f} ms (other work: {enq.other_cpu / enq.seconds:.2f} cores)",
            flush=True,
        )
        for workers, concurrency in parse_configs(args.configs):
            runs = []
            for _ in range(args.runs):
                wait_for_quiet(args.quiet_wait)
                result = bench_e2e(
                    backend,
                    workers,
                    concurrency,
                    args.messages,
                    args.timeout,
                    workdir,
                    args.profile,
                )
                runs.append(result)
                shown = f"{result.rate:,.0f} msg/s" if result.seconds else "timeout"
                print(
                    f"{name}: {result.config} end to end {shown} "
                    f"({result.delivered}/{result.messages})",
                    flush=True,
                )
            # The median run (a timeout counts as the slowest), with every run's rate.
            ordered = sorted(runs, key=lambda r: r.rate)
            median = ordered[len(ordered) // 2]
            median.all_rates = [r.rate for r in runs]
            report.e2e.append(median)
    wait_for_quiet(args.quiet_wait)
    messages = baseline_messages(baseline_count)
    baseline = bench_smtplib(messages, args.timeout)
    for b in baseline:
        print(f"{b.name}: {b.rate:,.0f} msg/s", flush=True)
    table = render(reports, baseline, args, len(messages[0].data))
    print()
    print(table)
    if args.write_doc:
        shown = " ".join(["python bench/outbox_bench.py", *(argv or sys.argv[1:])])
        write_doc(table, shown)
    if args.json:
        args.json.write_text(json.dumps(as_json(reports, baseline), indent=2) + "\n")
    return 0


def as_json(
    reports: Sequence[BackendReport], baseline: Sequence[BaselineResult]
) -> dict[str, object]:
    """The figures per backend, for ``bench/targets.py``."""
    backends: dict[str, object] = {}
    for r in reports:
        enq, best = r.enqueue, r.best()
        backends[r.name] = {
            "durability": r.durability,
            "send_calls": enq.calls if enq else None,
            "send_per_s": enq.rate if enq else None,
            "send_p50_ms": enq.pct(0.50) if enq else None,
            "send_p99_ms": enq.pct(0.99) if enq else None,
            "other_cores": enq.other_cpu / enq.seconds if enq else None,
            "end_to_end_per_s": best.rate if best else None,
            "end_to_end_config": best.config if best else None,
        }
    return {
        "script": "outbox_bench",
        "backends": backends,
        "baseline": {b.name: b.rate for b in baseline},
    }


if __name__ == "__main__":
    sys.exit(main())
