"""deploy/prometheus: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), and name only metrics Hato exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hato.web.metrics import Metrics
from peers import missing

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool (apt package prometheus)")
        pytest.skip("promtool")  # not reached under CI=true: missing() fails there
    return path


@pytest.mark.parametrize(
    "args",
    [["check", "rules", "hato-rules.yml"], ["test", "rules", "hato-rules.test.yml"]],
    ids=["check", "test"],
)
def test_promtool(args: list[str]) -> None:
    proc = subprocess.run(
        [_promtool(), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rules_name_only_exported_metrics() -> None:
    metrics = Metrics(role="serve")
    metrics.listeners_known(["smtp=127.0.0.1:25"])
    metrics.delivery("relay", "sent", 1.0)
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    used = set(re.findall(r"\b(hato_[a-z_]+)", (DEPLOY / "hato-rules.yml").read_text()))
    assert used and used <= exported, used - exported
