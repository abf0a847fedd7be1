"""The fuzz targets in CI: every seed replayed, then a short coverage-guided run of each.

The long runs are ``scripts/fuzz`` (an hour before a release); here each target runs for
``HATO_FUZZ_SECONDS`` (intake 60 s by default, the others 10 s) so a regression in the
intake or a parser shows up in every CI run. Findings that were fixed live on as files in
``tests/fuzz/regressions/TARGET/`` and are replayed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS, seeds

HERE = Path(__file__).resolve().parent
REGRESSIONS = HERE / "regressions"
SECONDS = {"intake": 60, "sasl": 10, "address": 10, "compose": 10, "dsn": 10}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_and_regressions_hold(target: str) -> None:
    inputs = seeds(target)
    folder = REGRESSIONS / target
    if folder.is_dir():
        inputs += [p.read_bytes() for p in sorted(folder.iterdir())]
    assert inputs
    for data in inputs:
        TARGETS[target](data)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_coverage_guided_run_finds_nothing(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris") if os.environ.get("CI") != "true" else None
    seconds = int(os.environ.get("HATO_FUZZ_SECONDS", SECONDS[target]))
    corpus = tmp_path / "corpus"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "run.py"),
            target,
            str(corpus),
            f"-max_total_time={seconds}",
            f"-artifact_prefix={tmp_path}/",
            "-timeout=10",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    findings = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert proc.returncode == 0 and not findings, (findings, proc.stderr[-4000:])
    executed = [
        int(line.rsplit(" ", 1)[1])
        for line in proc.stderr.splitlines()
        if line.startswith("stat::number_of_executed_units:")
    ]
    assert executed and executed[0] > 100, proc.stderr[-2000:]
