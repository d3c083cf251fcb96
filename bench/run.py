"""`make bench`: what chatmesh adds over calling the model directly, in latency, throughput, CPU and memory.

It starts the cluster the integration tests start (tests/support/cluster.py: every chatmesh process
plus modelsim, default configuration, free loopback ports), sets modelsim to zero latency and a fixed
reply length, and runs each case of bench/cases.py against chatmesh and against two baselines that
call modelsim directly (floor: lean aiohttp + minimal SSE parser; sdk: the openai SDK). The targets
alternate within each of several short rounds, so that the machine's noise hits all of them alike.

Usage: python -m bench [--mode full|quick|tiny] [--rounds N] [--reply-tokens N] [--cases a,b] [--out-dir DIR]
       [--profile SECONDS [--profile-case NAME]]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import uvloop

from bench.cases import CASES, Case, Expect, Message, preparation_message, question
from bench.clients import ChatmeshClient, FloorClient, Sample, SdkClient
from bench.loadgen import Segment, run_segment
from bench.procstat import CpuMeter, RssMonitor
from bench.profile import markdown as profile_markdown
from bench.report import (
    TARGET_NAMES,
    added_over,
    case_header,
    empty_case,
    evaluate_targets,
    markdown,
    plot,
    target_stats,
)
from chatmesh.runtime.settings import MODELSIM_API_KEY

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Processes of the cluster that are not chatmesh: measured, but not counted as chatmesh's cost.
MODEL_PROCESSES = frozenset({"modelsim"})
PREPARATION_CONCURRENCY = 32
USERS = 100


@dataclass(frozen=True, slots=True)
class Mode:
    """How long each target runs per round: until `count` calls have started or `seconds` have passed."""

    rounds: int
    seconds: float  # at concurrency 1
    seconds_concurrent: float  # at higher concurrency
    count: int
    count_concurrent: int
    # Calls per round in the turn-10 cases: each needs a conversation prepared with nine turns.
    turn_count: int
    turn_count_concurrent: int
    warmup: int

    def bounds(self, case: Case) -> tuple[int, float]:
        single = case.concurrency == 1
        if case.turn > 1:
            count = self.turn_count if single else self.turn_count_concurrent
        else:
            count = self.count if single else self.count_concurrent
        return count, self.seconds if single else self.seconds_concurrent


MODES = {
    # 3.5 to 4.5 minutes on 2 cores (more on a busy machine), a third of it preparing conversations for
    # the turn-10 cases.
    "full": Mode(5, 1.0, 1.6, 400, 2000, 40, 80, 200),
    # 35 to 50 seconds; its c=32 turn-10 throughput comes from too few calls to mean much.
    "quick": Mode(2, 0.4, 0.6, 120, 480, 10, 40, 32),
    # A few calls per case: for tests of the harness itself; its numbers mean nothing.
    "tiny": Mode(1, 2.0, 4.0, 4, 32, 3, 32, 4),
}


class _Cycle(list):
    """A list whose indexes wrap around."""

    def __getitem__(self, index: Any) -> Any:
        return super().__getitem__(index % len(self))


def _cluster_class() -> type:
    """The integration tests' launcher: which processes make up chatmesh is its business, not ours."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.cluster import Cluster

    return Cluster


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    )


