"""What knowledge-base retrieval adds to a turn (issue 18's target: ≤ 3 ms p50 with 5,000 chunks), measured two ways.

**Retrieval alone** (`measure_retrieval`, in this process): `Retriever.search` over one knowledge base of 5,000
chunks, timed as a turn waits for it (wall clock, the worker thread included when the search is offloaded), with
the knowledge base already loaded, as it is for every turn after the first since its last change. The chunks are
synthetic: about 200 words each, drawn with a Zipf distribution from a vocabulary of 20,000 made-up English words
and 3,000 Chinese characters (so that BM25 has common and rare terms, as in real text), with random unit vectors at
the embedding size measured (256, CHATMESH_EMBEDDING_DIMENSIONS' default). Questions are 8 to 12 words from the
same distribution. Also reported: how long loading the knowledge base into a process takes (from the in-memory
store: the matrix and the keyword index, without Redis' transfer).

**A grounded turn end to end** (`measure_turns`, against a running cluster with the admin API open: `make bench`'s
chatmesh_open): a knowledge base of Markdown guides of ten sections each (one chunk per section, about 210 tokens,
made of the same kind of words) is ingested through KnowledgeService, then StreamChat calls at concurrency 1 with
`knowledge_bases` naming it alternate with the same calls without, each call a new conversation with a question of
its own (so no cache answers it). What the grounded call adds is the question's embedding (a round trip to the
embedding endpoint: modelsim here), the retrieval, the sources counted into the window, and the model reading a
longer prompt (modelsim counts its tokens).

`python -m bench.knowledge` measures retrieval alone at 256 and 1,536 dimensions; with `--turns`, it also starts a
Redis and a cluster as `make bench` does and measures grounded turns (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.retrieval import Retriever
from chatmesh.dialogue.knowledge.store import MemoryKnowledgeStore
from chatmesh.v1 import chat_pb2, chat_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc

CHUNKS = 5_000
DIMENSIONS = 256
TARGET_MS = 3.0
SEARCHES = 1_000
# The grounded turns' knowledge base: guides of SECTIONS sections of SECTION_WORDS words, each section one chunk.
KNOWLEDGE_BASE = "bench-guides"
TENANT = "default"  # the tenant of every call with CHATMESH_AUTH=off
SECTIONS = 10
SECTION_WORDS = 60
# Documents per IngestDocuments request, as `chatmesh kb ingest` sends them.
INGEST_BATCH = 64
CALL_TIMEOUT_SECONDS = 30.0
INGEST_TIMEOUT_SECONDS = 300.0
_VOCABULARY = 20_000
_CHINESE = 3_000


def _vocabulary(random: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(random.choice(letters, size=random.integers(3, 10))) for _ in range(_VOCABULARY * 2)}
    chinese = [chr(0x4E00 + offset) for offset in random.choice(20_000, size=_CHINESE, replace=False)]
    return sorted(words)[:_VOCABULARY] + ["".join(chinese[i : i + 2]) for i in range(0, _CHINESE, 2)]


def _text(random: np.random.Generator, vocabulary: list[str], words: int) -> str:
    ranks = np.minimum(random.zipf(1.2, size=words), len(vocabulary)) - 1
    return " ".join(vocabulary[rank] for rank in random.permutation(len(vocabulary))[ranks])


def _percentiles(timings_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(timings_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 3),
        "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 3),
    }


async def _measure_size(
    dimensions: int, searches: int, random: np.random.Generator, vocabulary: list[str]
) -> dict[str, Any]:
    store = MemoryKnowledgeStore()
    chunks = [
        Chunk("bench.md", f"Section {index // 4}", index, _text(random, vocabulary, 200), 250)
        for index in range(CHUNKS)
    ]
    vectors = random.standard_normal((CHUNKS, dimensions)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    await store.upsert_document("bench", "kb", "bench.md", "digest", chunks, list(vectors), embedding_model="bench")
    retriever = Retriever(store, embedding_model="bench")
    questions = [_text(random, vocabulary, int(random.integers(8, 13))) for _ in range(searches)]
    question_vectors = random.standard_normal((searches, dimensions)).astype(np.float32)

    started = time.perf_counter()
    await retriever.search("bench", ["kb"], questions[0], question_vectors[0], k=5)
    load_ms = (time.perf_counter() - started) * 1000
    timings = []
    for question, vector in zip(questions, question_vectors, strict=True):
        started = time.perf_counter()
        await retriever.search("bench", ["kb"], question, vector, k=5)
        timings.append((time.perf_counter() - started) * 1000)
    return {
        "dimensions": dimensions,
        "chunks": CHUNKS,
        "searches": searches,
        **_percentiles(timings),
        "load_ms": round(load_ms, 1),
    }


async def measure_retrieval(dimensions: Sequence[int] = (DIMENSIONS,), searches: int = SEARCHES) -> dict[str, Any]:
    """Search latency percentiles at each size of `dimensions`; `p50_ms` and `p90_ms` are the first size's (the
    default one's), compared with TARGET_MS."""
    random = np.random.default_rng(18)
    vocabulary = _vocabulary(random)
    sizes = [await _measure_size(size, searches, random, vocabulary) for size in dimensions]
    return {
        "sizes": sizes,
        "p50_ms": sizes[0]["p50_ms"],
        "p90_ms": sizes[0]["p90_ms"],
        "dimensions": sizes[0]["dimensions"],
        "chunks": CHUNKS,
        "target_ms": TARGET_MS,
    }


