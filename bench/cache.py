"""`make bench-cache`: what the answer cache saves, and whether it ever answers a question with another's answer
(issue 17).

The workload (bench/cache_workload.py, bench/cache_workload.yaml) is a fixed, Zipf-distributed sequence of first
turns to a product's support bot, in English and Chinese: FAQ intents asked in several ways, near-misses (questions
that share most words with an FAQ question but ask something else) and unrelated one-off questions. Every request
is a new conversation through the gateway's ChatService.Chat, one at a time, with the workload's system prompt and
temperature 0.2. The sequence runs on three fresh clusters of the integration tests' kind (tests/support/cluster.py,
each with its own redis-server), which differ only in their settings:

- no_cache: CHATMESH_CACHE_ANSWERS=false, so that dialogue neither looks up nor stores any of the requests;
- exact: the answer cache as shipped (exact keys, in memory and Redis);
- semantic: the same with CHATMESH_SEMANTIC_CACHE=true.

modelsim's reply is a function of the model's messages, so it identifies the question it was made for (checked over
every reply the model made: one reply per question, no reply for two). A reply served from the cache is traced to
the question its text was made for; it is a wrong hit when that question belongs to another intent than the
request's.

The lookup's added latency is measured apart: a cache process with the semantic cache on and one with it off share
one Redis; 10,000 answers in one scope are stored through the first's CacheService.Store, then questions that none of
them was stored for (so exact misses: the workload's questions, asked in ways the sequence never sends) are looked up
on both as dialogue looks them up (Lookup, then LookupSimilar where the first allows it), one at a time, in turn with
an embeddings call for the same question to the same modelsim: what the semantic lookup adds is reported with and
without that call, which is the provider's latency.

The report also says how the workload's questions stand under modelsim's embeddings (near-misses above a threshold
are refused by the guards or not at all), for choosing the threshold.

Usage: python -m bench.cache [--requests N] [--seed N] [--zipf S] [--reply-tokens N] [--threshold X]
       [--entries N] [--lookups N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from bench.cache_workload import (
    FAQ,
    LANGUAGES,
    NEAR_MISS,
    UNRELATED,
    Request,
    Workload,
    load_workload,
    request_sequence,
    similarity_census,
)
from bench.clients import CALL_TIMEOUT_SECONDS, Sample
from bench.loadgen import run_segment
from bench.report import percentile
from bench.run import RESULTS, _commit, _loadavg, _support
from chatmesh.cache.guards import QuestionFeatures, guard_mismatch, question_features
from chatmesh.cache.keys import normalize_text
from chatmesh.dialogue.tokens import TokenCounter
from chatmesh.modelsim.embeddings import embed
from chatmesh.runtime.settings import MODELSIM_API_KEY, CacheSettings
from chatmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2, chat_pb2_grpc

# A support bot's temperature: low, and within the cache's default bound (0.5).
TEMPERATURE = 0.2
RUNS = {
    "no_cache": {"CHATMESH_CACHE_ANSWERS": "false"},
    "exact": {},
    "semantic": {"CHATMESH_SEMANTIC_CACHE": "true"},
}
RUN_TITLES = {"no_cache": "no cache", "exact": "exact cache", "semantic": "semantic cache"}
USERS = 100
# The most a run of the sequence may take; what it has not sent by then is reported as not sent.
RUN_SECONDS = 150.0
# The lookup measurement: its tenant (the scope), how many stores run at once, and warm-up bounds.
LOOKUP_TENANT = "bench-cache"
STORE_CONCURRENCY = 16
WARMUP_LOOKUPS = 50
WARMUP_SECONDS = 10.0
# Held-out ways of asking the workload's questions, none of them a variant that the sequence sends: the lookups'
# questions, close to stored ones but never stored themselves.
HELD_OUT = {"en": ("Hey there! ", " Cheers."), "zh": ("打扰一下，", "多谢。")}  # noqa: RUF001
# Issue 17's targets.
TOKEN_SAVING_TARGET = 0.40
ADDED_LOOKUP_TARGET_MS = 2.0
CENSUS_THRESHOLDS = [0.85, 0.9, 0.92, 0.95]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one Chat answered."""

    text: str
    finish_reason: int
    cached: bool
    match: int
    similarity: float
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency: float
    model: str


def _setting_default(name: str) -> Any:
    return CacheSettings.model_fields[name].default


