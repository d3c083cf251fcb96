"""The PII policy end to end (gateway → dialogue → safety → modelsim, conversations in Redis): what the model
received, what was stored, and what the caller got, for each mode — e-mail left as it is, phone numbers redacted
in storage, card numbers redacted before the model.

modelsim answers a message holding `[echo]` with the text after it, so the reply can carry what the model saw.
"""

import json
from collections.abc import Iterator

import pytest
from support.cluster import Cluster
from support.redis_scan import keys_holding
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

POLICY = {"email": "leave", "phone": "storage", "cn_id": "storage", "payment_card": "model", "ip_address": "leave"}
EMAIL = "ada@example.com"
PHONE = "138 0013 8000"
CARD = "4111 1111 1111 1111"
CALL_TIMEOUT = 20


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    with Cluster(redis_url=module_redis.url, env={"CHATMESH_PII_POLICY": json.dumps(POLICY)}) as running:
        yield running


async def stored_messages(chat: chat_pb2_grpc.ChatServiceStub, conversation_id: str) -> list[str]:
    response = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id="alice"), timeout=CALL_TIMEOUT
    )
    return [message.content for message in response.conversation.messages]


async def test_each_mode_from_the_model_to_the_store_to_the_caller(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    message = f"mail {EMAIL}, call {PHONE}, pay with {CARD} [echo] ok: {EMAIL} {PHONE}"

    events = [
        event
        async for event in chat.StreamChat(chat_pb2.ChatRequest(user_id="alice", message=message), timeout=CALL_TIMEOUT)
    ]

    seen_by_model = sim.sim_requests(limit=1)[-1]["messages"][-1]["content"]
    assert seen_by_model == f"mail {EMAIL}, call {PHONE}, pay with [CARD_1] [echo] ok: {EMAIL} {PHONE}"
    reply = "".join(event.delta.text for event in events if event.HasField("delta"))
    assert reply == f"ok: {EMAIL} {PHONE}"
    stored = await stored_messages(chat, events[0].started.conversation_id)
    # The same number has the same placeholder, in the message and in the reply.
    assert stored == [
        f"mail {EMAIL}, call [PHONE_1], pay with [CARD_1] [echo] ok: {EMAIL} [PHONE_1]",
        f"ok: {EMAIL} [PHONE_1]",
    ]


async def test_a_storage_kind_is_kept_nowhere_and_a_model_kind_only_with_its_message(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, module_redis: RedisServer
):
    """Beneath GetConversation: a scan of every Redis key and the processes' logs. The card (model) is kept with
    the message that introduced it, so that later turns can restore it; the phone number (storage) nowhere."""
    response = await chat.Chat(
        chat_pb2.ChatRequest(user_id="alice", message=f"call {PHONE} or pay with {CARD} [echo] ok {PHONE} {CARD}"),
        timeout=CALL_TIMEOUT,
    )

    assert response.text == f"ok {PHONE} {CARD}"
    found = await keys_holding(module_redis.url, PHONE, PHONE.replace(" ", ""), CARD)
    assert found[PHONE] == found[PHONE.replace(" ", "")] == []
    assert found[CARD] and all(":m:" in key for key in found[CARD])
    assert any(response.conversation_id in key for key in found[CARD])
    log = "".join(process.log() for process in sim.processes.values() if process.command != "modelsim")
    assert PHONE not in log and CARD not in log


async def test_placeholders_the_model_writes_are_restored_for_the_caller_in_later_turns_too(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    first = await chat.Chat(chat_pb2.ChatRequest(user_id="alice", message=f"my card is {CARD}"), timeout=CALL_TIMEOUT)

    second = await chat.Chat(
        chat_pb2.ChatRequest(
            user_id="alice",
            conversation_id=first.conversation_id,
            message="which card? [echo] the card [CARD_1], not [CARD_2]",
        ),
        timeout=CALL_TIMEOUT,
    )

    assert second.text == f"the card {CARD}, not [CARD_2]"
    # The model saw the first message with its placeholder, and neither turn stored the card.
    sent = sim.sim_requests(limit=1)[-1]["messages"]
    assert sent[0]["content"] == "my card is [CARD_1]"
    assert CARD not in json.dumps(await stored_messages(chat, first.conversation_id))


async def test_a_turn_with_personal_information_is_not_cached(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    for _ in range(2):
        response = await chat.Chat(
            chat_pb2.ChatRequest(user_id="alice", message=f"call me at {PHONE} tomorrow please"),
            timeout=CALL_TIMEOUT,
        )
        assert not response.cached

    assert sim.sim_stats()["requests"] == 2
