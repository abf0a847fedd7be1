"""deploy/grafana/hato.json: valid JSON, and every query names only metrics Hato exports
(each one checked by promtool's PromQL parser where promtool is installed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hato.web.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hato.json"


def _exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel["targets"]]


def test_dashboard_queries_use_exported_metrics() -> None:
    metrics = Metrics(role="serve")
    metrics.listeners_known(["smtp=127.0.0.1:25"])
    metrics.delivery("relay", "sent", 1.0)
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    exprs = _exprs()
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"\b(hato_[a-z_]+)", expr)}
    assert used <= exported, used - exported
    # The metrics the issue names are all on the board.
    for name in (
        "hato_queue_messages",
        "hato_queue_oldest_age_seconds",
        "hato_smtp_connections_active",
        "hato_smtp_connections_total",
        "hato_smtp_messages_total",
        "hato_smtp_auth_failures_total",
        "hato_deliveries_total",
        "hato_delivery_seconds_bucket",
    ):
        assert name in used, name


def test_dashboard_panels_do_not_overlap() -> None:
    board = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, panel["title"]
        assert pos["x"] + pos["w"] <= 24
        cells |= mine


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool."""
    import shutil
    import subprocess

    from peers import missing

    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (apt package prometheus)")
        return
    rules = [
        {
            "record": f"hato:dashboard_{number}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for number, expr in enumerate(_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
