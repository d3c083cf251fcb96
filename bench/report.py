"""From measured segments to the report: statistics, the targets of issue 19 for both configurations (the Helm
chart's defaults and `make run`'s), those of authentication and limits, of the idempotency key and of TLS,
markdown, and the plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case
from bench.loadgen import Segment

# chatmesh: the chart's configuration without TLS (authentication and every limit on); chatmesh_open: the same
# without authentication and limits; chatmesh_tls: chatmesh plus TLS on every gRPC port, which is the Helm chart's
# default configuration; run: `make run`'s defaults (every store in memory, no Redis, no authentication, no TLS).
# One cluster each.
CHATMESH_TARGETS = ("chatmesh", "chatmesh_open", "chatmesh_tls", "run")
# The configurations issue 19's targets are read for, each the target that runs it: the chart's defaults and
# `make run`'s.
CONFIGURATIONS = {"run": "run", "chart": "chatmesh_tls"}
# What authentication and limits add is the first of each pair minus the second; what TLS adds likewise.
AUTH_PAIR = ("chatmesh", "chatmesh_open")
TLS_PAIR = ("chatmesh_tls", "chatmesh")
# A case that sends an idempotency key also runs, in every round, the same calls without one against the chatmesh
# and chatmesh_open clusters, as targets of their own: what the key adds is the one minus the other. (chatmesh_tls
# sends the key in such a case too, as chatmesh does, but has no such twin.)
UNKEYED = {target: f"{target}_unkeyed" for target in ("chatmesh", "chatmesh_open")}
# The targets of the latency table, in its order; a case's `targets` has the unkeyed ones too (None but in a
# case that sends a key).
TABLE_TARGETS = (*CHATMESH_TARGETS, "floor", "sdk")
TARGET_NAMES = (*TABLE_TARGETS, *UNKEYED.values())
# The redis-servers: one that chatmesh and chatmesh_open share (plaintext), and chatmesh_tls's own (TLS, as the
# chart's Redis is with TLS on); run has none. Measured, reported apart from the chatmesh processes.
REDIS_PROCESSES = ("redis", "tls-redis")


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, linearly interpolated."""
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isnan(seconds):
        return None
    return round(seconds * 1000, 3)


def target_stats(segments: Sequence[Segment], process_cpu_seconds: dict[str, float]) -> dict[str, Any]:
    """The statistics of one target (chatmesh, chatmesh_open, chatmesh_tls, run, floor, ...) over every round of
    one case."""
    latencies = sorted(sample.latency for segment in segments for sample in segment.samples)
    ttfds = sorted(sample.ttfd for segment in segments for sample in segment.samples if sample.ttfd is not None)
    calls = len(latencies)
    wall = sum(segment.wall_seconds for segment in segments)
    saturated_seconds = sum(segment.saturated_seconds for segment in segments)
    saturated_calls = sum(segment.saturated_calls for segment in segments)
    per_call = 1000 / calls if calls else math.nan
    error_kinds: dict[str, int] = {}
    for segment in segments:
        for kind, count in segment.error_kinds.items():
            error_kinds[kind] = error_kinds.get(kind, 0) + count
    return {
        "calls": calls,
        "errors": sum(segment.errors for segment in segments),
        "error_kinds": error_kinds,
        "unexpected": sum(not sample.as_expected for segment in segments for sample in segment.samples),
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p90": _ms(percentile(latencies, 90)),
            "p99": _ms(percentile(latencies, 99)),
            "mean": _ms(sum(latencies) / calls) if calls else None,
            "max": _ms(latencies[-1]) if calls else None,
        },
        "ttfd_ms": {"p50": _ms(percentile(ttfds, 50)), "p99": _ms(percentile(ttfds, 99))} if ttfds else None,
        # Calls per second while all `concurrency` callers were busy (see bench/loadgen.py); rps_wall counts
        # the ramp-down at the end of each round too.
        "rps": round(saturated_calls / saturated_seconds, 1) if saturated_calls and saturated_seconds > 0 else None,
        "rps_wall": round(calls / wall, 1) if wall > 0 else None,
        "wall_seconds": round(wall, 3),
        "client_cpu_ms_per_call": _round(sum(s.client_cpu_seconds for s in segments) * per_call),
        "process_cpu_ms_per_call": {name: _round(seconds * per_call) for name, seconds in process_cpu_seconds.items()},
        # The latency distribution in 101 points (percentiles 0..100), enough to redraw the plot.
        "latency_percentiles_ms": [_ms(percentile(latencies, q)) for q in range(101)] if calls else [],
        "rounds": [
            {
                "calls": len(segment.samples),
                "p50_ms": _ms(percentile(sorted(s.latency for s in segment.samples), 50)),
                "rps": round(segment.saturated_calls / segment.saturated_seconds, 1)
                if segment.saturated_calls and segment.saturated_seconds > 0
                else None,
            }
            for segment in segments
        ],
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def redis_cpu_ms_per_call(stats: dict[str, Any]) -> float | None:
    """The CPU per call of every redis-server during a target's windows: its own Redis's, and whatever the others
    did meanwhile (little: only one target runs at a time)."""
    values = [stats["process_cpu_ms_per_call"].get(name) for name in REDIS_PROCESSES]
    return None if all(value is None for value in values) else round(sum(value or 0 for value in values), 3)


