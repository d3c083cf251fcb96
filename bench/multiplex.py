"""What multiplexed streams save (issue 19): dialogue's calls to safety and cache made as unary calls, and as messages
on long-lived streams (chatmesh.runtime.multiplex), against the same safety and cache processes in the same run.

Each turn makes the calls a first turn that misses the cache makes: ScreenInput and Lookup at once, then Store. This
process plays dialogue's part with dialogue's channels and stubs (metrics on, as in dialogue). Rounds alternate the
two ways, in a different order each round; the report gives, per way and concurrency, the CPU per turn of safety, of
cache and of this process, and the latency of a turn's calls, with the ratio multiplexed ÷ unary. Safety and cache
run with their defaults (Redis off, the PII screen on).

Usage: python -m bench.multiplex [--turns N] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop

from bench.procstat import cpu_seconds
from chatmesh.dialogue.main import cache_client, safety_client
from chatmesh.runtime import metrics
from chatmesh.runtime.channels import open_channel
from chatmesh.runtime.multiplex import Multiplexer
from chatmesh.runtime.settings import DialogueSettings
from chatmesh.v1 import cache_pb2, chat_pb2, safety_pb2

ROOT = Path(__file__).resolve().parent.parent
CALL_SECONDS = 10.0
WAYS = ("unary", "multiplexed")
QUESTION = "How do I reset my password? My order number is 20261204-7731 and I wrote on 4 December."


def _support() -> Any:
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import support.cluster
    import support.ports

    return support


class Calls:
    """Safety and cache stubs as dialogue builds them, one way."""

    def __init__(self, safety: Any, cache: Any, closers: list[Multiplexer | None]) -> None:
        self.safety = safety
        self.cache = cache
        self._closers = closers

    async def turn(self, index: int) -> None:
        context = cache_pb2.AnswerContext(
            tenant="bench",
            model="gpt-4o-mini",
            messages=[cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content=f"{QUESTION} ({uuid.uuid4().hex})")],
        )
        screen = self.safety.ScreenInput(
            safety_pb2.ScreenInputRequest(text=context.messages[0].content, request_id=f"bench-{index}"),
            timeout=CALL_SECONDS,
        )
        lookup = self.cache.Lookup(cache_pb2.LookupRequest(context=context), timeout=CALL_SECONDS)
        verdict, found = await asyncio.gather(screen, lookup)
        assert not verdict.verdict.blocked and not found.hit, "a turn must be allowed and miss the cache"
        reply = cache_pb2.CachedReply(text="Open Settings, then Security.", finish_reason=chat_pb2.FINISH_REASON_STOP)
        await self.cache.Store(
            cache_pb2.StoreRequest(context=context, reply=reply, user_id="bench-user", conversation_id=f"c-{index}"),
            timeout=CALL_SECONDS,
        )

    async def close(self) -> None:
        for closer in self._closers:
            if closer is not None:
                await closer.close()


def _calls(way: str, safety_target: str, cache_target: str) -> tuple[Calls, list[Any]]:
    settings = DialogueSettings(multiplex_streams=4 if way == "multiplexed" else 0)
    safety_channel, cache_channel = open_channel(safety_target, settings), open_channel(cache_target, settings)
    safety, safety_streams = safety_client(safety_channel, settings)
    cache, cache_streams = cache_client(cache_channel, settings)
    return Calls(safety, cache, [safety_streams, cache_streams]), [safety_channel, cache_channel]


async def _run(calls: Calls, turns: int, concurrency: int, latencies: list[float]) -> None:
    indexes = iter(range(turns))

    async def worker() -> None:
        for index in indexes:
            started = time.perf_counter()
            await calls.turn(index)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {**{name: cpu_seconds(pid) for name, pid in pids.items()}, "client": time.process_time()}


async def measure(turns: int, rounds: int, concurrencies: list[int]) -> dict[str, Any]:
    support = _support()
    log_dir = Path(tempfile.mkdtemp(prefix="chatmesh-bench-multiplex-"))
    processes = {}
    for name in ("safety", "cache"):
        port = support.ports.free_port()
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith("CHATMESH_")},
            "GRPC_VERBOSITY": "ERROR",
            "CHATMESH_BIND_HOST": "127.0.0.1",
            f"CHATMESH_{name.upper()}_PORT": str(port),
            f"CHATMESH_{name.upper()}_METRICS_PORT": str(support.ports.free_port()),
        }
        processes[name] = support.cluster.ServiceProcess(name, port, env, log_dir)
    metrics.serve_metrics(
        DialogueSettings(bind_host="127.0.0.1", dialogue_metrics_port=support.ports.free_port()), "dialogue"
    )
    # Per way and concurrency: CPU seconds per process and latencies, summed over rounds.
    totals: dict[tuple[str, int], dict[str, Any]] = {
        (way, c): {"cpu": dict.fromkeys(("safety", "cache", "client"), 0.0), "latencies": [], "turns": 0}
        for way in WAYS
        for c in concurrencies
    }
    try:
        for process in processes.values():
            process.start()
        pids = {name: process.pid for name, process in processes.items()}
        ways: dict[str, tuple[Calls, list[Any]]] = {
            way: _calls(way, f"127.0.0.1:{processes['safety'].port}", f"127.0.0.1:{processes['cache'].port}")
            for way in WAYS
        }
        for calls, _ in ways.values():  # warm-up: channels connected, streams open, code paths run once
            await _run(calls, 64, 8, [])
        for round_index in range(rounds):
            order = WAYS if round_index % 2 == 0 else tuple(reversed(WAYS))
            for concurrency in concurrencies:
                for way in order:
                    total = totals[way, concurrency]
                    before = _cpu(pids)
                    await _run(ways[way][0], turns, concurrency, total["latencies"])
                    after = _cpu(pids)
                    for name in total["cpu"]:
                        total["cpu"][name] += after[name] - before[name]
                    total["turns"] += turns
        for calls, channels in ways.values():
            await calls.close()
            for channel in channels:
                await channel.close()
    finally:
        for process in processes.values():
            process.stop()
    return _report(totals, concurrencies)


def _report(totals: dict[tuple[str, int], dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for concurrency in concurrencies:
        per_way = {}
        for way in WAYS:
            total = totals[way, concurrency]
            cpu_ms = {name: 1000 * seconds / total["turns"] for name, seconds in total["cpu"].items()}
            cpu_ms["sum"] = sum(cpu_ms.values())
            per_way[way] = {
                "turns": total["turns"],
                "cpu_ms_per_turn": {name: round(value, 3) for name, value in cpu_ms.items()},
                "latency_p50_ms": round(1000 * statistics.median(total["latencies"]), 3),
            }
        unary_cpu, multiplexed_cpu = per_way["unary"]["cpu_ms_per_turn"], per_way["multiplexed"]["cpu_ms_per_turn"]
        per_way["multiplexed_over_unary"] = {
            # None when too few turns ran for the process's CPU clock (10 ms ticks) to move.
            **{
                f"cpu_{name}": round(multiplexed_cpu[name] / unary_cpu[name], 3) if unary_cpu[name] else None
                for name in unary_cpu
            },
            "latency_p50": round(per_way["multiplexed"]["latency_p50_ms"] / per_way["unary"]["latency_p50_ms"], 3),
        }
        rows[f"c{concurrency}"] = per_way
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=400, help="turns per way, concurrency and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = uvloop.run(measure(args.turns, args.rounds, args.concurrency))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
