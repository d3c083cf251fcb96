"""Idempotent turns over real processes and a real Redis: a retry with the turn's key never stores it twice."""

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

USER = "user-i"


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    """This module's cluster keeps conversations in Redis; conftest's `sim` and `chat` use it."""
    with Cluster(redis_url=module_redis.url) as running:
        yield running


def keyed_request(
    conversation_id: str = "", key: str | None = None, message: str | None = None
) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        conversation_id=conversation_id,
        user_id=USER,
        message=message or f"question {uuid.uuid4().hex}",
        idempotency_key=key or uuid.uuid4().hex,
    )


async def messages(chat: chat_pb2_grpc.ChatServiceStub, conversation_id: str) -> list[chat_pb2.Message]:
    reply = await chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id=USER))
    return list(reply.conversation.messages)


async def test_a_retry_of_a_committed_turn_replays_it_without_calling_the_model(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    request = keyed_request()
    first = await chat.Chat(request)
    retried = await chat.Chat(request)
    streamed = [event async for event in chat.StreamChat(request)]

    assert not first.replayed and retried.replayed and streamed[-1].completed.replayed
    assert retried.conversation_id == first.conversation_id  # a first turn: the same conversation
    assert (retried.text, retried.usage, retried.cost_usd) == (first.text, first.usage, first.cost_usd)
    assert "".join(event.delta.text for event in streamed if event.HasField("delta")) == first.text
    assert retried.request_id != first.request_id
    assert sim.sim_stats()["requests"] == 1
    assert len(await messages(chat, first.conversation_id)) == 2


async def test_a_retry_in_a_conversation_is_stored_once(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    first = await chat.Chat(keyed_request())
    second_turn = keyed_request(conversation_id=first.conversation_id)
    answered = await chat.Chat(second_turn)
    again = await chat.Chat(second_turn)

    assert again.replayed and again.text == answered.text
    assert [message.content for message in await messages(chat, first.conversation_id)][3] == answered.text
    assert len(await messages(chat, first.conversation_id)) == 4


async def test_a_key_reused_for_another_request_is_invalid_argument(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    first = await chat.Chat(keyed_request(key="reused-key"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await chat.Chat(keyed_request(conversation_id="", key="reused-key", message="something else"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith("idempotency_key: was already used for a different request")
    assert len(await messages(chat, first.conversation_id)) == 2


async def test_a_retry_while_the_first_attempt_runs_is_aborted(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    sim.sim_config(token_delay_seconds=0.1, reply_tokens=10)
    request = keyed_request()
    running = asyncio.ensure_future(chat.Chat(request))
    await asyncio.sleep(0.4)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await chat.Chat(request)
    assert failure.value.code() == grpc.StatusCode.ABORTED
    assert "still running" in failure.value.details()

    first = await running
    assert (await chat.Chat(request)).text == first.text


async def test_a_retry_after_a_failure_runs_the_turn_anew(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    sim.sim_faults(status=500, count=4)  # every attempt of the first call fails
    request = keyed_request()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await chat.Chat(request)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE

    retried = await chat.Chat(request)
    assert not retried.replayed and retried.text
    assert len(await messages(chat, retried.conversation_id)) == 2


async def test_cancelled_streams_retried_with_their_key_are_stored_exactly_once(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    """Cancel at every point of a stream, then retry until it succeeds: one turn each, with the text the
    caller was finally given."""
    sim.sim_config(token_delay_seconds=0.005, reply_tokens=20)
    first = await chat.Chat(keyed_request())
    conversation = first.conversation_id
    finals = []
    replays = 0
    # The last attempt reads its stream to the end (however finely the reply was split) before "cancelling".
    for cut in [*range(0, 24, 3), None]:
        request = keyed_request(conversation_id=conversation)
        stream = chat.StreamChat(request)
        for _ in range(cut if cut is not None else 1000):
            if await stream.read() is grpc.aio.EOF:
                break
        stream.cancel()
        for _ in range(20):
            try:
                retried = await chat.Chat(request)
                finals.append(retried.text)
                replays += retried.replayed
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.ABORTED, error.details()  # the cancelled attempt winding down
                await asyncio.sleep(0.1)

    stored = await messages(chat, conversation)
    assert len(stored) == 2 + 2 * len(finals)
    # A stream read to its end before the "cancel" was committed: its retry is a replay.
    assert replays >= 1
    assert [message.content for message in stored[3::2]] == finals
