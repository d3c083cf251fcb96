"""`make bench`: what chatmesh adds over calling the model directly, in latency, throughput, CPU and memory, in
two configurations side by side, the Helm chart's defaults and `make run`'s; and what authentication and tenant
limits, and TLS, add.

It starts two real redis-servers (tests/support/redis_server.py; one plaintext, one TLS only) and four clusters of
the kind the integration tests start (tests/support/cluster.py: every chatmesh process, free loopback ports):

- chatmesh: the Helm chart's default configuration without TLS: CHATMESH_AUTH=required, an admin token, and a
  tenant created through the AdminService with every kind of limit set (far above what the run uses, so that every
  check runs on every call and none refuses); every call sends the tenant's API key. Tenants, usage,
  conversations and cache entries in that Redis, over plaintext. Moderation off (see below); PII screening
  with the chart's (and the settings') policy; no tracing (the chart sets no OTLP endpoint); logs at INFO. It also
  runs modelsim, set to zero latency and a fixed reply length.
- chatmesh_open: the same without authentication and limits: CHATMESH_AUTH=off and no key, so calls act as the
  tenant `default`, which has no limits. Same Redis. It calls the first cluster's modelsim. Its processes are
  reported as `open-<name>`.
- chatmesh_tls, the **chart** configuration of issue 19's targets: chatmesh plus TLS, as the chart's default runs it
  (tests/support/certificates.py makes the certificates): every gRPC port with TLS, mutual between the processes,
  the gateway's with a certificate of a public CA and no client certificate asked; and a Redis of its own that
  serves TLS only, with a username and password (the chart's bundled Redis with tls.enabled). Its own admin token,
  and a tenant of its own with the same limits; the client calls it on one TLS channel that every call reuses. It
  calls the first cluster's modelsim. Its processes are reported as `tls-<name>`, its Redis as `tls-redis`.
- run, the **run** configuration: `make run`'s defaults (`chatmesh up` with no settings): every store in the
  processes' memory (no Redis), CHATMESH_AUTH=off, no TLS, and moderation off ("auto" with the simulator's key).
  It calls the first cluster's modelsim. Its processes are reported as `run-<name>`.

What the chart's defaults do that this machine does not reproduce (listed in the report's run.configurations):
two replicas of each process behind Kubernetes Services (one process each here, dialed by address); a separate
cache Redis (the chart's cache.bundled; here the cache uses the data Redis, as the chart does without one); a
real provider behind moderation and the model (modelsim here, on loopback, with zero latency); and moderation,
which the chart turns on with a provider's key: issue 19's target configuration (keys and limits, TLS, PII
screening, Redis) leaves it out, since its cost is the provider's round trips.

Each case of bench/cases.py runs against all four, and against two baselines that call modelsim directly (floor:
lean aiohttp + minimal SSE parser; sdk: the openai SDK). The targets alternate within each of several short rounds,
so that the machine's noise hits all of them alike. What chatmesh adds is measured against the baselines: issue
19's targets are read for run and for chart (chatmesh_tls), each over the floor of the same case; what
authentication and limits add is chatmesh minus chatmesh_open; what TLS adds is chatmesh_tls minus chatmesh. What
an idempotency key adds is measured within a keyed case (stream_c1_new_keyed: a fresh key on every call, on every
chatmesh target, no baselines): in each of its rounds, chatmesh and chatmesh_open also run the same calls without a
key against the same cluster (chatmesh_unkeyed, chatmesh_open_unkeyed), and the key's cost is the one minus the
other; every other case sends no key.

Beside the cases, the report measures in this process what building a window (bench/window.py), the PII screen
(bench/pii.py) and knowledge-base retrieval (bench/knowledge.py) cost, and, after the cases, grounded turns against
the same turns without knowledge bases on chatmesh_open (bench/knowledge.py).

`--profile SECONDS` then samples each process of the chart cluster with `py-spy record --native` while
`--profile-case` runs (stream_c32_new by default). py-spy cannot read native stacks without stopping the process
it samples (it refuses --native with --nonblocking), so the profile pauses each process at every sample: its
latencies mean nothing, which is why it runs after the measurements.

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
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import redis
import uvloop

from bench import knowledge as knowledge_cost
from bench import pii as pii_cost
from bench import window as window_cost
from bench.cases import CASES, Case, Expect, Message, preparation_message, question
from bench.clients import (
    BENCH_LIMITS,
    BENCH_TENANT,
    BENCH_TLS_TENANT,
    ChatmeshClient,
    FloorClient,
    Sample,
    SdkClient,
    create_bench_tenant,
)
from bench.loadgen import Segment, run_segment
from bench.procstat import CpuMeter, RssMonitor
from bench.profile import markdown as profile_markdown
from bench.report import (
    CHATMESH_TARGETS,
    CONFIGURATIONS,
    TARGET_NAMES,
    UNKEYED,
    added_over,
    case_header,
    cluster_difference,
    empty_case,
    evaluate_targets,
    idempotency_key_added,
    markdown,
    plot,
    target_stats,
)
from chatmesh.runtime.settings import MODELSIM_API_KEY

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Processes of the cluster that are not chatmesh: measured, but not counted as chatmesh's cost.
MODEL_PROCESSES = frozenset({"modelsim"})
# How each cluster's processes are named in the report: chatmesh_open's `open-<process>`, chatmesh_tls's
# `tls-<process>`, run's `run-<process>`.
PROCESS_PREFIX = {"chatmesh": "", "chatmesh_open": "open-", "chatmesh_tls": "tls-", "run": "run-"}
# The cluster each target that calls chatmesh calls (an unkeyed target calls its keyed target's).
CLUSTER_OF = {**{target: target for target in CHATMESH_TARGETS}, **{unkeyed: t for t, unkeyed in UNKEYED.items()}}
# The order of those targets in a round (of those a case runs); reversed every other round. chatmesh runs right
# next to chatmesh_tls in every case: what TLS adds has the tightest target (0.3 ms).
CHATMESH_ORDER = ("run", "chatmesh_open", UNKEYED["chatmesh_open"], UNKEYED["chatmesh"], "chatmesh", "chatmesh_tls")
# The chart configuration's cluster, which --profile samples.
CHART = CONFIGURATIONS["chart"]
# How each configuration of issue 19's targets is run, and what of the chart's defaults one machine does not
# reproduce (values.yaml; those that change no request path, such as resources and probes, are left out).
CONFIGURATION_NOTES = {
    "run": {
        "target": CONFIGURATIONS["run"],
        "as": "`make run` (`chatmesh up` without settings): every store in memory, no Redis; CHATMESH_AUTH=off; no "
        "TLS; moderation off (auto, with the simulator's key); PII screening with the default policy; the cache on "
        "(exact answers of first turns only, no semantic cache); no tracing; logs at INFO",
    },
    "chart": {
        "target": CONFIGURATIONS["chart"],
        "as": "the chart's values.yaml defaults: CHATMESH_AUTH=required with a tenant whose every limit is set and an "
        "API key on every call; TLS on every gRPC hop (mutual inside) and to Redis; Redis for tenants, usage, "
        "conversations, idempotency keys and the cache; PII screening with the chart's "
        "policy (email, phone, cn_id, payment_card: storage); the cache on for first turns (cache.followUps "
        "false), no semantic cache; no tracing (tracing.otlpEndpoint empty); logs at INFO; the auth cache at 1 s",
        "not_reproduced": [
            "two replicas of each process behind Kubernetes Services, dialed through DNS: one process each here, "
            "dialed by address, since two cores cannot run eight processes per configuration apart",
            "a separate cache Redis (redis.cache.bundled, allkeys-lru, also TLS): the cache uses the data Redis here, "
            "as the chart does without one; the commands are the same, on one process instead of two",
            "a model provider (and its moderation endpoint) across a network: modelsim on loopback with zero latency "
            "here, so that what is measured is chatmesh's own cost",
            "the bundled Redis's append-only file on a volume: this Redis keeps no file",
            "moderation: the chart's auto turns it on with a provider's key, for input and output; it is off here, as "
            "issue 19's target configuration (keys and limits, TLS, PII screening, Redis) leaves it out: its cost is "
            "the provider's, two moderation round trips a turn, and a reply held back until its window is moderated",
        ],
    },
}
PREPARATION_CONCURRENCY = 32
# After each segment, the meters keep running this long: work a call leaves behind once its caller has the
# reply (releasing its stream slot, settling its usage) counts for its target, not for the next one.
SETTLE_SECONDS = 0.03
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
    # The knowledge base's chunks and the grounded turns (and as many without) of bench/knowledge.py's turns.
    knowledge_chunks: int
    knowledge_calls: int

    def bounds(self, case: Case) -> tuple[int, float]:
        single = case.concurrency == 1
        if case.turn > 1:
            count = self.turn_count if single else self.turn_count_concurrent
        else:
            count = self.count if single else self.count_concurrent
        return count, self.seconds if single else self.seconds_concurrent


MODES = {
    # About 12 minutes on 2 cores (an estimate: more on a busy machine; 10 before run and moderation, 6 before
    # chatmesh_tls), over half of it preparing the conversations of the turn-10 cases, once for each chatmesh target
    # (conversations belong to a tenant).
    "full": Mode(5, 1.0, 1.6, 400, 2000, 40, 80, 200, knowledge_chunks=5000, knowledge_calls=200),
    # About 2 minutes; its c=32 turn-10 throughput comes from too few calls to mean much, and its differences
    # between the chatmesh targets (the turn-10 cases' above all) are within the machine's noise.
    "quick": Mode(2, 0.4, 0.6, 120, 480, 10, 40, 32, knowledge_chunks=5000, knowledge_calls=60),
    # A few calls per case: for tests of the harness itself; its numbers mean nothing.
    "tiny": Mode(1, 2.0, 4.0, 4, 32, 3, 32, 4, knowledge_chunks=200, knowledge_calls=3),
}


class _Cycle(list):
    """A list whose indexes wrap around."""

    def __getitem__(self, index: Any) -> Any:
        return super().__getitem__(index % len(self))


def _support() -> Any:
    """The integration tests' launchers (tests/support): which processes make up chatmesh is their business,
    not ours."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import support.certificates
    import support.cluster
    import support.redis_server

    return argparse.Namespace(
        Cluster=support.cluster.Cluster,
        START_ORDER=support.cluster.START_ORDER,
        RedisServer=support.redis_server.RedisServer,
        TestPki=support.certificates.TestPki,
    )


