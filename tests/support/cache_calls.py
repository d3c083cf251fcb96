"""A cache process on free ports, and CacheService calls as dialogue makes them, for the cache's integration tests."""

import os
import tempfile
from pathlib import Path

import grpc

from chatmesh.v1 import cache_pb2, cache_pb2_grpc, chat_pb2
from support.cluster import ServiceProcess
from support.ports import free_port

CALL_TIMEOUT = 10.0
REPLY_TEXT = "Paris is the capital of France."


def cache_process(redis_url: str | None, **settings: str) -> ServiceProcess:
    """A cache process on a free port, not started; Redis-backed when `redis_url` is given. `settings` are more
    environment variables."""
    port = free_port()
    env = {
        **os.environ,
        "GRPC_VERBOSITY": "ERROR",
        "CHATMESH_BIND_HOST": "127.0.0.1",
        "CHATMESH_CACHE_PORT": str(port),
        "CHATMESH_CACHE_METRICS_PORT": str(free_port()),
        "CHATMESH_SHUTDOWN_GRACE_SECONDS": "5",
        **settings,
    }
    env.pop("CHATMESH_REDIS_URL", None)
    if redis_url is not None:
        env["CHATMESH_REDIS_URL"] = redis_url
    return ServiceProcess("cache", port, env, Path(tempfile.mkdtemp(prefix="chatmesh-cache-")))


def answer_context(question: str = "What is the capital of France?", **fields) -> cache_pb2.AnswerContext:
    fields.setdefault("tenant", "default")
    fields.setdefault("model", "gpt-4o-mini")
    return cache_pb2.AnswerContext(
        messages=[cache_pb2.ContextMessage(role=chat_pb2.ROLE_USER, content=question)], **fields
    )


def reply(
    text: str = REPLY_TEXT, finish_reason: int = chat_pb2.FINISH_REASON_STOP, output_tokens: int = 7
) -> cache_pb2.CachedReply:
    return cache_pb2.CachedReply(text=text, finish_reason=finish_reason, output_tokens=output_tokens)


async def lookup(stub: cache_pb2_grpc.CacheServiceStub, context: cache_pb2.AnswerContext) -> cache_pb2.LookupResponse:
    return await stub.Lookup(cache_pb2.LookupRequest(context=context), timeout=CALL_TIMEOUT)


async def lookup_similar(
    stub: cache_pb2_grpc.CacheServiceStub,
    context: cache_pb2.AnswerContext,
    embedding: cache_pb2.QuestionEmbedding | None = None,
) -> cache_pb2.LookupResponse:
    """A semantic lookup, as dialogue makes it after an exact miss that allows one."""
    request = cache_pb2.LookupSimilarRequest(context=context, embedding=embedding)
    return await stub.LookupSimilar(request, timeout=CALL_TIMEOUT)


async def store(
    stub: cache_pb2_grpc.CacheServiceStub,
    context: cache_pb2.AnswerContext,
    cached: cache_pb2.CachedReply,
    *,
    user_id: str = "user-1",
    conversation_id: str = "conv-1",
    embedding: cache_pb2.QuestionEmbedding | None = None,
) -> cache_pb2.StoreResponse:
    """Stores as dialogue does, with the question's embedding from the lookup before it, if given."""
    request = cache_pb2.StoreRequest(context=context, reply=cached, user_id=user_id, conversation_id=conversation_id)
    if embedding is not None:
        request.embedding.CopyFrom(embedding)
    return await stub.Store(request, timeout=CALL_TIMEOUT)


async def erase(
    stub: cache_pb2_grpc.CacheServiceStub, tenant: str = "default", *, user_id: str = "", conversation_id: str = ""
) -> int:
    response = await stub.Erase(
        cache_pb2.EraseRequest(tenant=tenant, user_id=user_id, conversation_id=conversation_id), timeout=CALL_TIMEOUT
    )
    return response.entries


async def connect(process: ServiceProcess) -> tuple[grpc.aio.Channel, cache_pb2_grpc.CacheServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{process.port}")
    return channel, cache_pb2_grpc.CacheServiceStub(channel)
