"""`make bench`'s harness, run in its tiny mode: it writes a report with every case of issue 5.

Timings are not checked here: the targets are read from the report, never asserted by a test.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    f"{rpc}_{concurrency}_{turn}"
    for concurrency in ("c1", "c32")
    for turn in ("new", "turn10")
    for rpc in ("chat", "stream")
]
# Reported as not available, with a reason, while the cluster lacks the feature (cache, safety).
FEATURE_CASES = ["cache_hit", "blocked_input"]

CASE_KEYS = {
    "name",
    "description",
    "rpc",
    "concurrency",
    "turn",
    "available",
    "reason",
    "targets",
    "added",
    "cpu_ms_per_call",
    "rss_mib",
}
STATS_KEYS = {
    "calls",
    "errors",
    "unexpected",
    "latency_ms",
    "ttfd_ms",
    "rps",
    "client_cpu_ms_per_call",
    "process_cpu_ms_per_call",
}
ADDED_KEYS = {"p50_ms", "p99_ms", "ttfd_p50_ms", "ttfd_p99_ms", "rps_ratio"}


def test_the_tiny_run_reports_every_case(tmp_path: Path):
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--mode", "tiny", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]

    [json_path] = tmp_path.glob("*-tiny.json")
    assert json_path.with_suffix(".md").read_text() in finished.stdout
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert not (tmp_path / "latest.md").exists()  # only a full run replaces the latest table
    report = json.loads(json_path.read_text())

    assert {"gateway", "dialogue"} <= set(report["chatmesh_processes"])
    assert "modelsim" not in report["chatmesh_processes"]
    for name, process in report["processes"].items():
        assert process["rss_idle_mib"] > 0 and process["rss_peak_mib"] >= process["rss_idle_mib"], name

    cases = {entry["name"]: entry for entry in report["cases"]}
    assert set(cases) == {*CASES, *FEATURE_CASES}
    for name, entry in cases.items():
        assert set(entry) >= CASE_KEYS, name
        if name in CASES:
            assert entry["available"] is True, name
        if not entry["available"]:
            assert entry["reason"], name
            continue
        assert entry["reason"] is None
        assert set(entry["targets"]) == {"chatmesh", "floor", "sdk"}
        for target in ("chatmesh", *entry["baselines"]):
            stats = entry["targets"][target]
            assert set(stats) >= STATS_KEYS, (name, target)
            assert stats["calls"] > 0 and stats["errors"] == 0 and stats["unexpected"] == 0, (name, target, stats)
            assert {"p50", "p90", "p99"} <= set(stats["latency_ms"])
            assert stats["rps"] > 0
        for baseline in entry["baselines"]:
            assert set(entry["added"][baseline]) == ADDED_KEYS
        assert set(entry["cpu_ms_per_call"]) == {*report["chatmesh_processes"], "total"}
        assert set(entry["rss_mib"]) == set(report["processes"])

    for name in CASES:
        streamed = cases[name]["rpc"] == "StreamChat"
        assert (cases[name]["targets"]["chatmesh"]["ttfd_ms"] is not None) == streamed, name
        if name.endswith("turn10"):
            assert cases[name]["turns"]["measured_turn"] == 10
            assert cases[name]["turns"]["model_messages"] > 1

    assert {row["status"] for row in report["targets"]} <= {"met", "not met", "not available", "not measured"}
    assert {"cache_hit", "process gateway, whole run"} <= {row["case"] for row in report["targets"]}
