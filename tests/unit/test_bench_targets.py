"""bench/targets.py's table: the issue's rows from sample phase JSON, verdicts, failures, the doc."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TARGETS_PY = Path(__file__).resolve().parents[2] / "bench" / "targets.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_targets", TARGETS_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


targets = _load()


def _cell(
    accepted: float, e2e: float, other: float = 0.05, peak: int | None = 10
) -> dict[str, Any]:
    return {
        "accepted": accepted,
        "end_to_end": e2e,
        "cpu_sut": 1.0,
        "cpu_source": 0.1,
        "cpu_sink": 0.1,
        "cpu_loop": 0.7,
        "cpu_other": other,
        "runs": 3,
        "errors": [],
        "spool_peak": peak,
    }


def _ok(data: dict[str, Any], command: str = "python bench/x.py") -> dict[str, Any]:
    return {"command": command, "status": "ok", "error": "", "seconds": 65.0, "data": data}


SMTP = {
    "script": "smtp_bench",
    "durability": "hato: queue sqlite (the data dir), HATO_FSYNC=true",
    "environment": {"machine": "2 CPUs (AMD EPYC)", "postfix": "3.7.11"},
    "sessions": {
        "1": {"hato": _cell(900, 900), "postfix": _cell(450, 450, peak=3)},
        "20": {"hato": _cell(2000, 1400), "postfix": _cell(650, 500, other=0.6)},
        "100": {"hato": _cell(3000, 1600, peak=4000), "postfix": _cell(640, 440, peak=900)},
    },
}
LATENCY = {
    "script": "latency",
    "rate": 100.0,
    "clients": 20,
    "systems": {
        "hato": {"p50_ms": 4.0, "p99_ms": 18.0, "other_cores_max": 0.1, "durability": "fsync"},
        "postfix": {"p50_ms": 40.0, "p99_ms": 150.0, "other_cores_max": 0.2, "durability": "pf"},
    },
}
IDLE = {
    "script": "idle_sessions",
    "sessions": 15000,
    "opened": 15000,
    "rss_before_bytes": 60_000_000,
    "rss_during_bytes": 150_000_000,
    "pss_during_bytes": 90_000_000,
    "processes": 3,
    "other_cores": 0.0,
}
OUTBOX = {
    "script": "outbox_bench",
    "backends": {
        "postgres": {
            "durability": "synchronous_commit=on",
            "send_p50_ms": 0.6,
            "send_p99_ms": 0.9,
            "other_cores": 0.1,
        },
        "redis": {
            "durability": "appendonly=yes",
            "send_p50_ms": 1.1,
            "send_p99_ms": 2.4,
            "other_cores": 0.0,
        },
    },
}
MULTINODE = {
    "script": "multinode",
    "durability": "each 250 after the PostgreSQL commit",
    "rows": [
        {"nodes": 1, "messages": 3000, "accepted_per_s": 300.0, "end_to_end_per_s": 200.0},
        {"nodes": 2, "messages": 3000, "accepted_per_s": 500.0, "end_to_end_per_s": 380.0},
        {"nodes": 3, "messages": 3000, "accepted_per_s": 520.0, "end_to_end_per_s": 350.0},
    ],
}


def _phases() -> dict[str, Any]:
    return {
        "smtp_bench": _ok(SMTP, "python bench/smtp_bench.py --json x"),
        "latency": _ok(LATENCY),
        "idle_sessions": _ok(IDLE),
        "outbox_bench": _ok(OUTBOX),
        "multinode": _ok(MULTINODE),
    }


def _by_figure(phases: dict[str, Any]) -> dict[str, list[str]]:
    return {row.figure: row.cells()[1:] for row in targets.figures(phases)}


# figure | Hato | Postfix | ratio | target | stretch | met?
EXPECTED = """
end to end vs Postfix, 1 session | 900 msg/s | 450 msg/s | 2.00× | ≥ 2× |  | yes
end to end vs Postfix, 20 sessions | 1,400 msg/s | 500 msg/s | 2.80× | ≥ 2× | ≥ 3× | yes
end to end vs Postfix, 100 sessions | 1,600 msg/s | 440 msg/s | 3.64× | ≥ 2× | ≥ 3× | yes (stretch)
accepted vs Postfix, 1 session | 900 msg/s | 450 msg/s | 2.00× | ≥ 2× | ≥ 4× | yes
accepted vs Postfix, 20 sessions | 2,000 msg/s | 650 msg/s | 3.08× | ≥ 2× | ≥ 4× | yes
accepted vs Postfix, 100 sessions | 3,000 msg/s | 640 msg/s | 4.69× | ≥ 2× | ≥ 4× | yes (stretch)
p99 accept → delivered at a steady 100 msg/s (20 clients) | 18.0 ms (p50 4.0) | 150.0 ms (p50 40.0) | 0.12× | ≤ 20 ms | ≤ 5 ms | yes
RSS with 15,000 idle SMTP sessions after EHLO | 150.0 MB (3 processes; PSS 90.0 MB, judged) | – | – | ≤ 200 MB |  | yes
outbox `send()` p99, PostgreSQL | 0.90 ms (p50 0.60) | – | – | < 2 ms | < 1 ms | yes (stretch)
outbox `send()` p99, Redis | 2.40 ms (p50 1.10) | – | – | < 2 ms | < 1 ms | **no**
end to end, 1 node on one PostgreSQL | 200 msg/s (accepted 300) | – | – |  |  | –
end to end, 2 nodes on one PostgreSQL | 380 msg/s (accepted 500) | – | 1.90× of 1 node | > 1 node |  | yes
end to end, 3 nodes on one PostgreSQL | 350 msg/s (accepted 520) | – | 1.75× of 1 node | > 2 nodes |  | **no**
"""


def test_every_row_of_the_issue_from_sample_json() -> None:
    got = [" | ".join(row.cells()) for row in targets.figures(_phases())]
    assert got == EXPECTED.strip().split("\n")


@pytest.mark.parametrize(
    ("goal", "value", "verdict"),
    [
        (targets.THROUGHPUT, 1.99, "**no**"),
        (targets.THROUGHPUT, 2.0, "yes"),
        (targets.THROUGHPUT, 3.0, "yes (stretch)"),
        (targets.P99, 20.0, "yes"),
        (targets.P99, 20.1, "**no**"),
        (targets.P99, 5.0, "yes (stretch)"),
        (targets.SEND_P99, 2.0, "**no**"),
        (targets.SEND_P99, 1.0, "yes"),
        (targets.SEND_P99, 0.99, "yes (stretch)"),
        (targets.RSS, 200.0, "yes"),
        (targets.RSS, None, "–"),
    ],
)
def test_verdicts_at_the_edges(goal: Any, value: float | None, verdict: str) -> None:
    assert goal.met(value) == verdict


def test_a_failed_phase_is_shown_failed_and_the_others_still_count() -> None:
    phases = _phases()
    phases["latency"] = {
        "command": "python bench/latency.py",
        "status": "exit 1",
        "error": "no JSON (FileNotFoundError); BenchError: latency sink did not start | x",
        "seconds": 3.0,
        "data": None,
    }
    del phases["multinode"]
    rows = _by_figure(phases)
    p99 = rows["p99 accept → delivered at a steady 100 msg/s (20 clients)"]
    assert p99[:3] == ["failed", "failed", "–"] and p99[-1] == "–"
    assert rows["end to end, 1–3 nodes on one PostgreSQL"][0] == "not run"
    assert rows["end to end vs Postfix, 20 sessions"][-1] == "yes"
    by_phase = {r[0]: r for r in targets.phase_rows(phases)}
    assert by_phase["latency"][1].startswith("exit 1: no JSON")
    assert by_phase["multinode"][1] == "not run"
    assert by_phase["smtp_bench"][2:] == ["1:05", "0.60 (noisy)", "1 s.: 10 / 3; 20 s.: 10 / 10; 100 s.: 4,000 / 900"]  # fmt: skip
    markdown = targets.render_markdown({"phases": phases, "date": "d", "command": "c"})
    assert (
        "exit 1: no JSON (FileNotFoundError); BenchError: latency sink did not start \\| x"
        in markdown
    )


def test_partial_idle_sessions_is_not_judged() -> None:
    phases = _phases()
    phases["idle_sessions"]["data"] = {**IDLE, "opened": 9000}
    row = _by_figure(phases)["RSS with 15,000 idle SMTP sessions after EHLO"]
    assert (
        row[0] == "150.0 MB (3 processes; PSS 90.0 MB, judged), only 9,000 opened"
        and row[-1] == "–"
    )


def test_markdown_names_machine_durability_and_commands() -> None:
    result = {
        "date": "2026-12-03 16:00 UTC",
        "command": "python bench/targets.py --write-doc",
        "seconds": 1500.0,
        "quick": False,
        "machine": {"machine": "fallback", "load average before": "0.10 0.20 0.30"},
        "phases": _phases(),
    }
    markdown = targets.render_markdown(result)
    assert "Measured 2026-12-03 16:00 UTC in one run of `python bench/targets.py --write-doc`" in (
        markdown
    )
    assert "(25:00 in all)." in markdown and "smoke run" not in markdown
    assert "- **machine**: 2 CPUs (AMD EPYC)" in markdown  # smtp_bench's, more precise
    assert "- **postfix**: 3.7.11" in markdown
    assert "HATO_FSYNC=true" in markdown and "  - outbox, redis: appendonly=yes" in markdown
    assert "  - `python bench/smtp_bench.py --json x`" in markdown
    assert "| figure | Hato | Postfix (same run) | ratio | target | stretch | met? |" in markdown
    assert (
        "| end to end vs Postfix, 100 sessions | 1,600 msg/s | 440 msg/s | 3.64× | ≥ 2× | ≥ 3× "
        "| yes (stretch) |" in markdown
    )
    quick = targets.render_markdown({**result, "quick": True})
    assert "a smoke run (`--quick`)" in quick


def test_section_goes_under_the_intake_heading_then_is_replaced_in_place() -> None:
    doc = (
        "# Performance\n\n## Outbox\n\ntext\n\n## Intake and relay: Hato against Postfix\n\nprose\n"
    )
    once = targets.insert_section(doc, "TABLE 1")
    assert once == (
        "# Performance\n\n## Outbox\n\ntext\n\n## Intake and relay: Hato against Postfix\n\n"
        "<!-- targets:begin -->\nTABLE 1\n<!-- targets:end -->\n\nprose\n"
    )
    twice = targets.insert_section(once, "TABLE 2")
    assert twice == once.replace("TABLE 1", "TABLE 2")
    assert (
        targets.insert_section("# P\n", "T")
        == "# P\n\n<!-- targets:begin -->\nT\n<!-- targets:end -->\n"
    )


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        (["Traceback (most recent call last):", "  x", "KeyError: 'http'"], "KeyError: 'http'"),
        (
            ["psycopg.OperationalError: connection failed: refused", "\tIs the server running?"],
            "psycopg.OperationalError: connection failed: refused",
        ),
        (["smtp_bench: smtp-sink did not answer"], "smtp_bench: smtp-sink did not answer"),
        ([], ""),
    ],
)
def test_a_failed_phase_is_summed_up_by_its_exception(lines: list[str], said: str) -> None:
    assert targets.last_words(lines) == said