async def chat_sequence(target: str, workload: Workload, sequence: list[Request]) -> list[Outcome | None]:
    """Sends the sequence as first turns, one at a time; None for a request that failed or was not sent."""
    outcomes: list[Outcome | None] = [None] * len(sequence)
    options = chat_pb2.ChatOptions(system_prompt=workload.system_prompt, temperature=TEMPERATURE)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def send(index: int) -> Sample:
            request = chat_pb2.ChatRequest(
                user_id=f"bench-cache-{index % USERS}", message=sequence[index].text, options=options
            )
            started = time.perf_counter()
            response = await stub.Chat(request, timeout=CALL_TIMEOUT_SECONDS)
            latency = time.perf_counter() - started
            outcomes[index] = Outcome(
                text=response.text,
                finish_reason=response.finish_reason,
                cached=response.cached,
                match=response.cache_match,
                similarity=response.cache_similarity,
                input_tokens=response.usage.input_tokens,
                output_tokens=response.usage.output_tokens,
                cost_usd=response.cost_usd,
                latency=latency,
                model=response.model,
            )
            return Sample(latency, None, response.finish_reason == chat_pb2.FINISH_REASON_STOP)

        segment = await run_segment(send, concurrency=1, count=len(sequence), seconds=RUN_SECONDS)
    if segment.errors:
        print(f"bench-cache: {segment.errors} calls failed: {segment.error_kinds}", file=sys.stderr, flush=True)
    return outcomes


async def run_sequence(
    support: Any, name: str, env: dict[str, str], workload: Workload, sequence: list[Request]
) -> tuple[list[Outcome | None], dict[str, Any]]:
    """The sequence on a fresh cluster and Redis with `env`; its outcomes and modelsim's counters."""
    print(f"bench-cache: {name}", file=sys.stderr, flush=True)
    redis_server = support.RedisServer.start()
    try:
        with support.Cluster(redis_url=redis_server.url, env=env) as cluster:
            outcomes = await chat_sequence(cluster.gateway_target, workload, sequence)
            stats = {**cluster.sim_stats(), "semantic": semantic_counters(cluster.metrics_ports["cache"])}
    finally:
        redis_server.stop()
    return outcomes, stats