def added_over(chatmesh: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """What chatmesh adds over a baseline of the same case: latency differences and the throughput ratio."""
    ttfd, base_ttfd = chatmesh["ttfd_ms"] or {}, baseline["ttfd_ms"] or {}
    ratio = None
    if chatmesh["rps"] and baseline["rps"]:
        ratio = round(chatmesh["rps"] / baseline["rps"], 3)
    return {
        "p50_ms": _difference(chatmesh["latency_ms"]["p50"], baseline["latency_ms"]["p50"]),
        "p99_ms": _difference(chatmesh["latency_ms"]["p99"], baseline["latency_ms"]["p99"]),
        "ttfd_p50_ms": _difference(ttfd.get("p50"), base_ttfd.get("p50")),
        "ttfd_p99_ms": _difference(ttfd.get("p99"), base_ttfd.get("p99")),
        "rps_ratio": ratio,
    }


def cluster_difference(
    target: dict[str, Any],
    other: dict[str, Any],
    cpu: dict[str, float | None],
    cpu_other: dict[str, float | None],
) -> dict[str, Any]:
    """What one chatmesh target adds over another in the same case: `target` minus `other`, in latency (as
    `added_over`), in CPU per call of each chatmesh process (by kind: gateway, ...) and their total, and in CPU
    per call of Redis (not a chatmesh process, so not in the total; see `redis_cpu_ms_per_call`). Authentication and
    limits: chatmesh minus chatmesh_open; TLS: chatmesh_tls minus chatmesh."""
    return {
        **added_over(target, other),
        "cpu_ms_per_call": {name: _difference(value, cpu_other.get(name)) for name, value in cpu.items()},
        "redis_cpu_ms_per_call": _difference(redis_cpu_ms_per_call(target), redis_cpu_ms_per_call(other)),
    }


def idempotency_key_added(
    targets: dict[str, dict[str, Any]], cpu: dict[str, dict[str, float | None]], expect: str
) -> dict[str, Any]:
    """What an idempotency key adds in a case that sends one: for chatmesh and chatmesh_open, the calls with a key
    minus the same calls without one (its UNKEYED target), measured in the same rounds of the same case (as
    `cluster_difference`, plus Redis commands and scripts per call, and the CPU per call without a key that the
    difference is taken from); a target is None, with the reason, when either side's replies were not all as
    expected. `targets` and `cpu` are by target name, the unkeyed ones included."""
    added: dict[str, Any] = {"reason": None, **dict.fromkeys(UNKEYED)}
    reasons = []
    for target, unkeyed in UNKEYED.items():
        with_key, without = targets[target], targets[unkeyed]
        failed = [
            f"{stats['unexpected']} of {stats['calls']} {name} replies were not {expect}"
            for name, stats in ((target, with_key), (unkeyed, without))
            if stats["unexpected"] or not stats["calls"]
        ]
        if failed:
            reasons += failed
            continue
        difference = cluster_difference(with_key, without, cpu[target], cpu[unkeyed])
        for kind in ("commands", "scripts"):
            difference[f"redis_{kind}_per_call"] = _difference(
                (with_key.get("redis_per_call") or {}).get(kind), (without.get("redis_per_call") or {}).get(kind)
            )
        difference["cpu_ms_per_call_without_key"] = cpu[unkeyed]
        added[target] = difference
    added["reason"] = "; ".join(reasons) or None
    return added


def empty_case(case: Case) -> dict[str, Any]:
    """The entry of a case that was not run, with the same keys as one that was."""
    return {
        **case_header(case),
        "targets": dict.fromkeys(TARGET_NAMES),
        "added": {"floor": None, "sdk": None},
        "auth_and_limits": None,
        "tls_added": None,
        "idempotency_key_added": None,
        "cpu_ms_per_call": None,
        "cpu_ms_per_call_open": None,
        "cpu_ms_per_call_tls": None,
        "cpu_ms_per_call_run": None,
        "rss_mib": None,
        "turns": None,
        "other_load_cores": None,
        "bounds": None,
        "preparation_seconds": None,
        "measure_seconds": None,
    }


def case_header(case: Case) -> dict[str, Any]:
    return {
        "name": case.name,
        "description": case.describe(),
        "rpc": case.rpc,
        "concurrency": case.concurrency,
        "turn": case.turn,
        "message": case.message.value,
        "expect": case.expect.value,
        "baselines": list(case.baselines),
        "idempotency_key": case.idempotency_key,
        "available": case.available,
        "reason": case.unavailable,
    }


# The targets: issue 19's, read for each configuration (CONFIGURATIONS), and those of authentication and limits, of
# the idempotency key and of TLS, each read from one difference. Read from the report, never asserted by a test.


@dataclass(frozen=True, slots=True)
class Target:
    statement: str
    cases: tuple[str, ...]
    # The figure, from a case's entry and the target (chatmesh, run, ...) the configuration runs on; for a target
    # of a difference (configuration None), the target is "chatmesh".
    measure: Callable[[dict[str, Any], str], float | None]
    limit: float
    unit: str
    at_most: bool = True
    # The targets whose calls must all have succeeded as expected for the figure to count; by default, the one
    # measured.
    needs: tuple[str, ...] = ()
    # Why `measure` found no figure, when the case can say.
    reason: Callable[[dict[str, Any]], str | None] | None = None


def _stats(entry: dict[str, Any], target: str, *path: str) -> float | None:
    value: Any = entry["targets"][target]
    for key in path:
        value = None if value is None else value.get(key)
    return value


def _over_floor(entry: dict[str, Any], target: str, figure: str) -> float | None:
    """What `target` adds over the floor baseline of the same case (see `added_over`)."""
    stats, floor = entry["targets"][target], entry["targets"]["floor"]
    if stats is None or floor is None:
        return None
    return added_over(stats, floor)[figure]


def _keyed(entry: dict[str, Any], target: str) -> dict[str, Any] | None:
    """What the idempotency key adds on `target` in a case that sends one (see `idempotency_key_added`)."""
    return (entry.get("idempotency_key_added") or {}).get(target)


# The CPU per call of each target's cluster, in a case's entry.
CPU_KEYS = {
    "chatmesh": "cpu_ms_per_call",
    "chatmesh_open": "cpu_ms_per_call_open",
    "chatmesh_tls": "cpu_ms_per_call_tls",
    "run": "cpu_ms_per_call_run",
}
STREAM_CASES = ("stream_c1_new", "stream_c1_turn10", "stream_c32_new", "stream_c32_turn10")

# Issue 19's, for each configuration: what it adds over the floor baseline of the same case (a coalesced stream
# straight from the model), its throughput, its CPU and a cache hit end to end. The memory target is RSS_LIMIT_MIB.
CONFIGURATION_TARGETS = (
    Target(
        "StreamChat c=1: added p50 over floor ≤ 3 ms",
        ("stream_c1_new", "stream_c1_turn10"),
        lambda entry, target: _over_floor(entry, target, "p50_ms"),
        3.0,
        "ms",
    ),
    Target(
        "StreamChat c=1: added time to first delta p50 over floor ≤ 2.5 ms",
        ("stream_c1_new", "stream_c1_turn10"),
        lambda entry, target: _over_floor(entry, target, "ttfd_p50_ms"),
        2.5,
        "ms",
    ),
    Target(
        "StreamChat c=32: ≥ 300 streams per second",
        ("stream_c32_new", "stream_c32_turn10"),
        lambda entry, target: _stats(entry, target, "rps"),
        300.0,
        "/s",
        at_most=False,
    ),
    Target(
        "CPU per 50-token stream, summed over every chatmesh process ≤ 5 ms",
        STREAM_CASES,
        lambda entry, target: (entry[CPU_KEYS[target]] or {}).get("total"),
        5.0,
        "ms",
    ),
    Target(
        "Chat c=1: added p50 over floor ≤ 3 ms",
        ("chat_c1_new", "chat_c1_turn10"),
        lambda entry, target: _over_floor(entry, target, "p50_ms"),
        3.0,
        "ms",
    ),
    Target(
        "A cache hit at c=1: p50 end to end ≤ 2 ms",
        ("cache_hit",),
        lambda entry, target: _stats(entry, target, "latency_ms", "p50"),
        2.0,
        "ms",
    ),
)
RSS_LIMIT_MIB = 100.0
RSS_TARGET = f"RSS ≤ {RSS_LIMIT_MIB:g} MiB per process at peak"

# The targets of one difference between two clusters of the same run.
DIFFERENCE_TARGETS = (
    Target(
        "auth and limits: added p50 at c=1 ≤ 0.5 ms",
        (
            "chat_c1_new",
            "stream_c1_new",
            "stream_c1_new_keyed",
            "chat_c1_turn10",
            "stream_c1_turn10",
            "cache_hit",
            "blocked_input",
        ),
        lambda entry, _: entry["auth_and_limits"]["p50_ms"],
        0.5,
        "ms",
        needs=AUTH_PAIR,
    ),
    Target(
        "auth and limits: added CPU per call ≤ 0.5 ms",
        (
            "chat_c1_new",
            "stream_c1_new",
            "stream_c1_new_keyed",
            "chat_c1_turn10",
            "stream_c1_turn10",
            "chat_c32_new",
            "stream_c32_new",
            "chat_c32_turn10",
            "stream_c32_turn10",
            "cache_hit",
            "blocked_input",
        ),
        lambda entry, _: entry["auth_and_limits"]["cpu_ms_per_call"]["total"],
        0.5,
        "ms",
        needs=AUTH_PAIR,
    ),
    Target(
        "idempotency key: added p50 at c=1 ≤ 0.3 ms",
        ("stream_c1_new_keyed",),
        lambda entry, target: (_keyed(entry, target) or {}).get("p50_ms"),
        0.3,
        "ms",
        reason=lambda entry: (entry["idempotency_key_added"] or {}).get("reason"),
    ),
    Target(
        "TLS adds ≤ 0.3 ms p50 at c=1",
        ("stream_c1_new",),
        lambda entry, _: entry["tls_added"]["p50_ms"],
        0.3,
        "ms",
        needs=TLS_PAIR,
    ),
)


def _evaluate(target: Target, entry: dict[str, Any], measured_target: str) -> dict[str, Any]:
    """The status (and figure, or reason) of one target in one case, read on `measured_target`."""
    row: dict[str, Any] = {"measured": None}
    failed = [
        (name, stats)
        for name, stats in ((name, entry["targets"][name]) for name in target.needs or (measured_target,))
        if stats is not None and (stats["unexpected"] or not stats["calls"])
    ]
    if not entry["available"]:
        row["status"] = "not available"
        row["reason"] = entry["reason"]
    elif failed:
        row["status"] = "not measured"
        row["reason"] = "; ".join(
            f"{stats['unexpected']} of {stats['calls']} {name} replies were not {entry['expect']}"
            for name, stats in failed
        )
    else:
        measured = target.measure(entry, measured_target)
        row["measured"] = measured
        if measured is None:
            row["status"] = "not measured"
            reason = target.reason(entry) if target.reason else None
            if reason:
                row["reason"] = reason
        else:
            met = measured <= target.limit if target.at_most else measured >= target.limit
            row["status"] = "met" if met else "not met"
    return row


def evaluate_targets(cases: list[dict[str, Any]], processes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target, case and configuration (None for the targets of a difference); a case that a run of
    chosen cases (--cases) left out has no rows."""
    by_name = {entry["name"]: entry for entry in cases}
    rows = []

    def add(target: Target, name: str, configuration: str | None, measured_target: str) -> None:
        rows.append(
            {
                "target": target.statement,
                "case": name,
                "configuration": configuration,
                "limit": target.limit,
                "unit": target.unit,
                **_evaluate(target, by_name[name], measured_target),
            }
        )

    for target in CONFIGURATION_TARGETS:
        for name in target.cases:
            if name in by_name:
                for configuration, measured_target in CONFIGURATIONS.items():
                    add(target, name, configuration, measured_target)
    for configuration, measured_target in CONFIGURATIONS.items():
        for process in processes.values():
            if process["target"] != measured_target:
                continue
            peak = process["rss_peak_mib"]
            rows.append(
                {
                    "target": RSS_TARGET,
                    "case": f"process {process['kind']}, whole run",
                    "configuration": configuration,
                    "limit": RSS_LIMIT_MIB,
                    "unit": "MiB",
                    "measured": peak,
                    "status": "met" if peak <= RSS_LIMIT_MIB else "not met",
                }
            )
    for target in DIFFERENCE_TARGETS:
        for name in target.cases:
            if name in by_name:
                add(target, name, None, "chatmesh")
    return rows


# Markdown.


def _fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _redis_calls(stats: dict[str, Any], kind: str) -> str:
    return _fmt((stats.get("redis_per_call") or {}).get(kind), 1)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# Issue 13: building a turn's window at 20 stored messages.
WINDOW_TARGET_MS = 0.3
# Issue 16: safety's PII screen on a message under 2,000 characters.
PII_TARGET_MS = 0.2


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    chatmesh_processes = report["chatmesh_processes"]
    auth = run.get("auth") or {}
    lines = [
        f"# chatmesh benchmark: {run['date']}, commit {run['commit']}"
        + (" (with uncommitted changes)" if run["dirty"] else ""),
        "",
        f"Mode `{run['mode']}`: {run['rounds']} rounds per case, targets alternating within each round. "
        f"modelsim with zero latency and {run['reply_tokens']}-token replies; "
        f"chatmesh processes measured: {', '.join(chatmesh_processes)}. "
        f"**chatmesh**: {auth.get('chatmesh', 'the default configuration')}; "
        f"chatmesh_open: {auth.get('chatmesh_open', '-')}; "
        f"chatmesh_tls: {auth.get('chatmesh_tls', '-')}; "
        f"run: {auth.get('run', '-')}. {run.get('tls', '')} "
        "chatmesh and chatmesh_open share one Redis over plaintext; chatmesh_tls has its own, over TLS; run has none. "
        "Every cluster is measured apart. "
        f"{run['cpus']} CPUs, Python {run['python']}, grpcio {run['grpcio']}; "
        f"load average {run['loadavg_before']} before, {run['loadavg_after']} after; {run['duration_seconds']:.0f} s. "
        f"modelsim served {run['modelsim_stats'].get('requests', 0)} chat and "
        f"{run['modelsim_stats'].get('moderation_requests', 0)} moderation requests.",
        "",
        "## Latency and throughput",
        "",
    ]
    rows = []
    unavailable = []
    for entry in report["cases"]:
        if not entry["available"]:
            unavailable.append(entry)
            continue
        for target in TABLE_TARGETS:
            stats = entry["targets"].get(target)
            if stats is None:
                continue
            ttfd = stats["ttfd_ms"] or {}
            failures = stats["errors"] + stats["unexpected"]
            rows.append(
                (
                    f"{entry['name']}" if target == "chatmesh" else "",
                    f"**{target}**" if target == "chatmesh" else target,
                    f"{stats['calls']}" + (f" ({failures} failed)" if failures else ""),
                    _fmt(stats["latency_ms"]["p50"]),
                    _fmt(stats["latency_ms"]["p90"]),
                    _fmt(stats["latency_ms"]["p99"]),
                    _fmt(ttfd.get("p50")),
                    _fmt(ttfd.get("p99")),
                    _fmt(stats["rps"], 0),
                )
            )
    for entry in unavailable:
        rows.append((entry["name"], f"not available: {entry['reason']}", "", "", "", "", "", "", ""))
    lines += _table(("case", "target", "calls", "p50 ms", "p90 ms", "p99 ms", "TTFD p50", "TTFD p99", "req/s"), rows)

    lines += ["", "## What chatmesh adds over the baselines (same case, same run)", ""]
    rows = []
    for entry in report["cases"]:
        if not entry["available"]:
            continue
        floor, sdk = entry["added"]["floor"] or {}, entry["added"]["sdk"] or {}
        rows.append(
            (
                entry["name"],
                _fmt(floor.get("p50_ms"), signed=True),
                _fmt(floor.get("p99_ms"), signed=True),
                _fmt(floor.get("ttfd_p50_ms"), signed=True),
                _fmt(sdk.get("p50_ms"), signed=True),
                _fmt(sdk.get("p99_ms"), signed=True),
                _ratio(floor.get("rps_ratio")),
                _ratio(sdk.get("rps_ratio")),
            )
        )
    lines += _table(
        (
            "case",
            "p50 vs floor",
            "p99 vs floor",
            "TTFD p50 vs floor",
            "p50 vs sdk",
            "p99 vs sdk",
            "req/s ÷ floor",
            "req/s ÷ sdk",
        ),
        rows,
    )

    lines += [
        "",
        "## What authentication and limits add (chatmesh minus chatmesh_open, same case, same run)",
        "",
    ]
    rows = []
    for entry in report["cases"]:
        if not entry["available"]:
            continue
        added = entry["auth_and_limits"] or {}
        cpu = added.get("cpu_ms_per_call") or {}
        rows.append(
            (
                entry["name"],
                _fmt(added.get("p50_ms"), signed=True),
                _fmt(added.get("p99_ms"), signed=True),
                _fmt(added.get("ttfd_p50_ms"), signed=True),
                _ratio(added.get("rps_ratio")),
                _fmt(entry["cpu_ms_per_call"]["total"]),
                _fmt(entry["cpu_ms_per_call_open"]["total"]),
                f"**{_fmt(cpu.get('total'), signed=True)}**",
                *(_fmt(cpu.get(name), signed=True) for name in chatmesh_processes),
                _fmt(added.get("redis_cpu_ms_per_call"), signed=True),
                " / ".join(_redis_calls(entry["targets"][target], "commands") for target in AUTH_PAIR),
                " / ".join(_redis_calls(entry["targets"][target], "scripts") for target in AUTH_PAIR),
            )
        )
    lines += _table(
        (
            "case",
            "p50",
            "p99",
            "TTFD p50",
            "req/s ÷ open",
            "chatmesh CPU",
            "chatmesh_open CPU",
            "added CPU",
            *(f"{name} CPU" for name in chatmesh_processes),
            "Redis CPU",
            "Redis commands (chatmesh / open)",
            "of them scripts",
        ),
        rows,
    )
    lines += [
        "",
        "Latencies and CPU in ms per call; CPU summed over the chatmesh processes of each cluster (the added CPU "
        "of each process next to it). Redis CPU is the redis-servers' during each target's own windows, "
        "not in the chatmesh totals. Redis commands per call count those that Lua scripts run; 'of them scripts' "
        "counts the scripts (EVALSHA) themselves.",
    ]
    lines += _tls_section(report)
    lines += _idempotency_key_section(report)

    lines += ["", "## CPU per call (ms) and memory (MiB) of chatmesh", ""]
    rows = []
    for entry in report["cases"]:
        if not entry["available"]:
            continue
        cpu = entry["cpu_ms_per_call"]
        chatmesh, sdk = entry["targets"]["chatmesh"], entry["targets"].get("sdk")
        rows.append(
            (
                entry["name"],
                *(_fmt(cpu.get(name)) for name in chatmesh_processes),
                f"**{_fmt(cpu['total'])}**",
                _fmt(chatmesh["process_cpu_ms_per_call"].get("modelsim")),
                _fmt(redis_cpu_ms_per_call(chatmesh)),
                _fmt(chatmesh["client_cpu_ms_per_call"]),
                _fmt(sdk["client_cpu_ms_per_call"]) if sdk else "-",
                *(
                    f"{entry['rss_mib'][name]['idle']:.0f} → {entry['rss_mib'][name]['peak']:.0f}"
                    for name in chatmesh_processes
                ),
                _fmt(entry["other_load_cores"]),
            )
        )
    lines += _table(
        (
            "case",
            *(f"{name} CPU" for name in chatmesh_processes),
            "chatmesh CPU",
            "modelsim CPU",
            "Redis CPU",
            "client CPU (chatmesh)",
            "client CPU (sdk)",
            *(f"{name} RSS idle → peak" for name in chatmesh_processes),
            "other load (cores)",
        ),
        rows,
    )

    lines += [
        "",
        "Other load: cores kept busy by work outside the benchmark while the case ran. Well above 0, the machine "
        "was shared and absolute figures (req/s above all) are disturbed; the baselines were disturbed alike.",
    ]

    window = report.get("window")
    if window:
        met = "✅ met" if window["cpu_ms_per_build"] <= WINDOW_TARGET_MS else "❌ not met"
        lines += [
            "",
            "## Building the window (dialogue, in the bench's own process)",
            "",
            f"{window['cpu_ms_per_build']:.3f} ms of CPU per window at {window['stored_messages']} stored messages "
            f"({window['prompt_tokens']} prompt tokens; {window['builds']} builds, each counting its new message "
            f"and reading the stored messages' counts): target ≤ {WINDOW_TARGET_MS} ms, {met}.",
        ]

    pii = report.get("pii")
    if pii:
        met = "✅ met" if pii["cpu_ms_per_message"] <= PII_TARGET_MS else "❌ not met"
        lines += [
            "",
            "## The PII screen (safety, in the bench's own process)",
            "",
            f"PII screen ≤ {PII_TARGET_MS} ms CPU per message under 2,000 characters: "
            f"{pii['cpu_ms_per_message']:.3f} ms at most, {met} ({pii['screens']} screens of each message, every "
            "kind looked for).",
            "",
        ]
        lines += _table(
            ("message", "characters", "found", "CPU ms"),
            [
                (name, str(message["chars"]), str(message["found"]), f"{message['cpu_ms_per_message']:.3f}")
                for name, message in pii["messages"].items()
            ],
        )

    knowledge = report.get("knowledge")
    if knowledge:
        lines += _knowledge_section(knowledge)

    lines += _targets_section(report["targets"])

    failures = [
        (entry["name"], target, stats)
        for entry in report["cases"]
        if entry["available"]
        for target, stats in entry["targets"].items()
        if stats and (stats["errors"] or stats["unexpected"])
    ]
    if failures:
        lines += ["", "## Failed calls", ""]
        for name, target, stats in failures:
            kinds = ", ".join(f"{kind}: {count}" for kind, count in stats["error_kinds"].items())
            lines.append(
                f"- {name} / {target}: {stats['errors']} calls failed{f' ({kinds})' if kinds else ''}; "
                f"{stats['unexpected']} replies were not as expected"
            )
    return "\n".join(lines) + "\n"


def _shown(row: dict[str, Any]) -> str:
    """A target's figure and status in one cell."""
    measured = row["measured"]
    shown = "-" if measured is None else f"{measured:.2f} {row['unit']}".replace(" /s", "/s")
    status = row["status"]
    if status == "met":
        return f"{shown} ✅ met"
    if status == "not met":
        return f"{shown} ❌ not met"
    return f"{status}: {row['reason']}" if row.get("reason") else status


def _targets_section(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 19's targets, one column per configuration, then the targets of the differences."""
    lines = [
        "",
        "## Targets of issue 19, per configuration (added = the configuration's target minus the floor baseline of "
        "the same case)",
        "",
    ]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        if row["configuration"] is not None:
            cells.setdefault((row["target"], row["case"]), {})[row["configuration"]] = _shown(row)
    lines += _table(
        ("target", "case", *(f"{name} ({target})" for name, target in CONFIGURATIONS.items())),
        [(target, case, *(shown.get(name, "-") for name in CONFIGURATIONS)) for (target, case), shown in cells.items()],
    )
    lines += [
        "",
        "run: `make run`'s defaults (every store in memory, no Redis, authentication off, no TLS, moderation off "
        "as with the simulator's key). chart: the Helm chart's defaults as far as one machine can run them (see "
        "run.configurations in the JSON for what differs). CPU sums every chatmesh process of the configuration's "
        "cluster; RSS is each of them at its peak over the whole run.",
        "",
        "## Targets of authentication and limits (chatmesh minus chatmesh_open), of the idempotency key (chatmesh "
        "with a key minus without) and of TLS (chatmesh_tls minus chatmesh)",
        "",
    ]
    lines += _table(
        ("target", "case", "measured"),
        [(row["target"], row["case"], _shown(row)) for row in rows if row["configuration"] is None],
    )
    return lines


def _knowledge_section(knowledge: dict[str, Any]) -> list[str]:
    """Issue 18's target (retrieval alone, in the bench's process) and a grounded turn end to end."""
    retrieval = knowledge["retrieval"]
    met = "✅ met" if retrieval["p50_ms"] <= retrieval["target_ms"] else "❌ not met"
    first = retrieval["sizes"][0]
    lines = [
        "",
        "## Knowledge-base retrieval (dialogue's Retriever in the bench's own process, and a grounded turn)",
        "",
        f"Retrieval adds ≤ {retrieval['target_ms']:g} ms p50 to a turn with {retrieval['chunks']:,} chunks: "
        f"**{retrieval['p50_ms']:.3f} ms** p50 (p90 {retrieval['p90_ms']:.3f} ms, p99 {first['p99_ms']:.3f} ms) at "
        f"{retrieval['dimensions']} dimensions, {met} ({first['searches']} searches of one knowledge base, already "
        "loaded: the question's vector against every chunk's, BM25 over its words, fused; loading it took "
        f"{first['load_ms']:.0f} ms).",
    ]
    turns = knowledge.get("turns")
    if not turns:
        return lines
    grounded, plain = turns["grounded"], turns["plain"]
    lines += [
        "",
        f"A grounded turn end to end: chatmesh_open, StreamChat at c=1 in a new conversation, {grounded['calls']} "
        f"calls naming a knowledge base of {turns['chunks']:,} chunks ({turns['documents']} Markdown documents "
        f"ingested through KnowledgeService in {turns['ingest_seconds']:.1f} s) alternating with "
        f"{plain['calls']} without, in ms:",
        "",
    ]
    lines += _table(
        ("calls", "p50", "p90", "p99", "TTFD p50"),
        [
            (
                name,
                _fmt(stats["p50_ms"]),
                _fmt(stats["p90_ms"]),
                _fmt(stats["p99_ms"]),
                _fmt(stats["ttfd_p50_ms"]),
            )
            for name, stats in (("grounded", grounded), ("without knowledge bases", plain))
        ]
        + [
            (
                "**added**",
                f"**{_fmt(turns['added_p50_ms'], signed=True)}**",
                _fmt(turns["added_p90_ms"], signed=True),
                "-",
                _fmt(turns["added_ttfd_p50_ms"], signed=True),
            )
        ],
    )
    embedding = turns.get("embedding_mean_ms")
    lines += [
        "",
        "What a grounded turn adds beyond the retrieval: the question's embedding, a round trip to the embedding "
        f"endpoint (modelsim's here{f': {embedding:.2f} ms on average' if embedding is not None else ''}; a "
        "provider's takes tens of milliseconds), and the sources in a longer prompt. "
        f"{turns['cited_share']:.0%} of the grounded replies cited a source. The first grounded turn after "
        f"ingestion, which loads the knowledge base into dialogue, took {turns['first_turn_ms']:.0f} ms.",
    ]
    return lines


def _tls_section(report: dict[str, Any]) -> list[str]:
    """What TLS adds: chatmesh_tls minus chatmesh in every case, in latency and CPU per call."""
    chatmesh_processes = report["chatmesh_processes"]
    lines = ["", "## What TLS adds (chatmesh_tls minus chatmesh, same case, same run)", ""]
    rows = []
    for entry in report["cases"]:
        if not entry["available"]:
            continue
        added = entry["tls_added"] or {}
        cpu = added.get("cpu_ms_per_call") or {}
        rows.append(
            (
                entry["name"],
                f"**{_fmt(added.get('p50_ms'), signed=True)}**",
                _fmt(added.get("p99_ms"), signed=True),
                _fmt(added.get("ttfd_p50_ms"), signed=True),
                _ratio(added.get("rps_ratio")),
                _fmt(entry["cpu_ms_per_call"]["total"]),
                _fmt(entry["cpu_ms_per_call_tls"]["total"]),
                f"**{_fmt(cpu.get('total'), signed=True)}**",
                *(_fmt(cpu.get(name), signed=True) for name in chatmesh_processes),
            )
        )
    lines += _table(
        (
            "case",
            "p50",
            "p99",
            "TTFD p50",
            "req/s ÷ chatmesh",
            "chatmesh CPU",
            "chatmesh_tls CPU",
            "added CPU",
            *(f"{name} CPU" for name in chatmesh_processes),
        ),
        rows,
    )
    lines += [
        "",
        "chatmesh_tls is chatmesh (same modelsim, a tenant with the same limits, an API key on every call) with "
        "TLS on, as the chart's default runs it: on every gRPC port (the load generator to the gateway with the "
        "gateway's public certificate and no client certificate, mutual TLS between the chatmesh processes), and "
        "to a Redis of its own that serves TLS only (rediss://, a username and password). Every connection is "
        "reused, so handshakes happen in the warm-up; what is measured is encrypting and decrypting each call on "
        "every hop. modelsim stays plaintext. Latencies and CPU in ms per call, CPU summed over each cluster's "
        "chatmesh processes (the "
        "added CPU of each process next to it). The chatmesh_tls processes are reported as `tls-<name>`.",
    ]
    return lines


def _idempotency_key_section(report: dict[str, Any]) -> list[str]:
    """What an idempotency key adds: in each keyed case, the calls with a key minus the same calls without one, on
    chatmesh and chatmesh_open."""
    keyed = [entry for entry in report["cases"] if entry.get("idempotency_key") and entry["available"]]
    if not keyed:
        return []
    chatmesh_processes = report["chatmesh_processes"]
    cpu_of = {"chatmesh": "cpu_ms_per_call", "chatmesh_open": "cpu_ms_per_call_open"}
    lines = [
        "",
        "## What an idempotency key adds (calls with a key minus the same calls without one, same case, same rounds)",
        "",
    ]
    rows = []
    notes = []
    for entry in keyed:
        added = entry["idempotency_key_added"] or {}
        if added.get("reason"):
            notes.append(f"{entry['name']}: {added['reason']}.")
        for target in UNKEYED:
            difference = added.get(target) or {}
            cpu = difference.get("cpu_ms_per_call") or {}
            rows.append(
                (
                    f"{entry['name']}: with key minus without" if target == "chatmesh" else "",
                    f"**{target}**" if target == "chatmesh" else target,
                    f"**{_fmt(difference.get('p50_ms'), signed=True)}**"
                    if target == "chatmesh"
                    else _fmt(difference.get("p50_ms"), signed=True),
                    _fmt(difference.get("p99_ms"), signed=True),
                    _fmt(difference.get("ttfd_p50_ms"), signed=True),
                    _ratio(difference.get("rps_ratio")),
                    _fmt((entry.get(cpu_of[target]) or {}).get("total")),
                    _fmt((difference.get("cpu_ms_per_call_without_key") or {}).get("total")),
                    _fmt(cpu.get("total"), signed=True),
                    *(_fmt(cpu.get(name), signed=True) for name in chatmesh_processes),
                    _fmt(difference.get("redis_cpu_ms_per_call"), signed=True),
                    _fmt(difference.get("redis_commands_per_call"), 1, signed=True),
                    _fmt(difference.get("redis_scripts_per_call"), 1, signed=True),
                )
            )
    lines += _table(
        (
            "case",
            "target",
            "p50",
            "p99",
            "TTFD p50",
            "req/s ÷ without",
            "CPU with key",
            "CPU without",
            "added CPU",
            *(f"{name} CPU" for name in chatmesh_processes),
            "Redis CPU",
            "Redis commands",
            "Redis scripts",
        ),
        rows,
    )
    lines += [
        "",
        "Each call with a key sends a fresh `idempotency_key` (uuid4 hex), so dialogue claims every turn in Redis "
        "before running it (one Lua script more) and commits it together with its replay record. In every round "
        "of a keyed case, each chatmesh target also runs the same calls without a key against the same cluster "
        "(targets chatmesh_unkeyed and chatmesh_open_unkeyed), right next to its keyed calls, which of the two "
        "goes first alternating round by round, each with its own CPU and Redis windows: the machine's drift hits "
        "both alike. Latencies and CPU in ms per call, CPU summed over each cluster's chatmesh processes; Redis "
        "CPU, commands and scripts per call as above. The target reads the **chatmesh** row; chatmesh_open's (no "
        "authentication and limits) is a second reading of the same difference. Nothing is added when no key is "
        "sent: no claim is made without one, and every other case of this report sends none, so their figures "
        "(and the targets read from them) are those of calls without a key.",
        *(["", *notes] if notes else []),
    ]
    return lines


# The plot.


def plot(report: dict[str, Any], samples: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One panel per case: the latency distribution (ECDF, log scale) of chatmesh and each baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    entries = report["cases"]
    columns = 4
    rows = math.ceil(len(entries) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colors = {
        "chatmesh": "tab:blue",
        "chatmesh_open": "tab:green",
        "chatmesh_tls": "tab:purple",
        "run": "tab:red",
        "floor": "tab:gray",
        "sdk": "tab:orange",
        "chatmesh_unkeyed": "tab:cyan",
        "chatmesh_open_unkeyed": "tab:olive",
    }
    for axis, entry in zip(axes.flat, entries, strict=False):
        axis.set_title(f"{entry['name']}\n{entry['description']}", fontsize=9)
        if not entry["available"]:
            axis.text(0.5, 0.5, f"not available:\n{entry['reason']}", ha="center", va="center", wrap=True, fontsize=8)
            axis.set_axis_off()
            continue
        for target, latencies in samples.get(entry["name"], {}).items():
            if not latencies:
                continue
            ordered = sorted(latency * 1000 for latency in latencies)
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            p50 = percentile(ordered, 50)
            axis.step(ordered, fractions, where="post", color=colors[target], label=f"{target} (p50 {p50:.2f} ms)")
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel("latency, ms (log)", fontsize=8)
        axis.set_ylabel("fraction of calls", fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=7, loc="lower right")
    for axis in list(axes.flat)[len(entries) :]:
        axis.set_axis_off()
    run = report["run"]
    figure.suptitle(
        f"chatmesh vs calling modelsim directly: {run['date']} {run['commit']} ({run['mode']})", fontsize=11
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
