"""KnowledgeService in dialogue: ingesting, listing and deleting a tenant's knowledge bases, on the store that
retrieval reads (one per process, made in chatmesh.dialogue.main).

Only the gateway calls it, after checking the admin token and the request (chatmesh.gateway.knowledge), so what
is checked here is only what the store and the parsers refuse. Chunks are embedded through the model client's
embeddings call, with the embedding model and dimensions of the semantic cache, each request of up to 64 chunks
given `knowledge_embedding_timeout_seconds` (within the call's deadline): ingestion is an operator's call, not a
turn, and a provider may take seconds for a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from chatmesh.dialogue.knowledge.chunking import ChunkSettings
from chatmesh.dialogue.knowledge.documents import DocumentError, SourceDocument, media_type_for
from chatmesh.dialogue.knowledge.ingest import Embed, ingest
from chatmesh.dialogue.knowledge.store import EmbeddingMismatch, KnowledgeStore, KnowledgeStoreUnavailable
from chatmesh.dialogue.tokens import TokenCounter
from chatmesh.model.client import ModelClient
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.runtime.logs import annotate, get_logger
from chatmesh.runtime.settings import DialogueSettings
from chatmesh.runtime.status import abort, abort_with, invalid_argument
from chatmesh.tenancy.messages import timestamp
from chatmesh.v1 import knowledge_pb2, knowledge_pb2_grpc

log = get_logger(__name__)


class KnowledgeServicer(knowledge_pb2_grpc.KnowledgeServiceServicer):
    def __init__(
        self, settings: DialogueSettings, store: KnowledgeStore, model: ModelClient, tokens: TokenCounter
    ) -> None:
        self._store = store
        self._model = model
        self._tokens = tokens
        self._embedding_model = settings.embedding_model
        self._dimensions = settings.embedding_dimensions
        self._embedding_timeout_seconds = settings.knowledge_embedding_timeout_seconds
        self._chunk_settings = ChunkSettings(
            chunk_tokens=settings.knowledge_chunk_tokens,
            overlap_tokens=settings.knowledge_chunk_overlap_tokens,
            token_model=settings.embedding_model,
        )

    async def IngestDocuments(
        self, request: knowledge_pb2.IngestDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.IngestDocumentsResponse:
        annotate(tenant=request.tenant)
        tenant, kb = request.tenant, request.knowledge_base
        documents = [
            SourceDocument(document.path, document.content, document.media_type or media_type_for(document.path) or "")
            for document in request.documents
        ]
        started = time.perf_counter()
        async with _knowledge_errors(context):
            report = await ingest(
                self._store,
                tenant,
                kb,
                documents,
                self._embed_within(context),
                self._chunk_settings,
                self._tokens,
                embedding_model=self._embedding_model,
            )
            removed: list[str] = []
            version = report.version
            if request.prune:
                keep = {document.path for document in documents} | set(request.keep_paths)
                removed = await self._prune(tenant, kb, keep)
                if removed:
                    version = (await self._store.versions(tenant, [kb]))[kb]
        log.info(
            "knowledge_ingested",
            extra={
                "tenant": tenant,
                "knowledge_base": kb,
                "added": len(report.added),
                "replaced": len(report.replaced),
                "unchanged": len(report.unchanged),
                "removed": len(removed),
                "chunks": report.chunks,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return knowledge_pb2.IngestDocumentsResponse(
            added=report.added,
            replaced=report.replaced,
            unchanged=report.unchanged,
            removed=removed,
            chunks=report.chunks,
            version=version or "",
        )

    async def ListKnowledgeBases(
        self, request: knowledge_pb2.ListKnowledgeBasesRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.ListKnowledgeBasesResponse:
        annotate(tenant=request.tenant)
        async with _knowledge_errors(context):
            found = await self._store.list_knowledge_bases(request.tenant)
        return knowledge_pb2.ListKnowledgeBasesResponse(
            knowledge_bases=[
                knowledge_pb2.KnowledgeBase(
                    name=info.name,
                    documents=info.documents,
                    chunks=info.chunks,
                    version=info.version,
                    embedding_model=info.embedding_model,
                    dimensions=info.dimensions,
                    update_time=timestamp(info.updated_at),
                )
                for info in found
            ]
        )

    async def DeleteKnowledgeBase(
        self, request: knowledge_pb2.DeleteKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteKnowledgeBaseResponse:
        annotate(tenant=request.tenant)
        async with _knowledge_errors(context):
            deleted = await self._store.delete_knowledge_base(request.tenant, request.knowledge_base)
        if not deleted:
            await _not_found(context, request.tenant, request.knowledge_base)
        log.info("knowledge_base_deleted", extra={"tenant": request.tenant, "knowledge_base": request.knowledge_base})
        return knowledge_pb2.DeleteKnowledgeBaseResponse()

    async def DeleteDocument(
        self, request: knowledge_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteDocumentResponse:
        annotate(tenant=request.tenant)
        tenant, kb = request.tenant, request.knowledge_base
        async with _knowledge_errors(context):
            deleted = await self._store.delete_document(tenant, kb, request.path)
            version = (await self._store.versions(tenant, [kb]))[kb]
        if not deleted:
            if version is None:
                await _not_found(context, tenant, kb)
            await abort(context, grpc.StatusCode.NOT_FOUND, f"knowledge base {kb} has no document {request.path!r}")
        log.info("knowledge_document_deleted", extra={"tenant": tenant, "knowledge_base": kb})
        return knowledge_pb2.DeleteDocumentResponse(version=version or "")

    def _embed_within(self, context: grpc.aio.ServicerContext) -> Embed:
        """The embedding call of ingestion: each request given the timeout, within what is left of the call."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        call_deadline = math.inf if remaining is None else loop.time() + remaining

        async def embed(texts: list[str]) -> list[np.ndarray]:
            deadline = min(call_deadline, loop.time() + self._embedding_timeout_seconds)
            vectors = await self._model.embed(
                texts, model=self._embedding_model, dimensions=self._dimensions, deadline=deadline
            )
            if len(vectors) != len(texts):
                raise ModelError(
                    ModelErrorKind.UNAVAILABLE,
                    f"the embedding endpoint returned {len(vectors)} vectors for {len(texts)} texts",
                )
            return vectors

        return embed

    async def _prune(self, tenant: str, kb: str, keep: set[str]) -> list[str]:
        """Deletes the knowledge base's documents whose paths are not in `keep`; returns their paths."""
        stored = await self._store.documents(tenant, kb)
        return [path for path in sorted(set(stored) - keep) if await self._store.delete_document(tenant, kb, path)]


