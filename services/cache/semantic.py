"""The semantic cache: on an exact miss, the answer stored for a question close enough in meaning.

A question is matched only within its scope (chatmesh.cache.keys.semantic_scope): the tenant, the model, the
system prompt, every sampling option, the history before the question (empty on a first turn; by default only
first turns are looked up), and the embedding model with its dimensions. Within the scope, the nearest questions
by cosine similarity of their embeddings are candidates when above the threshold; a candidate answers only if the
guards (chatmesh.cache.guards: numbers, negations, named entities) find nothing that differs, and only if its
entry and its answer are still in the cache's tiers when read.

Where things are kept:
- Each question is a `SemanticEntry` (the answer's key, the question, its vector) stored in the AnswerCache's
  tiers under `chatmesh.cache.keys.question_key`, with the answer's TTL and listed in the same origin indexes:
  erasing a conversation or a user removes its questions with its answers, in every tier, and its tombstones
  refuse a question stored after it as they refuse an answer.
- With Redis, each scope lists its questions in a sorted set (`scope_members`, by expiry, trimmed to
  `max_entries`), so that a cache process that starts or restarts loads a scope's vectors from Redis the first
  time it is searched (in the background: that lookup misses). Stores are announced on ADDITIONS_CHANNEL, and
  every process that has the scope loaded adds the vector; erasures arrive as the answers' do.
- In each process, a scope's vectors are one float32 matrix, searched by brute force with numpy: exact, and at
  256 dimensions about 0.15 ms for 10,000 questions on this machine (usearch's HNSW index took 0.3 ms there, and
  approximates; it wins only from about 1,500 dimensions). The matrices of all scopes are bounded by
  `memory_max_bytes`, the least recently searched scope going first.

A process's vectors may lag behind Redis (an announcement missed, a scope trimmed elsewhere): that costs hits,
never correctness, since a candidate is served only after its entry and answer are read from the tiers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from chatmesh.cache import metrics
from chatmesh.cache.guards import guard_mismatch, question_features
from chatmesh.cache.keys import normalize_text, question_key, scope_members, scope_of_question, semantic_scope
from chatmesh.cache.tiers import ADDITIONS_CHANNEL, AnswerCache, CacheHit
from chatmesh.model.client import ModelClient
from chatmesh.model.errors import ModelError
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import CacheSettings
from chatmesh.runtime.tasks import BackgroundTasks
from chatmesh.v1 import cache_pb2

log = get_logger(__name__)

# `(question, deadline in loop.time() terms)` -> its unit vector; raises ModelError.
Embed = Callable[[str, float], Awaitable[np.ndarray]]

# The nearest questions above the threshold that a lookup checks against the guards, best first.
CANDIDATES = 4
# A search over more floats than this runs in a worker thread, off the event loop: 4 Mi floats (16,000 questions at
# 256 dimensions) take about 1 ms of numpy here; below that, the hand-off would cost more than it spares.
OFFLOAD_FLOATS = 1 << 22
# Questions read from Redis per MGET when loading a scope.
LOAD_BATCH = 500


@dataclass(frozen=True, slots=True)
class SemanticHit:
    hit: CacheHit
    similarity: float


@dataclass(frozen=True, slots=True)
class SemanticLookup:
    """A semantic lookup's hit, or on a miss the question's embedding (None when there is none: the embedding
    endpoint failed), which the Store of the answer passes back."""

    hit: SemanticHit | None
    embedding: cache_pb2.QuestionEmbedding | None


class ScopeVectors:
    """One scope's question vectors in this process: a float32 matrix searched by brute force, at most
    `max_entries` rows (the soonest to expire go first), of the length of the first vector added. Never awaits:
    every method is atomic on the event loop."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._keys: list[str] = []
        self._rows: dict[str, int] = {}
        self._matrix = np.empty((0, 0), dtype=np.float32)
        self._expires = np.empty(0, dtype=np.float64)

    def accepts(self, vector: np.ndarray) -> bool:
        """Whether `vector` has this scope's length (any, while the scope has never held one)."""
        return self._matrix.shape[1] in (0, len(vector))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    @property
    def nbytes(self) -> int:
        return self._matrix.nbytes + self._expires.nbytes

    def add(self, key: str, vector: np.ndarray, expires_at: float) -> None:
        """Keeps `vector` (unit length) for `key` until `expires_at` (time.time() terms), replacing its old one."""
        if not self.accepts(vector):
            raise ValueError(f"a vector of {len(vector)} dimensions in a scope of {self._matrix.shape[1]}")
        row = self._rows.get(key)
        if row is None:
            if len(self._keys) >= self._max_entries:
                self.discard(self._keys[int(np.argmin(self._expires[: len(self._keys)]))])
            row = len(self._keys)
            if row == len(self._matrix):
                capacity = min(max(16, 2 * row), self._max_entries)
                matrix = np.empty((capacity, len(vector)), dtype=np.float32)
                expires = np.empty(capacity, dtype=np.float64)
                if row:
                    matrix[:row] = self._matrix[:row]
                    expires[:row] = self._expires[:row]
                self._matrix, self._expires = matrix, expires
            self._keys.append(key)
            self._rows[key] = row
        self._matrix[row] = vector
        self._expires[row] = expires_at

    def discard(self, key: str) -> None:
        row = self._rows.pop(key, None)
        if row is None:
            return
        last = len(self._keys) - 1
        if row != last:
            moved = self._keys[last]
            self._keys[row] = moved
            self._rows[moved] = row
            self._matrix[row] = self._matrix[last]
            self._expires[row] = self._expires[last]
        self._keys.pop()

    def scores(self, vector: np.ndarray) -> np.ndarray:
        """The cosine similarity of `vector` to every row, in row order. Safe to run in a worker thread: it reads a
        view that the event loop may change meanwhile, which `nearest` then checks."""
        if not self._keys:
            return np.empty(0, dtype=np.float32)
        return self._matrix[: len(self._keys)] @ vector

    def nearest(
        self, vector: np.ndarray, scores: np.ndarray, count: int, threshold: float, now: float
    ) -> list[tuple[str, float]]:
        """The `count` keys most similar to `vector` with a similarity of at least `threshold`, best first, from
        `scores` (see `scores`): each similarity is computed again from the current row, so that a row moved
        while `scores` ran is never taken for another. Expired rows are dropped."""
        size = min(len(scores), len(self._keys))
        if size == 0:
            return []
        scores = scores[:size]
        top = np.argpartition(-scores, min(count, size) - 1)[:count] if size > count else np.arange(size)
        found = []
        for row in top[np.argsort(-scores[top])]:
            if scores[row] < threshold:
                break
            key = self._keys[row]
            if self._expires[row] <= now:
                self.discard(key)
                continue
            similarity = float(self._matrix[row] @ vector)
            if similarity >= threshold:
                found.append((key, similarity))
        found.sort(key=lambda pair: -pair[1])
        return found


