"""Scale-out: throughput of one, two and three ``hato serve`` nodes sharing a PostgreSQL queue.

Usage (as root: smtp-sink is started as the postfix user)::

    /work/venv/bin/python bench/multinode.py                     # 1,2,3 nodes, 3000 messages
    /work/venv/bin/python bench/multinode.py --quick             # 300 messages, 1 and 2 nodes
    /work/venv/bin/python bench/multinode.py --nodes 1,2,3 --messages 6000 --sessions 20

For every node count it creates a fresh schema on the PostgreSQL server of ``--postgres``
(``HATO_QUEUE_URL=postgresql://...?schema=hato_bench_XXXX``, dropped afterwards), starts
that many ``hato serve`` processes on it (``smtp_bench.py``'s starter: own data dir and
port each, ``RELAYHOST`` = one ``smtp-sink``), and runs one ``smtp-source`` per node at
the same time with ``--sessions`` sessions each and an equal share of ``--messages``.
Measured: accepted msg/s (all messages got 250: total / the slowest smtp-source) and
end-to-end msg/s (total / time until the sink counted every message). One machine runs
the nodes and the database alike, so this shows what sharing the queue costs and how the
cores get used, not what a second machine would add.
Loopback only; every child is bounded and killed on exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import smtp_bench
from smtp_bench import REPO, BenchError, Hato, Sink, SourceResult, smtp_source

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Row:
    nodes: int
    messages: int
    accepted_per_s: float
    end_to_end_per_s: float | None
    other_cores: float = 0.0  # the machine's busy CPU less the nodes, sink, sources, PostgreSQL


def postgres_cpu() -> float:
    """CPU seconds used so far by the live ``postgres`` processes (the shared server)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = Path(f"/proc/{entry}/stat").read_text()
                if raw[raw.index("(") + 1 : raw.rindex(")")] == "postgres":
                    fields = raw[raw.rindex(")") + 2 :].split()
                    ticks += int(fields[11]) + int(fields[12])
    return ticks / smtp_bench.CLK_TCK


def measure(nodes: int, args: argparse.Namespace) -> Row:
    import psycopg

    schema = f"hato_bench_{secrets.token_hex(4)}"
    sink = Sink()
    started: list[Hato] = []
    try:
        args.hato_env = {
            **args.base_env,
            "HATO_QUEUE_URL": f"{args.postgres}?schema={schema}",
        }
        for _ in range(nodes):
            started.append(Hato(sink.port, args.sessions, args))
        share = [
            args.messages // nodes + (1 if i < args.messages % nodes else 0) for i in range(nodes)
        ]
        results: list[SourceResult | BaseException] = [BenchError("not run")] * nodes

        def source(i: int) -> None:
            try:
                results[i] = smtp_source(started[i].port, args.sessions, share[i], args.timeout)
            except BaseException as exc:  # reported below
                results[i] = exc

        busy0, own0, pg0 = smtp_bench.machine_busy(), smtp_bench.own_cpu(), postgres_cpu()
        ours0 = sum(smtp_bench.tree_cpu(h.pid()) for h in started)
        ours0 += smtp_bench.tree_cpu(sink.proc.pid)
        begin = time.monotonic()
        threads = [threading.Thread(target=source, args=(i,), daemon=True) for i in range(nodes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.timeout + 30)
        sent = [r for r in results if isinstance(r, SourceResult)]
        failed = [r for r in results if not isinstance(r, SourceResult)]
        if failed or any(r.returncode != 0 for r in sent):
            raise BenchError(f"smtp-source failed: {failed or [r.stderr[-300:] for r in sent]}")
        accepted = max(r.seconds for r in sent)
        done = sink.wait_for(args.messages, time.monotonic() + args.timeout)
        ours = sum(smtp_bench.tree_cpu(h.pid()) for h in started)
        ours += smtp_bench.tree_cpu(sink.proc.pid) - ours0 + sum(r.cpu for r in sent)
        busy = smtp_bench.machine_busy() - busy0 - (smtp_bench.own_cpu() - own0)
        other = busy - ours - (postgres_cpu() - pg0)
        return Row(
            nodes,
            args.messages,
            args.messages / accepted,
            args.messages / (done - begin) if done is not None else None,
            max(0.0, other / (time.monotonic() - begin)),
        )
    finally:
        for hato in started:
            hato.close()
        sink.close()
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", help="comma separated (default 1,2,3; --quick: 1,2)")
    parser.add_argument("--messages", type=int, default=3000, help="in total, per node count")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions per node")
    parser.add_argument("--quick", action="store_true", help="300 messages, 1 and 2 nodes")
    parser.add_argument("--postgres", default=DEFAULT_PG, help="server URL, without ?schema")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--workdir", help="where the hato data dirs go (default: $TMPDIR)")
    parser.add_argument("--hato-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--python", default="/work/venv/bin/python"
                        if Path("/work/venv/bin/python").exists() else sys.executable)  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 300)
        args.nodes = args.nodes or "1,2"
    args.nodes = args.nodes or "1,2,3"
    args.node_list = [int(n) for n in args.nodes.split(",") if n.strip()]
    args.base_env = smtp_bench._pairs(args.hato_env)
    args.src = REPO / "src"
    args.hato_cmd = [args.python, "-m", "hato"]
    args.hato_log = "file"
    args.accept_only = False
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    atexit.register(smtp_bench._cleanup_all)
    signal.signal(signal.SIGTERM, smtp_bench._on_signal)
    rows = []
    for nodes in args.node_list:
        print(f"{nodes} node(s): {args.messages} messages ...", flush=True)
        rows.append(measure(nodes, args))
    print()
    print(f"PostgreSQL queue ({args.postgres.split('@')[-1]}), {args.sessions} sessions per node")
    print(f"{'nodes':>5} {'messages':>8} {'accepted/s':>11} {'end-to-end/s':>13} {'vs 1 node':>9}")
    base = rows[0].end_to_end_per_s if rows and rows[0].nodes == 1 else None
    for row in rows:
        e2e = row.end_to_end_per_s
        ratio = f"{e2e / base:.2f}x" if e2e and base else "-"
        shown = f"{e2e:.0f}" if e2e else "timeout"
        print(
            f"{row.nodes:>5} {row.messages:>8} {row.accepted_per_s:>11.0f} {shown:>13} {ratio:>9}"
        )
    print(
        "durability: each 250 after the PostgreSQL commit (synchronous_commit as the server has it)"
    )
    if args.json:
        data = {
            "script": "multinode",
            "postgres": args.postgres.split("@")[-1],
            "sessions_per_node": args.sessions,
            "durability": "each 250 after the PostgreSQL commit "
            "(synchronous_commit as the server has it)",
            "rows": [dataclasses.asdict(row) for row in rows],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0 if all(r.end_to_end_per_s for r in rows) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
    sys.exit(130)