def _commit() -> tuple[str, bool]:
    head = _git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "nocommit", True
    return head.stdout.strip(), _git("diff-index", "--quiet", "HEAD", "--").returncode != 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Bench:
    def __init__(self, cluster: Any, mode: Mode, reply_tokens: int) -> None:
        self.cluster = cluster
        self.mode = mode
        self.reply_tokens = reply_tokens
        # Every process the launcher started (the ones it only knows of have no pid).
        self.pids: dict[str, int] = {
            name: process.pid for name, process in cluster.processes.items() if process.pid is not None
        }
        self.chatmesh_processes = [name for name in self.pids if name not in MODEL_PROCESSES]
        self.rss = RssMonitor(self.pids)
        self.rss_at_start = self.rss.current_mib()
        self.chatmesh = ChatmeshClient(cluster.gateway_target)
        base_url, api_key = cluster.env["OPENAI_BASE_URL"], cluster.env["OPENAI_API_KEY"]
        self.floor = FloorClient(base_url, api_key)
        self.sdk = SdkClient(base_url, api_key)
        self.model = ""
        self.samples: dict[str, dict[str, list[float]]] = {}

    async def close(self) -> None:
        await self.rss.stop()
        await asyncio.gather(self.chatmesh.close(), self.floor.close(), self.sdk.close())

    async def warm_up(self) -> None:
        """Opens connections and fills caches of imports and code paths in every process; not measured."""
        case = Case("warmup", "Chat", 32)
        self.model = await self.chatmesh.default_model()
        for send in (
            self._chatmesh_send(case, None),
            self._chatmesh_send(replace(case, rpc="StreamChat"), None),
            self._baseline_send("floor", case, None),
            self._baseline_send("sdk", case, None),
        ):
            segment = await run_segment(send, concurrency=32, count=self.mode.warmup, seconds=30)
            if segment.errors:
                raise RuntimeError(f"warm-up calls failed: {segment.error_kinds}")

    def _chatmesh_send(self, case: Case, pool: list[tuple[str, str]] | None) -> Callable[[int], Awaitable[Sample]]:
        call = self.chatmesh.stream_chat if case.rpc == "StreamChat" else self.chatmesh.chat

        def send(index: int) -> Awaitable[Sample]:
            if pool is None:
                return call("", f"bench-{index % USERS}", question(case, index), case.expect)
            conversation_id, user_id = pool[index]
            return call(conversation_id, user_id, question(case, index), case.expect)

        return send

    def _baseline_send(
        self, target: str, case: Case, window: list[dict[str, Any]] | None
    ) -> Callable[[int], Awaitable[Sample]]:
        client = self.floor if target == "floor" else self.sdk
        model = self.model

        def send(index: int) -> Awaitable[Sample]:
            message = {"role": "user", "content": question(case, index)}
            return client.stream_chat(model, [*window[:-1], message] if window else [message])

        return send

    async def _prepare(self, case: Case, count: int) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
        """`count` conversations with `case.turn - 1` turns each, plus the messages that dialogue sends the
        model at turn `case.turn` (read from modelsim after one unmeasured call), for the baselines."""
        pool: list[tuple[str, str]] = [("", "")] * (count + 1)
        indexes = iter(range(count + 1))

        async def worker() -> None:
            for index in indexes:
                user_id, conversation_id = f"bench-{index % USERS}", ""
                for turn in range(1, case.turn):
                    conversation_id = await self.chatmesh.chat_for_id(
                        conversation_id, user_id, preparation_message(case, index, turn)
                    )
                pool[index] = (conversation_id, user_id)

        await asyncio.gather(*(worker() for _ in range(PREPARATION_CONCURRENCY)))
        conversation_id, user_id = pool.pop()
        probe = question(case, -1)
        await self.chatmesh.chat_for_id(conversation_id, user_id, probe)
        for logged in reversed(self.cluster.sim_requests(limit=20)):
            messages = logged.get("messages") or [{}]
            if messages[-1].get("content") == probe:
                return pool, messages
        raise RuntimeError("modelsim did not log the call that reads the turn's context window")

    async def run_case(self, case: Case) -> dict[str, Any]:
        if not case.available:
            return empty_case(case)
        count, seconds = self.mode.bounds(case)
        pool, window = None, None
        preparation_started = time.perf_counter()
        if case.turn > 1:
            pool, window = await self._prepare(case, count * self.mode.rounds)
        if case.message is Message.REPEATED:
            await self._chatmesh_send(replace(case, expect=Expect.REPLY), None)(0)  # the miss that fills the cache
        sends = {
            "chatmesh": self._chatmesh_send(case, pool),
            **{name: self._baseline_send(name, case, window) for name in case.baselines},
        }
        meters = {name: CpuMeter(self.pids) for name in sends}
        segments: dict[str, list[Segment]] = {name: [] for name in sends}
        next_index = dict.fromkeys(sends, 0)
        order = list(sends)

        self.rss.checkpoint()  # the preparation's peak goes to the run's, not the case's
        idle = self.rss.current_mib()
        measure_started = time.perf_counter()
        for round_index in range(self.mode.rounds):
            shift = round_index % len(order)
            for name in order[shift:] + order[:shift]:
                gc.collect()
                meters[name].start()
                segment = await run_segment(
                    sends[name],
                    concurrency=case.concurrency,
                    count=count,
                    seconds=seconds,
                    first_index=next_index[name],
                )
                meters[name].stop()
                next_index[name] += segment.issued
                segments[name].append(segment)
        peak = self.rss.checkpoint()

        targets = {name: target_stats(segments[name], meters[name].seconds) for name in sends}
        chatmesh = targets["chatmesh"]
        cpu = {name: chatmesh["process_cpu_ms_per_call"][name] for name in self.chatmesh_processes}
        cpu["total"] = round(sum(value or 0 for value in cpu.values()), 3)
        self.samples[case.name] = {
            name: [sample.latency for segment in segments[name] for sample in segment.samples] for name in sends
        }
        # Cores kept busy by everything outside the benchmark (other work on a shared machine) while it ran.
        ours = sum(sum(meter.seconds.values()) for meter in meters.values()) + sum(
            segment.client_cpu_seconds for name in sends for segment in segments[name]
        )
        wall = sum(segment.wall_seconds for name in sends for segment in segments[name])
        other_load = (sum(meter.machine_seconds for meter in meters.values()) - ours) / wall if wall else None
        entry = case_header(case)
        entry.update(
            targets={name: targets.get(name) for name in TARGET_NAMES},
            added={name: added_over(chatmesh, targets[name]) if name in targets else None for name in ("floor", "sdk")},
            cpu_ms_per_call=cpu,
            rss_mib={name: {"idle": idle[name], "peak": peak[name]} for name in self.pids},
            turns=None if pool is None else {"measured_turn": case.turn, "model_messages": len(window or [])},
            other_load_cores=None if other_load is None else round(max(0.0, other_load), 2),
            bounds={"count_per_round": count, "seconds_per_round": seconds},
            preparation_seconds=round(measure_started - preparation_started, 2),
            measure_seconds=round(time.perf_counter() - measure_started, 2),
        )
        return entry

    async def profile(self, case: Case, seconds: float, out_prefix: Path) -> dict[str, str]:
        """Samples each chatmesh process with py-spy while `case` runs (after, not during, the measurements).
        Writes collapsed stacks per process; returns their paths."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        pool = None
        if case.turn > 1:
            # Conversations are reused here (turns 10, 11, ...): the window is full either way.
            prepared, _ = await self._prepare(case, 2 * case.concurrency)
            pool = _Cycle(prepared)
        paths = {name: f"{out_prefix}-profile-{name}.txt" for name in self.chatmesh_processes}
        spies = [
            await asyncio.create_subprocess_exec(
                str(spy),
                "record",
                "--pid",
                str(self.pids[name]),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, path in paths.items()
        ]
        await asyncio.sleep(0.5)
        await run_segment(
            self._chatmesh_send(case, pool), concurrency=case.concurrency, count=10**9, seconds=seconds + 1
        )
        await asyncio.gather(*(spy_process.wait() for spy_process in spies))
        return paths


async def measure(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]], Bench]:
    mode = MODES[args.mode]
    if args.rounds:
        mode = replace(mode, rounds=args.rounds)
    selected = [case for case in CASES if not args.cases or case.name in args.cases]
    commit, dirty = _commit()
    started = time.time()
    loadavg_before = _loadavg()
    # The simulator's own key, as `make run` uses it: the default configuration, where moderation ("auto") is
    # off because the simulator stands in for the provider.
    cluster = _cluster_class()(
        env={"CHATMESH_MODELSIM_REPLY_TOKENS": str(args.reply_tokens), "OPENAI_API_KEY": MODELSIM_API_KEY}
    )
    cluster.start()
    bench = None
    try:
        cluster.sim_config(reply_tokens=args.reply_tokens, first_token_latency_seconds=0, token_delay_seconds=0)
        bench = Bench(cluster, mode, args.reply_tokens)
        bench.rss.start()
        await bench.warm_up()
        gc.collect()
        gc.freeze()
        entries = []
        for case in selected:
            print(f"bench: {case.name} ({case.describe()})", file=sys.stderr, flush=True)
            entries.append(await bench.run_case(case))
        peaks = bench.rss.run_peak_mib()
        profile = None
        if args.profile:
            case = next(case for case in CASES if case.name == args.profile_case)
            profile = await bench.profile(case, args.profile, args.out_prefix)
        sim_stats = cluster.sim_stats()
    finally:
        if bench is not None:
            await bench.close()
        cluster.stop()

    processes = {
        name: {
            "chatmesh": name in bench.chatmesh_processes,
            "rss_idle_mib": bench.rss_at_start[name],
            "rss_peak_mib": peaks[name],
        }
        for name in bench.pids
    }
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "schema": 1,
        "run": {
            "date": now.strftime("%Y-%m-%d"),
            "finished_at": now.isoformat(timespec="seconds"),
            "commit": commit,
            "dirty": dirty,
            "mode": args.mode,
            "rounds": mode.rounds,
            "reply_tokens": args.reply_tokens,
            "model": bench.model,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "loadavg_before": loadavg_before,
            "loadavg_after": _loadavg(),
            "duration_seconds": round(time.time() - started, 1),
            "modelsim_stats": sim_stats,
            "profile": profile,
        },
        "chatmesh_processes": bench.chatmesh_processes,
        "processes": processes,
        "cases": entries,
        "targets": evaluate_targets(entries, processes),
    }
    return report, bench.samples, bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full", help="full (≤ 5 min), quick (< 1 min), tiny")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per case (default: the mode's)")
    parser.add_argument("--reply-tokens", type=int, default=50, help="tokens in each modelsim reply")
    parser.add_argument("--cases", type=lambda text: set(text.split(",")), default=None, help="only these cases")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="then py-spy each process")
    parser.add_argument(
        "--profile-case", default="stream_c32_new", choices=[case.name for case in CASES if case.available]
    )
    args = parser.parse_args(argv)
    if args.cases:
        unknown = args.cases - {case.name for case in CASES}
        if unknown:
            parser.error(f"unknown cases: {', '.join(sorted(unknown))}")

    commit, _ = _commit()
    stem = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}-{commit}" + ("" if args.mode == "full" else f"-{args.mode}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.out_prefix = args.out_dir / stem

    report, samples, _ = uvloop.run(measure(args))

    text = markdown(report)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (args.out_dir / f"{stem}.md").write_text(text)
    plot(report, samples, args.out_dir / f"{stem}.png")
    if args.mode == "full":
        (args.out_dir / "latest.md").write_text(text)
    print(text)
    if report["run"]["profile"]:
        profile_text = profile_markdown(report["run"]["profile"], args.profile_case)
        (args.out_dir / f"{stem}-profile.md").write_text(profile_text)
        print(profile_text)
    print(f"bench: wrote {args.out_dir / stem}.json, .md and .png", file=sys.stderr)
