"""What callers see when processes die, restart, or are told to stop; each test has its own cluster."""

import asyncio
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

USER = "user-r"


@pytest.fixture
def fresh_cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        yield running


@pytest.fixture
def redis_cluster(redis_url: str) -> Iterator[Cluster]:
    with Cluster(redis_url=redis_url) as running:
        yield running


def chat_request(message: str, conversation_id: str = "") -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(conversation_id=conversation_id, user_id=USER, message=message)


async def test_health_is_serving_and_reflection_lists_the_services(fresh_cluster: Cluster):
    expected = {
        "gateway": "chatmesh.v1.ChatService",
        "dialogue": "chatmesh.v1.DialogueService",
    }
    for name, service in expected.items():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{fresh_cluster.processes[name].port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for checked in ("", service):
                response = await health.Check(health_pb2.HealthCheckRequest(service=checked))
                assert response.status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            listed = {
                service.name async for response in responses for service in response.list_services_response.service
            }
            assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


@pytest.mark.parametrize("process", ["dialogue", "safety"])
async def test_a_process_that_stays_down_fails_fast_and_one_that_restarts_costs_callers_nothing(
    fresh_cluster: Cluster, process: str
):
    async with grpc.aio.insecure_channel(fresh_cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        assert (await chat.Chat(chat_request("before"))).text

        fresh_cluster.processes[process].kill()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await chat.Chat(chat_request("while down"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"{process} service is unavailable" in raised.value.details()
        assert time.monotonic() - started < 5  # not the 10 s deadline: nothing waits for a process that is gone

        # Internal channels reconnect within 100 ms to 1 s, and retry a call that found no process for about a
        # second: the first calls after the process is SERVING again succeed.
        fresh_cluster.processes[process].start()
        replies = await asyncio.gather(*(chat.Chat(chat_request(f"after {n}"), timeout=10) for n in range(5)))
        assert all(reply.text for reply in replies)


async def test_sigterm_to_the_gateway_lets_a_running_stream_finish_and_refuses_new_calls(fresh_cluster: Cluster):
    fresh_cluster.sim_config(reply_tokens=30, token_delay_seconds=0.05)
    gateway = fresh_cluster.processes["gateway"]
    async with grpc.aio.insecure_channel(fresh_cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        stream = chat.StreamChat(chat_request("a long answer, please"))
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 2:
                gateway.signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await chat.Chat(chat_request("too late"), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    assert events[-1].WhichOneof("event") == "completed"
    assert events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert sum(len(e.delta.text.split()) for e in events if e.WhichOneof("event") == "delta") == 30
    assert gateway.wait() == 0


async def test_every_process_exits_zero_on_sigterm(fresh_cluster: Cluster):
    assert fresh_cluster.stop() == {"gateway": 0, "dialogue": 0, "cache": 0, "safety": 0, "modelsim": 0}


async def test_with_redis_a_conversation_survives_a_dialogue_restart(redis_cluster: Cluster):
    async with grpc.aio.insecure_channel(redis_cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        first = await chat.Chat(chat_request("remember this"))

        dialogue = redis_cluster.processes["dialogue"]
        dialogue.stop()
        dialogue.start()
        for _ in range(100):
            try:
                second = await chat.Chat(chat_request("what did I say?", first.conversation_id), timeout=10)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)

    assert second.conversation_id == first.conversation_id
    sent = redis_cluster.sim_requests(limit=1)[-1]["messages"]
    assert sent == [
        {"role": "user", "content": "remember this"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "what did I say?"},
    ]


async def test_a_deadline_shorter_than_the_reply_is_deadline_exceeded_and_commits_nothing(fresh_cluster: Cluster):
    async with grpc.aio.insecure_channel(fresh_cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        first = await chat.Chat(chat_request("quick"))
        fresh_cluster.sim_config(reply_tokens=100, token_delay_seconds=0.05)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await chat.Chat(chat_request("slow", first.conversation_id), timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        history = await chat.GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=first.conversation_id, user_id=USER)
        )
        assert len(history.conversation.messages) == 2
    stats = fresh_cluster.sim_stats()
    for _ in range(100):
        if stats["streams_open"] == 0:
            break
        await asyncio.sleep(0.05)
        stats = fresh_cluster.sim_stats()
    assert stats["streams_open"] == 0


async def test_with_redis_down_the_caller_gets_unavailable_and_nothing_hangs():
    redis = RedisServer.start()
    running = Cluster(redis_url=redis.url).start()
    try:
        async with grpc.aio.insecure_channel(running.gateway_target) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            first = await chat.Chat(chat_request("stored"))
            redis.stop()
            for attempt in (chat_request("new conversation"), chat_request("continued", first.conversation_id)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await chat.Chat(attempt, timeout=20)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                # Whichever store the call reaches first once the gateway's 1-second key cache lapses: the
                # tenant's (gateway) or the conversation's (dialogue). Both say to retry.
                details = raised.value.details() or ""
                assert "retry with backoff" in details
                assert "conversation store is unavailable" in details or "tenant limits cannot be read" in details
    finally:
        running.stop()
        redis.stop()
