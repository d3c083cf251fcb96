"""What knowledge-base retrieval adds to a turn: `Retriever.search` over one knowledge base of 5,000 chunks, timed
as a turn waits for it (wall clock, the worker thread included when the search is offloaded), with the knowledge
base already loaded, as it is for every turn after the first since its last change.

The chunks are synthetic: about 200 words each, drawn with a Zipf distribution from a vocabulary of 20,000 made-up
English words and 3,000 Chinese characters (so that BM25 has common and rare terms, as in real text), with random
unit vectors at the embedding sizes measured. Questions are 8 to 12 words from the same distribution. Also
reported: how long loading the knowledge base into a process takes (from the in-memory store: the matrix and the
keyword index, without Redis' transfer).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np

from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.retrieval import Retriever
from chatmesh.dialogue.knowledge.store import MemoryKnowledgeStore

CHUNKS = 5_000
DIMENSIONS = (256, 1536)
TARGET_MS = 3.0
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


async def _measure(
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
    timings.sort()
    return {
        "dimensions": dimensions,
        "chunks": CHUNKS,
        "searches": searches,
        "p50_ms": round(statistics.median(timings), 3),
        "p99_ms": round(timings[int(len(timings) * 0.99) - 1], 3),
        "load_ms": round(load_ms, 1),
    }


def measure(searches: int = 2000) -> dict[str, Any]:
    """Search latency percentiles at each size in DIMENSIONS; `p50_ms` is the worst size's median."""
    random = np.random.default_rng(18)
    vocabulary = _vocabulary(random)
    sizes = [asyncio.run(_measure(dimensions, searches, random, vocabulary)) for dimensions in DIMENSIONS]
    return {"sizes": sizes, "p50_ms": max(size["p50_ms"] for size in sizes), "target_ms": TARGET_MS}


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
