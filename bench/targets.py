"""Issue 11's targets in one table: every benchmark of ``bench/`` run once, side by side.

Usage (as root, like the scripts it runs: Postfix's master and smtp-sink need it)::

    /work/venv/bin/python bench/targets.py                  # the figures (~25 min, quiet machine)
    /work/venv/bin/python bench/targets.py --quick          # smoke run of every phase (~3 min)
    /work/venv/bin/python bench/targets.py --write-doc      # and put the table in docs/performance.md
    /work/venv/bin/python bench/targets.py --render run.json    # the table of a saved run, nothing run

It runs five phases in sequence, each a subprocess with the same ``--python`` and its own
``--json`` file: ``smtp_bench.py`` (accepted and end-to-end msg/s against Postfix at 1,
20 and 100 sessions, spool peak), ``latency.py`` (p50/p99 accept → delivered at a steady
100 msg/s from 20 clients, Hato and Postfix), ``idle_sessions.py`` (RSS of hato's process
tree with 15,000 idle sessions), ``outbox_bench.py`` (``Mailer.send()`` p50/p99 on
PostgreSQL and Redis) and ``multinode.py`` (1, 2, 3 nodes on one PostgreSQL). Their output
is passed through, prefixed with the phase; a line with the elapsed time is printed every
``--heartbeat`` seconds of silence. A phase that fails (exit status, timeout, no JSON) is
shown as failed with its last line of output; the other phases still run.

Then it prints one table with the rows of the issue: figure | Hato | Postfix (same run) |
ratio | target | stretch | met?, and one with each phase's status, time, the cores of
other work on the machine during it (a noisy phase shows) and the spool peak. With
``--write-doc`` both go into ``docs/performance.md`` between ``<!-- targets:begin -->``
and ``<!-- targets:end -->`` (placed under the "Intake and relay" heading the first time),
with the date, the machine, the durability settings and the commands. ``--json PATH``
keeps everything measured; ``--render PATH`` prints (and with ``--write-doc`` writes) the
tables of such a file again.

The table assembly (``figures``, ``phase_rows``, ``render_markdown``, ``insert_section``)
is pure, tested by ``tests/unit/test_bench_targets.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DOC = REPO / "docs" / "performance.md"
BEGIN = "<!-- targets:begin -->"
END = "<!-- targets:end -->"
ANCHOR = "## Intake and relay"
NOISY = 0.3  # cores of other work that make a phase's figures doubtful (as smtp_bench's --noisy)
MB = 1_000_000  # the "200 MB" is decimal


# --- the phases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    script: str
    full: tuple[str, ...]  # the arguments for the table
    quick: tuple[str, ...]  # the arguments of a smoke run
    python_flag: bool = True  # the script takes --python (outbox_bench runs workers itself)
    hato_env: bool = True  # the script takes --hato-env
    timeout: float = 1800.0
    quick_timeout: float = 300.0


PHASES = (
    Phase(
        "smtp_bench",
        "smtp_bench.py",
        full=(),  # 1, 20, 100 sessions, 3 runs, N = 2000 / 5000 / 5000
        quick=("--quick", "--sessions", "1,20,100", "--quiet-wait", "5", "--retries", "0"),
        timeout=3600.0,
    ),
    Phase(
        "latency",
        "latency.py",
        full=("--runs", "3"),  # 100 msg/s, 20 clients, 60 s, Hato and Postfix interleaved
        quick=("--quick", "--drain", "20", "--timeout", "20"),
    ),
    Phase("idle_sessions", "idle_sessions.py", full=(), quick=("--quick",), timeout=900.0),
    Phase(
        "outbox_bench",
        "outbox_bench.py",
        # send() latency only: no end-to-end configurations, a small smtplib baseline.
        full=("--backends", "postgres,redis", "--configs", "", "--baseline", "500"),
        quick=("--quick", "--backends", "postgres,redis", "--configs", "", "--baseline", "50"),
        python_flag=False,
        hato_env=False,
        timeout=900.0,
    ),
    Phase("multinode", "multinode.py", full=(), quick=("--quick", "--nodes", "1,2,3")),
)


def phase_argv(phase: Phase, args: argparse.Namespace, json_path: Path) -> list[str]:
    argv = [args.python, str(BENCH / phase.script)]
    argv += phase.quick if args.quick else phase.full
    if phase.python_flag:
        argv += ["--python", args.python]
    if phase.hato_env:
        for pair in args.hato_env:
            argv += ["--hato-env", pair]
    if phase.name == "smtp_bench":
        # Its own detailed table (CPU per process group) from the same run; never a smoke run's.
        argv += ["--markdown", str(args.doc) if args.write_doc and not args.quick else ""]
    if phase.name in ("outbox_bench", "multinode") and args.postgres:
        argv += ["--postgres", args.postgres]
    if phase.name == "outbox_bench" and args.redis:
        argv += ["--redis", args.redis]
    return [*argv, "--json", str(json_path)]


def shown(argv: Sequence[str]) -> str:
    """A command as a reader would type it: the bench script relative to the repository."""
    parts = [str(Path(a).relative_to(REPO)) if a.startswith(str(BENCH)) else a for a in argv]
    return shlex.join(parts)


def fmt_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class _Child:
    """The running phase, so that a signal to us stops it (and it cleans up its own)."""

    proc: subprocess.Popen[bytes] | None = None


def _stop(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    # SIGTERM: the scripts turn it into KeyboardInterrupt and kill their children by id.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def run_phase(
    phase: Phase, argv: list[str], json_path: Path, args: argparse.Namespace, began: float
) -> dict[str, Any]:
    """Run one phase to completion or timeout; its record for the combined JSON."""
    timeout = phase.quick_timeout if args.quick else phase.timeout
    tail: collections.deque[str] = collections.deque(maxlen=8)
    start = time.monotonic()
    last_line = [start]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO
    )
    _Child.proc = proc

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                if line.strip():
                    tail.append(line.rstrip())
                    print(f"  {phase.name} | {line.rstrip()}", flush=True)
            last_line[0] = time.monotonic()

    reader = threading.Thread(target=pump, daemon=True, name=f"{phase.name}-output")
    reader.start()
    timed_out = False
    while True:
        try:
            proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if now - start > timeout:
                print(f"  {phase.name} | timeout after {timeout:.0f}s: stopping it", flush=True)
                timed_out = True
                _stop(proc)
                break
            if now - last_line[0] >= args.heartbeat:
                print(
                    f"  {phase.name} | ... running {fmt_elapsed(now - start)} "
                    f"(total {fmt_elapsed(now - began)})",
                    flush=True,
                )
                last_line[0] = now
    reader.join(timeout=10)
    _Child.proc = None
    seconds = time.monotonic() - start
    data: dict[str, Any] | None = None
    error = ""
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        error = f"no JSON ({type(exc).__name__})"
    if timed_out:
        status = f"timeout after {timeout:.0f}s"
    elif proc.returncode != 0:
        status = f"exit {proc.returncode}"
    elif data is None:
        status = "failed"
    else:
        status = "ok"
    if status != "ok":
        error = "; ".join(filter(None, [error, last_words(list(tail))]))
    return {
        "command": shown(argv[:-2]),  # without --json TMPFILE: the command to run again
        "status": status,
        "error": error[-600:],
        "seconds": seconds,
        "data": data,
    }


def last_words(lines: list[str]) -> str:
    """What a failed phase said last that says most: a traceback's exception line if there
    is one among its last lines, else its last line (the rest was passed through)."""
    for line in reversed(lines):
        if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line.strip()):
            return " ".join(line.split())
    return " ".join(lines[-1].split()) if lines else ""


def machine() -> dict[str, str]:
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
    return {
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM, {platform.system()} "
        f"{platform.release()}",
        "load average before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# --- the table (pure: from the combined JSON) ----------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A target on one value: ``op`` is ``>=``, ``<=`` or ``<``; ``stretch`` may be None."""

    op: str
    target: float
    stretch: float | None
    unit: str

    def holds(self, value: float, bound: float) -> bool:
        return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[self.op]

    def met(self, value: float | None) -> str:
        if value is None:
            return "–"
        if self.stretch is not None and self.holds(value, self.stretch):
            return "yes (stretch)"
        return "yes" if self.holds(value, self.target) else "**no**"

    def text(self, bound: float | None) -> str:
        if bound is None:
            return ""
        op = {">=": "≥", "<=": "≤", "<": "<"}[self.op]
        number = f"{bound:g}"
        return f"{op} {number}{self.unit}"