def semantic_counters(metrics_port: int) -> dict[str, dict[str, float]]:
    """The cache process's semantic lookups by outcome and its guards' refusals by guard (chatmesh's metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counters: dict[str, dict[str, float]] = {"lookups": {}, "guard_refusals": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chatmesh_cache_semantic_lookups_total":
                counters["lookups"][sample.labels["outcome"]] = sample.value
            elif sample.name == "chatmesh_cache_semantic_guard_refusals_total":
                counters["guard_refusals"][sample.labels["guard"]] = sample.value
    return counters


def reply_sources(
    sequence: list[Request], runs: dict[str, list[Outcome | None]]
) -> tuple[dict[str, str], dict[str, int]]:
    """Which question each reply the model made was made for (reply text -> request text), from every run, and the
    check that replies identify their questions: per question the replies the model made for it, per reply the
    questions it was made for."""
    replies_of: dict[str, set[str]] = {}
    questions_of: dict[str, set[str]] = {}
    for outcomes in runs.values():
        for request, outcome in zip(sequence, outcomes, strict=True):
            if outcome is None or outcome.cached:
                continue
            replies_of.setdefault(request.text, set()).add(outcome.text)
            questions_of.setdefault(outcome.text, set()).add(request.text)
    check = {
        "questions": len(replies_of),
        "replies": len(questions_of),
        "questions_with_several_replies": sum(len(replies) > 1 for replies in replies_of.values()),
        "replies_of_several_questions": sum(len(questions) > 1 for questions in questions_of.values()),
    }
    sources = {reply: next(iter(questions)) for reply, questions in questions_of.items() if len(questions) == 1}
    return sources, check


def summarize(
    sequence: list[Request], outcomes: list[Outcome | None], sources: dict[str, str], stats: dict[str, Any]
) -> dict[str, Any]:
    """Hits by kind, wrong hits, tokens and cost of one run."""
    intent_of = {request.text: request.intent for request in sequence}
    answered: set[str] = set()  # intents with a reply the model made, so far
    hits = {"exact": 0, "semantic": 0}
    by_kind = {kind: Counter() for kind in (FAQ, NEAR_MISS, UNRELATED)}
    by_language = {language: Counter() for language in LANGUAGES}
    wrong: list[dict[str, Any]] = []
    near_miss_hits: list[dict[str, Any]] = []
    unattributed = 0
    exposed_near_misses = 0
    tokens = {"input": 0, "output": 0}
    cost = 0.0
    latencies = []
    not_stop = failed = 0
    embedded_tokens = 0
    counter = TokenCounter()
    embedding_model = _setting_default("embedding_model")
    for request, outcome in zip(sequence, outcomes, strict=True):
        intent = request.intent
        if intent.kind == NEAR_MISS and intent.resembles in answered:
            exposed_near_misses += 1
        if outcome is None:
            failed += 1
            continue
        latencies.append(outcome.latency)
        not_stop += outcome.finish_reason != chat_pb2.FINISH_REASON_STOP
        tokens["input"] += outcome.input_tokens
        tokens["output"] += outcome.output_tokens
        cost += outcome.cost_usd
        kind = "semantic" if outcome.match == chat_pb2.CACHE_MATCH_SEMANTIC else "exact"
        if outcome.match != chat_pb2.CACHE_MATCH_EXACT:
            # Every exact miss of the semantic run is embedded once (its store reuses the vector).
            embedded_tokens += counter.count_text(embedding_model, request.text)
        for counts in (by_kind[intent.kind], by_language[intent.language]):
            counts["requests"] += 1
            if outcome.cached:
                counts[kind] += 1
        if not outcome.cached:
            answered.add(intent.id)
            continue
        hits[kind] += 1
        source = sources.get(outcome.text)
        if source is None:
            unattributed += 1
            continue
        source_intent = intent_of[source]
        if intent.kind == NEAR_MISS:
            near_miss_hits.append(
                {
                    "asked": request.text,
                    "intent": intent.id,
                    "differs_by": intent.differs_by,
                    "match": kind,
                    "similarity": round(outcome.similarity, 4),
                    "answered_with_reply_to": source,
                    "reply_intent": source_intent.id,
                }
            )
        if source_intent.id != intent.id:
            wrong.append(
                {
                    "match": kind,
                    "similarity": round(outcome.similarity, 4),
                    "asked": request.text,
                    "intent": intent.id,
                    "kind": intent.kind,
                    "answered_with_reply_to": source,
                    "reply_intent": source_intent.id,
                    "reply_kind": source_intent.kind,
                }
            )
    answered_count = len(sequence) - failed
    latencies.sort()
    return {
        "requests": len(sequence),
        "failed": failed,
        "not_stop": not_stop,
        "hits": hits,
        "hit_rate": {
            kind: round(count / answered_count, 4) if answered_count else None for kind, count in hits.items()
        },
        "by_kind": {kind: dict(counts) for kind, counts in by_kind.items()},
        "by_language": {language: dict(counts) for language, counts in by_language.items()},
        "wrong_hits": len(wrong),
        # A near-miss answered with another intent's reply, and any request answered with a near-miss's reply.
        "wrong_hits_on_near_misses": sum(entry["kind"] == NEAR_MISS for entry in wrong),
        "wrong_hits_with_near_miss_replies": sum(entry["reply_kind"] == NEAR_MISS for entry in wrong),
        "wrong_hits_in_near_miss_pairs": sum(NEAR_MISS in (entry["kind"], entry["reply_kind"]) for entry in wrong),
        "wrong": wrong,
        # Every near-miss answered from the cache, rightly (with its own reply) or not.
        "near_miss_hits": near_miss_hits,
        "unattributed_hits": unattributed,
        "near_miss_requests": by_kind[NEAR_MISS]["requests"],
        "near_miss_requests_after_their_intent_was_answered": exposed_near_misses,
        "model_tokens": {**tokens, "total": tokens["input"] + tokens["output"]},
        "cost_usd": round(cost, 6),
        "chat_latency_ms": {
            "p50": round(1000 * percentile(latencies, 50), 2) if latencies else None,
            "p90": round(1000 * percentile(latencies, 90), 2) if latencies else None,
        },
        "modelsim": {
            "chat_requests": stats.get("requests"),
            "embedding_requests": stats.get("embedding_requests"),
        },
        "semantic_lookups": stats["semantic"]["lookups"],
        "guard_refusals": stats["semantic"]["guard_refusals"],
        "embedding_tokens_estimated": embedded_tokens if stats.get("embedding_requests") else 0,
        "embedding_model": embedding_model,
        "model": next((outcome.model for outcome in outcomes if outcome is not None), ""),
    }


def saving(run: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    tokens, base_tokens = run["model_tokens"]["total"], baseline["model_tokens"]["total"]
    cost, base_cost = run["cost_usd"], baseline["cost_usd"]
    input_price, _ = _setting_default("model_prices_usd_per_million")[_setting_default("embedding_model")]
    embedding_usd = run["embedding_tokens_estimated"] * input_price / 1_000_000
    return {
        "model_tokens": base_tokens - tokens,
        "model_tokens_fraction": round(1 - tokens / base_tokens, 4) if base_tokens else None,
        "usd": round(base_cost - cost, 6),
        "usd_fraction": round(1 - cost / base_cost, 4) if base_cost else None,
        "embedding_usd_estimated": round(embedding_usd, 6),
    }


def lookup_texts(workload: Workload) -> list[str]:
    """Every held-out form of every question of the workload (see HELD_OUT), each once."""
    texts = []
    for intent in workload.intents:
        prefix, suffix = HELD_OUT[intent.language]
        for question in intent.questions:
            texts += [prefix + question, question + suffix]
    return list(dict.fromkeys(texts))


def stored_texts(workload: Workload, count: int, seed: int) -> list[str]:
    """`count` distinct questions to store: every text the sequence may send, then pairs of questions of one
    language, in a seeded order."""
    texts = [text for intent in workload.intents for text, _ in workload.forms(intent)]
    rng = np.random.default_rng(seed)
    by_language = {
        language: [q for intent in workload.intents if intent.language == language for q in intent.questions]
        for language in LANGUAGES
    }
    pairs = [
        f"{first} {second}"
        for questions in by_language.values()
        for first in questions
        for second in questions
        if first != second
    ]
    texts += [pairs[index] for index in rng.permutation(len(pairs))]
    texts = list(dict.fromkeys(texts))
    if len(texts) < count:
        raise ValueError(f"the workload makes {len(texts)} distinct questions to store, fewer than {count}")
    return texts[:count]


def _context(workload: Workload, question: str) -> cache_pb2.AnswerContext:
    """A first turn's context, as dialogue builds it for the sequence's requests."""
    return cache_pb2.AnswerContext(
        tenant=LOOKUP_TENANT,
        model="gpt-4o-mini",
        system_prompt=workload.system_prompt,
        temperature=TEMPERATURE,
        messages=[cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content=question)],
    )


def _ms_stats(seconds: list[float]) -> dict[str, float | None]:
    ordered = sorted(seconds)
    if not ordered:
        return {"p50": None, "p90": None}
    return {"p50": round(1000 * percentile(ordered, 50), 3), "p90": round(1000 * percentile(ordered, 90), 3)}


async def measure_lookups(support: Any, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Lookups of exact misses with `args.entries` answers in the scope, the semantic cache on and off."""
    print(f"bench-cache: lookup latency with {args.entries} answers", file=sys.stderr, flush=True)
    common = {"OPENAI_API_KEY": MODELSIM_API_KEY, **_threshold_env(args)}
    redis_server = support.RedisServer.start()
    clusters = []
    try:
        semantic_on = support.Cluster(
            redis_url=redis_server.url,
            env={**common, "CHATMESH_SEMANTIC_CACHE": "true"},
            processes=("modelsim", "cache"),
        ).start()
        clusters.append(semantic_on)
        semantic_off = support.Cluster(
            redis_url=redis_server.url,
            env={**common, "OPENAI_BASE_URL": semantic_on.env["OPENAI_BASE_URL"]},
            processes=("cache",),
        ).start()
        clusters.append(semantic_off)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{semantic_on.processes['cache'].port}") as on_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{semantic_off.processes['cache'].port}") as off_channel,
        ):
            on = cache_pb2_grpc.CacheServiceStub(on_channel)
            off = cache_pb2_grpc.CacheServiceStub(off_channel)
            stored, store_seconds = await _store_answers(on, workload, stored_texts(workload, args.entries, args.seed))
            texts = lookup_texts(workload)[: args.lookups]
            warm = await _warm_up(on, off, workload)
            embeddings = openai.AsyncOpenAI(base_url=semantic_on.env["OPENAI_BASE_URL"], api_key=MODELSIM_API_KEY)
            try:
                seconds, on_outcomes = await _time_lookups(on, off, embeddings, workload, texts)
            finally:
                await embeddings.close()
    finally:
        for cluster in reversed(clusters):
            cluster.stop()
        redis_server.stop()
    off_stats, on_stats, embedding = (_ms_stats(seconds[name]) for name in ("off", "on", "embedding"))
    added = {q: _difference(on_stats[q], off_stats[q]) for q in ("p50", "p90")}
    return {
        "entries": args.entries,
        "stored": stored,
        "store_seconds": round(store_seconds, 1),
        "lookups": len(texts),
        "warm_up_saw_a_semantic_hit": warm,
        "off_ms": off_stats,
        "on_ms": on_stats,
        "added_ms": added,
        # What the lookup adds besides its embeddings call, which is the provider's latency (modelsim's here).
        "added_without_embedding_ms": {q: _difference(added[q], embedding[q]) for q in ("p50", "p90")},
        "on_outcomes": dict(on_outcomes),
        "embedding_call_ms": embedding,
        "embedding_model": _setting_default("embedding_model"),
        "embedding_dimensions": _setting_default("embedding_dimensions"),
    }


