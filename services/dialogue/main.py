"""Starts the dialogue process."""

import asyncio
from typing import Any

import grpc

from chatmesh.dialogue.knowledge.retrieval import Retriever
from chatmesh.dialogue.knowledge.service import KnowledgeServicer
from chatmesh.dialogue.knowledge.store import create_knowledge_store
from chatmesh.dialogue.server_tools import ServerTools
from chatmesh.dialogue.service import DialogueServicer
from chatmesh.dialogue.spend import SpendLedger
from chatmesh.dialogue.store import create_conversation_store
from chatmesh.dialogue.summary import Summarizer
from chatmesh.dialogue.tokens import DEFAULT_MODEL_ENCODINGS, TokenCounter
from chatmesh.model.client import ModelClient
from chatmesh.review.store import create_review_store
from chatmesh.runtime import redis_connection
from chatmesh.runtime.channels import open_channel
from chatmesh.runtime.grpc_server import Servicer, serve
from chatmesh.runtime.multiplex import Multiplexer, multiplexed
from chatmesh.runtime.settings import DialogueSettings
from chatmesh.runtime.tasks import BackgroundTasks
from chatmesh.tenancy.ledger import create_usage_ledger
from chatmesh.tenancy.metrics import TenantMetrics
from chatmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    dialogue_pb2,
    dialogue_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)


def safety_client(channel: grpc.aio.Channel, settings: DialogueSettings) -> tuple[Any, Multiplexer | None]:
    """Safety's stub as dialogue uses it: the input and tool screens on multiplexed streams (safety serves them
    there too), and the Multiplexer to close; the plain stub when `multiplex_streams` is 0."""
    return multiplexed(
        safety_pb2_grpc.SafetyServiceStub(channel),
        safety_pb2.DESCRIPTOR.services_by_name["SafetyService"],
        ("ScreenInput", "ScreenTool"),
        channel,
        settings,
    )


def cache_client(channel: grpc.aio.Channel, settings: DialogueSettings) -> tuple[Any, Multiplexer | None]:
    """Cache's stub as dialogue uses it: lookups and stores on multiplexed streams, as `safety_client`."""
    return multiplexed(
        cache_pb2_grpc.CacheServiceStub(channel),
        cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
        ("Lookup", "LookupSimilar", "Store"),
        channel,
        settings,
    )


async def main(settings: DialogueSettings) -> None:
    redis_options = redis_connection.connection_options(settings, settings.redis_url or "")
    store = create_conversation_store(
        settings.redis_url,
        retention_seconds=settings.conversation_retention_seconds or None,
        max_conversations=settings.memory_store_max_conversations,
        max_messages=settings.conversation_max_messages,
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
        options=redis_options,
    )
    model = ModelClient(settings)
    server_tools = ServerTools.load(settings)
    tokens = TokenCounter({**DEFAULT_MODEL_ENCODINGS, **settings.model_encodings})
    # Loading an encoding takes about half a second and 40 to 80 MB: the default model's before the first call;
    # another model's when a turn first needs it, off the event loop (DialogueServicer._window).
    await asyncio.to_thread(tokens.preload, [settings.default_model, settings.summary_model or settings.default_model])
    ledger = create_usage_ledger(settings.redis_url, redis_options)
    # One store for ingestion (KnowledgeService) and retrieval in turns.
    knowledge_store = create_knowledge_store(settings.redis_url, options=redis_options)
    reviews = create_review_store(settings)
    background = BackgroundTasks()
    spend = SpendLedger(settings, ledger, TenantMetrics(settings.metrics_max_tenants), background)
    safety_channel = open_channel(settings.safety_target, settings)
    cache_channel = open_channel(settings.cache_target, settings)
    safety, safety_streams = safety_client(safety_channel, settings)
    cache, cache_streams = cache_client(cache_channel, settings)
    servicer = DialogueServicer(
        settings,
        store,
        model,
        safety,
        cache,
        spend,
        tokens,
        Summarizer(settings, store, model),
        server_tools,
        background,
        reviews,
        Retriever(
            knowledge_store,
            embedding_model=settings.embedding_model,
            vector_weight=settings.knowledge_vector_weight,
            max_bytes=settings.knowledge_memory_max_bytes,
            version_check_seconds=settings.knowledge_version_check_seconds,
        ),
    )
    knowledge = KnowledgeServicer(settings, knowledge_store, model, tokens)

    async def release() -> None:
        await background.wait()
        await ledger.close()
        for streams in (safety_streams, cache_streams):
            if streams is not None:
                await streams.close()
        await safety_channel.close()
        await cache_channel.close()
        await model.close()
        await server_tools.close()
        await store.close()
        await reviews.close()
        await knowledge_store.close()

    await serve(
        settings,
        port=settings.dialogue_port,
        health_port=settings.dialogue_health_port,
        servicers=[
            Servicer(
                dialogue_pb2.DESCRIPTOR.services_by_name["DialogueService"].full_name,
                lambda server: dialogue_pb2_grpc.add_DialogueServiceServicer_to_server(servicer, server),
            ),
            Servicer(
                knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name,
                lambda server: knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(knowledge, server),
            ),
        ],
        on_stopped=release,
    )