@dataclass(frozen=True)
class Row:
    figure: str
    hato: str
    postfix: str
    ratio: str
    target: str
    stretch: str
    met: str

    def cells(self) -> list[str]:
        return [
            self.figure,
            self.hato,
            self.postfix,
            self.ratio,
            self.target,
            self.stretch,
            self.met,
        ]


HEADER = ["figure", "Hato", "Postfix (same run)", "ratio", "target", "stretch", "met?"]
PHASE_HEADER = ["phase", "status", "time", "other work (cores, max)", "spool peak (Hato / Postfix)"]

THROUGHPUT = Goal(">=", 2.0, 3.0, "×")
ACCEPTED = Goal(">=", 2.0, 4.0, "×")
P99 = Goal("<=", 20.0, 5.0, " ms")
RSS = Goal("<=", 200.0, None, " MB")
SEND_P99 = Goal("<", 2.0, 1.0, " ms")


def _data(phases: dict[str, Any], name: str) -> dict[str, Any] | None:
    record = phases.get(name)
    if not isinstance(record, dict):
        return None
    data = record.get("data")
    return data if isinstance(data, dict) else None


def _missing(phases: dict[str, Any], name: str) -> str:
    record = phases.get(name)
    if not isinstance(record, dict):
        return "not run"
    return "failed" if record.get("status") != "ok" else "–"


