"""The rest of the model options, and images, over real processes: gateway → dialogue → safety → modelsim."""

import base64
import json
import re
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.cluster import Cluster
from support.images import png

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
CAT = "https://example.com/cat.png"
# Modelsim bills gpt-4o an https image (not fetched) as the most a high-detail image costs: 85 + 8 x 170.
URL_IMAGE_TOKENS = 1445
# A 10 x 10 image at high detail is one tile: 85 + 170.
SMALL_IMAGE_TOKENS = 255


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """This module's cluster: input moderation on (modelsim's endpoint); conftest's `sim` and `chat` use it."""
    with Cluster(env={"CHATMESH_SAFETY_MODERATION": "on", "CHATMESH_SAFETY_MODERATE_OUTPUT": "false"}) as running:
        yield running


def request(
    message: str | None = None,
    images: list[chat_pb2.Image] | None = None,
    user_id: str = "alice",
    conversation_id: str = "",
    **options,
) -> chat_pb2.ChatRequest:
    """A request; without a message, one no other test sends, so that no answer comes from the cache."""
    return chat_pb2.ChatRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        message=f"describe {uuid.uuid4().hex}" if message is None else message,
        images=images or [],
        options=chat_pb2.ChatOptions(**options),
    )


def inline(data: bytes, mime_type: str = "image/png", **fields) -> chat_pb2.Image:
    return chat_pb2.Image(inline=chat_pb2.InlineImage(data=data, mime_type=mime_type), **fields)


def data_url(data: bytes, mime_type: str = "image/png") -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad_request)
    return [violation.field for violation in bad_request.field_violations]


async def test_the_new_options_reach_the_model(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response_format = chat_pb2.ResponseFormat(
        type=chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA, name="answer", json_schema=json.dumps(SCHEMA), strict=True
    )
    await chat.Chat(
        request(
            logit_bias={50256: -100, 7: 5},
            presence_penalty=0.5,
            frequency_penalty=-1.25,
            response_format=response_format,
        )
    )

    sent = sim.sim_requests(limit=1)[-1]
    assert sent["logit_bias"] == {"7": 5, "50256": -100}
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.5, -1.25)
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }


async def test_unset_options_are_not_sent(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    await chat.Chat(request())

    sent = sim.sim_requests(limit=1)[-1]
    assert not {"logit_bias", "presence_penalty", "frequency_penalty", "response_format"} & set(sent)


async def test_a_json_object_reply_is_asked_for(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    json_object = chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    await chat.Chat(request(f"answer in JSON {uuid.uuid4().hex}", response_format=json_object))

    assert sim.sim_requests(limit=1)[-1]["response_format"] == {"type": "json_object"}


async def test_the_provider_sees_a_hashed_user_id(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    first = await chat.Chat(request(user_id="alice"))
    await chat.Chat(request(user_id="alice", conversation_id=first.conversation_id))
    await chat.Chat(request(user_id="bob"))

    users = [sent["user"] for sent in sim.sim_requests(limit=3)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", user) for user in users)
    assert users[0] == users[1] != users[2]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"logit_bias": {-1: 5}}, "options.logit_bias"),
        ({"logit_bias": {1: 101}}, "options.logit_bias"),
        ({"logit_bias": {token: 1 for token in range(301)}}, "options.logit_bias"),
        ({"presence_penalty": 2.5}, "options.presence_penalty"),
        ({"frequency_penalty": -3}, "options.frequency_penalty"),
        (
            {"response_format": chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA, name="a")},
            "options.response_format.json_schema",
        ),
        (
            {
                "response_format": chat_pb2.ResponseFormat(
                    type=chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA, name="a b", json_schema="{}"
                )
            },
            "options.response_format.name",
        ),
        (
            {
                "response_format": chat_pb2.ResponseFormat(
                    type=chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA, name="a", json_schema='{"type": 5}'
                )
            },
            "options.response_format.json_schema",
        ),
    ],
)
async def test_bad_options_are_invalid_argument_naming_the_field(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, options: dict, field: str
):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.Chat(request(**options))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == [field]
    assert field in raised.value.details()
    assert sim.sim_stats()["requests"] == 0


async def test_an_image_by_url_goes_to_the_model_and_is_billed(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    text = f"what is this? {uuid.uuid4().hex}"
    plain = await chat.Chat(request(text, model="gpt-4o", temperature=0.9))
    with_image = await chat.Chat(
        request(text, [chat_pb2.Image(url=CAT, detail=chat_pb2.IMAGE_DETAIL_HIGH)], model="gpt-4o")
    )

    assert with_image.finish_reason == chat_pb2.FINISH_REASON_STOP and with_image.text
    assert sim.sim_requests(limit=1)[-1]["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": CAT, "detail": "high"}},
        ],
    }
    assert with_image.usage.input_tokens == plain.usage.input_tokens + URL_IMAGE_TOKENS