class RedisScopeLists:
    """Each scope's questions in Redis: a sorted set of their keys by expiry (ms since the epoch), with the TTL of
    the newest, trimmed on every add to what has not expired and to the `max_entries` that expire last."""

    def __init__(self, client: Redis, *, max_entries: int, ttl_seconds: float) -> None:
        self._client = client
        self._max_entries = max_entries
        self._ttl_ms = int(ttl_seconds * 1000)

    async def add(self, scope: str, key: str, expires_at: float) -> None:
        """Lists `key` in `scope` and announces it on ADDITIONS_CHANNEL."""
        members = scope_members(scope)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(members, {key: int(expires_at * 1000)})
            pipe.zremrangebyscore(members, "-inf", int(time.time() * 1000))
            pipe.zremrangebyrank(members, 0, -(self._max_entries + 1))
            pipe.pexpire(members, self._ttl_ms)
            pipe.publish(ADDITIONS_CHANNEL, key)
            await pipe.execute()

    async def load(self, scope: str) -> list[tuple[str, bytes, float]]:
        """Every question of `scope` not expired: (key, stored entry, expires at in time.time() terms)."""
        listed = await self._client.zrangebyscore(
            scope_members(scope), int(time.time() * 1000), "+inf", withscores=True
        )
        found = []
        for start in range(0, len(listed), LOAD_BATCH):
            batch = listed[start : start + LOAD_BATCH]
            values = await self._client.mget([key for key, _ in batch])
            for (key, expires_ms), value in zip(batch, values, strict=True):
                if value is not None:
                    found.append((key.decode(), value, expires_ms / 1000))
        return found

    async def get(self, key: str) -> bytes | None:
        return await self._client.get(key)


