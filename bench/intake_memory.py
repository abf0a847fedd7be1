"""Intake memory: the RSS of ``hato serve`` before, during and after a burst of large messages.

Usage::

    .venv/bin/python bench/intake_memory.py                       # 20 x 10 MiB, one session
    .venv/bin/python bench/intake_memory.py --messages 40 --size 5 --sessions 4

It starts ``python -m hato serve`` on a free loopback port with a fresh data dir (SQLite
queue, no relay host, so every message is held and nothing is delivered: what is measured
is the intake alone), reads its RSS from ``/proc/PID/status``, sends the messages with
smtplib (``--sessions`` connections at once, one message after another on each), and
prints the RSS before the burst, its peak (``VmHWM``) and the RSS after it, once at
once and once more after ``--settle`` seconds. Every message must get its 250.

Only 127.0.0.1 is used; the server is stopped (SIGTERM, then SIGKILL) on every exit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from peers import free_port  # noqa: E402

MIB = 1024 * 1024


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(m.group(1)) * 1024
        for key in ("VmRSS", "VmHWM")
        if (m := re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE))
    }


def message(size: int, n: int) -> bytes:
    """A message of about ``size`` bytes: headers, then 76-character base64-like lines."""
    head = (
        f"From: bench@example.org\r\nTo: someone@example.net\r\nSubject: large {n}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    line = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx" * 2)[
        :76
    ] + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def send(port: int, data: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        for body in data:
            refused = client.sendmail("bench@example.org", ["someone@example.net"], body)
            if refused:
                raise RuntimeError(f"refused: {refused}")


def wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hato serve exited {proc.returncode}:\n{log.read_text()}")
        if "hato: ready" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"hato serve not ready after {timeout}s:\n{log.read_text()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--size", type=float, default=10.0, help="MiB per message")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the last RSS")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment"
    )
    args = parser.parse_args(argv)

    size = int(args.size * MIB)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hato-mem-") as tmp:
        data_dir = Path(tmp)
        log = data_dir / "serve.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "PYTHONPATH": str(REPO / "src"),
            "HATO_DATA_DIR": tmp,
            "HATO_LISTEN": f"127.0.0.1:{port}",
            "HATO_MESSAGE_SIZE_LIMIT": str(size + MIB),
            "HATO_FSYNC": "false",
        }
        env.update(item.split("=", 1) for item in args.env)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hato", "serve"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
            )
        try:
            wait_ready(proc, log)
            # One small message first, so that "before" includes a warmed-up session.
            send(port, [message(4096, 0)])
            before = status(proc.pid)["VmRSS"]
            bodies = [message(size, n) for n in range(1, args.messages + 1)]
            per_session = [bodies[i :: args.sessions] for i in range(args.sessions)]
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(args.sessions) as pool:
                for future in [pool.submit(send, port, part) for part in per_session]:
                    future.result()
            elapsed = time.monotonic() - started
            after = status(proc.pid)
            time.sleep(args.settle)
            settled = status(proc.pid)["VmRSS"]
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    print(
        f"{args.messages} x {args.size:g} MiB over {args.sessions} session(s) in {elapsed:.1f}s "
        f"(python {sys.version.split()[0]})"
    )
    print(f"RSS before:             {before / MIB:7.1f} MiB")
    print(f"RSS peak (VmHWM):       {after['VmHWM'] / MIB:7.1f} MiB")
    print(f"RSS right after:        {after['VmRSS'] / MIB:7.1f} MiB")
    print(f"RSS after {args.settle:g}s:         {settled / MIB:7.1f} MiB")
    print(f"growth kept:            {(settled - before) / MIB:+7.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
