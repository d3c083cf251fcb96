"""The ways of getting a reply that the benchmark compares, one call at a time.

- chatmesh: the gateway over grpc.aio, as a backend service calls it, with the tenant's API key in
  `authorization` metadata on every call (chatmesh_open and run: the same client, without a key; chatmesh_tls:
  the same client, over TLS), and an `idempotency_key` in the request when the case sends one;
- floor: straight to the model with a lean aiohttp client and a minimal SSE parser, the least any
  caller can spend;
- sdk: straight to the model with the openai SDK's `AsyncOpenAI` (stream=True, typed chunks), what a
  service would do without chatmesh.

Each call returns a Sample timed from just before the request is built to the last byte of the reply.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, NamedTuple

import aiohttp
import grpc
import openai

from bench.cases import Expect
from chatmesh.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc

CALL_TIMEOUT_SECONDS = 30.0
# Tries of an unmeasured turn that preparation makes (see `ChatmeshClient.chat_for_id`).
PREPARATION_ATTEMPTS = 4

_DATA = b"data: "
_DONE = b"[DONE]"


class Sample(NamedTuple):
    latency: float  # seconds, the whole call
    ttfd: float | None  # seconds to the first text delta; None when the call has none (Chat, a refusal)
    as_expected: bool  # the reply is what the case expects (see Expect)


class BadReply(Exception):
    """A call that returned, but not a complete reply."""


def _meets(expect: Expect, finish_reason: int, cached: bool) -> bool:
    if expect is Expect.CACHED:
        return cached
    if expect is Expect.CONTENT_FILTER:
        return finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    return finish_reason == chat_pb2.FINISH_REASON_STOP and not cached


def _channel(target: str, root_certificates: bytes | None) -> grpc.aio.Channel:
    """A channel to a gateway: over TLS, trusting the CA `root_certificates` (PEM), when given."""
    if root_certificates is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))


class ChatmeshClient:
    """One channel to the gateway, reused by every call (as a service would), so that a TLS handshake is made
    once, when it connects. With `api_key`, every call sends it as `authorization: Bearer <key>` metadata; with
    `root_certificates` (the PEM of the CA that the gateway's certificate chains to), the channel uses TLS."""

    def __init__(self, target: str, api_key: str | None = None, root_certificates: bytes | None = None) -> None:
        self._channel = _channel(target, root_certificates)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._metadata = None if api_key is None else (("authorization", f"Bearer {api_key}"),)

    async def close(self) -> None:
        await self._channel.close()

    async def stream_chat(
        self, conversation_id: str, user_id: str, message: str, expect: Expect, idempotency_key: str = ""
    ) -> Sample:
        started = time.perf_counter()
        request = chat_pb2.ChatRequest(
            conversation_id=conversation_id, user_id=user_id, message=message, idempotency_key=idempotency_key
        )
        ttfd = None
        completed = None
        async for event in self._stub.StreamChat(request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata):
            kind = event.WhichOneof("event")
            if kind == "delta":
                if ttfd is None:
                    ttfd = time.perf_counter() - started
            elif kind == "completed":
                completed = event.completed
        latency = time.perf_counter() - started
        if completed is None:
            raise BadReply("the stream ended without Completed")
        return Sample(latency, ttfd, _meets(expect, completed.finish_reason, completed.cached))

    async def chat(
        self, conversation_id: str, user_id: str, message: str, expect: Expect, idempotency_key: str = ""
    ) -> Sample:
        started = time.perf_counter()
        request = chat_pb2.ChatRequest(
            conversation_id=conversation_id, user_id=user_id, message=message, idempotency_key=idempotency_key
        )
        response = await self._stub.Chat(request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata)
        latency = time.perf_counter() - started
        return Sample(latency, None, _meets(expect, response.finish_reason, response.cached))

    async def default_model(self) -> str:
        """The model chatmesh uses when a request names none (the baselines ask modelsim for the same)."""
        request = chat_pb2.ChatRequest(user_id="bench-0", message="hello")
        return (await self._stub.Chat(request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata)).model

    async def chat_for_id(self, conversation_id: str, user_id: str, message: str) -> str:
        """One unmeasured turn; returns the conversation id. As chatmesh asks of a caller that gets UNAVAILABLE,
        it is retried with backoff, under an idempotency key so that it is taken once (a new conversation has no
        id to key, and is simply asked again)."""
        request = chat_pb2.ChatRequest(
            conversation_id=conversation_id,
            user_id=user_id,
            message=message,
            idempotency_key=uuid.uuid4().hex if conversation_id else "",
        )
        for attempt in range(PREPARATION_ATTEMPTS - 1):
            try:
                response = await self._stub.Chat(request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata)
                return response.conversation_id
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.25 * 2**attempt)
        response = await self._stub.Chat(request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata)
        return response.conversation_id


