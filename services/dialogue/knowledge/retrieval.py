"""The chunks of a tenant's knowledge bases that best answer a question: vector similarity fused with BM25.

**Two scores, one sum.** Every chunk of the knowledge bases searched gets the cosine similarity of its embedding
to the question's (brute force with numpy over one float32 matrix of unit rows: exact, and about 0.1 ms for 5,000
chunks at 256 dimensions) and its BM25 score over its title and text (chatmesh.dialogue.knowledge.keywords).
Each score is scaled to [0, 1] by its minimum and maximum over all the chunks searched, and a chunk's score is
`vector_weight` * the scaled similarity + (1 - `vector_weight`) * the scaled BM25 score (0.5 each by default).
Ties go to the higher similarity. Keywords catch what embeddings blur (error codes, product and option names,
numbers); embeddings catch paraphrases that share no word.

Why this weighted sum ("relative score fusion", Weaviate's default since 1.24) and not reciprocal rank fusion:
ranks throw away how far apart scores are, so RRF ranks a chunk that is second in both rankings above one that is
first by a wide margin in one and tenth in the other. On the tests' corpus with modelsim's embeddings, RRF
(k = 60) found the right chunk in the top 3 for 84 % of English and 90 % of Chinese questions, this sum for 96 %
and 95 %, and the result barely moves for weights from 0.3 to 0.7. Bruch et al. (An Analysis of Fusion Functions
for Hybrid Retrieval, ACM TOIS 2023) found the same on public benchmarks: a convex combination of normalized
scores beats RRF, and one weight carries across domains.

**In memory, per version.** Each knowledge base searched is loaded once into this process (its matrix, its
chunks and its keyword index, built in a worker thread) and kept while its version stays the same, the least
recently searched going first beyond `max_bytes`. Versions are asked of the store (one round trip for all the
knowledge bases of a search) at most every `version_check_seconds`, so a change reaches every replica within
that time. A search of more than `offload_floats` floats runs in a worker thread, off the event loop.

A knowledge base embedded with another model or size than the question is not searched (`mismatched`), nor is
one that does not exist (`missing`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.keywords import KeywordIndex, terms
from chatmesh.dialogue.knowledge.store import (
    KnowledgeBaseChanging,
    KnowledgeBaseSnapshot,
    KnowledgeStore,
    validate_name,
)
from chatmesh.runtime.logs import get_logger

log = get_logger(__name__)

# The share of the (scaled) vector similarity in a chunk's score; the rest is the (scaled) BM25 score's.
VECTOR_WEIGHT = 0.5
# A search over more floats than this (all the matrices it reads) runs in a worker thread: 16 MiB of float32,
# about 0.3 ms of numpy here (5,000 chunks at 256 dimensions, 1.3 million floats, take about 0.05 ms).
OFFLOAD_FLOATS = 1 << 22
MAX_BYTES = 256 * 1024 * 1024
VERSION_CHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RetrievedChunk:
    knowledge_base: str
    chunk: Chunk
    score: float  # the fused score, from 0 to 1
    similarity: float  # the cosine similarity of the chunk's embedding and the question's
    keyword_score: float  # its BM25 score for the question (0: no term in common)


@dataclass(frozen=True, slots=True)
class Retrieval:
    chunks: tuple[RetrievedChunk, ...]  # best first
    versions: Mapping[str, str]  # the version searched of each knowledge base searched
    missing: tuple[str, ...] = ()  # named, but does not exist
    mismatched: tuple[str, ...] = ()  # embedded with another model or size than the question


@dataclass(slots=True)
class _LoadedKnowledgeBase:
    version: str
    embedding_model: str
    chunks: tuple[Chunk, ...]
    matrix: np.ndarray  # unit rows, float32
    keywords: KeywordIndex
    nbytes: int
    checked_at: float

    @classmethod
    def build(cls, snapshot: KnowledgeBaseSnapshot, checked_at: float) -> _LoadedKnowledgeBase:
        matrix = np.ascontiguousarray(snapshot.vectors, dtype=np.float32)
        lengths = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = np.divide(matrix, lengths, out=np.zeros_like(matrix), where=lengths > 0)
        keywords = KeywordIndex([chunk.indexed_text for chunk in snapshot.chunks])
        text_bytes = sum(len(chunk.text) + len(chunk.title) + len(chunk.source) for chunk in snapshot.chunks)
        return cls(
            snapshot.version,
            snapshot.embedding_model,
            snapshot.chunks,
            matrix,
            keywords,
            matrix.nbytes + keywords.nbytes + 2 * text_bytes,
            checked_at,
        )

    def scores(self, vector: np.ndarray | None, query_terms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each chunk's cosine similarity to `vector` (a unit vector; all 0 without one) and BM25 score for the
        query's terms."""
        if not self.chunks:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        similarities = self.matrix @ vector if vector is not None else np.zeros(len(self.chunks), dtype=np.float32)
        return similarities, self.keywords.term_scores(query_terms)


