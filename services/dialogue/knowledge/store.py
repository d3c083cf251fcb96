"""Where knowledge bases live: the KnowledgeStore interface and its in-memory and Redis implementations.

A knowledge base belongs to a tenant and is named within it: the same name in two tenants is two knowledge bases,
and nothing of one tenant's is ever read for another. It holds documents (path → digest and chunk ids) and their
chunks (text, source, title, position, tokens, and the embedding as float32), all embedded with one model at one
size (`embedding_model`, `dimensions`, set by its first chunks); a document embedded otherwise is refused.

**Version.** Every change (a document added, replaced or deleted) gives the knowledge base a new `version`,
`<generation>.<revision>`: the revision counts changes, and the generation is drawn at random when the knowledge
base is created, so that one deleted and created again never repeats a version. A reply answered from a knowledge
base is cached under its version, and searches reload a knowledge base whose version moved.

**Atomic changes.** Upserting a document replaces its old chunks with its new ones in one step (a Lua script in
Redis), and is skipped, changing nothing, when the stored digest is the one given. A search never sees half a
document: `load` reads the chunks in batches (HSCAN, never blocking Redis for long) between two reads of the
version, and reads again if it moved.

**Operator data, not user data.** Knowledge bases are the operator's documents. They have no TTL: they stay until
the operator deletes them (`delete_knowledge_base` removes every key), and erasing a user or a conversation
never touches them.

Redis keys, with the tenant (a hash tag, so that one tenant's keys share a Redis Cluster slot) and the knowledge
base's name percent-encoded:
- `chatmesh:kb:{tenant}:names`: a set of the tenant's knowledge base names.
- `chatmesh:kb:{tenant}:<kb>:meta`: a hash of generation, revision, embedding_model, dimensions, updated_at.
- `chatmesh:kb:{tenant}:<kb>:documents`: a hash of path → JSON `{"digest": ..., "chunks": [chunk ids]}`.
- `chatmesh:kb:{tenant}:<kb>:chunks`: a hash of chunk id → JSON `{source, title, position, text, tokens}`.
- `chatmesh:kb:{tenant}:<kb>:vectors`: a hash of chunk id → the embedding, little-endian float32.
"""

from __future__ import annotations

import abc
import enum
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from redis.asyncio import Redis

from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.names import validate_name
from chatmesh.runtime.redis_errors import unavailable_on_redis_error

KEY_PREFIX = "chatmesh:kb:"
# Hash fields read per HSCAN call when loading.
LOAD_BATCH = 500
# Loads attempted while the knowledge base keeps changing, before giving up for now.
LOAD_ATTEMPTS = 3


class KnowledgeStoreUnavailable(Exception):
    """The store could not be reached or did not answer; nothing was written."""


class EmbeddingMismatch(ValueError):
    """The knowledge base is embedded with another model or size than the chunks given; nothing was written."""


class KnowledgeBaseChanging(Exception):
    """The knowledge base changed during every attempt to load it; try again later."""


class UpsertOutcome(enum.StrEnum):
    ADDED = "added"
    REPLACED = "replaced"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    digest: str
    chunk_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KnowledgeBaseInfo:
    name: str
    documents: int
    chunks: int
    version: str
    embedding_model: str
    dimensions: int
    updated_at: float  # Unix seconds


@dataclass(frozen=True, slots=True)
class KnowledgeBaseSnapshot:
    """A knowledge base as of one version: its chunks in (source, position) order, and their embeddings as the
    rows of one float32 matrix in the same order."""

    version: str
    embedding_model: str
    chunks: tuple[Chunk, ...]
    vectors: np.ndarray = field(repr=False)


def _version(generation: str, revision: int) -> str:
    return f"{generation}.{revision}"


def _new_generation() -> str:
    return secrets.token_hex(4)