class RedisCommands:
    """The redis-servers' own count of the commands they have run (INFO commandstats), summed over them, Lua
    scripts (EVALSHA, EVAL) apart; the INFO calls that read it are left out. `servers` by the name the report gives
    each (REDIS_PROCESSES)."""

    SCRIPTS = frozenset({"cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_eval_ro"})

    def __init__(self, servers: dict[str, Any]) -> None:
        self._clients = {
            name: redis.Redis.from_url(server.url, socket_timeout=5, **server.client_options())
            for name, server in servers.items()
        }
        self.pids = {name: int(client.info("server")["process_id"]) for name, client in self._clients.items()}

    def count(self) -> tuple[int, int]:
        """(commands, scripts) so far."""
        commands = scripts = 0
        for client in self._clients.values():
            stats = client.info("commandstats")
            commands += sum(value["calls"] for name, value in stats.items() if name != "cmdstat_info")
            scripts += sum(value["calls"] for name, value in stats.items() if name in self.SCRIPTS)
        return commands, scripts

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


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


def _round_order(names: list[str], round_index: int) -> list[str]:
    """The order of the targets in a round: rotated by one each round, so that none always goes first; the
    chatmesh targets run back to back (in CHATMESH_ORDER, reversed every other round), so that what sets them
    apart is measured under the same conditions. In a keyed case, chatmesh's and chatmesh_open's calls without a
    key run right after or before their keyed calls (alternating likewise), for the same reason."""
    chatmesh = [name for name in CHATMESH_ORDER if name in names]
    units: list[list[str]] = [chatmesh] + [[name] for name in names if name not in CLUSTER_OF]
    if round_index % 2:
        units[0].reverse()
    shift = round_index % len(units)
    return [name for unit in units[shift:] + units[:shift] for name in unit]


