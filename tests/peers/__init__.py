"""Real peers for integration tests: private Postfix instances, recording sinks, hato serve.

Each module starts one kind of peer on loopback, waits for it with a deadline and stops
it again. Nothing here touches the system's own Postfix or resolves a real name.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it; a race is possible but rare)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def missing(reason: str) -> None:
    """Skip for a missing tool on a developer machine; fail under CI, where nothing may skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: tests may not skip)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, *, hint: str = "") -> str:
    """The absolute path of a program, or skip/fail the test when it is not installed."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        missing(f"{name} is not installed{': ' + hint if hint else ''}")
        raise AssertionError("unreachable")  # pragma: no cover
    return path