def _check_vectors(chunks: Sequence[Chunk], vectors: Sequence[np.ndarray]) -> int:
    if len(chunks) != len(vectors):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    sizes = {int(np.asarray(vector).size) for vector in vectors}
    if len(sizes) > 1:
        raise ValueError(f"vectors of different sizes: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


class KnowledgeStore(abc.ABC):
    """Every method takes the tenant and the knowledge base's name; a name must pass `validate_name`."""

    @abc.abstractmethod
    async def document(self, tenant: str, kb: str, path: str) -> DocumentRecord | None:
        """The stored record of a document, or None."""

    @abc.abstractmethod
    async def documents(self, tenant: str, kb: str) -> dict[str, DocumentRecord]:
        """Every document of the knowledge base, by path (empty when it does not exist)."""

    @abc.abstractmethod
    async def upsert_document(
        self,
        tenant: str,
        kb: str,
        path: str,
        digest: str,
        chunks: Sequence[Chunk],
        vectors: Sequence[np.ndarray],
        *,
        embedding_model: str,
    ) -> tuple[UpsertOutcome, str]:
        """Stores the document's chunks with their vectors in place of its old ones, in one step, creating the
        knowledge base if needed; nothing when the stored digest is `digest`. Returns what happened and the
        knowledge base's version after it. Raises EmbeddingMismatch when the knowledge base is embedded with
        another model or size."""

    @abc.abstractmethod
    async def delete_document(self, tenant: str, kb: str, path: str) -> bool:
        """Removes the document and its chunks; False when there was none."""

    @abc.abstractmethod
    async def list_knowledge_bases(self, tenant: str) -> list[KnowledgeBaseInfo]:
        """The tenant's knowledge bases, by name."""

    @abc.abstractmethod
    async def delete_knowledge_base(self, tenant: str, kb: str) -> bool:
        """Removes the knowledge base: its documents, chunks and vectors. False when there was none."""

    @abc.abstractmethod
    async def versions(self, tenant: str, kbs: Sequence[str]) -> dict[str, str | None]:
        """Each knowledge base's version (None when it does not exist), in one round trip."""

    @abc.abstractmethod
    async def load(self, tenant: str, kb: str) -> KnowledgeBaseSnapshot | None:
        """The knowledge base's chunks and vectors as of one version, or None when it does not exist. Raises
        KnowledgeBaseChanging if it changed during every attempt."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory store has nothing to release
        """Releases connections."""


@dataclass(slots=True)
class _MemoryKnowledgeBase:
    generation: str
    embedding_model: str = ""
    dimensions: int = 0
    revision: int = 0
    updated_at: float = 0.0
    documents: dict[str, DocumentRecord] = field(default_factory=dict)
    chunks: dict[str, Chunk] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return _version(self.generation, self.revision)

    def changed(self) -> None:
        self.revision += 1
        self.updated_at = time.time()

    def remove_chunks(self, ids: Sequence[str]) -> None:
        for chunk_id in ids:
            self.chunks.pop(chunk_id, None)
            self.vectors.pop(chunk_id, None)


class MemoryKnowledgeStore(KnowledgeStore):
    """Knowledge bases in this process's memory: for one dialogue process without Redis, and for tests. Never
    awaits, so every method is atomic on the event loop."""

    def __init__(self) -> None:
        self._bases: dict[tuple[str, str], _MemoryKnowledgeBase] = {}

    async def document(self, tenant: str, kb: str, path: str) -> DocumentRecord | None:
        validate_name(kb)
        base = self._bases.get((tenant, kb))
        return None if base is None else base.documents.get(path)

    async def documents(self, tenant: str, kb: str) -> dict[str, DocumentRecord]:
        validate_name(kb)
        base = self._bases.get((tenant, kb))
        return {} if base is None else dict(base.documents)

    async def upsert_document(
        self,
        tenant: str,
        kb: str,
        path: str,
        digest: str,
        chunks: Sequence[Chunk],
        vectors: Sequence[np.ndarray],
        *,
        embedding_model: str,
    ) -> tuple[UpsertOutcome, str]:
        validate_name(kb)
        dimensions = _check_vectors(chunks, vectors)
        base = self._bases.get((tenant, kb)) or _MemoryKnowledgeBase(_new_generation())
        if (
            dimensions
            and base.embedding_model
            and (base.embedding_model, base.dimensions) != (embedding_model, dimensions)
        ):
            raise _mismatch(kb, base.embedding_model, base.dimensions, embedding_model, dimensions)
        if dimensions and not base.embedding_model:
            base.embedding_model, base.dimensions = embedding_model, dimensions
        old = base.documents.get(path)
        if old is not None and old.digest == digest:
            return UpsertOutcome.UNCHANGED, base.version
        if old is not None:
            base.remove_chunks(old.chunk_ids)
        for chunk, vector in zip(chunks, vectors, strict=True):
            base.chunks[chunk.id] = chunk
            base.vectors[chunk.id] = np.asarray(vector, dtype=np.float32).reshape(-1).copy()
        base.documents[path] = DocumentRecord(digest, tuple(chunk.id for chunk in chunks))
        base.changed()
        self._bases[(tenant, kb)] = base
        return (UpsertOutcome.ADDED if old is None else UpsertOutcome.REPLACED), base.version

    async def delete_document(self, tenant: str, kb: str, path: str) -> bool:
        validate_name(kb)
        base = self._bases.get((tenant, kb))
        old = None if base is None else base.documents.pop(path, None)
        if base is None or old is None:
            return False
        base.remove_chunks(old.chunk_ids)
        base.changed()
        return True

    async def list_knowledge_bases(self, tenant: str) -> list[KnowledgeBaseInfo]:
        return [
            KnowledgeBaseInfo(
                name,
                len(base.documents),
                len(base.chunks),
                base.version,
                base.embedding_model,
                base.dimensions,
                base.updated_at,
            )
            for (owner, name), base in sorted(self._bases.items())
            if owner == tenant
        ]

    async def delete_knowledge_base(self, tenant: str, kb: str) -> bool:
        validate_name(kb)
        return self._bases.pop((tenant, kb), None) is not None

    async def versions(self, tenant: str, kbs: Sequence[str]) -> dict[str, str | None]:
        for kb in kbs:
            validate_name(kb)
        return {kb: (base.version if (base := self._bases.get((tenant, kb))) else None) for kb in kbs}

    async def load(self, tenant: str, kb: str) -> KnowledgeBaseSnapshot | None:
        validate_name(kb)
        base = self._bases.get((tenant, kb))
        if base is None:
            return None
        return _snapshot(base.version, base.embedding_model, base.dimensions, base.chunks.values(), base.vectors)


def _snapshot(
    version: str,
    embedding_model: str,
    dimensions: int,
    chunks: Any,
    vectors: Mapping[str, np.ndarray],
) -> KnowledgeBaseSnapshot:
    ordered = tuple(sorted(chunks, key=lambda chunk: (chunk.source, chunk.position)))
    matrix = np.empty((len(ordered), dimensions), dtype=np.float32)
    for row, chunk in enumerate(ordered):
        matrix[row] = vectors[chunk.id]
    return KnowledgeBaseSnapshot(version, embedding_model, ordered, matrix)


def _mismatch(kb: str, model: str, dimensions: int, new_model: str, new_dimensions: int) -> EmbeddingMismatch:
    return EmbeddingMismatch(
        f"knowledge base {kb} is embedded with {model} at {dimensions} dimensions, not {new_model} at "
        f"{new_dimensions}: delete it and ingest its documents again to change the model"
    )


# KEYS: meta, documents, chunks, vectors, names. ARGV: kb name, path, digest, embedding model, dimensions, a new
# generation, now (ms), the document's record (JSON), then (chunk id, chunk JSON, vector) for each chunk. A document
# without chunks (dimensions 0) neither sets nor checks the embedding model. Returns {outcome, version} or
# {"mismatch", model, dimensions}.
_UPSERT_LUA = """
local model = redis.call("HGET", KEYS[1], "embedding_model")
local dimensions = redis.call("HGET", KEYS[1], "dimensions")
if ARGV[5] ~= "0" and model and (model ~= ARGV[4] or dimensions ~= ARGV[5]) then
  return {"mismatch", model, dimensions}
end
local old = redis.call("HGET", KEYS[2], ARGV[2])
local outcome = "added"
if old then
  local record = cjson.decode(old)
  if record["digest"] == ARGV[3] then
    local meta = redis.call("HMGET", KEYS[1], "generation", "revision")
    return {"unchanged", meta[1] .. "." .. meta[2]}
  end
  outcome = "replaced"
  for _, id in ipairs(record["chunks"]) do
    redis.call("HDEL", KEYS[3], id)
    redis.call("HDEL", KEYS[4], id)
  end
end
for index = 9, #ARGV, 3 do
  redis.call("HSET", KEYS[3], ARGV[index], ARGV[index + 1])
  redis.call("HSET", KEYS[4], ARGV[index], ARGV[index + 2])
end
redis.call("HSET", KEYS[2], ARGV[2], ARGV[8])
redis.call("HSETNX", KEYS[1], "generation", ARGV[6])
if ARGV[5] ~= "0" and not model then
  redis.call("HSET", KEYS[1], "embedding_model", ARGV[4], "dimensions", ARGV[5])
end
local revision = redis.call("HINCRBY", KEYS[1], "revision", 1)
redis.call("HSET", KEYS[1], "updated_at", ARGV[7])
redis.call("SADD", KEYS[5], ARGV[1])
return {outcome, redis.call("HGET", KEYS[1], "generation") .. "." .. revision}
"""

# KEYS: meta, documents, chunks, vectors. ARGV: path, now (ms). Returns 1 when the document was there.
_DELETE_DOCUMENT_LUA = """
local old = redis.call("HGET", KEYS[2], ARGV[1])
if not old then
  return 0
end
for _, id in ipairs(cjson.decode(old)["chunks"]) do
  redis.call("HDEL", KEYS[3], id)
  redis.call("HDEL", KEYS[4], id)
end
redis.call("HDEL", KEYS[2], ARGV[1])
redis.call("HINCRBY", KEYS[1], "revision", 1)
redis.call("HSET", KEYS[1], "updated_at", ARGV[2])
return 1
"""

# KEYS: meta, documents, chunks, vectors, names. ARGV: kb name. Returns 1 when the knowledge base was there.
_DELETE_KNOWLEDGE_BASE_LUA = """
local existed = redis.call("EXISTS", KEYS[1])
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call("SREM", KEYS[5], ARGV[1])
return existed
"""

_unavailable_on_redis_error = unavailable_on_redis_error(KnowledgeStoreUnavailable)


class RedisKnowledgeStore(KnowledgeStore):
    """Knowledge bases in Redis, shared by every dialogue replica (see the module's doc for the keys). The scripts
    that change a knowledge base touch its keys and its tenant's names, all in the tenant's slot."""

    def __init__(self, client: Redis) -> None:
        """Takes ownership of `client` (closed by `close`), which must return bytes; see `from_url`."""
        if client.get_encoder().decode_responses:
            raise ValueError("RedisKnowledgeStore needs a client created with decode_responses=False")
        self._client = client
        self._upsert = client.register_script(_UPSERT_LUA)
        self._delete_document = client.register_script(_DELETE_DOCUMENT_LUA)
        self._delete_knowledge_base = client.register_script(_DELETE_KNOWLEDGE_BASE_LUA)

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, Any] | None = None) -> RedisKnowledgeStore:
        """A store with its own connection pool to `url`; `options` are more arguments of `Redis.from_url`
        (credentials, TLS files: chatmesh.runtime.redis_connection)."""
        return cls(Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, **(options or {})))

    @staticmethod
    def _tenant_prefix(tenant: str) -> str:
        return f"{KEY_PREFIX}{{{quote(tenant, safe='')}}}:"

    @classmethod
    def names_key(cls, tenant: str) -> str:
        return cls._tenant_prefix(tenant) + "names"

    @classmethod
    def keys(cls, tenant: str, kb: str) -> list[str]:
        """The knowledge base's meta, documents, chunks and vectors keys."""
        validate_name(kb)
        prefix = f"{cls._tenant_prefix(tenant)}{quote(kb, safe='')}:"
        return [prefix + name for name in ("meta", "documents", "chunks", "vectors")]

    @_unavailable_on_redis_error
    async def document(self, tenant: str, kb: str, path: str) -> DocumentRecord | None:
        raw = await self._client.hget(self.keys(tenant, kb)[1], path)
        return None if raw is None else _decode_record(raw)

    @_unavailable_on_redis_error
    async def documents(self, tenant: str, kb: str) -> dict[str, DocumentRecord]:
        raw = await self._client.hgetall(self.keys(tenant, kb)[1])
        return {path.decode(): _decode_record(record) for path, record in raw.items()}

    @_unavailable_on_redis_error
    async def upsert_document(
        self,
        tenant: str,
        kb: str,
        path: str,
        digest: str,
        chunks: Sequence[Chunk],
        vectors: Sequence[np.ndarray],
        *,
        embedding_model: str,
    ) -> tuple[UpsertOutcome, str]:
        dimensions = _check_vectors(chunks, vectors)
        record = json.dumps({"digest": digest, "chunks": [chunk.id for chunk in chunks]}, ensure_ascii=False)
        chunk_args: list[str | bytes] = []
        for chunk, vector in zip(chunks, vectors, strict=True):
            chunk_args += [chunk.id, _encode_chunk(chunk), np.asarray(vector, dtype="<f4").reshape(-1).tobytes()]
        result = await self._upsert(
            keys=[*self.keys(tenant, kb), self.names_key(tenant)],
            args=[kb, path, digest, embedding_model, dimensions, _new_generation(), _now_ms(), record, *chunk_args],
        )
        if result[0] == b"mismatch":
            raise _mismatch(kb, result[1].decode(), int(result[2]), embedding_model, dimensions)
        return UpsertOutcome(result[0].decode()), result[1].decode()

    @_unavailable_on_redis_error
    async def delete_document(self, tenant: str, kb: str, path: str) -> bool:
        return bool(await self._delete_document(keys=self.keys(tenant, kb), args=[path, _now_ms()]))

    @_unavailable_on_redis_error
    async def list_knowledge_bases(self, tenant: str) -> list[KnowledgeBaseInfo]:
        names = sorted(name.decode() for name in await self._client.smembers(self.names_key(tenant)))
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                meta, documents, chunks, _ = self.keys(tenant, name)
                pipe.hmget(meta, "generation", "revision", "embedding_model", "dimensions", "updated_at")
                pipe.hlen(documents)
                pipe.hlen(chunks)
            replies = await pipe.execute()
        found = []
        for index, name in enumerate(names):
            (generation, revision, model, dimensions, updated_at), documents, chunks = replies[
                3 * index : 3 * index + 3
            ]
            if generation is None:
                continue  # deleted since SMEMBERS
            found.append(
                KnowledgeBaseInfo(
                    name,
                    documents,
                    chunks,
                    _version(generation.decode(), int(revision or 0)),
                    (model or b"").decode(),
                    int(dimensions or 0),
                    int(updated_at or 0) / 1000,
                )
            )
        return found

    @_unavailable_on_redis_error
    async def delete_knowledge_base(self, tenant: str, kb: str) -> bool:
        keys = [*self.keys(tenant, kb), self.names_key(tenant)]
        return bool(await self._delete_knowledge_base(keys=keys, args=[kb]))

    @_unavailable_on_redis_error
    async def versions(self, tenant: str, kbs: Sequence[str]) -> dict[str, str | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            for kb in kbs:
                pipe.hmget(self.keys(tenant, kb)[0], "generation", "revision")
            replies = await pipe.execute()
        return {kb: _decode_version(reply) for kb, reply in zip(kbs, replies, strict=True)}

    @_unavailable_on_redis_error
    async def load(self, tenant: str, kb: str) -> KnowledgeBaseSnapshot | None:
        meta, _, chunks_key, vectors_key = self.keys(tenant, kb)
        for _ in range(LOAD_ATTEMPTS):
            before = await self._client.hmget(meta, "generation", "revision", "embedding_model", "dimensions")
            version = _decode_version(before[:2])
            if version is None:
                return None
            chunks = [_decode_chunk(raw) async for _, raw in self._client.hscan_iter(chunks_key, count=LOAD_BATCH)]
            vectors = {
                chunk_id.decode(): np.frombuffer(raw, dtype="<f4")
                async for chunk_id, raw in self._client.hscan_iter(vectors_key, count=LOAD_BATCH)
            }
            after = _decode_version(await self._client.hmget(meta, "generation", "revision"))
            # HSCAN may return a field twice; a chunk without its vector means a change came between the scans.
            if after == version and all(chunk.id in vectors for chunk in chunks):
                unique = {chunk.id: chunk for chunk in chunks}.values()
                return _snapshot(version, (before[2] or b"").decode(), int(before[3] or 0), unique, vectors)
        raise KnowledgeBaseChanging(f"knowledge base {kb} changed during {LOAD_ATTEMPTS} attempts to load it")

    async def close(self) -> None:
        await self._client.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _decode_version(reply: Sequence[bytes | None]) -> str | None:
    generation, revision = reply
    return None if generation is None else _version(generation.decode(), int(revision or 0))


def _decode_record(raw: bytes) -> DocumentRecord:
    record = json.loads(raw)
    return DocumentRecord(record["digest"], tuple(record["chunks"]))


def _encode_chunk(chunk: Chunk) -> str:
    return json.dumps(
        {
            "source": chunk.source,
            "title": chunk.title,
            "position": chunk.position,
            "text": chunk.text,
            "tokens": chunk.tokens,
        },
        ensure_ascii=False,
    )


def _decode_chunk(raw: bytes) -> Chunk:
    fields = json.loads(raw)
    return Chunk(fields["source"], fields["title"], fields["position"], fields["text"], fields["tokens"])


def create_knowledge_store(redis_url: str | None, *, options: Mapping[str, Any] | None = None) -> KnowledgeStore:
    """Redis when a URL is given (CHATMESH_REDIS_URL), the in-memory store otherwise (also for "")."""
    if redis_url:
        return RedisKnowledgeStore.from_url(redis_url, options=options)
    return MemoryKnowledgeStore()
