"""The Helm chart renders the PrometheusRule, the Grafana dashboard and the default keyword list from its own
copies of deploy/prometheus/, deploy/grafana/ and services/safety/default_keywords.txt (`.Files.Get` reads only
the chart's folder). `make chart-files` copies them; this test fails when a copy is missing or stale."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_charts_copies_equal_the_originals() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/sync_chart_files.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_no_symlinks_in_the_chart() -> None:
    chart = ROOT / "deploy" / "helm" / "chatmesh"
    assert [str(path) for path in chart.rglob("*") if path.is_symlink()] == []
