"""Memory with many idle SMTP sessions: the RSS of the whole hato process tree.

Usage (as root, or with a hard RLIMIT_NOFILE above 2 x N)::

    /work/venv/bin/python bench/idle_sessions.py                  # 15000 sessions
    /work/venv/bin/python bench/idle_sessions.py --quick          # 1000 sessions
    /work/venv/bin/python bench/idle_sessions.py --sessions 15000 --hato-env HATO_PROCESSES=2

It starts ``hato serve`` (``smtp_bench.py``'s starter: fresh data dir, SQLite queue, no
relay host) with its connection limits raised to fit, raises RLIMIT_NOFILE (for itself
and so for hato, which inherits it), then opens ``--sessions`` connections from this
process, each reading the greeting and sending ``EHLO``, and keeps them open and silent.
Source addresses rotate over 127.0.0.1 … 127.0.0.N (``--sources``) so that ephemeral
ports do not run out. Printed: the RSS (sum of ``VmRSS`` over hato's process and all its
descendants) before the first connection, with every session open, and per session.
Bounded: ``--timeout`` for opening them, ``--hold`` seconds idle; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import resource
import signal
import sys
import time
from pathlib import Path

import smtp_bench
from smtp_bench import HOST, REPO, Hato

MIB = 1024 * 1024


def tree(root: int) -> list[int]:
    """``root`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_rss(root: int) -> tuple[int, int]:
    """(bytes of VmRSS summed over the tree of ``root``, number of processes)."""
    total = count = 0
    for pid in tree(root):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
    return total, count


def tree_pss(root: int) -> int | None:
    """Bytes of PSS summed over the tree of ``root``: forked processes share pages, which
    their summed VmRSS counts once per process and PSS divides among them (None: no
    ``smaps_rollup``)."""
    total, seen = 0, False
    for pid in tree(root):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    seen = True
                    break
    return total if seen else None


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def open_session(
    port: int, source: str, writers: list[asyncio.StreamWriter], errors: dict[str, int]
) -> None:
    try:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    except OSError as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        return
    try:
        line = await reader.readline()
        if not line.startswith(b"220"):
            raise ConnectionError(f"greeting {line[:60]!r}")
        writer.write(b"EHLO idle.bench\r\n")
        while True:
            line = await reader.readline()
            if not line.startswith(b"250"):
                raise ConnectionError(f"EHLO answered {line[:60]!r}")
            if line[3:4] == b" ":
                break
        writers.append(writer)
    except (OSError, ConnectionError) as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        writer.close()


async def run(
    args: argparse.Namespace, port: int
) -> tuple[int, dict[str, int], float, tuple[int, int], float, int | None]:
    """Open the sessions; (how many opened, failures by kind, seconds, tree RSS meanwhile,
    cores of other work on the machine while they were held idle, tree PSS meanwhile)."""
    writers: list[asyncio.StreamWriter] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(args.parallel)
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]

    async def one(n: int) -> None:
        async with gate:
            await open_session(port, sources[n % len(sources)], writers, errors)

    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(one(n) for n in range(args.sessions)))
    took = time.monotonic() - started
    busy0, own0, t0 = smtp_bench.machine_busy(), smtp_bench.own_cpu(), time.monotonic()
    hato0 = smtp_bench.tree_cpu(args.hato_pid)
    await asyncio.sleep(args.hold)  # idle: let the server settle with every session open
    rss, pss = tree_rss(args.hato_pid), tree_pss(args.hato_pid)
    busy = smtp_bench.machine_busy() - busy0 - (smtp_bench.own_cpu() - own0)
    busy -= smtp_bench.tree_cpu(args.hato_pid) - hato0
    other = max(0.0, busy / (time.monotonic() - t0))
    for writer in writers:
        writer.close()
    return len(writers), errors, took, rss, other, pss


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=15000)
    parser.add_argument("--quick", action="store_true", help="1000 sessions")
    parser.add_argument("--sources", type=int, default=4, help="127.0.0.1..N as source")
    parser.add_argument("--parallel", type=int, default=200, help="connections opening at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="for opening them all")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds idle before measuring")
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--workdir", help="where the hato data dir goes (default: $TMPDIR)")
    parser.add_argument("--hato-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--python", default="/work/venv/bin/python"
                        if Path("/work/venv/bin/python").exists() else sys.executable)  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions = min(args.sessions, 1000)
    args.hato_env = {
        "HATO_IDLE_TIMEOUT": str(max(300.0, args.timeout + args.hold + 60)),
        **smtp_bench._pairs(args.hato_env),
    }
    args.src = REPO / "src"
    args.hato_cmd = [args.python, "-m", "hato"]
    args.hato_log = "file"
    args.accept_only = True  # no relay host: nothing is sent anywhere
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    atexit.register(smtp_bench._cleanup_all)
    signal.signal(signal.SIGTERM, smtp_bench._on_signal)
    limit = raise_nofile(2 * args.sessions + 1024)
    if limit < args.sessions + 256:
        print(f"RLIMIT_NOFILE is {limit}: too low for {args.sessions} sessions", file=sys.stderr)
        return 2
    hato = Hato(0, args.sessions, args)
    try:
        args.hato_pid = hato.pid()
        time.sleep(1.0)
        before, procs = tree_rss(args.hato_pid)
        pss_before = tree_pss(args.hato_pid)
        opened, errors, took, (during, procs_during), other, pss = asyncio.run(run(args, hato.port))
    finally:
        hato.close()
    print(f"hato serve, {args.sessions} idle sessions after EHLO (RLIMIT_NOFILE {limit})")
    print(f"  opened:           {opened} in {took:.1f} s; failures: {errors or 'none'}")
    print(f"  RSS before:       {before / MIB:.1f} MiB ({procs} process(es))")
    print(f"  RSS with all open: {during / MIB:.1f} MiB ({procs_during} process(es))")
    if pss_before is not None and pss is not None:
        print(
            f"  PSS before:       {pss_before / MIB:.1f} MiB (shared pages split among processes)"
        )
        print(f"  PSS with all open: {pss / MIB:.1f} MiB")
    if opened:
        print(f"  per session:      {(during - before) / opened / 1024:.1f} KiB")
    if args.json:
        data = {
            "script": "idle_sessions",
            "sessions": args.sessions,
            "opened": opened,
            "failures": errors,
            "open_seconds": took,
            "rss_before_bytes": before,
            "rss_during_bytes": during,
            "pss_before_bytes": pss_before,
            "pss_during_bytes": pss,
            "processes": procs_during,
            "other_cores": other,
            "hato_env": {k: v for k, v in args.hato_env.items() if k != "HATO_IDLE_TIMEOUT"},
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0 if opened == args.sessions else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
    sys.exit(130)
