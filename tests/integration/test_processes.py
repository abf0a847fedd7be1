"""``hato serve`` with several processes (HATO_PROCESSES): the supervisor, its intake
processes on shared sockets and its one delivery process, under real SMTP load.

The crash tests are those of ``test_crash.py`` (a ledger of every 250; after the kill
every acknowledged message must reach the recording sink) with kill -9 aimed at one
intake child, at the delivery child, and at the supervisor itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from test_crash import Ledger, client_loop, relay_env, run_and_kill, verify_delivered
from test_swaks_serve import Swaks, auth, prepare, saw, swaks_at  # noqa: F401 (a fixture)

from peers import free_port, require_tool
from peers.hato import HatoFactory, HatoServe
from peers.sinks import RecordingSink

pytestmark = pytest.mark.slow

PROCESSES = {"HATO_PROCESSES": "2"}
STARTED_RE = r"started {role} process (\d+)"


def child_pids(hato: HatoServe, role: str, since: int = 0) -> list[int]:
    pattern = re.compile(STARTED_RE.format(role=role))
    return [int(m.group(1)) for line in hato.lines(since) if (m := pattern.search(line))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the supervisor may not have reaped it yet.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def connected_pids(hato: HatoServe, want: int, timeout: float = 10.0) -> set[int]:
    """The intake processes that logged a connection, waited for until ``want`` have
    (the log is read in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {
            int(m.group(1))
            for m in re.finditer(r"hato/smtpd\[(\d+)\]: (?:connect|NOQUEUE)", hato.log)
        }
        if len(pids) >= want or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [pid for pid in pids if alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in left if alive(pid)]
    return left


def load_with_child_killed(
    hato: HatoServe, ledger: Ledger, *, role: str, sessions: int, kill_after: int
) -> int:
    """Send with ``sessions`` clients; kill -9 one ``role`` child after ``kill_after``
    acks; the supervisor must start a new one while the clients go on."""
    up = threading.Event()
    up.set()
    threads = [
        threading.Thread(target=client_loop, args=(hato.host, hato.port, ledger, up), daemon=True)
        for _ in range(sessions)
    ]
    for thread in threads:
        thread.start()
    acked_at_kill = ledger.wait_acked(kill_after, timeout=ledger.deadline - time.monotonic())
    victim = child_pids(hato, role)[-1]
    mark = hato.mark()
    os.kill(victim, signal.SIGKILL)
    hato.wait_for_log(rf"{role} process {victim} ended \(signal 9\)", timeout=30, since=mark)
    hato.wait_for_log(STARTED_RE.format(role=role), timeout=30, since=mark)
    for thread in threads:
        thread.join(timeout=max(1.0, ledger.deadline - time.monotonic() + 20))
    assert not any(t.is_alive() for t in threads), "client threads did not finish"
    assert len(ledger.acked) > acked_at_kill, "nothing was acknowledged after the kill"
    return acked_at_kill


def queue_files(pid: int) -> set[str]:
    """The files of the SQLite queue (queue.db, its -wal and -shm) process ``pid`` holds."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if os.path.basename(target).startswith("queue.db"):
                held.add(os.path.basename(target))
    return held


@pytest.mark.parametrize("commit", ["delivery", "intake"])
def test_several_processes_share_the_port_and_deliver(
    hato_serve: HatoFactory, recording_sink: RecordingSink, commit: str
) -> None:
    """Postfix's smtp-source against two intake processes; every message delivered once;
    SIGTERM stops every child and the supervisor exits 0. With HATO_INTAKE_COMMIT
    delivery (the committer) only the delivery process holds the SQLite queue open;
    with intake every process does."""
    smtp_source = require_tool("smtp-source", hint="apt-get install postfix")
    hato = hato_serve(env={**relay_env(recording_sink), **PROCESSES, "HATO_INTAKE_COMMIT": commit})
    children = child_pids(hato, "intake") + child_pids(hato, "delivery")
    assert len(child_pids(hato, "intake")) == 2 and len(child_pids(hato, "delivery")) == 1
    proc = subprocess.run(
        [smtp_source, "-s", "10", "-m", "100", "-l", "2048", "-f", "load@dbmx.net",
         "-t", "sink@example.org", f"{hato.host}:{hato.port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recording_sink.wait_for_count(100, timeout=60)
    # Both intake processes took connections: the port is shared, not one child's.
    intake = connected_pids(hato, want=2)
    assert intake <= set(child_pids(hato, "intake")) and len(intake) == 2, intake
    assert "queue.db" in queue_files(child_pids(hato, "delivery")[-1])
    for pid in child_pids(hato, "intake"):
        if commit == "delivery":
            assert queue_files(pid) == set(), f"intake process {pid} opened the queue"
        else:
            assert "queue.db" in queue_files(pid)

    assert hato.stop() == 0
    assert wait_gone(children, timeout=30) == []
    assert "supervisor: stopped" in hato.log


def test_kill_9_of_an_intake_process_loses_no_acknowledged_message(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    hato = hato_serve(env={**relay_env(recording_sink), **PROCESSES})
    ledger = Ledger(total=300, deadline=time.monotonic() + 60)
    load_with_child_killed(hato, ledger, role="intake", sessions=20, kill_after=100)
    verify_delivered(hato, recording_sink, ledger, timeout=60)


def test_kill_9_of_the_delivery_process_loses_no_acknowledged_message(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """The delivery process is the committer too: the messages whose commit it was
    running are answered 451 (or committed, if it died after the commit: a duplicate at
    worst); those sent while it restarts wait in the supervisor's backlog or get 451;
    nothing else, and every 250 is delivered."""
    hato = hato_serve(env={**relay_env(recording_sink), **PROCESSES})
    ledger = Ledger(total=300, deadline=time.monotonic() + 60)
    load_with_child_killed(hato, ledger, role="delivery", sessions=20, kill_after=100)
    assert set(ledger.errors) <= {"DATA 451"}, ledger.errors
    verify_delivered(hato, recording_sink, ledger, timeout=60)


def test_mail_sent_while_the_committer_restarts_is_answered_4xx_or_delivered(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """Sessions that start right after kill -9 of the delivery process (the committer),
    before the supervisor has started the next one: each message waits in the
    supervisor's backlog for the new committer or is answered 451; every 250 is
    delivered."""
    hato = hato_serve(env={**relay_env(recording_sink), **PROCESSES})
    victim = child_pids(hato, "delivery")[-1]
    mark = hato.mark()
    ledger = Ledger(total=40, deadline=time.monotonic() + 60)
    up = threading.Event()
    up.set()
    threads = [
        threading.Thread(target=client_loop, args=(hato.host, hato.port, ledger, up), daemon=True)
        for _ in range(10)
    ]
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.start()
    hato.wait_for_log(STARTED_RE.format(role="delivery"), timeout=30, since=mark)
    for thread in threads:
        thread.join(timeout=max(1.0, ledger.deadline - time.monotonic() + 20))
    assert not any(t.is_alive() for t in threads), "client threads did not finish"
    assert set(ledger.errors) <= {"DATA 451"}, ledger.errors
    assert len(ledger.acked) + len(ledger.unacked) == 40
    assert ledger.acked, "nothing was acknowledged"
    verify_delivered(hato, recording_sink, ledger, timeout=60)


def test_kill_9_of_the_supervisor_loses_no_acknowledged_message(
    hato_serve: HatoFactory, recording_sink: RecordingSink
) -> None:
    """The children notice their parent's death (SIGTERM), drain and leave; the next
    supervisor on the same port and data dir delivers everything acknowledged."""
    hato = hato_serve(env={**relay_env(recording_sink), **PROCESSES})
    first = child_pids(hato, "intake") + child_pids(hato, "delivery")
    ledger = Ledger(total=300, deadline=time.monotonic() + 60)
    acked_at_kill, acked = run_and_kill(hato, ledger, sessions=20, kill_after=100)
    assert acked > acked_at_kill, "no message was acknowledged after the restart"
    assert wait_gone(first, timeout=30) == [], "children outlived their supervisor"
    verify_delivered(hato, recording_sink, ledger, timeout=60)


def test_a_queue_that_cannot_be_opened_is_refused_before_the_fork(
    hato_serve: HatoFactory, tmp_path: os.PathLike[str]
) -> None:
    """The supervisor opens the queue once (its start-up recovery) before it forks: a
    queue nobody can open is one line and a non-zero status, as with one process."""
    blocker = os.path.join(tmp_path, "not-a-directory")
    with open(blocker, "w", encoding="ascii") as handle:
        handle.write("x")
    hato = hato_serve(
        env={**PROCESSES, "HATO_QUEUE_URL": f"sqlite:///{blocker}/queue.db"}, start=False
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hato", "serve"],
        env={**os.environ, **hato.env, "HATO_DATA_DIR": str(hato.data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("hato: cannot create "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_child_that_keeps_failing_at_start_ends_the_supervisor(tmp_path: Path) -> None:
    """A child that dies right after each start is restarted with a doubling backoff,
    then given up on: the supervisor ends with status 1 and says why."""
    from hato.config import load_settings
    from hato.supervisor import MAX_QUICK_FAILURES, Supervisor

    settings = load_settings(data_dir=tmp_path, listen=["127.0.0.1:0"])
    said: list[str] = []

    def child(role: str, sockets: object) -> None:
        sys.exit(1)

    supervisor = Supervisor(settings, 1, child, say=said.append)
    assert supervisor.run() == 1
    ended = [line for line in said if "ended (status 1)" in line]
    assert len(ended) >= MAX_QUICK_FAILURES, said
    assert any("keeps failing at start; giving up" in line for line in said), said
    assert "ready" not in said


def test_the_per_client_connection_limit_holds_across_intake_processes(
    hato_serve: HatoFactory,
) -> None:
    """The kernel spreads one client's connections over the intake processes; the limit
    counts them all (loopback made a stranger, so that the limit applies to it)."""
    hato = hato_serve(
        env={
            **PROCESSES,
            "HATO_MYNETWORKS": "192.0.2.0/24",
            "ALLOW_EMPTY_SENDER_DOMAINS": "true",
            "HATO_MAX_CONNECTIONS_PER_CLIENT": "3",
        }
    )
    held: list[socket.socket] = []
    greetings: list[bytes] = []
    try:
        for _ in range(12):
            sock = socket.create_connection((hato.host, hato.port), timeout=10)
            held.append(sock)
            greetings.append(sock.recv(512)[:3])
        assert greetings.count(b"220") == 3, greetings
        assert greetings.count(b"421") == 9, greetings
        # Both processes took part: otherwise this would test one process's own limit.
        pids = connected_pids(hato, want=2)
        assert len(pids) == 2, pids
    finally:
        for sock in held:
            sock.close()


def test_the_total_connection_limit_holds_across_intake_processes(
    hato_serve: HatoFactory,
) -> None:
    """HATO_MAX_CONNECTIONS bounds one listener's connections over all its intake
    processes, trusted clients included (loopback is in mynetworks here)."""
    hato = hato_serve(
        env={**PROCESSES, "HATO_MAX_CONNECTIONS": "4", "HATO_TRUSTED_CONNECTION_RESERVE": "0"}
    )
    held: list[socket.socket] = []
    greetings: list[bytes] = []
    try:
        for _ in range(12):
            sock = socket.create_connection((hato.host, hato.port), timeout=10)
            held.append(sock)
            greetings.append(sock.recv(512)[:3])
        assert greetings.count(b"220") == 4, greetings
        assert greetings.count(b"421") == 8, greetings
        pids = connected_pids(hato, want=2)
        assert len(pids) == 2, pids
        # A place given back is free for the next client, whichever process it reaches.
        for sock in held[:4]:
            sock.close()
        del held[:4]
        deadline = time.monotonic() + 10
        admitted = 0
        while admitted < 4 and time.monotonic() < deadline:
            sock = socket.create_connection((hato.host, hato.port), timeout=10)
            held.append(sock)
            if sock.recv(512)[:3] == b"220":
                admitted += 1
            else:
                time.sleep(0.1)  # the closed ones are still being counted down
        assert admitted == 4
    finally:
        for sock in held:
            sock.close()


def test_auth_failures_are_counted_across_intake_processes(
    hato_serve: HatoFactory,
    tmp_path: Path,
    swaks_at: Callable[[HatoServe], Swaks],  # noqa: F811 (the fixture imported above)
) -> None:
    """Each guess on a new connection, which the kernel gives to either process: the
    limit is reached at the same guess as with one process, and then every process
    refuses the client at connect."""
    data = tmp_path / "relay"
    serve = hato_serve(env=prepare(data, HATO_AUTH_FAILURE_LIMIT="4", **PROCESSES), data_dir=data)
    swaks = swaks_at(serve)
    for guess in range(1, 4):
        proc = swaks("submission", "--tls", *auth(password=f"guess-{guess}"))
        assert saw(proc, "535 5.7.8") and not saw(proc, "421"), proc.stdout
    fourth = swaks("submission", "--tls", *auth(password="guess-4"))
    assert saw(fourth, "535 5.7.8") and saw(fourth, "421 4.7.0"), fourth.stdout
    # Refused at connect now, by whichever process takes the connection.
    for _ in range(6):
        refused = swaks("smtp", "--tls", *auth())
        assert refused.returncode == 21 and saw(refused, "421 4.7.0"), refused.stdout
    # Both processes answered the guesser: otherwise one process counted alone.
    assert len(connected_pids(serve, want=2)) == 2


def test_the_http_listener_runs_once_in_the_delivery_process(hato_serve: HatoFactory) -> None:
    port = free_port()
    hato = hato_serve(env={**PROCESSES, "HATO_HTTP_LISTEN": f"127.0.0.1:{port}"})
    hato.wait_for_log(rf"http on 127\.0\.0\.1:{port}", timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
        assert answer.status == 200
    assert sum("hato: http on" in line for line in hato.lines()) == 1, hato.log