async def _lookup(stub: cache_pb2_grpc.CacheServiceStub, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
    """A lookup as dialogue makes it: Lookup, then LookupSimilar after an exact miss that allows it."""
    response = await stub.Lookup(request, timeout=CALL_TIMEOUT_SECONDS)
    if response.hit or not response.similar_lookup:
        return response
    return await stub.LookupSimilar(
        cache_pb2.LookupSimilarRequest(context=request.context), timeout=CALL_TIMEOUT_SECONDS
    )


async def _store_answers(
    stub: cache_pb2_grpc.CacheServiceStub, workload: Workload, texts: list[str]
) -> tuple[int, float]:
    """Stores an answer for each text; returns how many were stored and the seconds it took."""
    stored = 0

    async def store(index: int) -> Sample:
        nonlocal stored
        started = time.perf_counter()
        response = await stub.Store(
            cache_pb2.StoreRequest(
                context=_context(workload, texts[index]),
                reply=cache_pb2.CachedReply(
                    text=f"The answer to question {index}.",
                    finish_reason=chat_pb2.FINISH_REASON_STOP,
                    output_tokens=8,
                    policy_version="bench-cache",
                ),
                user_id=f"bench-cache-{index % USERS}",
                conversation_id=f"bench-cache-{index}",
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        stored += response.stored
        return Sample(time.perf_counter() - started, None, response.stored)

    started = time.perf_counter()
    segment = await run_segment(store, concurrency=STORE_CONCURRENCY, count=len(texts), seconds=RUN_SECONDS)
    if segment.errors:
        print(f"bench-cache: {segment.errors} stores failed: {segment.error_kinds}", file=sys.stderr, flush=True)
    return stored, time.perf_counter() - started


async def _warm_up(
    on: cache_pb2_grpc.CacheServiceStub, off: cache_pb2_grpc.CacheServiceStub, workload: Workload
) -> bool:
    """Opens both channels and code paths, then asks the semantic process, within WARMUP_SECONDS, until it answers
    a stored question semantically (its scope is searchable); whether it did."""
    for index in range(WARMUP_LOOKUPS):
        request = cache_pb2.LookupRequest(context=_context(workload, f"warm-up question {index}"))
        await asyncio.gather(_lookup(on, request), _lookup(off, request))
    # Lower case and no question mark: not a stored text (those differ from their question in one way only), but
    # the same words.
    stored = workload.intents[0].questions[0]
    request = cache_pb2.LookupRequest(context=_context(workload, stored.lower().rstrip("?")))
    deadline = time.monotonic() + WARMUP_SECONDS
    while time.monotonic() < deadline:
        response = await _lookup(on, request)
        if response.match == chat_pb2.CACHE_MATCH_SEMANTIC:
            return True
        await asyncio.sleep(0.1)
    return False


async def _time_lookups(
    on: cache_pb2_grpc.CacheServiceStub,
    off: cache_pb2_grpc.CacheServiceStub,
    embeddings: openai.AsyncOpenAI,
    workload: Workload,
    texts: list[str],
) -> tuple[dict[str, list[float]], Counter[str]]:
    """The seconds of each text's lookup on both processes and of an embeddings call for it as the semantic cache
    makes one (to the same modelsim, from this process), in a rotating order; and how the semantic process answered."""
    stubs = {"off": off, "on": on}
    seconds: dict[str, list[float]] = {"off": [], "on": [], "embedding": []}
    outcomes: Counter[str] = Counter()

    async def call(name: str, text: str, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse | None:
        if name == "embedding":
            await embeddings.embeddings.create(
                model=_setting_default("embedding_model"),
                input=[text],
                dimensions=_setting_default("embedding_dimensions"),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            return None
        return await _lookup(stubs[name], request)

    names = list(seconds)
    for index, text in enumerate(texts):
        request = cache_pb2.LookupRequest(context=_context(workload, text))
        for name in names[index % 3 :] + names[: index % 3]:
            started = time.perf_counter()
            response = await call(name, text, request)
            seconds[name].append(time.perf_counter() - started)
            if name == "on" and response is not None:
                outcomes[chat_pb2.CacheMatch.Name(response.match) if response.hit else "miss"] += 1
    return seconds, outcomes


def _difference(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or baseline is None else round(value - baseline, 3)


@functools.cache
def _features(text: str) -> QuestionFeatures:
    return question_features(normalize_text(text))


def _guard(asked: str, cached: str) -> str | None:
    """The guard of the semantic cache that refuses `cached`'s answer to `asked`, or None."""
    return guard_mismatch(_features(asked), _features(cached))


def _threshold_env(args: argparse.Namespace) -> dict[str, str]:
    return {} if args.threshold is None else {"CHATMESH_SEMANTIC_CACHE_THRESHOLD": str(args.threshold)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    loadavg_before = _loadavg()
    workload = load_workload()
    sequence = request_sequence(workload, args.requests, args.seed, args.zipf)
    support = _support()
    common = {
        "CHATMESH_MODELSIM_REPLY_TOKENS": str(args.reply_tokens),
        # modelsim's own key, as `make run` uses it: moderation ("auto") is off.
        "OPENAI_API_KEY": MODELSIM_API_KEY,
        **_threshold_env(args),
    }
    outcomes: dict[str, list[Outcome | None]] = {}
    stats: dict[str, dict[str, Any]] = {}
    for name, env in RUNS.items():
        outcomes[name], stats[name] = await run_sequence(support, name, {**common, **env}, workload, sequence)
    lookups = await measure_lookups(support, workload, args)

    sources, identity = reply_sources(sequence, outcomes)
    runs = {name: summarize(sequence, outcomes[name], sources, stats[name]) for name in RUNS}
    baseline = runs["no_cache"]
    savings = {name: saving(runs[name], baseline) for name in RUNS if name != "no_cache"}
    threshold = args.threshold if args.threshold is not None else _setting_default("semantic_cache_threshold")
    dimensions = _setting_default("embedding_dimensions")
    census = similarity_census(
        workload, lambda text: np.array(embed(text, dimensions), dtype=np.float32), _guard, CENSUS_THRESHOLDS
    )
    semantic = runs["semantic"]
    commit, dirty = _commit()
    now = datetime.datetime.now(datetime.UTC)
    texts = {request.text for request in sequence}
    return {
        "schema": 1,
        "run": {
            "date": now.strftime("%Y-%m-%d"),
            "finished_at": now.isoformat(timespec="seconds"),
            "commit": commit,
            "dirty": dirty,
            "duration_seconds": round(time.time() - started, 1),
            "loadavg_before": loadavg_before,
            "loadavg_after": _loadavg(),
            "cpus": os.cpu_count(),
            "requests": args.requests,
            "seed": args.seed,
            "zipf_exponent": args.zipf,
            "reply_tokens": args.reply_tokens,
            "temperature": TEMPERATURE,
            "threshold": threshold,
            "model": baseline["model"],
            "runs": {name: env for name, env in RUNS.items()},
        },
        "workload": {
            "intents": Counter(intent.kind for intent in workload.intents),
            "questions": sum(len(intent.questions) for intent in workload.intents),
            "distinct_texts_sent": len(texts),
            "requests_repeating_an_earlier_text": len(sequence) - len(texts),
            "requests_by_kind": Counter(request.intent.kind for request in sequence),
            "requests_as_variants": sum(request.text != request.question for request in sequence),
        },
        "replies_identify_questions": identity,
        "runs": runs,
        "savings": savings,
        "lookup_latency": lookups,
        "similarity": census,
        "targets": {
            "no_wrong_hits_on_near_misses": semantic["wrong_hits_in_near_miss_pairs"] == 0,
            "no_near_miss_through_threshold_and_guards": not _exposed_near_misses(census, threshold),
            "fewer_model_tokens": (savings["semantic"]["model_tokens_fraction"] or 0) >= TOKEN_SAVING_TARGET,
            "added_lookup_p50": _within(lookups["added_ms"]["p50"], ADDED_LOOKUP_TARGET_MS),
            "added_lookup_p50_without_embedding": _within(
                lookups["added_without_embedding_ms"]["p50"], ADDED_LOOKUP_TARGET_MS
            ),
        },
    }


def _exposed_near_misses(census: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """The near-misses of the census that a question of their intent, at or above the threshold, would answer: no
    guard refuses it."""
    return [
        entry
        for entry in census["near_misses"]["pairs"]
        if entry["closest_unguarded"] and entry["closest_unguarded"]["similarity"] >= threshold
    ]


def _within(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _met(met: bool) -> str:
    return "✅ met" if met else "❌ not met"


def _counts(counts: dict[str, float]) -> str:
    return ", ".join(f"{name} {int(value)}" for name, value in sorted(counts.items())) or "-"


def markdown(report: dict[str, Any]) -> str:
    run, workload, runs, savings = report["run"], report["workload"], report["runs"], report["savings"]
    lookups, census, targets = report["lookup_latency"], report["similarity"], report["targets"]
    identity = report["replies_identify_questions"]
    requests_by_kind, intents = workload["requests_by_kind"], workload["intents"]
    semantic = runs["semantic"]
    lines = [
        f"# chatmesh answer cache benchmark: {run['date']}, commit {run['commit']}{' (dirty)' if run['dirty'] else ''}",
        "",
        f"{run['requests']} first turns (ChatService.Chat, one at a time) of bench/cache_workload.yaml, seed "
        f"{run['seed']}: {requests_by_kind.get(FAQ, 0)} asking {intents[FAQ]} FAQ intents (Zipf, s = "
        f"{run['zipf_exponent']}), {requests_by_kind.get(NEAR_MISS, 0)} asking {intents[NEAR_MISS]} near-misses "
        f"(each twice) and {requests_by_kind.get(UNRELATED, 0)} unrelated one-offs; {workload['requests_as_variants']} "
        f"sent as a variant (greeting, thanks, no question mark, lower case); {workload['distinct_texts_sent']} "
        f"distinct texts. Model {run['model']}, modelsim replies of {run['reply_tokens']} tokens, temperature "
        f"{run['temperature']}, semantic threshold {run['threshold']}; each run on a fresh cluster and Redis. Load "
        f"average {run['loadavg_before']} before, {run['loadavg_after']} after ({run['cpus']} CPUs), "
        f"{run['duration_seconds']:.0f} s.",
        "",
        "| run | exact hits | semantic hits | hit rate | wrong hits | of them near-miss | model tokens | USD | "
        "tokens saved | USD saved | Chat p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in runs.items():
        answered = summary["requests"] - summary["failed"]
        hit_rate = sum(summary["hits"].values()) / answered if answered else None
        saved = savings.get(name, {})
        lines.append(
            f"| {RUN_TITLES[name]} | {summary['hits']['exact']} | {summary['hits']['semantic']} | "
            f"{_percent(hit_rate)} | {summary['wrong_hits']} | {summary['wrong_hits_in_near_miss_pairs']} | "
            f"{summary['model_tokens']['total']:,} | {summary['cost_usd']:.4f} | "
            f"{_percent(saved.get('model_tokens_fraction'))} | {_percent(saved.get('usd_fraction'))} | "
            f"{summary['chat_latency_ms']['p50']} |"
        )
    problems = [
        f"{summary['failed']} failed and {summary['not_stop']} did not finish with stop in {name}"
        for name, summary in runs.items()
        if summary["failed"] or summary["not_stop"]
    ]
    lines += [
        "",
        f"Replies identify their question: the model's replies to {identity['questions']} questions were "
        f"{identity['replies']} distinct texts ({identity['questions_with_several_replies']} questions got several, "
        f"{identity['replies_of_several_questions']} texts answered several); hits not traced to a question: "
        f"{semantic['unattributed_hits']}. Near-miss requests asked after the intent they resemble had been answered: "
        f"{semantic['near_miss_requests_after_their_intent_was_answered']} of {semantic['near_miss_requests']}. "
        f"Semantic lookups: {_counts(semantic['semantic_lookups'])}; guard refusals: "
        f"{_counts(semantic['guard_refusals'])}. The semantic run made {semantic['modelsim']['embedding_requests']} "
        f"embedding calls (about {semantic['embedding_tokens_estimated']:,} tokens, "
        f"{savings['semantic']['embedding_usd_estimated']:.6f} USD at {semantic['embedding_model']}'s price)."
        + (f" {'; '.join(problems)}." if problems else ""),
        "",
        "Hits of the semantic run (exact + semantic, of requests):",
        "",
        "| " + " | ".join([FAQ, NEAR_MISS, UNRELATED, *LANGUAGES]) + " |",
        "|---|---|---|---|---|",
        "| "
        + " | ".join(
            f"{counts.get('exact', 0)} + {counts.get('semantic', 0)} of {counts.get('requests', 0)}"
            for counts in [*semantic["by_kind"].values(), *semantic["by_language"].values()]
        )
        + " |",
        "",
        f"Lookup latency: CacheService.Lookup (then LookupSimilar where it allows it, as dialogue calls them) of "
        f"{lookups['lookups']} questions that miss exactly, on a cache process "
        f"with the semantic cache off and one with it on (one Redis, {lookups['stored']:,} answers stored in the "
        f"scope), and an embeddings call ({lookups['embedding_model']}, {lookups['embedding_dimensions']} dimensions) "
        "for each to the same modelsim from this process, in turn:",
        "",
        "| | p50 ms | p90 ms |",
        "|---|---|---|",
        f"| semantic cache off | {lookups['off_ms']['p50']} | {lookups['off_ms']['p90']} |",
        f"| semantic cache on | {lookups['on_ms']['p50']} | {lookups['on_ms']['p90']} |",
        f"| added | {lookups['added_ms']['p50']} | {lookups['added_ms']['p90']} |",
        f"| an embeddings call | {lookups['embedding_call_ms']['p50']} | {lookups['embedding_call_ms']['p90']} |",
        f"| added without it | {lookups['added_without_embedding_ms']['p50']} | "
        f"{lookups['added_without_embedding_ms']['p90']} |",
        "",
        f"With the semantic cache on, the lookups were answered: {_counts(lookups['on_outcomes'])}.",
        "",
        "Targets of issue 17:",
        "",
        f"- 0 wrong hits on the near-misses (a near-miss answered with another intent's reply, or a request answered "
        f"with a near-miss's): {semantic['wrong_hits_in_near_miss_pairs']}, "
        f"{_met(targets['no_wrong_hits_on_near_misses'])}; and near-misses that a question of the intent they "
        f"resemble would answer, past the threshold and the guards, however the sequence falls (see below): "
        f"{len(_exposed_near_misses(census, run['threshold']))}, "
        f"{_met(targets['no_near_miss_through_threshold_and_guards'])}",
        f"- at least {TOKEN_SAVING_TARGET:.0%} fewer model tokens than with no cache: "
        f"{_percent(savings['semantic']['model_tokens_fraction'])}, {_met(targets['fewer_model_tokens'])}",
        f"- at most {ADDED_LOOKUP_TARGET_MS} ms p50 added to a lookup with {lookups['entries']:,} answers: "
        f"{lookups['added_ms']['p50']} ms with the embeddings call to modelsim, {_met(targets['added_lookup_p50'])}; "
        f"{lookups['added_without_embedding_ms']['p50']} ms without it, "
        f"{_met(targets['added_lookup_p50_without_embedding'])}",
        "",
        "The workload under modelsim's embeddings and the guards (how many are at or above each similarity):",
        "",
        "| | " + " | ".join(census["near_misses"]["at_or_above"]) + " |",
        "|---|" + "---|" * len(census["near_misses"]["at_or_above"]),
    ]
    near_misses, variants, paraphrases = census["near_misses"], census["variants"], census["paraphrases"]
    count = near_misses["count"]
    rows = [
        (f"near-misses, closest to a question or variant of their intent, of {count}", near_misses["at_or_above"]),
        (
            f"near-misses, closest that no guard refuses (wrong hits once both are asked), of {count}",
            near_misses["unguarded_at_or_above"],
        ),
        (f"variants, to their question (what a semantic hit needs), of {variants['count']}", variants["at_or_above"]),
        (f"questions, to their intent's closest other one, of {paraphrases['count']}", paraphrases["at_or_above"]),
    ]
    lines += [f"| {title} | " + " | ".join(map(str, counts.values())) + " |" for title, counts in rows]
    exposed = _exposed_near_misses(census, run["threshold"])
    if exposed:
        lines += [
            "",
            f"Near-misses that the threshold ({run['threshold']}) and the guards let through:",
            "",
            "| similarity | asked | cached |",
            "|---|---|---|",
        ]
        lines += [
            f"| {entry['closest_unguarded']['similarity']} | {entry['closest_unguarded']['asked']} "
            f"({entry['near_miss']}) | {entry['closest_unguarded']['cached']} |"
            for entry in exposed
        ]
    wrong = [(name, entry) for name, summary in runs.items() for entry in summary["wrong"]]
    if wrong:
        lines += ["", "Wrong hits:", "", "| run | match | similarity | asked | answered with the reply to |"]
        lines.append("|---|---|---|---|---|")
        lines += [
            f"| {name} | {entry['match']} | {entry['similarity']} | {entry['asked']} ({entry['intent']}) | "
            f"{entry['answered_with_reply_to']} ({entry['reply_intent']}) |"
            for name, entry in wrong
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="first turns in the sequence")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--zipf", type=float, default=1.0, help="the Zipf exponent of the FAQ intents' popularity")
    parser.add_argument("--reply-tokens", type=int, default=100, help="tokens in each modelsim reply")
    parser.add_argument("--threshold", type=float, default=None, help="the semantic threshold (default: chatmesh's)")
    parser.add_argument("--entries", type=int, default=10_000, help="answers in the scope for the lookup latency")
    parser.add_argument("--lookups", type=int, default=1000, help="lookups timed with the semantic cache on and off")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args(argv)

    report = uvloop.run(measure(args))
    stem = f"{report['run']['date']}-{report['run']['commit']}-cache"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (args.out_dir / f"{stem}.md").write_text(text)
    print(text)
    print(f"bench-cache: wrote {args.out_dir / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