def _guides(random: np.random.Generator, vocabulary: list[str], chunks: int) -> list[knowledge_pb2.KnowledgeDocument]:
    """Markdown guides of SECTIONS sections each, `chunks` sections in all (one chunk each at the default size)."""
    guides = []
    for number in range(-(-chunks // SECTIONS)):
        sections = range(number * SECTIONS, min(chunks, (number + 1) * SECTIONS))
        body = "\n\n".join(f"## Topic {section}\n\n{_text(random, vocabulary, SECTION_WORDS)}" for section in sections)
        guides.append(
            knowledge_pb2.KnowledgeDocument(
                path=f"guides/guide-{number:04d}.md",
                content=f"# Guide {number}\n\n{body}\n".encode(),
                media_type="text/markdown",
            )
        )
    return guides


async def _ingest(
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, guides: list[knowledge_pb2.KnowledgeDocument]
) -> int:
    """Ingests the guides into KNOWLEDGE_BASE, INGEST_BATCH documents a request; the chunks written."""
    written = 0
    for start in range(0, len(guides), INGEST_BATCH):
        request = knowledge_pb2.IngestDocumentsRequest(
            tenant=TENANT, knowledge_base=KNOWLEDGE_BASE, documents=guides[start : start + INGEST_BATCH]
        )
        written += (await knowledge.IngestDocuments(request, timeout=INGEST_TIMEOUT_SECONDS)).chunks
    return written


async def _turn(chat: chat_pb2_grpc.ChatServiceStub, message: str, grounded: bool) -> tuple[float, float, int]:
    """One StreamChat in a new conversation: its latency and time to the first delta (ms), and its citations.
    Raises RuntimeError for a reply that is not the model's whole answer."""
    options = chat_pb2.ChatOptions(knowledge_bases=[KNOWLEDGE_BASE] if grounded else [])
    request = chat_pb2.ChatRequest(user_id="bench-knowledge", message=message, options=options)
    started = time.perf_counter()
    first_delta = None
    completed = None
    async for event in chat.StreamChat(request, timeout=CALL_TIMEOUT_SECONDS):
        kind = event.WhichOneof("event")
        if kind == "delta" and first_delta is None:
            first_delta = time.perf_counter()
        elif kind == "completed":
            completed = event.completed
    ended = time.perf_counter()
    if completed is None or completed.finish_reason != chat_pb2.FINISH_REASON_STOP or completed.cached:
        raise RuntimeError(f"a {'grounded' if grounded else 'plain'} turn did not end with the model's reply")
    return (ended - started) * 1000, ((first_delta or ended) - started) * 1000, len(completed.citations)


def _embedding_calls(metrics_port: int) -> tuple[float, float]:
    """Dialogue's embedding requests so far: (how many, their seconds in all), from its metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals = {"_count": 0.0, "_sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            suffix = sample.name.removeprefix("chatmesh_model_request_duration_seconds")
            if suffix in totals and sample.labels.get("operation") == "embedding":
                totals[suffix] += sample.value
    return totals["_count"], totals["_sum"]


async def measure_turns(
    target: str, *, chunks: int = CHUNKS, calls: int = 200, dialogue_metrics_port: int | None = None
) -> dict[str, Any]:
    """Ingests a knowledge base of `chunks` chunks through the gateway at `target` (tenant `default`, the admin API
    open), then times `calls` grounded StreamChat calls and as many without knowledge bases, alternating. With
    dialogue's metrics port, also how long its embedding requests of the question took (the grounded turns'
    only, with the semantic cache off)."""
    random = np.random.default_rng(18)
    vocabulary = _vocabulary(random)
    guides = _guides(random, vocabulary, chunks)
    questions = [_text(random, vocabulary, int(random.integers(8, 13))) + "?" for _ in range(calls + 1)]
    async with grpc.aio.insecure_channel(target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        started = time.perf_counter()
        written = await _ingest(knowledge_pb2_grpc.KnowledgeServiceStub(channel), guides)
        ingest_seconds = time.perf_counter() - started
        # The first grounded turn loads the knowledge base into dialogue (from Redis, with its keyword index).
        first_ms, _, _ = await _turn(chat, f"[first] {questions[-1]}", grounded=True)
        embeddings_before = _embedding_calls(dialogue_metrics_port) if dialogue_metrics_port else None
        samples: dict[str, list[tuple[float, float, int]]] = {"grounded": [], "plain": []}
        for index, question in enumerate(questions[:calls]):
            # Each pair in turn order, swapped every other pair, so that drift hits both alike.
            for grounded in (True, False) if index % 2 == 0 else (False, True):
                name = "grounded" if grounded else "plain"
                samples[name].append(await _turn(chat, f"[{name[0]} {index}] {question}", grounded))
        embedding_mean_ms = None
        if embeddings_before is not None and dialogue_metrics_port:
            count, seconds = _embedding_calls(dialogue_metrics_port)
            if count > embeddings_before[0]:
                embedding_mean_ms = round((seconds - embeddings_before[1]) * 1000 / (count - embeddings_before[0]), 3)
    stats = {
        name: {
            "calls": len(runs),
            **_percentiles([latency for latency, _, _ in runs]),
            "ttfd_p50_ms": round(statistics.median(ttfd for _, ttfd, _ in runs), 3),
        }
        for name, runs in samples.items()
    }
    grounded, plain = stats["grounded"], stats["plain"]
    return {
        "chunks": written,
        "documents": len(guides),
        "ingest_seconds": round(ingest_seconds, 1),
        "first_turn_ms": round(first_ms, 1),
        "grounded": grounded,
        "plain": plain,
        "cited_share": round(sum(1 for _, _, cited in samples["grounded"] if cited) / calls, 3) if calls else None,
        "added_p50_ms": round(grounded["p50_ms"] - plain["p50_ms"], 3),
        "added_p90_ms": round(grounded["p90_ms"] - plain["p90_ms"], 3),
        "added_ttfd_p50_ms": round(grounded["ttfd_p50_ms"] - plain["ttfd_p50_ms"], 3),
        "embedding_mean_ms": embedding_mean_ms,
    }


async def _standalone_turns(calls: int) -> dict[str, Any]:
    """measure_turns against a fresh Redis and cluster started as `make bench` starts chatmesh_open's."""
    from bench.run import _support  # the test launchers, on sys.path through it

    support = _support()
    redis_server = support.RedisServer.start()
    try:
        with support.Cluster(redis_url=redis_server.url, env={"CHATMESH_AUTH": "off"}) as cluster:
            return await measure_turns(
                cluster.gateway_target, calls=calls, dialogue_metrics_port=cluster.metrics_ports["dialogue"]
            )
    finally:
        redis_server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.knowledge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--searches", type=int, default=SEARCHES, help="searches timed at each size")
    parser.add_argument("--turns", type=int, default=0, metavar="CALLS", help="also time CALLS grounded turns")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"retrieval": asyncio.run(measure_retrieval((DIMENSIONS, 1536), args.searches))}
    if args.turns:
        report["turns"] = asyncio.run(_standalone_turns(args.turns))
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
