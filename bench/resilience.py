"""The resilience run (issue 14): chatmesh against two deployments of the model, one faulty (429s, 500s and hangs)
and one healthy, each with its own keys, at high concurrency: how many turns succeed, whether any is committed
twice or half, what the faults add to latency against the same cluster without them, and how the calls spread
over deployments and keys.

Usage: python -m bench.resilience [--turns N] [--concurrency N] [--out-dir DIR]
(`make bench` runs it after the main benchmark.) The integration test tests/integration/test_resilience_run.py
runs the same `resilience_run`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
import yaml

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "gpt-4o-mini"
# The faulty deployment, as the issue sets it; the healthy one has none.
FAULTS = {"error_429_rate": 0.20, "error_500_rate": 0.10, "hang_rate": 0.02}
KEYS = {"faulty": ("RESILIENCE_KEY_A1", "RESILIENCE_KEY_A2"), "healthy": ("RESILIENCE_KEY_B1", "RESILIENCE_KEY_B2")}
# A hung deployment is abandoned after this long without a first token.
FIRST_TOKEN_TIMEOUT_SECONDS = 1.0
CALL_SECONDS = 30.0


@dataclass
class Phase:
    """One pass of `turns` new conversations: latencies of the turns that succeeded, and the failures by code."""

    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    # (conversation id, user id) of each turn that succeeded.
    conversations: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, turns: int) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "turns": turns,
            "succeeded": len(self.latencies),
            "success_rate": len(self.latencies) / turns,
            "failures": self.failures,
            "p50_ms": round(1000 * statistics.median(ordered), 2) if ordered else None,
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2) if ordered else None,
        }


def deployments_file(directory: Path, ports: list[int]) -> Path:
    """The deployments file: gpt-4o-mini on the faulty deployment (first, weighted like the other) and the healthy
    one, two keys each, taken from environment variables."""
    path = directory / "deployments.yaml"
    entries = [
        {
            "name": name,
            "base_url": f"http://127.0.0.1:{port}/v1",
            "keys": [{"env": variable} for variable in KEYS[name]],
            "weight": 1,
            "first_token_timeout_seconds": FIRST_TOKEN_TIMEOUT_SECONDS,
        }
        for name, port in zip(("faulty", "healthy"), ports, strict=True)
    ]
    path.write_text(yaml.safe_dump({"models": {MODEL: {"deployments": entries}}}), encoding="utf-8")
    return path


async def run_phase(target: str, turns: int, concurrency: int) -> Phase:
    """`turns` first turns of new conversations, `concurrency` at a time, each Chat bounded by CALL_SECONDS."""
    phase = Phase()
    queue = iter(range(turns))

    async def worker(stub: chat_pb2_grpc.ChatServiceStub) -> None:
        for number in queue:
            user_id = f"resilience-{number % 50}"
            request = chat_pb2.ChatRequest(
                user_id=user_id,
                message=f"resilience {number} {uuid.uuid4().hex}",
                idempotency_key=uuid.uuid4().hex,
            )
            started = time.perf_counter()
            try:
                response = await stub.Chat(request, timeout=CALL_SECONDS)
            except grpc.aio.AioRpcError as error:
                phase.failures[error.code().name] = phase.failures.get(error.code().name, 0) + 1
                continue
            phase.latencies.append(time.perf_counter() - started)
            phase.conversations.append((response.conversation_id, user_id))

    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(concurrency)))
    return phase


async def committed_once(target: str, phase: Phase) -> dict[str, int]:
    """How many successful turns' conversations hold exactly their one turn (two messages), and how many do not."""
    whole = other = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for conversation_id, user_id in phase.conversations:
            response = await stub.GetConversation(
                chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id=user_id), timeout=CALL_SECONDS
            )
            messages = response.conversation.messages
            if len(messages) == 2 and messages[0].role == chat_pb2.ROLE_USER and messages[1].content:
                whole += 1
            else:
                other += 1
    return {"one_whole_turn": whole, "anything_else": other}


