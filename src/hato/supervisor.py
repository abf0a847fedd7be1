"""The supervisor of ``hato serve`` with several processes (HATO_PROCESSES).

One Python process accepts and delivers on about one core. With ``HATO_PROCESSES`` above
1 the supervisor binds every listening socket itself, then forks:

- N **intake** processes, which all accept on the inherited sockets (the kernel spreads
  the connections over the processes waiting in ``accept``) and have each message
  committed before its 250;
- one **delivery** process, which recovers the queue, claims and delivers, and runs the
  companions (TLS reports, DKIM rotation) and the HTTP listener.

The HTTP listener of the delivery process covers every process: the supervisor also binds
one Unix socket per intake slot, on which that slot's child answers for its metrics and
listeners (:mod:`hato.web.process_metrics`).

With ``HATO_INTAKE_COMMIT=delivery`` (the default) the delivery process is also the one
committer (:mod:`hato.committer`): the supervisor binds its Unix socket before the fork
and keeps it, so intake requests wait in its backlog while a delivery process restarts;
one group commit serves every intake process, and fresh mail is leased to the worker in
that commit. With ``intake`` every intake process commits through its own
group-committing writer instead. Either way only the delivery process claims, so the
leases, retries and bounces have one owner, and a 250 follows the fsync: kill -9 of any
process, the supervisor included, loses nothing acknowledged.

The supervisor itself runs no event loop and no thread (so forking is safe): it waits
for signals with ``sigtimedwait``, restarts a child that dies (with a doubling backoff),
passes SIGHUP on (certificate reload), and on SIGTERM or SIGINT stops the intake
processes first (they finish the messages they are receiving), then the delivery
process. Children get SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so a
killed supervisor leaves no orphan holding the port. A child that keeps failing right
after its start (bad settings, a port it cannot use) ends the supervisor with a
non-zero status. Before the fork, ``hato serve`` checks the settings and runs the queue's
start-up recovery once (``app.check_serve``, ``app.recover_queue``), so that a refusal is
one line; the supervisor says ``ready`` once every child has told it so
(:data:`READY_SIGNAL`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import ipaddress
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hato.committer import bind_committer
from hato.config import Listener, Settings
from hato.errors import ConfigError
from hato.smtp.auth_share import AuthShare
from hato.smtp.shared import SharedCounts
from hato.web.process_metrics import IntakeSockets

__all__ = ["MAX_AUTO_PROCESSES", "Supervisor", "available_cpus", "bind", "effective_processes"]

MAX_AUTO_PROCESSES = 4
# A child tells the supervisor it is ready with a real-time signal: those queue (one per
# kill), where two SIGUSR1 sent at once would arrive as one; si_pid says who sent it.
READY_SIGNAL = signal.SIGRTMIN
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, READY_SIGNAL}
_PR_SET_PDEATHSIG = 1
# A child that ends sooner than this after its start failed to start.
STARTUP_GRACE = 3.0
# Restarts of a child that failed to start before the supervisor gives up.
MAX_QUICK_FAILURES = 5
# How long children get to drain on a stop before they are killed.
STOP_TIMEOUT = 30.0

Child = Callable[[str, Sequence[socket.socket]], None]
Say = Callable[[str], None]


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def effective_processes(settings: Settings, cpus: Callable[[], int] = available_cpus) -> int:
    """How many intake processes ``hato serve`` runs: ``HATO_PROCESSES``, or with 0 the
    available CPUs (at most :data:`MAX_AUTO_PROCESSES`); always 1 with a memory queue."""
    if settings.effective_queue_url.split(":", 1)[0].lower() == "memory":
        return 1
    if settings.processes == 0:
        return min(MAX_AUTO_PROCESSES, cpus())
    return settings.processes


def bind(listener: Listener, port: int | None = None, backlog: int = 1024) -> socket.socket:
    """A listening socket for ``listener``, inheritable by forked children, bound as
    asyncio's ``create_server`` would (SO_REUSEADDR, IPv6 only on an IPv6 address), and
    with SO_REUSEPORT; on ``port`` when given (the port a first bind of a listener
    configured with port 0 got)."""
    if port is not None:
        listener = dataclasses.replace(listener, port=port)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(listener.host).version == 6 else None
    except ValueError:
        family = None
    try:
        if family is None:
            infos = socket.getaddrinfo(
                listener.host or None,
                listener.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST,
            )
            family, _, _, _, address = infos[0]
        else:
            address = (listener.host, listener.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The children of a killed supervisor may still be draining when the next
            # one starts on the same port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        where = f"{listener.host}:{listener.port}"
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return sock


@dataclass
class _Slot:
    role: str  # "intake" or "delivery"
    pid: int = 0
    started: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)
    ready: bool = False


class Supervisor:
    """Start ``intake`` intake children and one delivery child, each running
    ``child(role, sockets)`` in a forked process; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        intake: int,
        child: Child,
        *,
        say: Say,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.child = child
        self.say = say
        self.clock = clock
        self.slots = [_Slot("delivery")] + [_Slot("intake") for _ in range(intake)]
        # One listening socket per intake slot and listener, all on the same ports
        # (SO_REUSEPORT): the kernel spreads connections evenly over them, and a
        # restarted child finds the connections that waited in its slot's backlog.
        self.sockets: dict[int, list[socket.socket]] = {}
        # Per-client connection counts across the intake processes: one column each.
        self.shared = SharedCounts(len(self.slots))
        # The AUTH throttle's failures and logins, told among the intake processes.
        self._parent = os.getpid()
        self.announced = False
        self.auth_share = AuthShare([i for i, s in enumerate(self.slots) if s.role == "intake"])
        # Where the delivery process asks each intake process for its metrics.
        self.reports = IntakeSockets([i for i, s in enumerate(self.slots) if s.role == "intake"])
        # The committer's listening socket (the delivery child serves it) and its address
        # (the intake children connect to it): bound in run(), with HATO_INTAKE_COMMIT
        # delivery.
        self.committer_socket: socket.socket | None = None
        self.committer_address: str | None = None

    # -- the children ------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        index = self.slots.index(slot)
        sockets = self.sockets.get(index, [])
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor's code
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                _die_with(parent)
                for other, theirs in self.sockets.items():
                    if other != index:
                        for sock in theirs:
                            sock.close()
                if self.committer_socket is not None and slot.role != "delivery":
                    self.committer_socket.close()
                self.shared.attach(index)
                self.auth_share.attach(index)
                self.reports.attach(index)
                self.child(slot.role, sockets)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        slot.pid = pid
        slot.started = self.clock()
        slot.restart_at = None
        slot.ready = False
        self.say(f"started {slot.role} process {pid}")

    def _reap(self) -> int | None:
        """Collect every child that ended; return 2 if one refused the settings, or 1
        if one keeps failing at start (the supervisor gives up), else None."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            slot.pid = 0
            how = f"status {code}" if code >= 0 else f"signal {-code}"
            self.say(f"{slot.role} process {pid} ended ({how})")
            if code == 2:  # the settings were refused: restarting cannot help
                return 2
            quick = self.clock() - slot.started < STARTUP_GRACE
            slot.quick_failures = slot.quick_failures + 1 if quick else 0
            if slot.quick_failures >= MAX_QUICK_FAILURES:
                self.say(f"{slot.role} process keeps failing at start; giving up")
                return 1
            backoff = 0.5 * 2 ** max(0, slot.quick_failures - 1) if quick else 0.1
            slot.restart_at = self.clock() + backoff

    def _signal(self, sig: int, role: str | None = None) -> None:
        for slot in self.slots:
            if slot.pid and (role is None or slot.role == role):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    def _wait_for(self, role: str, deadline: float) -> None:
        """Reap until no child of ``role`` runs; SIGKILL them at ``deadline``."""
        while any(s.pid and s.role == role for s in self.slots):
            left = deadline - self.clock()
            if left <= 0:
                self._signal(signal.SIGKILL, role)
                left = 5.0
                deadline = self.clock() + left
            signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))
            for slot in self.slots:
                if slot.pid:
                    with contextlib.suppress(ChildProcessError):
                        pid, _ = os.waitpid(slot.pid, os.WNOHANG)
                        if pid:
                            slot.pid = 0

    def _stop(self) -> None:
        """Intake first (each finishes the messages it is receiving), then delivery."""
        deadline = self.clock() + STOP_TIMEOUT
        self._signal(signal.SIGTERM, "intake")
        self._wait_for("intake", deadline)
        self._signal(signal.SIGTERM, "delivery")
        self._wait_for("delivery", deadline)

    # -- the loop ----------------------------------------------------------------------

    def child_ready(self) -> None:
        """In a child: tell the supervisor this child serves (listening, or delivering)."""
        with contextlib.suppress(OSError):
            os.kill(self._parent, READY_SIGNAL)

    def _child_ready(self, pid: int) -> None:
        """Say ``ready`` once, when every child has first said it is: only then does the
        whole answer (the console's address, say, is printed by the delivery child)."""
        for slot in self.slots:
            if slot.pid == pid:
                slot.ready = True
        if not self.announced and all(slot.ready for slot in self.slots):
            self.announced = True
            self.say("ready")

    def run(self) -> int:
        """Bind, start the children, supervise until SIGTERM or SIGINT; the exit status."""
        first = [bind(listener) for listener in self.settings.listeners]
        ports = [int(sock.getsockname()[1]) for sock in first]
        try:
            for index, slot in enumerate(self.slots):
                if slot.role == "intake":
                    self.sockets[index] = (
                        first
                        if not self.sockets
                        else [
                            bind(listener, port)
                            for listener, port in zip(self.settings.listeners, ports, strict=True)
                        ]
                    )
            self.reports.bind()
            if self.settings.intake_commit == "delivery":
                try:
                    self.committer_socket, self.committer_address = bind_committer()
                except OSError as exc:
                    raise ConfigError(f"cannot listen for the committer: {exc}") from exc
        except BaseException:
            for sock in [*first, *(s for socks in self.sockets.values() for s in socks)]:
                sock.close()
            self.reports.close()
            raise
        for listener, sock in zip(self.settings.listeners, first, strict=True):
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self.say(f"supervisor: listener {listener.role} on {shown}:{port}")
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        status = 0
        try:
            for slot in self.slots:
                self._start(slot)
            self.say(f"supervisor: {len(self.slots) - 1} intake process(es) and 1 delivery")
            while True:
                now = self.clock()
                pending = [s.restart_at for s in self.slots if s.restart_at is not None]
                timeout = max(0.0, min(pending) - now) if pending else 60.0
                info = signal.sigtimedwait(_SIGNALS, timeout)
                if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self.say("supervisor: stopping")
                    break
                if info is not None and info.si_signo == READY_SIGNAL:
                    self._child_ready(info.si_pid)
                if info is not None and info.si_signo == signal.SIGHUP:
                    self._signal(signal.SIGHUP)
                failed = self._reap()
                if failed is not None:
                    status = failed
                    break
                now = self.clock()
                for slot in self.slots:
                    if not slot.pid and slot.restart_at is not None and slot.restart_at <= now:
                        self._start(slot)
        finally:
            self._stop()
            for socks in self.sockets.values():
                for sock in socks:
                    sock.close()
            if self.committer_socket is not None:
                self.committer_socket.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            self.auth_share.close()
            self.shared.close()
            self.reports.close()
        self.say("supervisor: stopped")
        return status


def _die_with(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies; exit at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
