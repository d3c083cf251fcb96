"""The resilience run of issue 14, as `make bench` runs it (bench/resilience.py): 2,000 turns at c=32 against a
deployment with 20 % 429s, 10 % 500s and 2 % hangs and a healthy one, each with two keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_through_provider_faults_at_least_999_in_1000_turns_succeed_each_committed_once(tmp_path: Path) -> None:
    command = ["-m", "bench.resilience", "--turns", "2000", "--concurrency", "32", "--out-dir", str(tmp_path)]
    subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        check=True,
        timeout=540,
        capture_output=True,
    )
    (report_file,) = tmp_path.glob("*-resilience.json")
    report = json.loads(report_file.read_text())

    faulty, clean = report["with_faults"], report["without_faults"]
    assert clean["success_rate"] == 1.0, clean["failures"]
    assert faulty["success_rate"] >= 0.999, faulty["failures"]
    assert report["commits"] == {"one_whole_turn": faulty["succeeded"], "anything_else": 0}
    usage = report["deployments"]
    # The faults happened, and the healthy deployment carried what the faulty one could not.
    assert usage["faulty"]["errors_injected"] > 0 and usage["faulty"]["hangs"] > 0
    assert usage["healthy"]["requests"] > usage["faulty"]["requests"] - usage["faulty"]["errors_injected"]
    # Both keys of each deployment were used.
    assert all(len(deployment["by_key"]) == 2 for deployment in usage.values())
    assert report["added_p50_ms"] is not None and report["added_p99_ms"] is not None
    assert (tmp_path / report_file.name.replace(".json", ".md")).read_text().startswith("# chatmesh resilience run")