async def resilience_run(support: Any, turns: int, concurrency: int) -> dict[str, Any]:
    """Starts a cluster (Redis for conversations) against two modelsim deployments, runs `turns` without faults,
    then `turns` with the faulty deployment's faults on, and reports both."""
    redis_server = support.RedisServer.start()
    directory = Path(tempfile.mkdtemp(prefix="chatmesh-resilience-"))
    cluster = None
    try:
        cluster = support.Cluster(
            redis_url=redis_server.url,
            modelsim_deployments=[{"reply_tokens": 20}, {"reply_tokens": 20}],
            env={variable: f"sk-{variable.lower()}" for variables in KEYS.values() for variable in variables},
        )
        # Every process reads the cluster's environment when it starts.
        cluster.env["CHATMESH_MODEL_DEPLOYMENTS_FILE"] = str(deployments_file(directory, cluster.modelsim_ports))
        cluster.start()
        target = cluster.gateway_target
        await run_phase(target, 2 * concurrency, concurrency)  # warm-up: connections, encodings, caches
        clean = await run_phase(target, turns, concurrency)
        cluster.sim_config_at(0, **FAULTS)
        # At 2 %, the faulty deployment's share of a short run (about 170 requests of 2,000 turns) draws no hang
        # about once in 25 runs: one is queued, so that every run meets a hang.
        cluster.sim_faults_at(0, status="hang", count=1)
        before = [cluster.sim_stats_at(index) for index in range(2)]
        faulty = await run_phase(target, turns, concurrency)
        after = [cluster.sim_stats_at(index) for index in range(2)]
        cluster.sim_config_at(0, error_429_rate=0, error_500_rate=0, hang_rate=0)
        commits = await committed_once(target, faulty)
        usage = {
            name: {
                "requests": after[index]["requests"] - before[index]["requests"],
                "by_key": {
                    key: count - before[index].get("requests_by_key", {}).get(key, 0)
                    for key, count in after[index].get("requests_by_key", {}).items()
                },
                "hangs": after[index].get("hangs", 0) - before[index].get("hangs", 0),
                "errors_injected": after[index]["errors_injected"] - before[index]["errors_injected"],
            }
            for index, name in enumerate(("faulty", "healthy"))
        }
    finally:
        if cluster is not None:
            cluster.stop()
        redis_server.stop()
    without, with_faults = clean.summary(turns), faulty.summary(turns)
    return {
        "turns": turns,
        "concurrency": concurrency,
        "faults": FAULTS,
        "first_token_timeout_seconds": FIRST_TOKEN_TIMEOUT_SECONDS,
        "without_faults": without,
        "with_faults": with_faults,
        "added_p50_ms": _difference(with_faults["p50_ms"], without["p50_ms"]),
        "added_p99_ms": _difference(with_faults["p99_ms"], without["p99_ms"]),
        "commits": commits,
        "deployments": usage,
    }


def _difference(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or baseline is None else round(value - baseline, 2)


def markdown(report: dict[str, Any]) -> str:
    faulty, clean = report["with_faults"], report["without_faults"]
    lines = [
        f"# chatmesh resilience run: {report['date']}, commit {report['commit']}",
        "",
        f"{report['turns']} first turns at c={report['concurrency']} against two deployments of {MODEL}: one with "
        f"{report['faults']['error_429_rate']:.0%} 429s, {report['faults']['error_500_rate']:.0%} 500s and "
        f"{report['faults']['hang_rate']:.0%} hangs (abandoned after {report['first_token_timeout_seconds']} s "
        "without a first token), one healthy; two keys each. The same cluster ran the same turns without faults "
        "first.",
        "",
        "| run | succeeded | success rate | p50 ms | p99 ms | failures |",
        "|---|---|---|---|---|---|",
        f"| without faults | {clean['succeeded']} | {clean['success_rate']:.2%} | {clean['p50_ms']} | "
        f"{clean['p99_ms']} | {clean['failures'] or '-'} |",
        f"| with faults | {faulty['succeeded']} | {faulty['success_rate']:.2%} | {faulty['p50_ms']} | "
        f"{faulty['p99_ms']} | {faulty['failures'] or '-'} |",
        "",
        f"Added by the faults: {report['added_p50_ms']} ms p50, {report['added_p99_ms']} ms p99. Conversations of the "
        f"turns that succeeded: {report['commits']['one_whole_turn']} hold exactly their one turn, "
        f"{report['commits']['anything_else']} anything else (a turn committed twice or half). Target: ≥ 99.9 % "
        f"succeed: {'✅ met' if faulty['success_rate'] >= 0.999 else '❌ not met'}.",
        "",
        "| deployment | requests | injected errors | hangs | requests by key |",
        "|---|---|---|---|---|",
    ]
    for name, usage in report["deployments"].items():
        by_key = ", ".join(f"{key}: {count}" for key, count in sorted(usage["by_key"].items()))
        lines.append(f"| {name} | {usage['requests']} | {usage['errors_injected']} | {usage['hangs']} | {by_key} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.resilience", description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import support.cluster
    import support.redis_server

    support_api = argparse.Namespace(Cluster=support.cluster.Cluster, RedisServer=support.redis_server.RedisServer)
    report = uvloop.run(resilience_run(support_api, args.turns, args.concurrency))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip()
    report.update(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"), commit=commit)
    stem = f"{report['date']}-{commit}-resilience"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out_dir / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
