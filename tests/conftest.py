"""Shared fixtures: real peers (Postfix, sinks, nodemailer, swaks) and ``hato serve``.

The peers themselves live in ``tests/peers/`` (importable as ``peers``: pytest puts this
directory on ``sys.path``). Under ``CI=true`` a missing tool fails the test instead of
skipping it, so a green CI run means every real-peer test ran.

When a test fails, the logs of the peers it used (hato serve's stderr, Postfix's mail log)
are added to its failure report.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from peers import missing, require_tool
from peers.hato import HatoFactory, HatoServe
from peers.postfix import GuideRelay, PostfixInstance, plain_relay, relay_server
from peers.sinks import RecordingSink, SmtpSinkProcess

NODE_DIR = Path(__file__).resolve().parent / "peers" / "node"

# Fast retries so that deferred → delivered takes seconds; tests may override any of them.
HATO_TEST_DEFAULTS: Mapping[str, str] = {
    "HATO_RETRY_MIN_DELAY": "0.5",
    "HATO_RETRY_MAX_DELAY": "1",
    "HATO_MAX_QUEUE_LIFETIME": "30",
    "HATO_LOG_FORMAT": "text",
}

# ``hato serve`` run in-process by a test would otherwise open its HTTP listener on
# 127.0.0.1:8025, where the tests running in parallel open theirs. Tests of the HTTP
# listener set HATO_HTTP_LISTEN themselves (127.0.0.1:0).
os.environ["HATO_HTTP_LISTEN"] = ""

_PEER_LOGS = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()


def attach_log(request: pytest.FixtureRequest, name: str, read: Callable[[], str]) -> None:
    """Show ``read()`` under ``name`` in the report if the test fails."""
    request.node.stash.setdefault(_PEER_LOGS, []).append((name, read))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("call", "setup"):
        for name, read in item.stash.get(_PEER_LOGS, []):
            try:
                text = read()
            except Exception as exc:  # a broken log reader must not hide the failure
                text = f"(could not read: {exc!r})"
            if len(text) > 60_000:
                text = f"{text[:20_000]}\n[... cut ...]\n{text[-40_000:]}"
            report.sections.append((f"peer log: {name}", text or "(empty)"))
    return report


# Sinks.


@pytest.fixture
def recording_sink() -> Iterator[RecordingSink]:
    """A started recording SMTP sink on 127.0.0.1 (stop/start it to play an outage)."""
    sink = RecordingSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSinkProcess]:
    """Postfix's smtp-sink on a free loopback port, counting what it receives."""
    with SmtpSinkProcess() as sink:
        yield sink


# Postfix.


@pytest.fixture
def guide_relay(
    request: pytest.FixtureRequest, recording_sink: RecordingSink
) -> Iterator[GuideRelay]:
    """Postfix configured as the guide's relay server, relaying onward to ``recording_sink``."""
    password = "guide-Secret-42"
    instance = relay_server(recording_sink.address, password=password)
    attach_log(request, "postfix (guide relay server)", instance.log)
    try:
        instance.start()
        yield GuideRelay(instance, recording_sink, password)
    finally:
        instance.cleanup()


@pytest.fixture
def postfix_relay_with(
    request: pytest.FixtureRequest, recording_sink: RecordingSink
) -> Iterator[Callable[[Mapping[str, str]], PostfixInstance]]:
    """Start plain Postfix relays to ``recording_sink`` with more ``main.cf`` settings:
    ``postfix_relay_with({"smtpd_recipient_limit": "4"})`` → a started instance."""
    started: list[PostfixInstance] = []

    def start(main: Mapping[str, str]) -> PostfixInstance:
        instance = plain_relay(recording_sink.address, main=main)
        started.append(instance)
        attach_log(request, f"postfix (plain relay, {dict(main)})", instance.log)
        instance.start()
        return instance

    try:
        yield start
    finally:
        for instance in started:
            instance.cleanup()


@pytest.fixture
def postfix_plain_relay(
    postfix_relay_with: Callable[[Mapping[str, str]], PostfixInstance],
) -> PostfixInstance:
    """Postfix as a plain local relay (trusts 127.0.0.0/8), relaying to ``recording_sink``."""
    return postfix_relay_with({})


# hato serve.


@pytest.fixture
def hato_serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HatoFactory]:
    """Start ``hato serve`` subprocesses: ``hato_serve(env={...})`` → a started HatoServe.

    Each gets its own data dir under ``tmp_path`` unless ``data_dir`` is given; the
    retry knobs of ``HATO_TEST_DEFAULTS`` apply unless overridden. All are stopped at the
    end of the test.
    """
    started: list[HatoServe] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        data_dir: Path | None = None,
        args: Sequence[str] = (),
        start: bool = True,
        timeout: float = 30.0,
    ) -> HatoServe:
        full_env = {**HATO_TEST_DEFAULTS, **(env or {})}
        directory = data_dir or tmp_path / f"hato-{len(started)}"
        serve = HatoServe(directory, full_env, args=args)
        started.append(serve)
        attach_log(request, f"hato serve #{len(started)} ({directory})", lambda: serve.log)
        if start:
            serve.start(timeout=timeout)
        return serve

    try:
        yield start
    finally:
        for number, serve in enumerate(started):
            if serve.running:
                serve.stop()
            # The whole log, for when the failure report's tail is not enough.
            (tmp_path / f"hato-serve-{number}.log").write_text(serve.log)


# Clients.


@pytest.fixture(scope="session")
def node_send_script() -> Path:
    """``tests/peers/node/send.js`` with nodemailer installed (``npm ci`` if needed)."""
    node = require_tool("node", hint="apt-get install nodejs")
    if not (NODE_DIR / "node_modules" / "nodemailer").is_dir():
        npm = require_tool("npm", hint="apt-get install npm")
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            missing(f"npm ci in {NODE_DIR} failed: {proc.stderr[-2000:]}")
    assert node
    return NODE_DIR / "send.js"


@pytest.fixture
def node_send(node_send_script: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the guide's nodemailer client: ``node_send(host, port, from, to, subject, text)``."""
    node = require_tool("node")

    def run(
        host: str, port: int, sender: str, to: str, subject: str, text: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [node, str(node_send_script), host, str(port), sender, to, subject, text],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=NODE_DIR,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"},
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture
def swaks() -> str:
    """The path of swaks (the guide's own test client)."""
    return require_tool("swaks", hint="apt-get install swaks")
