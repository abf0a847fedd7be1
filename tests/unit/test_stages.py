"""hato.stages: one JSON line per finished message, gaps between consecutive stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hato.errors import ConfigError
from hato.stages import StageTrace


def test_a_finished_message_writes_its_stages_and_gaps(tmp_path: Path) -> None:
    path = tmp_path / "stages.jsonl"
    trace = StageTrace(path)
    try:
        trace.mark("q1", "accepted", 100.0)
        trace.mark("q1", "committed", 100.002)
        trace.mark("q1", "claimed", 100.003)
        trace.mark("q1", "connected", 100.004)
        trace.mark("q1", "delivered", 100.010)
        trace.mark("q2", "claimed", 101.0)  # not finished: no line
        trace.finish("q1")
    finally:
        trace.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines if "id" in line] == ["q1"]
    (record,) = [line for line in lines if "id" in line]
    assert record["accepted"] == 100.0
    assert record["recorded"] >= record["delivered"]
    assert set(record["ms"]) == {"commit", "wait", "connect", "deliver", "record"}
    assert round(record["ms"]["commit"], 3) == 2.0
    assert round(record["ms"]["deliver"], 3) == 6.0


def test_a_message_from_elsewhere_has_only_the_worker_stages(tmp_path: Path) -> None:
    path = tmp_path / "stages.jsonl"
    trace = StageTrace(path, clock=lambda: 5.0)
    trace.mark("q9", "claimed", 4.0)
    trace.finish("q9")
    trace.close()
    trace.finish("q9")  # after close: ignored
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record == {"id": "q9", "claimed": 4.0, "recorded": 5.0, "ms": {"record": 1000.0}}


def test_a_path_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HATO_TRACE_STAGES"):
        StageTrace(tmp_path / "no-such-dir" / "stages.jsonl")