class FloorClient:
    """aiohttp, one session and connection pool, and a minimal SSE parser: the cheapest honest client."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS),
        )
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    async def close(self) -> None:
        await self._session.close()

    async def stream_chat(self, model: str, messages: list[dict[str, Any]]) -> Sample:
        started = time.perf_counter()
        body = json.dumps(
            {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        )
        ttfd = None
        text: list[str] = []
        async with self._session.post(self._url, data=body, headers=self._headers) as response:
            if response.status != 200:
                raise BadReply(f"HTTP {response.status}")
            pending = b""
            async for chunk in response.content.iter_any():
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(_DATA):
                        continue
                    payload = line[len(_DATA) :]
                    if payload == _DONE:
                        if not text:
                            raise BadReply("the stream had no text")
                        return Sample(time.perf_counter() - started, ttfd, True)
                    for choice in json.loads(payload)["choices"]:
                        content = choice["delta"].get("content")
                        if content:
                            if ttfd is None:
                                ttfd = time.perf_counter() - started
                            text.append(content)
        raise BadReply("the stream ended before [DONE]")


class SdkClient:
    """The openai SDK as a service would use it without chatmesh: `AsyncOpenAI`, defaults, typed chunks."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)

    async def close(self) -> None:
        await self._client.close()

    async def stream_chat(self, model: str, messages: list[dict[str, Any]]) -> Sample:
        started = time.perf_counter()
        ttfd = None
        text: list[str] = []
        stream = await self._client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            timeout=CALL_TIMEOUT_SECONDS,
        )
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        if ttfd is None:
                            ttfd = time.perf_counter() - started
                        text.append(choice.delta.content)
        if not text:
            raise BadReply("the stream had no text")
        return Sample(time.perf_counter() - started, ttfd, True)


# The bench tenant's limits: every kind of limit is set, so that every check runs on every call, and each
# is far above what a run can use, so that none refuses. chatmesh_tls has a tenant of its own with the same
# limits, in its own Redis.
BENCH_TENANT = "bench"
BENCH_TLS_TENANT = "bench-tls"
BENCH_LIMITS = chat_pb2.TenantLimits(
    requests_per_minute=10**9,
    tokens_per_minute=10**9,
    concurrent_streams=10**6,
    monthly_budget_usd=1_000_000.0,
    daily_budget_usd=1_000_000.0,
)


async def create_bench_tenant(
    target: str, admin_token: str, tenant: str = BENCH_TENANT, root_certificates: bytes | None = None
) -> str:
    """Creates `tenant` with BENCH_LIMITS through the AdminService of the gateway at `target` (over TLS with
    `root_certificates`, as ChatmeshClient); returns an API key of it."""
    metadata = (("authorization", f"Bearer {admin_token}"),)
    async with _channel(target, root_certificates) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name=tenant, limits=BENCH_LIMITS),
            metadata=metadata,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        created = await admin.CreateKey(
            admin_pb2.CreateKeyRequest(tenant=tenant, description="make bench"),
            metadata=metadata,
            timeout=CALL_TIMEOUT_SECONDS,
        )
    return created.api_key
