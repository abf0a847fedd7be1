"""``hato serve`` as a real subprocess: start, wait for readiness, read its log, kill, restart.

The process is started as ``python -m hato serve`` with ``src/`` on ``PYTHONPATH`` (so an
uninstalled checkout works too), an environment built only from what the test passes plus
``PATH`` and the like, and ``HATO_DATA_DIR`` pointing at a per-test directory. Readiness is
the contract of ``hato serve``: one stderr line per listener, ``listener NAME on HOST:PORT``,
then ``hato: ready``. Everything on stderr is kept for assertions and failure reports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from peers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "src"

LISTENER_RE = re.compile(r"listener (\S+) on (\S+):(\d+)")
HTTP_RE = re.compile(r"hato: http on (\S+):(\d+)\s*$")
READY_RE = re.compile(r"hato: ready\s*$")
# With several processes (HATO_PROCESSES) each child says so before the supervisor's ready.
CHILD_READY_RE = re.compile(r"hato: (?:intake|delivery) process \d+ ready\s*$")

# Only these pass from the test runner's environment: anything else (a developer's own
# RELAYHOST, HATO_*, proxy settings) must not change what the test sees.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT", "VIRTUAL_ENV")


class HatoError(AssertionError):
    """``hato serve`` did not start, died, or a ``hato`` command failed."""


def hato_env(data_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``hato`` subprocess: clean, plus ``src/`` and the data dir."""
    result = {key: os.environ[key] for key in _INHERITED if key in os.environ}
    pythonpath = [str(SRC)]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    result["PYTHONPATH"] = os.pathsep.join(pythonpath)
    result["PYTHONUNBUFFERED"] = "1"
    result["HATO_DATA_DIR"] = str(data_dir)
    # The HTTP listener is off unless a test asks for it: parallel runs would all want
    # 127.0.0.1:8025. HatoServe turns it on at a free port (see HatoServe.http_url).
    result["HATO_HTTP_LISTEN"] = ""
    if env:
        result.update(env)
    return result