def _ratio(hato: float | None, postfix: float | None) -> float | None:
    return hato / postfix if hato is not None and postfix else None


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} msg/s"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _row(
    figure: str,
    goal: Goal,
    hato: str,
    postfix: str,
    ratio: str,
    judged: float | None,
) -> Row:
    return Row(
        figure,
        hato,
        postfix,
        ratio,
        goal.text(goal.target),
        goal.text(goal.stretch),
        goal.met(judged),
    )


def _num(mapping: dict[str, Any] | None, key: str) -> float | None:
    if not mapping:
        return None
    value = mapping.get(key)
    return float(value) if isinstance(value, int | float) else None


def smtp_rows(phases: dict[str, Any]) -> list[Row]:
    data = _data(phases, "smtp_bench")
    sessions = [1, 20, 100]
    if data:
        sessions = sorted({*sessions, *(int(s) for s in data.get("sessions", {}))})
    rows: list[Row] = []
    for metric, label, goal in (
        ("end_to_end", "end to end vs Postfix", THROUGHPUT),
        ("accepted", "accepted vs Postfix", ACCEPTED),
    ):
        for n in sessions:
            figure = f"{label}, {n} session{'s' if n != 1 else ''}"
            cell = (data or {}).get("sessions", {}).get(str(n), {})
            if not data:
                gone = _missing(phases, "smtp_bench")
                rows.append(_row(figure, goal, gone, gone, "–", None))
                continue
            hato, postfix = _num(cell.get("hato"), metric), _num(cell.get("postfix"), metric)
            ratio = _ratio(hato, postfix)
            # The issue names no stretch for end to end at one session.
            row_goal = goal if n != 1 or metric == "accepted" else Goal(">=", 2.0, None, "×")
            rows.append(_row(figure, row_goal, _rate(hato), _rate(postfix), _x(ratio), ratio))
    return rows


def latency_rows(phases: dict[str, Any]) -> list[Row]:
    data = _data(phases, "latency")
    figure = "p99 accept → delivered at a steady 100 msg/s (20 clients)"
    if data:
        figure = (
            f"p99 accept → delivered at a steady {data.get('rate', 100):g} msg/s "
            f"({data.get('clients', 20)} clients)"
        )
    if not data:
        gone = _missing(phases, "latency")
        return [_row(figure, P99, gone, gone, "–", None)]
    systems = data.get("systems", {})
    hato, postfix = _num(systems.get("hato"), "p99_ms"), _num(systems.get("postfix"), "p99_ms")
    p50h, p50p = _num(systems.get("hato"), "p50_ms"), _num(systems.get("postfix"), "p50_ms")
    return [
        _row(
            figure,
            P99,
            _ms(hato) + (f" (p50 {p50h:.1f})" if p50h is not None else ""),
            _ms(postfix) + (f" (p50 {p50p:.1f})" if p50p is not None else ""),
            _x(_ratio(hato, postfix)),
            hato,
        )
    ]