class SemanticCache:
    """The semantic lookup and store over an AnswerCache (see the module's doc). A failure of the embedding
    endpoint or of Redis is a logged miss, never an error."""

    def __init__(
        self,
        cache: AnswerCache,
        embed: Embed,
        *,
        threshold: float,
        max_entries: int,
        memory_max_bytes: int,
        follow_ups: bool,
        embedding_model: str,
        dimensions: int,
        timeout_seconds: float,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._cache = cache
        self._on_close = on_close
        self._embed = embed
        self._threshold = threshold
        self._max_entries = max_entries
        self._memory_max_bytes = memory_max_bytes
        self._follow_ups = follow_ups
        self._embedding_model = embedding_model
        self._dimensions = dimensions
        self._timeout_seconds = timeout_seconds
        self._lists = (
            None
            if cache.redis is None
            else RedisScopeLists(cache.redis.client, max_entries=max_entries, ttl_seconds=cache.ttl_seconds)
        )
        self._scopes: OrderedDict[str, ScopeVectors] = OrderedDict()
        # Scopes being loaded from Redis, with the keys announced meanwhile.
        self._loading: dict[str, set[str]] = {}
        self._background = BackgroundTasks()
        # Loads the guards' word lists now rather than in the first lookup.
        question_features("")
        cache.watch(self)
        metrics.watch_semantic_vectors(self._vector_count)

    @classmethod
    def from_settings(cls, settings: CacheSettings, cache: AnswerCache) -> SemanticCache:
        """The semantic cache as the settings describe it, embedding through a model client of its own."""
        client = ModelClient(settings)
        model, dimensions = settings.embedding_model, settings.embedding_dimensions

        async def embed(text: str, deadline: float) -> np.ndarray:
            (vector,) = await client.embed([text], model=model, dimensions=dimensions, deadline=deadline)
            return vector

        return cls(
            cache,
            embed,
            threshold=settings.semantic_cache_threshold,
            max_entries=settings.semantic_cache_max_entries,
            memory_max_bytes=settings.semantic_cache_memory_max_bytes,
            follow_ups=settings.semantic_cache_follow_ups,
            embedding_model=model,
            dimensions=dimensions,
            timeout_seconds=settings.embedding_timeout_seconds,
            on_close=client.close,
        )

    def applies_to(self, context: cache_pb2.AnswerContext) -> bool:
        """First turns only, unless follow-ups are on."""
        return self._follow_ups or len(context.messages) == 1

    async def lookup(
        self,
        context: cache_pb2.AnswerContext,
        embedding: cache_pb2.QuestionEmbedding | None,
        deadline: float,
    ) -> SemanticLookup:
        """The answer of the nearest question of the scope that passes the guards, if any. The question is embedded
        unless `embedding` is of this process's model and dimensions."""
        question = normalize_text(context.messages[-1].content)
        vector = await self._question_vector(question, embedding, deadline)
        if vector is None:
            metrics.semantic_lookup("error")
            return SemanticLookup(None, None)
        missed = SemanticLookup(
            None,
            cache_pb2.QuestionEmbedding(
                model=self._embedding_model, dimensions=self._dimensions, vector=_as_bytes(vector)
            ),
        )
        vectors = self._vectors(self._scope(context))
        if vectors is None or not vectors.accepts(vector):
            metrics.semantic_lookup("miss")
            return missed
        candidates = await self._nearest(vectors, vector)
        asked = question_features(question)
        refused = False
        for key, similarity in candidates:
            entry = await self._entry(key)
            if entry is None:
                vectors.discard(key)
                continue
            guard = guard_mismatch(asked, question_features(entry.question))
            if guard is not None:
                metrics.semantic_guard_refusal(guard)
                refused = True
                continue
            hit = await self._cache.lookup(entry.answer_key)
            if hit is not None:
                metrics.semantic_lookup("hit")
                return SemanticLookup(SemanticHit(hit, similarity), None)
        metrics.semantic_lookup("guarded" if refused else "miss")
        return missed

    async def store(
        self,
        context: cache_pb2.AnswerContext,
        answer_key: str,
        indexes: Sequence[str],
        embedding: cache_pb2.QuestionEmbedding | None,
        deadline: float,
    ) -> bool:
        """Keeps the question of an answer just stored under `answer_key`, listed in `indexes` like it, with
        `embedding` (from the lookup before it) when it is of this process's model and dimensions. Raises
        chatmesh.cache.tiers.IndexErased, keeping nothing, when one of `indexes` was erased meanwhile."""
        question = normalize_text(context.messages[-1].content)
        vector = await self._question_vector(question, embedding, deadline)
        if vector is None:
            return False
        scope = self._scope(context)
        key = question_key(scope, answer_key)
        entry = cache_pb2.SemanticEntry(answer_key=answer_key, question=question, vector=_as_bytes(vector))
        if not await self._cache.store(key, entry.SerializeToString(), indexes):
            return False
        expires_at = time.time() + self._cache.ttl_seconds
        vectors = self._scopes.get(scope)
        if vectors is None and self._lists is None:
            # Without Redis, this process's vectors are all there is: a scope starts with its first question.
            vectors = self._scopes[scope] = ScopeVectors(self._max_entries)
        if vectors is not None and vectors.accepts(vector):
            vectors.add(key, vector, expires_at)
            self._fit_memory()
        if self._lists is not None:
            try:
                await self._lists.add(scope, key, expires_at)
            except Exception as error:
                _log_failure("store", error)
        return True

    def erased(self, keys: Iterable[str]) -> None:
        for key in keys:
            scope = scope_of_question(key)
            if scope is None:
                continue
            vectors = self._scopes.get(scope)
            if vectors is not None:
                vectors.discard(key)
            self._loading.get(scope, set()).discard(key)

    def added(self, key: str) -> None:
        scope = scope_of_question(key)
        if scope is None:
            return
        if scope in self._loading:
            self._loading[scope].add(key)
        elif scope in self._scopes and key not in self._scopes[scope]:
            self._background.spawn(self._add_announced(scope, key), "semantic_add")

    def missed_announcements(self) -> None:
        # Loaded again when next searched: what was added elsewhere meanwhile comes with it.
        self._scopes.clear()

    async def close(self) -> None:
        await self._background.wait()
        if self._on_close is not None:
            await self._on_close()

    def _scope(self, context: cache_pb2.AnswerContext) -> str:
        return semantic_scope(context, self._embedding_model, self._dimensions)

    async def _question_vector(
        self, question: str, embedding: cache_pb2.QuestionEmbedding | None, deadline: float
    ) -> np.ndarray | None:
        """`embedding`'s vector when it is of this process's model and dimensions, else the question's, embedded
        now; None when the embedding endpoint fails."""
        if (
            embedding is not None
            and (embedding.model, embedding.dimensions) == (self._embedding_model, self._dimensions)
            and embedding.vector
        ):
            return np.frombuffer(embedding.vector, dtype="<f4").astype(np.float32)
        return await self._embedding(question, deadline)

    async def _embedding(self, question: str, deadline: float) -> np.ndarray | None:
        deadline = min(deadline, asyncio.get_running_loop().time() + self._timeout_seconds)
        try:
            return await self._embed(question, deadline)
        except ModelError as error:
            log.warning("semantic_embedding_failed", extra={"error": error.kind.value})
            return None

    def _vectors(self, scope: str) -> ScopeVectors | None:
        """The scope's vectors in this process; None while they are loaded from Redis (started here if needed)."""
        vectors = self._scopes.get(scope)
        if vectors is not None:
            self._scopes.move_to_end(scope)
            return vectors
        if self._lists is not None and scope not in self._loading:
            self._loading[scope] = set()
            self._background.spawn(self._load(self._lists, scope), "semantic_load")
        return None

    async def _load(self, lists: RedisScopeLists, scope: str) -> None:
        try:
            vectors = ScopeVectors(self._max_entries)
            for key, value, expires_at in await lists.load(scope):
                entry = _entry_of(value)
                if entry is not None and vectors.accepts(vector := _vector_of(entry)):
                    vectors.add(key, vector, expires_at)
            self._scopes[scope] = vectors
            self._fit_memory()
            for key in self._loading.get(scope, set()):
                if key not in vectors:
                    await self._add_announced(scope, key)
        except Exception as error:
            _log_failure("load", error)
        finally:
            self._loading.pop(scope, None)

    async def _add_announced(self, scope: str, key: str) -> None:
        assert self._lists is not None
        try:
            value = await self._lists.get(key)
        except Exception as error:
            _log_failure("load", error)
            return
        entry = None if value is None else _entry_of(value)
        vectors = self._scopes.get(scope)
        if entry is None or vectors is None:
            return
        if vectors.accepts(vector := _vector_of(entry)):
            vectors.add(key, vector, time.time() + self._cache.ttl_seconds)

    async def _nearest(self, vectors: ScopeVectors, vector: np.ndarray) -> list[tuple[str, float]]:
        if len(vectors) * len(vector) > OFFLOAD_FLOATS:
            scores = await asyncio.to_thread(vectors.scores, vector)
        else:
            scores = vectors.scores(vector)
        if len(scores):
            metrics.semantic_best_similarity(float(scores.max()))
        return vectors.nearest(vector, scores, CANDIDATES, self._threshold, time.time())

    async def _entry(self, key: str) -> cache_pb2.SemanticEntry | None:
        found = await self._cache.lookup(key)
        return None if found is None else _entry_of(found.value)

    def _fit_memory(self) -> None:
        """Drops the least recently searched scopes until the vectors fit `memory_max_bytes` (the most recent one
        stays, whatever its size)."""
        while len(self._scopes) > 1 and sum(v.nbytes for v in self._scopes.values()) > self._memory_max_bytes:
            self._scopes.popitem(last=False)

    def _vector_count(self) -> int:
        return sum(len(vectors) for vectors in self._scopes.values())


def _as_bytes(vector: np.ndarray) -> bytes:
    return vector.astype("<f4").tobytes()


def _vector_of(entry: cache_pb2.SemanticEntry) -> np.ndarray:
    return np.frombuffer(entry.vector, dtype="<f4").astype(np.float32)


def _entry_of(value: bytes) -> cache_pb2.SemanticEntry | None:
    try:
        return cache_pb2.SemanticEntry.FromString(value)
    except DecodeError:
        log.warning("semantic_entry_unreadable")
        return None


def _log_failure(operation: str, error: Exception) -> None:
    # The error's type only: its message could quote a key, and so the tenant.
    log.warning("semantic_cache_failed", extra={"operation": operation, "error": type(error).__name__})
    metrics.cache_redis_error(f"semantic_{operation}")
