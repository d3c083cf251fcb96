"""`make bench`'s harness, run in its tiny mode: it writes a report with every case of issue 5, measured on
chatmesh as the chart configures it without TLS (authentication and every limit on), on chatmesh_open (without
authentication and limits), on chatmesh_tls (chatmesh with TLS on every gRPC port and to its own Redis: the chart's
defaults) and on run (`make run`'s defaults: every store in memory); with issue 19's targets read for both
configurations side by side (run and chart), with what TLS adds (chatmesh_tls minus chatmesh), and with what an
idempotency key adds (in a keyed case, the calls with a key minus
the same calls without one, alternating with them within each round); and with what the window, the PII screen and
knowledge-base retrieval cost.

Timings are not checked here: the targets are read from the report, never asserted by a test.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    f"{rpc}_{concurrency}_{turn}"
    for concurrency in ("c1", "c32")
    for turn in ("new", "turn10")
    for rpc in ("chat", "stream")
]
# Reported as not available, with a reason, while the cluster lacks the feature (cache, safety).
FEATURE_CASES = ["cache_hit", "blocked_input"]
# Each chatmesh call sends a fresh idempotency key; the same calls as the case of the same name without `_keyed`
# otherwise. Within the keyed case, each chatmesh target's calls without a key run as a target of their own.
KEYED_CASES = {"stream_c1_new_keyed": "stream_c1_new"}
UNKEYED = {"chatmesh": "chatmesh_unkeyed", "chatmesh_open": "chatmesh_open_unkeyed"}

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
    "auth_and_limits",
    "tls_added",
    "idempotency_key",
    "idempotency_key_added",
    "cpu_ms_per_call",
    "cpu_ms_per_call_open",
    "cpu_ms_per_call_tls",
    "cpu_ms_per_call_run",
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
CHATMESH_TARGETS = ("chatmesh", "chatmesh_open", "chatmesh_tls", "run")
# Issue 19's targets are read for both configurations, each on its cluster.
CONFIGURATIONS = {"run": "run", "chart": "chatmesh_tls"}
PROCESS_PREFIX = {"chatmesh_open": "open-", "chatmesh_tls": "tls-", "run": "run-"}
STREAM_P50_TARGET = "StreamChat c=1: added p50 over floor ≤ 3 ms"
STREAM_TTFD_TARGET = "StreamChat c=1: added time to first delta p50 over floor ≤ 2.5 ms"
THROUGHPUT_TARGET = "StreamChat c=32: ≥ 300 streams per second"
STREAM_CPU_TARGET = "CPU per 50-token stream, summed over every chatmesh process ≤ 5 ms"
CHAT_P50_TARGET = "Chat c=1: added p50 over floor ≤ 3 ms"
CACHE_HIT_TARGET = "A cache hit at c=1: p50 end to end ≤ 2 ms"
RSS_TARGET = "RSS ≤ 100 MiB per process at peak"
AUTH_P50_TARGET = "auth and limits: added p50 at c=1 ≤ 0.5 ms"
AUTH_CPU_TARGET = "auth and limits: added CPU per call ≤ 0.5 ms"
KEY_P50_TARGET = "idempotency key: added p50 at c=1 ≤ 0.3 ms"
TLS_P50_TARGET = "TLS adds ≤ 0.3 ms p50 at c=1"
TLS_SECTION = "## What TLS adds (chatmesh_tls minus chatmesh, same case, same run)"


# Four clusters and two Redises start, and every case runs on each: about 2 minutes on a quiet machine.
@pytest.mark.timeout(400)
def test_the_tiny_run_reports_every_case(tmp_path: Path):
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--mode", "tiny", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]

    [json_path] = tmp_path.glob("*-tiny.json")
    assert json_path.with_suffix(".md").read_text() in finished.stdout
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert not (tmp_path / "latest.md").exists()  # only a full run replaces the latest table
    report = json.loads(json_path.read_text())

    assert {"gateway", "dialogue"} <= set(report["chatmesh_processes"])
    assert "modelsim" not in report["chatmesh_processes"]
    # The cluster without authentication and limits: the same processes, measured apart from the first's.
    assert report["chatmesh_open_processes"] == [f"open-{name}" for name in report["chatmesh_processes"]]
    # The cluster with TLS likewise, and the one of `make run`'s defaults.
    for target, prefix in PROCESS_PREFIX.items():
        assert report[f"{target}_processes"] == [prefix + name for name in report["chatmesh_processes"]], target
    assert set(report["processes"]) == {
        *report["chatmesh_processes"],
        *(name for target in PROCESS_PREFIX for name in report[f"{target}_processes"]),
        "modelsim",
        "redis",
        "tls-redis",  # chatmesh_tls's own, serving TLS only; run has none
    }
    for name, process in report["processes"].items():
        assert process["rss_idle_mib"] > 0 and process["rss_peak_mib"] >= process["rss_idle_mib"], name
        assert process["chatmesh"] == (name in report["chatmesh_processes"]), name
        expected_target = next(
            (target for target in CHATMESH_TARGETS if name in report[f"{target}_processes"]),
            None,
        )
        assert process["target"] == expected_target, name
        assert process["kind"] == (None if expected_target is None else name.split("-")[-1]), name
    assert set(report["run"]["auth"]) == set(CHATMESH_TARGETS)
    assert "Its Redis serves TLS only" in report["run"]["tls"]
    configurations = report["run"]["configurations"]
    assert {name: notes["target"] for name, notes in configurations.items()} == CONFIGURATIONS
    assert configurations["chart"]["not_reproduced"], "say what of the chart's defaults this run does not do"
    assert set(report["run"]["bench_tenant_limits"]) == {
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_streams",
        "monthly_budget_usd",
        "daily_budget_usd",
    }

    cases = {entry["name"]: entry for entry in report["cases"]}
    assert set(cases) == {*CASES, *FEATURE_CASES, *KEYED_CASES}
    for name, entry in cases.items():
        assert set(entry) >= CASE_KEYS, name
        assert entry["idempotency_key"] == (name in KEYED_CASES), name
        if name in CASES or name in KEYED_CASES:
            assert entry["available"] is True, name
        if not entry["available"]:
            assert entry["reason"], name
            continue
        assert entry["reason"] is None
        assert set(entry["targets"]) == {*CHATMESH_TARGETS, "floor", "sdk", *UNKEYED.values()}
        unkeyed_targets = list(UNKEYED.values()) if name in KEYED_CASES else []
        for target in UNKEYED.values():
            assert (entry["targets"][target] is not None) == (target in unkeyed_targets), (name, target)
        for target in (*CHATMESH_TARGETS, *unkeyed_targets, *entry["baselines"]):
            stats = entry["targets"][target]
            assert set(stats) >= STATS_KEYS, (name, target)
            assert stats["calls"] > 0 and stats["errors"] == 0 and stats["unexpected"] == 0, (name, target, stats)
            assert {"p50", "p90", "p99"} <= set(stats["latency_ms"])
            assert stats["rps"] > 0
        for baseline in entry["baselines"]:
            assert set(entry["added"][baseline]) == ADDED_KEYS
        assert set(entry["cpu_ms_per_call"]) == {*report["chatmesh_processes"], "total"}
        assert set(entry["cpu_ms_per_call_open"]) == {*report["chatmesh_processes"], "total"}
        assert entry["cpu_ms_per_call"]["total"] > 0 and entry["cpu_ms_per_call_open"]["total"] > 0, name
        added = entry["auth_and_limits"]
        assert set(added) == {*ADDED_KEYS, "cpu_ms_per_call", "redis_cpu_ms_per_call"}, name
        assert added["p50_ms"] is not None and added["rps_ratio"] is not None, name
        assert set(added["cpu_ms_per_call"]) == {*report["chatmesh_processes"], "total"}, name
        assert added["cpu_ms_per_call"]["total"] == round(
            entry["cpu_ms_per_call"]["total"] - entry["cpu_ms_per_call_open"]["total"], 3
        ), name
        for cpu in ("cpu_ms_per_call_tls", "cpu_ms_per_call_run"):
            assert set(entry[cpu]) == {*report["chatmesh_processes"], "total"}, (name, cpu)
            assert entry[cpu]["total"] > 0, (name, cpu)
        # What TLS adds: chatmesh_tls minus chatmesh, as auth_and_limits is chatmesh minus chatmesh_open.
        tls_added = entry["tls_added"]
        assert set(tls_added) == {*ADDED_KEYS, "cpu_ms_per_call", "redis_cpu_ms_per_call"}, name
        tls, chatmesh = entry["targets"]["chatmesh_tls"], entry["targets"]["chatmesh"]
        assert tls_added["p50_ms"] == round(tls["latency_ms"]["p50"] - chatmesh["latency_ms"]["p50"], 3), name
        assert tls_added["cpu_ms_per_call"]["total"] == round(
            entry["cpu_ms_per_call_tls"]["total"] - entry["cpu_ms_per_call"]["total"], 3
        ), name
        assert set(entry["rss_mib"]) == set(report["processes"])
        if name not in KEYED_CASES:
            assert entry["idempotency_key_added"] is None, name

    for name in CASES:
        streamed = cases[name]["rpc"] == "StreamChat"
        for target in CHATMESH_TARGETS:
            assert (cases[name]["targets"][target]["ttfd_ms"] is not None) == streamed, (name, target)
        assert (cases[name]["auth_and_limits"]["ttfd_p50_ms"] is not None) == streamed, name
        assert (cases[name]["tls_added"]["ttfd_p50_ms"] is not None) == streamed, name
        # Every limit is checked on every call: chatmesh does more in Redis per call than chatmesh_open.
        redis_calls = {target: cases[name]["targets"][target]["redis_per_call"] for target in CHATMESH_TARGETS}
        assert redis_calls["chatmesh"]["commands"] > redis_calls["chatmesh_open"]["commands"], (name, redis_calls)
        assert redis_calls["chatmesh"]["scripts"] >= redis_calls["chatmesh_open"]["scripts"] > 0, (name, redis_calls)
        # chatmesh_tls is chatmesh's configuration, tenant limits included.
        assert redis_calls["chatmesh_tls"]["commands"] > redis_calls["chatmesh_open"]["commands"], (name, redis_calls)
        # run keeps everything in memory: what Redis runs in its windows is only the other clusters' leftovers.
        assert redis_calls["run"]["commands"] < redis_calls["chatmesh_open"]["commands"], (name, redis_calls)
        if name.endswith("turn10"):
            assert cases[name]["turns"]["measured_turn"] == 10
            assert cases[name]["turns"]["model_messages"] > 1

    # The keyed case: the same calls as its twin but for the key, on both chatmesh targets, with no baselines
    # (the model never sees the key); in each of its rounds, each chatmesh target also runs those calls without a
    # key (its unkeyed target), and what the key adds is the one minus the other, both from the same case.
    for name, twin in KEYED_CASES.items():
        keyed = cases[name]
        assert (keyed["rpc"], keyed["concurrency"], keyed["turn"], keyed["message"], keyed["expect"]) == (
            cases[twin]["rpc"],
            cases[twin]["concurrency"],
            cases[twin]["turn"],
            cases[twin]["message"],
            cases[twin]["expect"],
        )
        assert keyed["baselines"] == [] and keyed["targets"]["floor"] is None and keyed["targets"]["sdk"] is None
        added = keyed["idempotency_key_added"]
        assert set(added) == {"reason", *UNKEYED} and added["reason"] is None, added
        for target, cpu in (("chatmesh", "cpu_ms_per_call"), ("chatmesh_open", "cpu_ms_per_call_open")):
            difference = added[target]
            assert set(difference) == {
                *ADDED_KEYS,
                "cpu_ms_per_call",
                "cpu_ms_per_call_without_key",
                "redis_cpu_ms_per_call",
                "redis_commands_per_call",
                "redis_scripts_per_call",
            }, (name, target)
            with_key, without = keyed["targets"][target], keyed["targets"][UNKEYED[target]]
            # Alternating within the same rounds: as many rounds, each as long, on each side.
            assert len(with_key["rounds"]) == len(without["rounds"]) == report["run"]["rounds"], (name, target)
            assert difference["p50_ms"] == round(with_key["latency_ms"]["p50"] - without["latency_ms"]["p50"], 3)
            assert difference["ttfd_p50_ms"] == round(with_key["ttfd_ms"]["p50"] - without["ttfd_ms"]["p50"], 3)
            without_cpu = difference["cpu_ms_per_call_without_key"]
            assert set(without_cpu) == {*report["chatmesh_processes"], "total"}, (name, target)
            assert without_cpu["total"] > 0, (name, target)
            assert difference["cpu_ms_per_call"]["total"] == round(keyed[cpu]["total"] - without_cpu["total"], 3), (
                name,
                target,
            )
            # The key reached dialogue: every call claimed its turn (one Lua script more) before running it. (With
            # a few calls per round, work that settles after a round's window moves these averages a little.)
            assert difference["redis_scripts_per_call"] > 0, (name, target, difference)
            assert difference["redis_commands_per_call"] > difference["redis_scripts_per_call"], (name, target)

    assert {row["status"] for row in report["targets"]} <= {"met", "not met", "not available", "not measured"}
    assert {"cache_hit", "process gateway, whole run"} <= {row["case"] for row in report["targets"]}
    assert {row["configuration"] for row in report["targets"]} == {*CONFIGURATIONS, None}
    # Issue 19's targets: every one in every case it names, for both configurations, read on its own cluster.
    by_configuration = {
        (row["target"], row["case"], row["configuration"]): row for row in report["targets"] if row["configuration"]
    }
    for configuration, target in CONFIGURATIONS.items():
        floor_cases = {
            STREAM_P50_TARGET: ("stream_c1_new", "stream_c1_turn10"),
            STREAM_TTFD_TARGET: ("stream_c1_new", "stream_c1_turn10"),
            CHAT_P50_TARGET: ("chat_c1_new", "chat_c1_turn10"),
        }
        for statement, names in floor_cases.items():
            figure = ("ttfd_ms", "p50") if statement == STREAM_TTFD_TARGET else ("latency_ms", "p50")
            for name in names:
                row = by_configuration[statement, name, configuration]
                assert row["status"] in {"met", "not met"}, row
                measured, floor = cases[name]["targets"][target], cases[name]["targets"]["floor"]
                assert row["measured"] == round(measured[figure[0]][figure[1]] - floor[figure[0]][figure[1]], 3)
        for name in ("stream_c32_new", "stream_c32_turn10"):
            row = by_configuration[THROUGHPUT_TARGET, name, configuration]
            assert row["measured"] == cases[name]["targets"][target]["rps"], row
        cpu = {"run": "cpu_ms_per_call_run", "chart": "cpu_ms_per_call_tls"}[configuration]
        for name in ("stream_c1_new", "stream_c1_turn10", "stream_c32_new", "stream_c32_turn10"):
            row = by_configuration[STREAM_CPU_TARGET, name, configuration]
            assert row["measured"] == cases[name][cpu]["total"], row
        row = by_configuration[CACHE_HIT_TARGET, "cache_hit", configuration]
        if cases["cache_hit"]["available"]:
            assert row["measured"] == cases["cache_hit"]["targets"][target]["latency_ms"]["p50"], row
        for name in report["chatmesh_processes"]:
            row = by_configuration[RSS_TARGET, f"process {name}, whole run", configuration]
            assert row["measured"] == report["processes"][PROCESS_PREFIX[target] + name]["rss_peak_mib"], row
    rows = {(row["target"], row["case"]): row for row in report["targets"] if row["configuration"] is None}
    single = [name for name in cases if cases[name]["concurrency"] == 1]
    for target, names in ((AUTH_P50_TARGET, single), (AUTH_CPU_TARGET, list(cases))):
        for name in names:
            row = rows[target, name]
            if cases[name]["available"]:
                assert row["status"] in {"met", "not met"} and row["measured"] is not None, row
    for name in KEYED_CASES:
        row = rows[KEY_P50_TARGET, name]
        assert row["status"] in {"met", "not met"}, row
        assert row["measured"] == cases[name]["idempotency_key_added"]["chatmesh"]["p50_ms"], row
    row = rows[TLS_P50_TARGET, "stream_c1_new"]
    assert row["status"] in {"met", "not met"}, row
    assert row["measured"] == cases["stream_c1_new"]["tls_added"]["p50_ms"], row
    markdown = json_path.with_suffix(".md").read_text()
    assert "## What authentication and limits add" in markdown
    assert AUTH_P50_TARGET in markdown and AUTH_CPU_TARGET in markdown
    assert "## What an idempotency key adds" in markdown
    assert "stream_c1_new_keyed: with key minus without" in markdown
    assert "one after the other" not in markdown
    assert "Nothing is added when no key is sent" in markdown
    assert KEY_P50_TARGET in markdown
    assert TLS_SECTION in markdown and TLS_P50_TARGET in markdown
    assert "| chatmesh_tls |" in markdown and "| run |" in markdown  # rows of the latency table
    # Issue 19's targets in one table, a column for each configuration.
    assert "| target | case | run (run) | chart (chatmesh_tls) |" in markdown
    throughput_row = next(line for line in markdown.splitlines() if line.startswith(f"| {THROUGHPUT_TARGET} |"))
    assert throughput_row.count("met") == 2, throughput_row
    # The PII screen's CPU per message, every message measured and found what it holds.
    assert "PII screen ≤ 0.2 ms CPU per message under 2,000 characters" in markdown
    pii = report["pii"]
    assert {name: message["found"] for name, message in pii["messages"].items()} == {
        "en_with_pii": 4,
        "en_without": 0,
        "zh_with_pii": 4,
        "zh_without": 0,
    }
    assert pii["cpu_ms_per_message"] == max(message["cpu_ms_per_message"] for message in pii["messages"].values())
    # Knowledge-base retrieval: the search alone at 5,000 chunks (issue 18's target), and grounded turns against
    # the same turns without knowledge bases (a small knowledge base in the tiny mode), every one answered.
    assert "Retrieval adds ≤ 3 ms p50 to a turn with 5,000 chunks" in markdown
    retrieval = report["knowledge"]["retrieval"]
    assert (retrieval["chunks"], retrieval["dimensions"], retrieval["target_ms"]) == (5000, 256, 3.0)
    assert 0 < retrieval["p50_ms"] <= retrieval["p90_ms"]
    turns = report["knowledge"]["turns"]
    assert turns["chunks"] == 200 and turns["grounded"]["calls"] == turns["plain"]["calls"] == 3
    assert turns["cited_share"] == 1.0 and turns["embedding_mean_ms"] > 0
    assert turns["added_p50_ms"] == round(turns["grounded"]["p50_ms"] - turns["plain"]["p50_ms"], 3)


@pytest.mark.timeout(120)
def test_the_multiplex_bench_reports_both_ways_and_their_ratio_per_concurrency():
    finished = subprocess.run(
        [sys.executable, "-m", "bench.multiplex", "--turns", "20", "--rounds", "2", "--concurrency", "1", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads(finished.stdout)

    assert set(report) == {"c1", "c4"}
    for row in report.values():
        for way in ("unary", "multiplexed"):
            assert row[way]["turns"] == 40
            assert set(row[way]["cpu_ms_per_turn"]) == {"safety", "cache", "client", "sum"}
            assert row[way]["latency_p50_ms"] > 0
        assert set(row["multiplexed_over_unary"]) == {"cpu_safety", "cpu_cache", "cpu_client", "cpu_sum", "latency_p50"}