def idle_rows(phases: dict[str, Any]) -> list[Row]:
    data = _data(phases, "idle_sessions")
    if not data:
        gone = _missing(phases, "idle_sessions")
        return [_row("RSS with 15,000 idle SMTP sessions after EHLO", RSS, gone, "–", "–", None)]
    figure = f"RSS with {data.get('sessions', 0):,} idle SMTP sessions after EHLO"
    during = _num(data, "rss_during_bytes")
    mb = during / MB if during is not None else None
    procs = data.get("processes")
    hato = "–" if mb is None else f"{mb:.1f} MB ({procs} process{'' if procs == 1 else 'es'}"
    pss = _num(data, "pss_during_bytes")
    if mb is not None:
        # Summed VmRSS counts the pages the forked processes share once per process; PSS
        # divides them among the processes, so its sum is what the tree holds: the target
        # is judged on it when known.
        hato += f"; PSS {pss / MB:.1f} MB, judged)" if pss is not None else ")"
        if pss is not None:
            mb = pss / MB
    opened, wanted = data.get("opened"), data.get("sessions")
    if opened != wanted:
        hato += f", only {opened:,} opened" if isinstance(opened, int) else ", not all opened"
        mb = None  # not the figure asked for
    return [_row(figure, RSS, hato, "–", "–", mb)]


def outbox_rows(phases: dict[str, Any]) -> list[Row]:
    data = _data(phases, "outbox_bench")
    rows = []
    for backend, label in (("postgres", "PostgreSQL"), ("redis", "Redis")):
        figure = f"outbox `send()` p99, {label}"
        if not data:
            gone = _missing(phases, "outbox_bench")
            rows.append(_row(figure, SEND_P99, gone, "–", "–", None))
            continue
        entry = data.get("backends", {}).get(backend)
        p99, p50 = _num(entry, "send_p99_ms"), _num(entry, "send_p50_ms")
        hato = "–" if p99 is None else f"{p99:.2f} ms" + (f" (p50 {p50:.2f})" if p50 else "")
        rows.append(_row(figure, SEND_P99, hato, "–", "–", p99))
    return rows


def multinode_rows(phases: dict[str, Any]) -> list[Row]:
    data = _data(phases, "multinode")
    if not data:
        gone = _missing(phases, "multinode")
        return [Row("end to end, 1–3 nodes on one PostgreSQL", gone, "–", "–", "grows", "", "–")]
    rows = []
    by_nodes = {int(r["nodes"]): r for r in data.get("rows", [])}
    base = _num(by_nodes.get(1), "end_to_end_per_s")
    previous: float | None = None
    for nodes in sorted(by_nodes):
        row = by_nodes[nodes]
        e2e, accepted = _num(row, "end_to_end_per_s"), _num(row, "accepted_per_s")
        hato = "timeout" if e2e is None else _rate(e2e)
        if accepted is not None:
            hato += f" (accepted {accepted:,.0f})"
        if nodes == 1:
            target, met = "", "–"
        else:
            target = f"> {nodes - 1} node{'s' if nodes > 2 else ''}"
            met = (
                "–" if e2e is None or previous is None else ("yes" if e2e > previous else "**no**")
            )
        ratio = f"{_x(_ratio(e2e, base))} of 1 node" if nodes != 1 and base else "–"
        figure = f"end to end, {nodes} node{'s' if nodes != 1 else ''} on one PostgreSQL"
        rows.append(Row(figure, hato, "–", ratio, target, "", met))
        previous = e2e
    return rows


ROW_BUILDERS: tuple[Callable[[dict[str, Any]], list[Row]], ...] = (
    smtp_rows,
    latency_rows,
    idle_rows,
    outbox_rows,
    multinode_rows,
)


def figures(phases: dict[str, Any]) -> list[Row]:
    """The issue's rows, in its order, from each phase's record (``data`` may be missing)."""
    return [row for build in ROW_BUILDERS for row in build(phases)]


