"""ChatService over real processes: gateway → dialogue → modelsim, on loopback."""

import asyncio
import json
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.cluster import Cluster

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

USER = "user-a"


def request(
    message: str | None = None, conversation_id: str = "", user_id: str = USER, **options
) -> chat_pb2.ChatRequest:
    """A request; without a message, one no other test sends, so that no answer comes from the cache."""
    return chat_pb2.ChatRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        message=f"hello {uuid.uuid4().hex}" if message is None else message,
        options=chat_pb2.ChatOptions(**options),
    )


async def collect(stub: chat_pb2_grpc.ChatServiceStub, chat_request: chat_pb2.ChatRequest) -> list[chat_pb2.ChatEvent]:
    return [event async for event in stub.StreamChat(chat_request)]


def text_of(events: list[chat_pb2.ChatEvent]) -> str:
    return "".join(event.delta.text for event in events if event.WhichOneof("event") == "delta")


async def test_a_stream_is_started_then_deltas_then_completed(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    events = await collect(chat, request(model="modelsim-1"))

    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    assert set(kinds[1:-1]) == {"delta"}
    started, completed = events[0].started, events[-1].completed
    assert started.conversation_id and started.request_id and started.model == "modelsim-1"
    assert completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert completed.usage.output_tokens == 12
    assert completed.usage.total_tokens == completed.usage.input_tokens + completed.usage.output_tokens
    assert not completed.cached
    assert len(text_of(events).split()) == 12


async def test_the_first_delta_arrives_while_the_model_is_still_producing(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    sim.sim_config(reply_tokens=40, token_delay_seconds=0.05)
    stream = chat.StreamChat(request())
    seen_at_first_delta = None
    async for event in stream:
        if event.WhichOneof("event") == "delta" and seen_at_first_delta is None:
            seen_at_first_delta = sim.sim_stats()
    assert seen_at_first_delta is not None
    assert seen_at_first_delta["streams_open"] == 1
    assert seen_at_first_delta["streams_completed"] == 0
    assert sim.sim_stats()["streams_completed"] == 1


async def test_a_second_turn_sends_the_first_turn_to_the_model(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    first = await collect(chat, request("my name is Ada", system_prompt="be brief"))
    conversation_id = first[0].started.conversation_id
    second = await collect(chat, request("what is my name?", conversation_id=conversation_id))

    assert second[0].started.conversation_id == conversation_id
    sent = sim.sim_requests(limit=1)[-1]["messages"]
    assert sent == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": text_of(first)},
        {"role": "user", "content": "what is my name?"},
    ]


async def test_the_system_prompt_comes_first(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    await collect(chat, request("hi", system_prompt="answer in French"))

    assert sim.sim_requests(limit=1)[-1]["messages"][0] == {"role": "system", "content": "answer in French"}


async def test_the_model_sees_the_whole_conversation_while_it_fits_its_context(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    conversation_id = ""
    for turn in range(7):
        events = await collect(chat, request(f"message {turn}", conversation_id=conversation_id))
        conversation_id = events[0].started.conversation_id

    sent = sim.sim_requests(limit=1)[-1]["messages"]
    # Six turns are stored (12 messages), far within gpt-4o-mini's context: all of them, then the new message.
    assert len(sent) == 13
    assert sent[0] == {"role": "user", "content": "message 0"}
    assert sent[-1] == {"role": "user", "content": "message 6"}


async def test_chat_and_stream_chat_give_the_same_reply(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    # A temperature above the cache's bound, so that both replies come from the model.
    streamed = await collect(chat, request("same question", seed=7, temperature=0.9))
    whole = await chat.Chat(request("same question", seed=7, temperature=0.9))

    assert whole.text == text_of(streamed)
    assert whole.finish_reason == streamed[-1].completed.finish_reason
    assert whole.usage == streamed[-1].completed.usage
    assert whole.cost_usd == streamed[-1].completed.cost_usd
    assert whole.conversation_id and whole.request_id and whole.model


async def test_options_reach_the_model(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response = await chat.Chat(
        request(model="gpt-4o-mini", temperature=0.25, top_p=0.5, max_tokens=5, stop=["END"], seed=3)
    )

    sent = sim.sim_requests(limit=1)[-1]
    assert sent["model"] == "gpt-4o-mini"
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"], sent["seed"]) == (
        0.25,
        0.5,
        5,
        ["END"],
        3,
    )
    assert response.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert response.usage.output_tokens == 5
    expected = (response.usage.input_tokens * 0.15 + 5 * 0.60) / 1_000_000
    assert response.cost_usd == pytest.approx(expected)


async def test_the_request_id_is_in_started_and_in_the_response_headers(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    call = chat.StreamChat(request())
    events = [event async for event in call]
    headers = dict(await call.initial_metadata())

    assert headers["x-request-id"] == events[0].started.request_id


async def test_a_well_formed_request_id_from_the_caller_is_kept(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    call = chat.StreamChat(request(), metadata=(("x-request-id", "caller-42"),))
    events = [event async for event in call]

    assert dict(await call.initial_metadata())["x-request-id"] == "caller-42"
    assert events[0].started.request_id == "caller-42"


@pytest.mark.parametrize(
    ("field", "chat_request"),
    [
        ("user_id", request(user_id="")),
        ("user_id", request(user_id="u" * 129)),
        ("message", request(message="")),
        ("message", request(message="   ")),
        ("message", request(message="x" * 32_001)),
        ("conversation_id", request(conversation_id="not a valid id!")),
        ("options.temperature", request(temperature=2.5)),
        ("options.temperature", request(temperature=-0.1)),
        ("options.top_p", request(top_p=0)),
        ("options.top_p", request(top_p=1.5)),
        ("options.max_tokens", request(max_tokens=0)),
        ("options.max_tokens", request(max_tokens=1_000_000)),
        ("options.stop", request(stop=["a", "b", "c", "d", "e"])),
        ("options.stop", request(stop=[""])),
        ("options.model", request(model="m" * 200)),
        ("options.system_prompt", request(system_prompt="s" * 32_001)),
    ],
)
async def test_each_invalid_field_is_rejected_by_name(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, field: str, chat_request: chat_pb2.ChatRequest
):
    for call in (chat.Chat, chat.StreamChat):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            result = call(chat_request)
            if hasattr(result, "__aiter__"):
                await collect(chat, chat_request)
            else:
                await result
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in raised.value.details()
    assert sim.sim_stats()["requests"] == 0


async def test_an_invalid_request_carries_a_bad_request_detail(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.Chat(request(message="", temperature=3))

    status = rpc_status.from_call(raised.value)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert {violation.field for violation in bad_request.field_violations} == {"message", "options.temperature"}


async def test_an_unknown_conversation_is_not_found(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.Chat(request(conversation_id="0123456789abcdef"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert sim.sim_stats()["requests"] == 0


async def test_another_users_conversation_is_not_found_and_left_untouched(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    owned = await chat.Chat(request("mine", user_id="owner"))
    conversation_id = owned.conversation_id

    for attempt in (
        chat.Chat(request("let me in", conversation_id=conversation_id, user_id="intruder")),
        chat.GetConversation(chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id="intruder")),
        chat.DeleteConversation(
            chat_pb2.DeleteConversationRequest(conversation_id=conversation_id, user_id="intruder")
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await attempt
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    history = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id="owner")
    )
    assert [message.content for message in history.conversation.messages] == ["mine", owned.text]


async def test_get_conversation_returns_every_message_and_the_usage(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    first = await chat.Chat(request("one"))
    second = await chat.Chat(request("two", conversation_id=first.conversation_id))

    got = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=first.conversation_id, user_id=USER)
    )
    conversation = got.conversation
    assert conversation.user_id == USER
    assert [(m.role, m.content) for m in conversation.messages] == [
        (chat_pb2.ROLE_USER, "one"),
        (chat_pb2.ROLE_ASSISTANT, first.text),
        (chat_pb2.ROLE_USER, "two"),
        (chat_pb2.ROLE_ASSISTANT, second.text),
    ]
    assert conversation.usage.output_tokens == first.usage.output_tokens + second.usage.output_tokens
    assert conversation.create_time.seconds > 0


async def test_delete_conversation_erases_it_at_once(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response = await chat.Chat(request("forget me"))
    await chat.DeleteConversation(
        chat_pb2.DeleteConversationRequest(conversation_id=response.conversation_id, user_id=USER)
    )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=response.conversation_id, user_id=USER)
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_caller_that_cancels_closes_the_model_stream_and_commits_nothing(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    first = await chat.Chat(request("before"))
    sim.sim_config(reply_tokens=200, token_delay_seconds=0.05)

    call = chat.StreamChat(request("interrupted", conversation_id=first.conversation_id))
    async for event in call:
        if event.WhichOneof("event") == "delta":
            break
    assert sim.sim_stats()["streams_open"] == 1
    call.cancel()

    stats = sim.sim_stats()
    for _ in range(200):
        if stats["streams_open"] == 0:
            break
        await asyncio.sleep(0.025)
        stats = sim.sim_stats()
    assert stats["streams_open"] == 0
    assert stats["streams_cancelled"] == 1
    history = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=first.conversation_id, user_id=USER)
    )
    assert [message.content for message in history.conversation.messages] == ["before", first.text]
    # The tokens the cancelled stream spent count for the conversation: its prompt and the text streamed.
    for _ in range(100):  # written after the stream closed: at most 100 polls of 20 ms
        usage = history.conversation.usage
        if usage.output_tokens > first.usage.output_tokens:
            break
        await asyncio.sleep(0.02)
        history = await chat.GetConversation(
            chat_pb2.GetConversationRequest(conversation_id=first.conversation_id, user_id=USER)
        )
    assert usage.input_tokens > first.usage.input_tokens
    assert usage.output_tokens > first.usage.output_tokens


async def test_a_rate_limit_with_retry_after_is_retried_and_the_caller_gets_its_reply(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    sim.sim_faults(429, count=1, retry_after=0.2)

    response = await chat.Chat(request("patience"))

    assert response.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert response.text
    stats = sim.sim_stats()
    assert stats["requests"] == 2 and stats["errors_injected"] == 1


async def test_a_server_error_is_retried(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    sim.sim_faults(500, count=2)

    response = await chat.Chat(request("again"))

    assert response.text
    assert sim.sim_stats()["requests"] == 3


async def test_a_rate_limit_that_outlives_the_retries_is_resource_exhausted(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    sim.sim_faults(429, count=100, retry_after=0.05)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.Chat(request("too much"))

    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in raised.value.details()
    retry_info = error_details_pb2.RetryInfo()
    assert rpc_status.from_call(raised.value).details[0].Unpack(retry_info)
    assert retry_info.retry_delay.ToMilliseconds() == 50
    assert sim.sim_stats()["requests"] == 4  # CHATMESH_MODEL_MAX_ATTEMPTS defaults to 4


@pytest.mark.parametrize(
    ("http_status", "code", "says"),
    [
        (404, grpc.StatusCode.INVALID_ARGUMENT, "options.model"),
        (401, grpc.StatusCode.FAILED_PRECONDITION, "OPENAI_API_KEY"),
    ],
)
async def test_a_request_the_provider_refuses_is_not_retried_and_says_what_to_fix(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, http_status: int, code: grpc.StatusCode, says: str
):
    sim.sim_faults(http_status, count=1)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.Chat(request(model="no-such-model"))

    assert raised.value.code() == code
    assert says in raised.value.details()
    assert sim.sim_stats()["requests"] == 1


async def test_a_failed_first_turn_sends_nothing_and_leaves_no_conversation(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    sim.sim_faults(500, count=100)
    key = uuid.uuid4().hex
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in chat.StreamChat(chat_pb2.ChatRequest(user_id=USER, message="doomed", idempotency_key=key)):
            events.append(event)
    # Started comes with the model's first answer (it names the model that answered), so there is none.
    assert events == []
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model provider" in raised.value.details()

    sim.sim_reset()
    for _ in range(20):  # the failed attempt's claim is released just after its error: at most 20 tries
        try:
            retried = await chat.Chat(chat_pb2.ChatRequest(user_id=USER, message="doomed", idempotency_key=key))
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ABORTED
            await asyncio.sleep(0.05)
    history = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=retried.conversation_id, user_id=USER)
    )
    # The conversation holds the retry's turn alone: the failed attempt left nothing.
    assert [message.content for message in history.conversation.messages] == ["doomed", retried.text]


def test_without_tls_settings_every_port_is_plaintext_and_says_so(cluster: Cluster) -> None:
    for name in ("gateway", "dialogue", "safety", "cache"):
        lines = [json.loads(line) for line in cluster.processes[name].log().splitlines() if line.startswith("{")]
        listening = [line for line in lines if line.get("event") == "listening"]
        assert [line["transport"] for line in listening] == ["plaintext"], name
        # On loopback, plaintext is expected: no warning.
        assert not any(line.get("event") == "plaintext_beyond_loopback" for line in lines), name