class Bench:
    def __init__(
        self,
        clusters: dict[str, Any],
        redis_commands: RedisCommands,
        clients: dict[str, ChatmeshClient],
        mode: Mode,
        reply_tokens: int,
    ) -> None:
        # The chatmesh cluster runs the modelsim that every target calls.
        self.cluster = clusters["chatmesh"]
        self.mode = mode
        self.reply_tokens = reply_tokens
        # Every process the launchers started (the ones they only know of have no pid): the chatmesh
        # cluster's under their own names, the others' with their PROCESS_PREFIX, and the shared redis-server.
        self.pids: dict[str, int] = {}
        # Which processes are each chatmesh target's own, and the process each one is (gateway, ...).
        self.processes_of: dict[str, list[str]] = {}
        self.process_kind: dict[str, str] = {}
        for target, cluster in clusters.items():
            prefix = PROCESS_PREFIX[target]
            self.processes_of[target] = []
            for name, process in cluster.processes.items():
                if process.pid is None:
                    continue
                self.pids[prefix + name] = process.pid
                if name not in MODEL_PROCESSES:
                    self.processes_of[target].append(prefix + name)
                    self.process_kind[prefix + name] = name
        self.pids.update(redis_commands.pids)
        self.redis_commands = redis_commands
        self.chatmesh_processes = self.processes_of["chatmesh"]
        self.rss = RssMonitor(self.pids)
        self.rss_at_start = self.rss.current_mib()
        # One client per chatmesh target's cluster (CHATMESH_TARGETS), each on one channel that every call reuses.
        self.clients = clients
        self.chatmesh = self.clients["chatmesh"]
        base_url, model_key = self.cluster.env["OPENAI_BASE_URL"], self.cluster.env["OPENAI_API_KEY"]
        self.floor = FloorClient(base_url, model_key)
        self.sdk = SdkClient(base_url, model_key)
        self.model = ""
        self.samples: dict[str, dict[str, list[float]]] = {}

    async def close(self) -> None:
        await self.rss.stop()
        await asyncio.gather(
            *(client.close() for client in self.clients.values()), self.floor.close(), self.sdk.close()
        )
        self.redis_commands.close()

    async def warm_up(self) -> None:
        """Opens connections and fills caches of imports and code paths in every process; not measured."""
        case = Case("warmup", "Chat", 32)
        self.model = await self.chatmesh.default_model()
        sends = [
            *(
                self._chatmesh_send(target, replace(case, rpc=rpc, idempotency_key=keyed), None)
                for target in CHATMESH_TARGETS
                for rpc in ("Chat", "StreamChat")
                for keyed in (False, True)  # the claim and the replay record's paths too
            ),
            self._baseline_send("floor", case, None),
            self._baseline_send("sdk", case, None),
        ]
        for send in sends:
            segment = await run_segment(send, concurrency=32, count=self.mode.warmup, seconds=30)
            if segment.errors:
                raise RuntimeError(f"warm-up calls failed: {segment.error_kinds}")

    def _chatmesh_send(
        self, target: str, case: Case, pool: list[tuple[str, str]] | None
    ) -> Callable[[int], Awaitable[Sample]]:
        """The calls of a target that calls chatmesh: with a fresh key each in a keyed case, but for the unkeyed
        targets, which send the same calls without one."""
        client = self.clients[CLUSTER_OF[target]]
        call = client.stream_chat if case.rpc == "StreamChat" else client.chat
        keyed = case.idempotency_key and target in CHATMESH_TARGETS
        # In a keyed case, the calls with a key ask the even-numbered questions and those without the odd ones:
        # alike, but never the same, so that no cache answers the one with the other's reply.
        spread = 2 if case.idempotency_key else 1
        offset = int(case.idempotency_key and not keyed)

        def send(index: int) -> Awaitable[Sample]:
            # A fresh key per call (made before the call's clock starts): every call claims a turn of its own.
            key = uuid.uuid4().hex if keyed else ""
            text = question(case, spread * index + offset)
            if pool is None:
                return call("", f"bench-{index % USERS}", text, case.expect, key)
            conversation_id, user_id = pool[index]
            return call(conversation_id, user_id, text, case.expect, key)

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

    async def _prepare(self, target: str, case: Case, count: int) -> list[tuple[str, str]]:
        """`count` conversations of the target `target` (its cluster's tenant's), with `case.turn - 1` turns each."""
        client = self.clients[CLUSTER_OF[target]]
        pool: list[tuple[str, str]] = [("", "")] * count
        indexes = iter(range(count))

        async def worker() -> None:
            for index in indexes:
                user_id, conversation_id = f"bench-{index % USERS}", ""
                for turn in range(1, case.turn):
                    conversation_id = await client.chat_for_id(
                        conversation_id, user_id, preparation_message(case, index, turn)
                    )
                pool[index] = (conversation_id, user_id)

        await asyncio.gather(*(worker() for _ in range(PREPARATION_CONCURRENCY)))
        return pool

    async def _model_window(self, case: Case, conversation: tuple[str, str]) -> list[dict[str, Any]]:
        """The messages that dialogue sends the model at turn `case.turn` of a prepared conversation (read from
        modelsim after one unmeasured call), for the baselines."""
        conversation_id, user_id = conversation
        probe = question(case, -1)
        await self.chatmesh.chat_for_id(conversation_id, user_id, probe)
        for logged in reversed(self.cluster.sim_requests(limit=20)):
            messages = logged.get("messages") or [{}]
            if messages[-1].get("content") == probe:
                return messages
        raise RuntimeError("modelsim did not log the call that reads the turn's context window")

    def _cpu(self, target: str, stats: dict[str, Any]) -> dict[str, float | None]:
        """CPU per call of each process of the target's cluster (by kind: gateway, ...), and their total."""
        processes = self.processes_of[CLUSTER_OF[target]]
        cpu = {self.process_kind[name]: stats["process_cpu_ms_per_call"][name] for name in processes}
        cpu["total"] = round(sum(value or 0 for value in cpu.values()), 3)
        return cpu

    async def run_case(self, case: Case) -> dict[str, Any]:
        if not case.available:
            return empty_case(case)
        count, seconds = self.mode.bounds(case)
        # The targets that call chatmesh: in a keyed case, the calls without a key (UNKEYED) too.
        chatmesh_targets = [*CHATMESH_TARGETS, *(UNKEYED.values() if case.idempotency_key else ())]
        pools: dict[str, list[tuple[str, str]] | None] = dict.fromkeys(chatmesh_targets)
        window = None
        preparation_started = time.perf_counter()
        if case.turn > 1:
            calls = count * self.mode.rounds
            # One conversation more on chatmesh: the one whose next turn shows the model's context window.
            prepared = await asyncio.gather(
                *(self._prepare(target, case, calls + (target == "chatmesh")) for target in chatmesh_targets)
            )
            pools.update(zip(chatmesh_targets, prepared, strict=True))
            window = await self._model_window(case, prepared[0].pop())
        if case.message is Message.REPEATED:
            for target in CHATMESH_TARGETS:  # the miss that fills the cache (each tenant has its own entries)
                await self._chatmesh_send(target, replace(case, expect=Expect.REPLY), None)(0)
        sends = {
            **{target: self._chatmesh_send(target, case, pools[target]) for target in chatmesh_targets},
            **{name: self._baseline_send(name, case, window) for name in case.baselines},
        }
        meters = {name: CpuMeter(self.pids) for name in sends}
        # Redis commands and scripts run in each target's windows.
        redis_counts = {name: [0, 0] for name in sends}
        segments: dict[str, list[Segment]] = {name: [] for name in sends}
        next_index = dict.fromkeys(sends, 0)

        self.rss.checkpoint()  # the preparation's peak goes to the run's, not the case's
        idle = self.rss.current_mib()
        measure_started = time.perf_counter()
        for round_index in range(self.mode.rounds):
            for name in _round_order(list(sends), round_index):
                gc.collect()
                commands_before, scripts_before = self.redis_commands.count()
                meters[name].start()
                segment = await run_segment(
                    sends[name],
                    concurrency=case.concurrency,
                    count=count,
                    seconds=seconds,
                    first_index=next_index[name],
                )
                await asyncio.sleep(SETTLE_SECONDS)
                meters[name].stop()
                commands, scripts = self.redis_commands.count()
                redis_counts[name][0] += commands - commands_before
                redis_counts[name][1] += scripts - scripts_before
                next_index[name] += segment.issued
                segments[name].append(segment)
        peak = self.rss.checkpoint()

        targets = {name: target_stats(segments[name], meters[name].seconds) for name in sends}
        for name, (commands, scripts) in redis_counts.items():
            issued = sum(segment.issued for segment in segments[name])
            targets[name]["redis_per_call"] = {
                "commands": round(commands / issued, 2) if issued else None,
                "scripts": round(scripts / issued, 2) if issued else None,
            }
        chatmesh = targets["chatmesh"]
        cpus = {target: self._cpu(target, targets[target]) for target in chatmesh_targets}
        cpu, cpu_open, cpu_tls = cpus["chatmesh"], cpus["chatmesh_open"], cpus["chatmesh_tls"]
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
            auth_and_limits=cluster_difference(chatmesh, targets["chatmesh_open"], cpu, cpu_open),
            tls_added=cluster_difference(targets["chatmesh_tls"], chatmesh, cpu_tls, cpu),
            idempotency_key_added=idempotency_key_added(targets, cpus, case.expect.value)
            if case.idempotency_key
            else None,
            cpu_ms_per_call=cpu,
            cpu_ms_per_call_open=cpu_open,
            cpu_ms_per_call_tls=cpu_tls,
            cpu_ms_per_call_run=cpus["run"],
            rss_mib={name: {"idle": idle[name], "peak": peak[name]} for name in self.pids},
            turns=None if window is None else {"measured_turn": case.turn, "model_messages": len(window)},
            other_load_cores=None if other_load is None else round(max(0.0, other_load), 2),
            bounds={"count_per_round": count, "seconds_per_round": seconds},
            preparation_seconds=round(measure_started - preparation_started, 2),
            measure_seconds=round(time.perf_counter() - measure_started, 2),
        )
        return entry

    async def profile(self, case: Case, seconds: float, out_prefix: Path) -> dict[str, str]:
        """Samples each process of the chart configuration's cluster with `py-spy record --native` (Python and C
        frames: grpc's core, protobuf, the TLS library) while `case` runs. py-spy stops a process to read its
        native stacks (it refuses --native with --nonblocking), so this runs after the measurements, never during.
        Writes collapsed stacks per process; returns their paths."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        pool = None
        if case.turn > 1:
            # Conversations are reused here (turns 10, 11, ...): the window is full either way.
            pool = _Cycle(await self._prepare(CHART, case, 2 * case.concurrency))
        paths = {name: f"{out_prefix}-profile-{name}.txt" for name in self.processes_of[CHART]}
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
                "--native",
                "--output",
                path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, path in paths.items()
        ]
        await asyncio.sleep(0.5)
        await run_segment(
            self._chatmesh_send(CHART, case, pool), concurrency=case.concurrency, count=10**9, seconds=seconds + 1
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
    support = _support()
    pki = support.TestPki()
    redis_servers = {"redis": support.RedisServer.start()}
    # The simulator's own key, as `make run` uses it: moderation ("auto") is then off in every cluster (see
    # CONFIGURATION_NOTES on why the chart's is too).
    common = {"CHATMESH_MODELSIM_REPLY_TOKENS": str(args.reply_tokens), "OPENAI_API_KEY": MODELSIM_API_KEY}
    admin_token, tls_admin_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    clusters: dict[str, Any] = {}
    clients: dict[str, ChatmeshClient] = {}
    bench = None
    try:
        # The chart's configuration without TLS: authentication required, tenants and limits in Redis.
        clusters["chatmesh"] = support.Cluster(
            redis_url=redis_servers["redis"].url,
            env={**common, "CHATMESH_AUTH": "required", "CHATMESH_ADMIN_TOKEN": admin_token},
        ).start()
        cluster = clusters["chatmesh"]
        others = [name for name in support.START_ORDER if name not in MODEL_PROCESSES]
        # The same without them, on the same Redis and the same modelsim.
        clusters["chatmesh_open"] = support.Cluster(
            redis_url=redis_servers["redis"].url,
            env={**common, "CHATMESH_AUTH": "off", "OPENAI_BASE_URL": cluster.env["OPENAI_BASE_URL"]},
            processes=others,
        ).start()
        # chatmesh plus TLS, as the chart runs it: on every gRPC port, and to a Redis of its own that serves TLS only
        # (modelsim stays plaintext); its own admin token.
        tls_redis = redis_servers["tls-redis"] = support.RedisServer.start(tls=pki.internal)
        clusters["chatmesh_tls"] = support.Cluster(
            redis_url=tls_redis.url,
            env={
                **common,
                "CHATMESH_AUTH": "required",
                "CHATMESH_ADMIN_TOKEN": tls_admin_token,
                "OPENAI_BASE_URL": cluster.env["OPENAI_BASE_URL"],
                "CHATMESH_REDIS_USERNAME": tls_redis.USERNAME,
                "CHATMESH_REDIS_PASSWORD": tls_redis.PASSWORD,
                "CHATMESH_REDIS_TLS_CA_FILE": pki.internal.ca,
            },
            processes=others,
            pki=pki,
        ).start()
        # `make run`'s defaults: no Redis (every store in memory), authentication off, no TLS, moderation off.
        clusters["run"] = support.Cluster(
            env={**common, "OPENAI_BASE_URL": cluster.env["OPENAI_BASE_URL"]}, processes=others
        ).start()
        tls_target = clusters["chatmesh_tls"].gateway_target
        cluster.sim_config(reply_tokens=args.reply_tokens, first_token_latency_seconds=0, token_delay_seconds=0)
        api_key = await create_bench_tenant(cluster.gateway_target, admin_token)
        tls_api_key = await create_bench_tenant(tls_target, tls_admin_token, BENCH_TLS_TENANT, pki.public_ca_pem())
        clients["chatmesh"] = ChatmeshClient(cluster.gateway_target, api_key)
        clients["chatmesh_open"] = ChatmeshClient(clusters["chatmesh_open"].gateway_target)
        clients["chatmesh_tls"] = ChatmeshClient(tls_target, tls_api_key, pki.public_ca_pem())
        clients["run"] = ChatmeshClient(clusters["run"].gateway_target)
        bench = Bench(clusters, RedisCommands(redis_servers), clients, mode, args.reply_tokens)
        bench.rss.start()
        await bench.warm_up()
        gc.collect()
        gc.freeze()
        entries = []
        for case in selected:
            print(f"bench: {case.name} ({case.describe()})", file=sys.stderr, flush=True)
            entries.append(await bench.run_case(case))
        peaks = bench.rss.run_peak_mib()
        # After the cases and their memory peaks: the knowledge base stays in chatmesh_open's dialogue.
        print("bench: knowledge (grounded turns, chatmesh_open)", file=sys.stderr, flush=True)
        open_cluster = clusters["chatmesh_open"]
        knowledge_turns = await knowledge_cost.measure_turns(
            open_cluster.gateway_target,
            chunks=mode.knowledge_chunks,
            calls=mode.knowledge_calls,
            dialogue_metrics_port=open_cluster.metrics_ports["dialogue"],
        )
        profile = None
        if args.profile:
            case = next(case for case in CASES if case.name == args.profile_case)
            profile = await bench.profile(case, args.profile, args.out_prefix)
        sim_stats = cluster.sim_stats()
    finally:
        if bench is not None:
            await bench.close()
        else:
            await asyncio.gather(*(client.close() for client in clients.values()))
        for running in reversed(clusters.values()):
            running.stop()
        for server in redis_servers.values():
            server.stop()

    target_of = {name: target for target, names in bench.processes_of.items() for name in names}
    processes = {
        name: {
            # The chatmesh target's own processes.
            "chatmesh": name in bench.chatmesh_processes,
            # The target whose cluster it belongs to (the RSS target reads run's and chatmesh_tls's).
            "target": target_of.get(name),
            # What it is (gateway, dialogue, ...) for a chatmesh process; None for modelsim and the Redises.
            "kind": bench.process_kind.get(name),
            "rss_idle_mib": bench.rss_at_start[name],
            "rss_peak_mib": peaks[name],
        }
        for name in bench.pids
    }
    now = datetime.datetime.now(datetime.UTC)
    report = {
        # 2: the chatmesh_open target, auth_and_limits, cpu_ms_per_call_open, redis_per_call, Redis processes.
        # 3: the keyed case (stream_c1_new_keyed), idempotency_key and idempotency_key_added in every case.
        # 4: the keyed case's targets chatmesh_unkeyed and chatmesh_open_unkeyed (None in every other case), which
        # idempotency_key_added subtracts (with cpu_ms_per_call_without_key); no unkeyed_case any more.
        # 5: the chatmesh_tls target (chatmesh plus TLS; processes tls-<name>, chatmesh_tls_processes), tls_added
        # and cpu_ms_per_call_tls in every case, run.tls; chatmesh_tls sends the key in the keyed case but has no
        # unkeyed twin, so idempotency_key_added still covers chatmesh and chatmesh_open only.
        # 6: the run target (`make run`'s defaults; processes run-<name>, run_processes, cpu_ms_per_call_run);
        # chatmesh_tls on a TLS Redis of its own (process tls-redis); run.configurations; processes' kind; targets
        # of issue 19, each row with its configuration (run, chart, or None for those of a difference), RSS for
        # run's and chatmesh_tls's processes.
        "schema": 6,
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
            "auth": {
                "chatmesh": f"CHATMESH_AUTH=required, tenant {BENCH_TENANT} with every limit, an API key on every call",
                "chatmesh_open": "CHATMESH_AUTH=off, no key: tenant default, without limits",
                "chatmesh_tls": f"as chatmesh (its own admin token, tenant {BENCH_TLS_TENANT} with the same limits), "
                "plus TLS",
                "run": "CHATMESH_AUTH=off, no key: tenant default, without limits; every store in memory",
            },
            "tls": "chatmesh_tls has TLS on every gRPC port: the gateway's with a certificate of a public CA and no "
            "client certificate asked, mutual TLS between its processes (an internal CA); the load generator calls "
            "it on one TLS channel that every call reuses (the handshake is made in the warm-up). Its Redis serves "
            "TLS only (rediss://, a username and password). modelsim is plaintext for every cluster, and so are the "
            "other clusters' Redis.",
            "configurations": CONFIGURATION_NOTES,
            "bench_tenant_limits": {field.name: value for field, value in BENCH_LIMITS.ListFields()},
            "profile": profile,
        },
        "chatmesh_processes": bench.chatmesh_processes,
        "chatmesh_open_processes": bench.processes_of["chatmesh_open"],
        "chatmesh_tls_processes": bench.processes_of["chatmesh_tls"],
        "run_processes": bench.processes_of["run"],
        "processes": processes,
        "cases": entries,
        "targets": evaluate_targets(entries, processes),
        "window": window_cost.measure(),
        "pii": pii_cost.measure(),
        "knowledge": {"retrieval": await knowledge_cost.measure_retrieval(), "turns": knowledge_turns},
    }
    return report, bench.samples, bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full", help="full (~12 min), quick (~2 min), tiny")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per case (default: the mode's)")
    parser.add_argument("--reply-tokens", type=int, default=50, help="tokens in each modelsim reply")
    parser.add_argument("--cases", type=lambda text: set(text.split(",")), default=None, help="only these cases")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument(
        "--profile", type=float, default=0, metavar="SECONDS", help="then py-spy --native each chart process"
    )
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