def other_work(name: str, data: dict[str, Any] | None) -> float | None:
    """The most cores of other work any measurement of the phase saw."""
    if not data:
        return None
    values: list[float | None] = []
    if name == "smtp_bench":
        values = [
            _num(c, "cpu_other") for s in data.get("sessions", {}).values() for c in s.values()
        ]
    elif name == "latency":
        values = [_num(s, "other_cores_max") for s in data.get("systems", {}).values()]
    elif name == "idle_sessions":
        values = [_num(data, "other_cores")]
    elif name == "outbox_bench":
        values = [_num(b, "other_cores") for b in data.get("backends", {}).values()]
    elif name == "multinode":
        values = [_num(r, "other_cores") for r in data.get("rows", [])]
    found = [v for v in values if v is not None]
    return max(found) if found else None


def spool_peaks(name: str, data: dict[str, Any] | None) -> str:
    if name != "smtp_bench" or not data:
        return "–"
    parts = []
    for n, cell in sorted(data.get("sessions", {}).items(), key=lambda kv: int(kv[0])):
        peaks = [cell.get(s, {}).get("spool_peak") for s in ("hato", "postfix")]
        text = " / ".join("–" if p is None else f"{p:,}" for p in peaks)
        parts.append(f"{n} s.: {text}")
    return "; ".join(parts) or "–"


def phase_rows(phases: dict[str, Any]) -> list[list[str]]:
    rows = []
    for phase in PHASES:
        record = phases.get(phase.name)
        if not isinstance(record, dict):
            rows.append([phase.name, "not run", "–", "–", "–"])
            continue
        data = _data(phases, phase.name)
        status = str(record.get("status", "?"))
        if record.get("error") and status != "ok":
            status += ": " + str(record["error"]).replace("`", "'")
        other = other_work(phase.name, data)
        other_text = (
            "–" if other is None else f"{other:.2f}" + (" (noisy)" if other > NOISY else "")
        )
        seconds = record.get("seconds")
        time_text = fmt_elapsed(seconds) if isinstance(seconds, int | float) else "–"
        rows.append([phase.name, status, time_text, other_text, spool_peaks(phase.name, data)])
    return rows