def run_hato(
    args: Sequence[str],
    *,
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run one ``hato`` command (``queue list --json`` …) and return its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=hato_env(data_dir, env),
        cwd=data_dir,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise HatoError(
            f"hato {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def operator_setup(data_dir: Path, users: Mapping[str, str]) -> dict[str, str]:
    """An operator's steps before ``hato serve`` as a relay server: a certificate from
    ``hato tls self-signed`` and each user by ``hato user add NAME --password-stdin``.
    Returns the ``HATO_TLS_*`` variables to start it with."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out = run_hato(["tls", "self-signed", "--hostname", "localhost"], data_dir=data_dir).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("HATO_TLS_"))
    for name, password in users.items():
        proc = subprocess.run(
            [sys.executable, "-m", "hato", "user", "add", name, "--password-stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            env=hato_env(data_dir),
            cwd=data_dir,
        )
        if proc.returncode != 0:
            raise HatoError(f"hato user add {name} exited {proc.returncode}: {proc.stderr}")
    return env


class HatoServe:
    """One ``hato serve`` process on a fixed loopback port, restartable on the same data dir."""

    def __init__(
        self,
        data_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.host = host
        # A fixed port, not 0, so that a restart comes back where the clients are.
        self.port = port or free_port(host)
        self.env.setdefault("HATO_LISTEN", f"{host}:{self.port}")
        self.env.setdefault("HATO_HTTP_LISTEN", "127.0.0.1:0")
        # The console's base URL once started ("http on HOST:PORT"), or "" when off.
        self.http_url = ""
        self.args = list(args)
        self.listeners: dict[str, tuple[str, int]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._runs = 0
        self._start_mark = 0

    # Process control.

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> HatoServe:
        if self.running:
            raise HatoError("hato serve is already running")
        self._runs += 1
        with self._cond:
            self._lines.append(f"--- hato serve start #{self._runs} ---")
            mark = len(self._lines)
        proc = subprocess.Popen(
            [sys.executable, "-m", "hato", "serve", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=hato_env(self.data_dir, self.env),
            cwd=self.data_dir,
        )
        self._proc = proc
        self._reader = threading.Thread(
            target=self._read, args=(proc,), daemon=True, name=f"hato-serve-{proc.pid}"
        )
        self._reader.start()
        self._start_mark = mark
        self.wait_for_log(READY_RE, timeout, since=mark)
        self.listeners = {}
        self.http_url = ""
        for line in self.lines(since=mark):
            match = LISTENER_RE.search(line)
            if match:
                self.listeners[match.group(1)] = (match.group(2), int(match.group(3)))
            http = HTTP_RE.search(line)
            if http:
                scheme = "https" if self.env.get("HATO_HTTP_TLS", "").lower() == "true" else "http"
                self.http_url = f"{scheme}://{http.group(1)}:{http.group(2)}"
        if self.listeners:
            first_host, first_port = next(iter(self.listeners.values()))
            smtp = self.listeners.get("smtp", (first_host, first_port))
            self.host, self.port = smtp
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit status."""
        proc = self._proc
        if proc is None:
            raise HatoError("hato serve is not running")
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=10)
        self._proc = None
        with self._cond:
            self._lines.append(f"--- hato serve ended: {code} (signal sent: {sig}) ---")
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM), then SIGKILL if it does not go in time."""
        if self._proc is None:
            return None
        return self.kill(signal.SIGTERM, timeout=timeout)

    def restart(self, timeout: float = 30.0) -> HatoServe:
        if self._proc is not None:
            self.stop()
        return self.start(timeout=timeout)

    # The log.

    def lines(self, since: int = 0) -> list[str]:
        with self._cond:
            return self._lines[since:]

    @property
    def log(self) -> str:
        return "\n".join(self.lines())

    def mark(self) -> int:
        """A position in the log, for ``wait_for_log(since=...)``."""
        with self._cond:
            return len(self._lines)

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, since: int = 0
    ) -> re.Match[str]:
        """The first log line at or after ``since`` matching ``pattern``, waited for."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = since
        with self._cond:
            while True:
                for line in self._lines[checked:]:
                    match = regex.search(line)
                    if match:
                        return match
                checked = max(checked, len(self._lines))
                proc = self._proc
                exited = proc is None or proc.poll() is not None
                reader_done = self._reader is None or not self._reader.is_alive()
                if exited and reader_done:
                    raise HatoError(
                        f"hato serve is not running; {regex.pattern!r} never logged:\n{self.log}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HatoError(
                        f"timed out after {timeout}s waiting for {regex.pattern!r}:\n{self.log}"
                    )
                self._cond.wait(min(left, 0.2))

    @property
    def processes(self) -> int:
        """How many processes serve in this run: the children of a supervisor that said
        they were ready (HATO_PROCESSES), else 1."""
        lines = self.lines(self._start_mark)
        return max(1, sum(1 for line in lines if CHILD_READY_RE.search(line)))

    def wait_for_each_process(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, *, since: int = 0
    ) -> None:
        """Wait until ``pattern`` was logged as many times as processes serve (a reload
        that each process does on its own, say)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        want = self.processes
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.lines(since) if regex.search(line)) < want:
            if time.monotonic() > deadline:
                raise HatoError(
                    f"timed out after {timeout}s waiting for {regex.pattern!r} from each of "
                    f"{want} processes:\n{self.log}"
                )
            time.sleep(0.05)

    # The CLI against the same data dir.

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.env.items() if k != "HATO_LISTEN"}
        return run_hato(args, data_dir=self.data_dir, env=env, check=check)

    def queue_list(self) -> list[dict[str, Any]]:
        """``hato queue list --json`` as Python objects."""
        out = self.cli("queue", "list", "--json").stdout
        try:
            items = json.loads(out)
        except json.JSONDecodeError as exc:
            raise HatoError(f"hato queue list --json printed no JSON: {exc}\n{out}") from exc
        if not isinstance(items, list):
            raise HatoError(f"hato queue list --json printed {type(items).__name__}, not a list")
        return items

    def wait_for_queue(
        self,
        predicate: Any,
        timeout: float = 30.0,
        *,
        what: str = "queue condition",
    ) -> list[dict[str, Any]]:
        """Poll ``hato queue list --json`` until ``predicate(items)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            items = self.queue_list()
            if predicate(items):
                return items
            if time.monotonic() > deadline:
                raise HatoError(f"timed out waiting for {what}; queue: {items}\n{self.log}")
            time.sleep(0.2)

    def __enter__(self) -> HatoServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


HatoFactory = Callable[..., HatoServe]
"""The ``hato_serve`` fixture: ``hato_serve(env={...}, data_dir=..., start=True)``."""
