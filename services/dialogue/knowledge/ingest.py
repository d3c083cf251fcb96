"""Documents into a knowledge base: parsed, chunked, embedded and stored, each document in one atomic step.

A document whose digest is the stored one is skipped before anything is embedded, so re-ingesting a folder costs
embeddings only for what changed. The digest covers the content, the media type and the chunk settings (and
`DIGEST_VERSION`): changing the chunk size re-chunks every document on the next ingestion.

Every document is parsed and chunked before anything is embedded or stored, so a document that cannot be read
fails the ingestion with nothing written. Embedding failures raise whatever `embed` raises; the documents stored
before it stay stored (each is whole), and ingesting again finishes the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from chatmesh.dialogue.knowledge.chunking import Chunk, ChunkSettings, chunk_document
from chatmesh.dialogue.knowledge.documents import SourceDocument, parse_document
from chatmesh.dialogue.knowledge.store import KnowledgeStore, UpsertOutcome, validate_name
from chatmesh.dialogue.tokens import TokenCounter

# Texts → their embeddings, one per text, in order (the embedding client's call, with its model and deadline).
Embed = Callable[[list[str]], Awaitable[list[np.ndarray]]]

# Part of every digest: bump it when parsing or chunking changes, so that the next ingestion redoes every document.
DIGEST_VERSION = 1
# Texts per embedding request (OpenAI takes up to 2,048 inputs and 300,000 tokens per request), and requests at once.
EMBED_BATCH = 64
EMBED_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class IngestReport:
    added: tuple[str, ...]  # paths
    replaced: tuple[str, ...]
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]  # with prune: stored documents that were not given
    chunks: int  # chunks written
    version: str | None  # the knowledge base's version after ingestion (None: it has none)


def document_digest(document: SourceDocument, settings: ChunkSettings) -> str:
    """SHA-256 of the content, the media type, the chunk settings and DIGEST_VERSION."""
    header = json.dumps(
        [DIGEST_VERSION, document.media_type, settings.chunk_tokens, settings.overlap_tokens, settings.token_model]
    )
    return hashlib.sha256(header.encode() + b"\n" + document.content_bytes).hexdigest()


async def ingest(
    store: KnowledgeStore,
    tenant: str,
    kb: str,
    documents: Sequence[SourceDocument],
    embed: Embed,
    settings: ChunkSettings,
    counter: TokenCounter,
    *,
    embedding_model: str,
    prune: bool = False,
) -> IngestReport:
    """Adds new documents to the knowledge base `kb` of `tenant` (creating it), replaces the chunks of changed ones
    and skips unchanged ones; with `prune`, also deletes its documents whose paths are not among `documents`.
    `embedding_model` is the model `embed` uses: a knowledge base holds one model's vectors (EmbeddingMismatch).
    Raises DocumentError (nothing written) for a document that cannot be read, ValueError for a bad name or
    paths given twice."""
    validate_name(kb)
    paths = [document.path for document in documents]
    if len(set(paths)) != len(paths):
        raise ValueError("a path is given more than once")
    stored = await store.documents(tenant, kb)
    changed: list[tuple[SourceDocument, str, list[Chunk]]] = []
    unchanged = []
    for document in documents:
        digest = document_digest(document, settings)
        record = stored.get(document.path)
        if record is not None and record.digest == digest:
            unchanged.append(document.path)
            continue
        chunks = await asyncio.to_thread(_chunks, document, settings, counter)
        changed.append((document, digest, chunks))

    vectors = await _embed_all(embed, [chunk.indexed_text for _, _, chunks in changed for chunk in chunks])
    added, replaced = [], []
    written = 0
    version = None
    for document, digest, chunks in changed:
        document_vectors, vectors = vectors[: len(chunks)], vectors[len(chunks) :]
        outcome, version = await store.upsert_document(
            tenant, kb, document.path, digest, chunks, document_vectors, embedding_model=embedding_model
        )
        if outcome is UpsertOutcome.UNCHANGED:
            unchanged.append(document.path)
            continue
        (added if outcome is UpsertOutcome.ADDED else replaced).append(document.path)
        written += len(chunks)
    removed = []
    if prune:
        for path in sorted(set(stored) - set(paths)):
            if await store.delete_document(tenant, kb, path):
                removed.append(path)
    if removed or version is None:
        version = (await store.versions(tenant, [kb]))[kb]
    return IngestReport(tuple(added), tuple(replaced), tuple(unchanged), tuple(removed), written, version)


def _chunks(document: SourceDocument, settings: ChunkSettings, counter: TokenCounter) -> list[Chunk]:
    return chunk_document(parse_document(document), document.path, settings, counter)


async def _embed_all(embed: Embed, texts: list[str]) -> list[np.ndarray]:
    """The texts' embeddings in order: EMBED_BATCH texts per call, at most EMBED_CONCURRENCY calls at once; the
    first failure cancels the other calls."""
    limit = asyncio.Semaphore(EMBED_CONCURRENCY)

    async def batch(start: int) -> list[np.ndarray]:
        inputs = texts[start : start + EMBED_BATCH]
        async with limit:
            vectors = await embed(inputs)
        if len(vectors) != len(inputs):
            raise ValueError(f"the embedding call returned {len(vectors)} vectors for {len(inputs)} texts")
        return vectors

    tasks = [asyncio.ensure_future(batch(start)) for start in range(0, len(texts), EMBED_BATCH)]
    try:
        batches = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [vector for vectors in batches for vector in vectors]