def durability_lines(phases: dict[str, Any]) -> list[str]:
    lines = []
    smtp = _data(phases, "smtp_bench")
    if smtp and smtp.get("durability"):
        lines.append(f"intake and relay: {smtp['durability']}")
    latency = _data(phases, "latency")
    if latency:
        for name, system in latency.get("systems", {}).items():
            lines.append(f"latency, {name}: {system.get('durability', '?')}")
    outbox = _data(phases, "outbox_bench")
    if outbox:
        for name, backend in outbox.get("backends", {}).items():
            lines.append(f"outbox, {name}: {backend.get('durability', '?')}")
    multinode = _data(phases, "multinode")
    if multinode and multinode.get("durability"):
        lines.append(f"multinode: {multinode['durability']}")
    return lines


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The section between the targets markers: what was run, where, and the two tables."""
    phases = result.get("phases", {})
    out = [
        "### Issue 11's targets in one run (`bench/targets.py`)",
        "",
        f"Measured {result.get('date', '?')} in one run of `{result.get('command', '?')}` "
        f"({fmt_elapsed(float(result.get('seconds', 0)))} in all)"
        + (
            "; **a smoke run (`--quick`): these numbers are not the figures**."
            if result.get("quick")
            else "."
        ),
        "",
    ]
    env = dict(result.get("machine", {}))
    smtp = _data(phases, "smtp_bench")
    if smtp:
        for key in ("machine", "disk", "postfix", "hato runtime"):
            if smtp.get("environment", {}).get(key):
                env[key] = smtp["environment"][key]
    out += [f"- **{key}**: {value}" for key, value in env.items()]
    durability = durability_lines(phases)
    if durability:
        out.append("- **durability**:")
        out += [f"  - {line}" for line in durability]
    out.append("- **commands** (run in this order, as root, from the repository root):")
    for phase in PHASES:
        record = phases.get(phase.name)
        if isinstance(record, dict) and record.get("command"):
            out.append(f"  - `{record['command']}`")
    out += ["", *_table(HEADER, [r.cells() for r in figures(phases)]), ""]
    out += [
        "Ratios are Hato / Postfix (for the nodes: against one node); RSS in MB of 10^6 "
        "bytes, summed over hato's process tree; p50 in parentheses. *Other work* is the "
        "machine's busy CPU outside the measured processes during a phase: above "
        f"{NOISY} cores the figures of that phase are doubtful. The spool peak is the most "
        "messages accepted and not yet delivered during each intake run (1, 20, 100 sessions). "
        "This section is generated: the limit behind each **no** is named in the sections "
        "below.",
        "",
        *_table(PHASE_HEADER, phase_rows(phases)),
    ]
    return "\n".join(out)


def render_text(result: dict[str, Any]) -> str:
    phases = result.get("phases", {})

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return lines

    lines = table(HEADER, [[c.replace("**", "") for c in r.cells()] for r in figures(phases)])
    short = [[c if len(c) <= 100 else c[:99] + "…" for c in row] for row in phase_rows(phases)]
    lines += ["", *table(PHASE_HEADER, short)]
    durability = durability_lines(phases)
    if durability:
        lines += ["", "durability:", *(f"  {d}" for d in durability)]
    return "\n".join(lines)


def insert_section(text: str, section: str) -> str:
    """``text`` with ``section`` between the markers: replaced where they are, else put
    right under the "Intake and relay" heading, else appended."""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(ANCHOR):
            return "\n".join([*lines[: i + 1], "", block, *lines[i + 1 :]])
    return text.rstrip("\n") + "\n\n" + block + "\n"


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every phase (~3 min)")
    parser.add_argument(
        "--phases",
        default=",".join(p.name for p in PHASES),
        help="comma separated subset (default: all, in this order)",
    )
    parser.add_argument("--python", default="/work/venv/bin/python"
                        if Path("/work/venv/bin/python").exists() else sys.executable)  # fmt: skip
    parser.add_argument("--hato-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for hato serve in every phase that starts it")  # fmt: skip
    parser.add_argument("--postgres", help="server URL for outbox_bench and multinode")
    parser.add_argument("--redis", help="server URL for outbox_bench")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="seconds of silence before an 'elapsed' line")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write everything measured to this file")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: print the tables of a --json file")  # fmt: skip
    parser.add_argument("--write-doc", action="store_true",
                        help=f"put the tables into {DOC.relative_to(REPO)} between the markers")  # fmt: skip
    parser.add_argument("--doc", type=Path, default=DOC, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    known = {p.name for p in PHASES}
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    for name in args.phase_list:
        if name not in known:
            parser.error(f"unknown phase {name!r} (known: {', '.join(sorted(known))})")
    for pair in args.hato_env:
        if "=" not in pair:
            parser.error(f"--hato-env {pair!r}: expected KEY=VALUE")
    return args


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": shown([args.python, str(BENCH / "targets.py"), *args.argv]),
        "quick": args.quick,
        "machine": machine(),
        "phases": {},
    }
    chosen = [p for p in PHASES if p.name in args.phase_list]
    with tempfile.TemporaryDirectory(prefix="hato-targets-") as tmp:
        for number, phase in enumerate(chosen, 1):
            json_path = Path(tmp) / f"{phase.name}.json"
            argv = phase_argv(phase, args, json_path)
            print(
                f"[{number}/{len(chosen)}] {phase.name} (total {fmt_elapsed(time.monotonic() - began)}):"
                f" {shown(argv[:-2])}",
                flush=True,
            )
            record = run_phase(phase, argv, json_path, args, began)
            result["phases"][phase.name] = record
            print(
                f"[{number}/{len(chosen)}] {phase.name}: {record['status']} in "
                f"{fmt_elapsed(record['seconds'])}"
                + (f" — {record['error']}" if record["status"] != "ok" else ""),
                flush=True,
            )
    result["seconds"] = time.monotonic() - began
    return result


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
    else:
        if os.geteuid() != 0:
            print("targets: run as root (Postfix's master and smtp-sink need it)", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _on_signal)
        try:
            result = run_all(args)
        except KeyboardInterrupt:
            if _Child.proc is not None:
                _stop(_Child.proc)
            print("targets: interrupted", file=sys.stderr)
            return 130
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
    print()
    print(render_text(result))
    if args.write_doc:
        doc: Path = args.doc
        text = doc.read_text() if doc.exists() else "# Performance\n"
        doc.write_text(insert_section(text, render_markdown(result)))
        print(f"wrote {doc}")
    failed = [n for n, r in result.get("phases", {}).items() if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