def _scaled(scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The arrays scaled together to [0, 1] by their common minimum and maximum (all 0 when those are equal)."""
    low = min((float(array.min()) for array in scores if array.size), default=0.0)
    high = max((float(array.max()) for array in scores if array.size), default=0.0)
    if high <= low:
        return [np.zeros_like(array) for array in scores]
    return [(array - low) / (high - low) for array in scores]


class Retriever:
    """Searches a tenant's knowledge bases; one per process, shared by every turn. `embedding_model` is the model
    of the question vectors given to `search`."""

    def __init__(
        self,
        store: KnowledgeStore,
        *,
        embedding_model: str,
        vector_weight: float = VECTOR_WEIGHT,
        max_bytes: int = MAX_BYTES,
        version_check_seconds: float = VERSION_CHECK_SECONDS,
        offload_floats: int = OFFLOAD_FLOATS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._embedding_model = embedding_model
        if not 0 <= vector_weight <= 1:
            raise ValueError(f"vector_weight is {vector_weight}; it must be from 0 to 1")
        self._vector_weight = vector_weight
        self._max_bytes = max_bytes
        self._version_check_seconds = version_check_seconds
        self._offload_floats = offload_floats
        self._clock = clock
        self._loaded: OrderedDict[tuple[str, str], _LoadedKnowledgeBase] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    async def search(
        self,
        tenant: str,
        knowledge_bases: Sequence[str],
        question: str,
        vector: np.ndarray | None,
        *,
        k: int,
        min_similarity: float | None = None,
    ) -> Retrieval:
        """The `k` best chunks for `question` (whose embedding is `vector`) among the tenant's `knowledge_bases`;
        by keywords alone without a vector (the embedding endpoint failed). With `min_similarity`, chunks less
        similar to the question than that are left out, however their keywords matched. Raises
        KnowledgeStoreUnavailable when a knowledge base must be (re)loaded and the store cannot be reached, and
        KnowledgeBaseChanging when one keeps changing and was never loaded."""
        names = list(dict.fromkeys(knowledge_bases))
        for name in names:
            validate_name(name)
        loaded, missing = await self._current(tenant, names)
        question_vector = None
        if vector is not None:
            question_vector = np.asarray(vector, dtype=np.float32).reshape(-1)
            length = float(np.linalg.norm(question_vector))
            if length > 0:
                question_vector = question_vector / length
        elif min_similarity is not None:
            raise ValueError("min_similarity needs a question vector")
        searched = {}
        mismatched = []
        for name, base in loaded.items():
            if base.embedding_model not in (self._embedding_model, "") or (
                question_vector is not None and len(base.chunks) and base.matrix.shape[1] != question_vector.size
            ):
                mismatched.append(name)
            else:
                searched[name] = base
        query_terms = terms(question)
        floats = sum(base.matrix.size for base in searched.values())
        if floats > self._offload_floats:
            found = await asyncio.to_thread(self._best, searched, question_vector, query_terms, k, min_similarity)
        else:
            found = self._best(searched, question_vector, query_terms, k, min_similarity)
        return Retrieval(
            tuple(found),
            {name: base.version for name, base in searched.items()},
            tuple(missing),
            tuple(mismatched),
        )

    async def versions(self, tenant: str, knowledge_bases: Sequence[str]) -> dict[str, str]:
        """The version of each of the tenant's `knowledge_bases` that a search now would read ("" for one that does
        not exist), loading them if needed. Raises as `search` does."""
        names = list(dict.fromkeys(knowledge_bases))
        for name in names:
            validate_name(name)
        loaded, missing = await self._current(tenant, names)
        return {**{name: base.version for name, base in loaded.items()}, **dict.fromkeys(missing, "")}

    def _best(
        self,
        searched: Mapping[str, _LoadedKnowledgeBase],
        vector: np.ndarray | None,
        query_terms: Sequence[str],
        k: int,
        min_similarity: float | None,
    ) -> list[RetrievedChunk]:
        names = list(searched)
        scores = [searched[name].scores(vector, query_terms) for name in names]
        similarities = [similarity for similarity, _ in scores]
        keyword_scores = [keyword_score for _, keyword_score in scores]
        weight = self._vector_weight
        found = []
        for name, similarity, keyword_score, scaled_similarity, scaled_keyword_score in zip(
            names, similarities, keyword_scores, _scaled(similarities), _scaled(keyword_scores), strict=True
        ):
            fused = weight * scaled_similarity + (1 - weight) * scaled_keyword_score
            if min_similarity is not None:
                fused[similarity < min_similarity] = -1.0
            rows = np.arange(fused.size) if fused.size <= k else np.argpartition(-fused, k - 1)[:k]
            chunks = searched[name].chunks
            found += [
                RetrievedChunk(name, chunks[row], float(fused[row]), float(similarity[row]), float(keyword_score[row]))
                for row in rows.tolist()
                if fused[row] >= 0
            ]
        found.sort(key=lambda chunk: (chunk.score, chunk.similarity), reverse=True)
        return found[:k]

    async def _current(self, tenant: str, names: list[str]) -> tuple[dict[str, _LoadedKnowledgeBase], list[str]]:
        """The loaded knowledge bases at their current versions (as of at most version_check_seconds ago), and
        the names that do not exist."""
        now = self._clock()
        loaded = {name: self._loaded.get((tenant, name)) for name in names}
        stale = [
            name
            for name, base in loaded.items()
            if base is None or now - base.checked_at >= self._version_check_seconds
        ]
        versions = await self._store.versions(tenant, stale) if stale else {}
        current: dict[str, _LoadedKnowledgeBase] = {}
        missing = []
        for name in names:
            base = loaded[name]
            if base is not None and name not in versions:
                self._loaded.move_to_end((tenant, name))
                current[name] = base
                continue
            version = versions[name]
            if version is None:
                self._loaded.pop((tenant, name), None)
                missing.append(name)
            elif base is not None and base.version == version:
                base.checked_at = now
                self._loaded.move_to_end((tenant, name))
                current[name] = base
            else:
                reloaded = await self._reload(tenant, name, version, base)
                if reloaded is None:
                    missing.append(name)
                else:
                    current[name] = reloaded
        return current, missing

    async def _reload(
        self, tenant: str, name: str, version: str, previous: _LoadedKnowledgeBase | None
    ) -> _LoadedKnowledgeBase | None:
        key = (tenant, name)
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            base = self._loaded.get(key)
            if base is not None and base.version == version:
                return base  # loaded by another search meanwhile
            try:
                snapshot = await self._store.load(tenant, name)
            except KnowledgeBaseChanging:
                if previous is None:
                    raise
                log.warning("knowledge_base_changing", extra={"knowledge_base": name})
                return previous
            if snapshot is None:
                self._loaded.pop(key, None)
                return None
            base = await asyncio.to_thread(_LoadedKnowledgeBase.build, snapshot, self._clock())
            self._loaded[key] = base
            self._loaded.move_to_end(key)
            self._fit_memory(keep=key)
            log.info(
                "knowledge_base_loaded",
                extra={"knowledge_base": name, "chunks": len(base.chunks), "bytes": base.nbytes},
            )
            return base

    def _fit_memory(self, keep: tuple[str, str]) -> None:
        total = sum(base.nbytes for base in self._loaded.values())
        for key in list(self._loaded):
            if total <= self._max_bytes:
                break
            if key != keep:
                total -= self._loaded.pop(key).nbytes
                lock = self._loading.get(key)
                if lock is not None and not lock.locked():
                    del self._loading[key]