async def test_an_inline_image_goes_as_a_data_url(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    text = f"and this? {uuid.uuid4().hex}"
    data = png(10, 10)
    plain = await chat.Chat(request(text, model="gpt-4o", temperature=0.9))
    response = await chat.Chat(
        request(text, [inline(data, detail=chat_pb2.IMAGE_DETAIL_LOW), inline(data)], model="gpt-4o")
    )

    parts = sim.sim_requests(limit=1)[-1]["messages"][-1]["content"]
    assert parts[1:] == [
        {"type": "image_url", "image_url": {"url": data_url(data), "detail": "low"}},
        {"type": "image_url", "image_url": {"url": data_url(data), "detail": "auto"}},
    ]
    assert response.usage.input_tokens == plain.usage.input_tokens + 85 + SMALL_IMAGE_TOKENS


async def test_an_image_stays_with_its_message_for_later_turns_and_in_the_history(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    data = png(10, 10)
    first = await chat.Chat(request("what is in this picture?", [inline(data, detail=chat_pb2.IMAGE_DETAIL_LOW)]))
    await chat.Chat(request("and what colour is it?", conversation_id=first.conversation_id))

    earlier = sim.sim_requests(limit=1)[-1]["messages"][0]
    assert earlier["content"] == [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": data_url(data), "detail": "low"}},
    ]
    history = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=first.conversation_id, user_id="alice")
    )
    assert list(history.conversation.messages[0].images) == [inline(data, detail=chat_pb2.IMAGE_DETAIL_LOW)]
    assert not history.conversation.messages[2].images


async def test_a_message_may_be_only_an_image(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    events = [event async for event in chat.StreamChat(request("", [chat_pb2.Image(url=CAT)]))]

    assert events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert sim.sim_requests(limit=1)[-1]["messages"][-1]["content"] == [
        {"type": "image_url", "image_url": {"url": CAT, "detail": "auto"}}
    ]


async def test_a_turn_with_images_is_never_answered_from_the_cache(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    same = request(f"cache me? {uuid.uuid4().hex}", [chat_pb2.Image(url=CAT)])
    first = await chat.Chat(same)
    second = await chat.Chat(same)

    assert not first.cached and not second.cached
    assert sim.sim_stats()["requests"] == 2


async def test_the_new_options_are_part_of_the_cache_key(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    text = f"cache me {uuid.uuid4().hex}"
    first = await chat.Chat(request(text, presence_penalty=0.5, logit_bias={1: 1}))
    other_penalty = await chat.Chat(request(text, presence_penalty=1.0, logit_bias={1: 1}))
    other_bias = await chat.Chat(request(text, presence_penalty=0.5, logit_bias={1: 2}))
    again = await chat.Chat(request(text, presence_penalty=0.5, logit_bias={1: 1}))

    assert [first.cached, other_penalty.cached, other_bias.cached, again.cached] == [False, False, False, True]
    assert again.text == first.text


@pytest.mark.parametrize(
    ("image", "field"),
    [
        (inline(png(), "image/bmp"), "images[0].inline.mime_type"),
        (inline(png(), "image/jpeg"), "images[0].inline.data"),
        (inline(png() + bytes(5 * 1024 * 1024)), "images[0].inline.data"),
        (chat_pb2.Image(url="http://example.com/cat.png"), "images[0].url"),
        (chat_pb2.Image(), "images[0]"),
    ],
)
async def test_a_bad_image_is_invalid_argument_naming_the_field(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, image: chat_pb2.Image, field: str
):
    for call in (chat.Chat, chat.StreamChat):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            if call is chat.Chat:
                await chat.Chat(request(images=[image]))
            else:
                [event async for event in chat.StreamChat(request(images=[image]))]

        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(raised.value) == [field]
    stats = sim.sim_stats()
    assert stats["requests"] == 0 and stats["moderation_requests"] == 0


async def test_too_many_images_are_invalid_argument(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await chat.Chat(request(images=[chat_pb2.Image(url=CAT)] * 5))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(raised.value) == ["images"]


async def test_with_moderation_on_images_are_screened_with_the_text(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    data = png(4, 4)
    await chat.Chat(request("look", [chat_pb2.Image(url=CAT), inline(data)]))

    moderated = sim.sim("GET", "/sim/moderations")["requests"][-1]
    assert moderated["input"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": CAT}},
        {"type": "image_url", "image_url": {"url": data_url(data)}},
    ]


async def test_a_flagged_image_is_refused_without_calling_the_model(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    # modelsim's moderation flags an image whose URL holds a flag word.
    response = await chat.Chat(request("what is this?", [chat_pb2.Image(url="https://example.com/simflag.png")]))

    assert response.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert response.content_filter.stage == chat_pb2.ContentFilter.STAGE_INPUT
    assert list(response.content_filter.categories) == ["harassment"]
    assert sim.sim_stats()["requests"] == 0