async def _not_found(context: grpc.aio.ServicerContext, tenant: str, kb: str) -> None:
    await abort(
        context,
        grpc.StatusCode.NOT_FOUND,
        f"tenant {tenant} has no knowledge base {kb}; ListKnowledgeBases (chatmesh kb list) shows its knowledge bases",
    )


@contextlib.asynccontextmanager
async def _knowledge_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Ends the call with a status an operator can act on when the store, a document or the embedding endpoint
    fails."""
    try:
        yield
    except KnowledgeStoreUnavailable:
        log.error("knowledge_store_unavailable")
        await abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            "the knowledge base store (Redis) cannot be reached; retry with backoff (ingesting again skips the "
            "documents already stored)",
        )
    except EmbeddingMismatch as error:
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
    except DocumentError as error:
        await abort_with(context, invalid_argument([("documents", str(error))]))
    except ModelError as error:
        log.warning("knowledge_embedding_failed", extra={"kind": error.kind.value, "http_status": error.http_status})
        if error.kind is ModelErrorKind.REJECTED:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the embedding endpoint refused the request ({error}): check CHATMESH_EMBEDDING_MODEL, "
                "CHATMESH_EMBEDDING_DIMENSIONS and the provider's key",
            )
        await abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"the embedding endpoint failed ({error}); retry with backoff (the documents stored so far are kept, "
            "and ingesting again skips them)",
        )
