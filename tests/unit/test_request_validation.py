"""The gateway's checks on a ChatRequest: each rule, and the field it names."""

import json

import pytest
from support.images import gif, jpeg, png, webp

from chatmesh.gateway.validation import check_chat_request
from chatmesh.runtime.settings import DialogueSettings, GatewaySettings
from chatmesh.v1 import chat_pb2

SETTINGS = GatewaySettings(max_images_per_message=3, max_image_bytes=1000)
JSON_SCHEMA = chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA
SCHEMA = json.dumps({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})


def request(message: str = "hello", images: list[chat_pb2.Image] | None = None, **options) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        user_id="alice", message=message, images=images or [], options=chat_pb2.ChatOptions(**options)
    )


def inline(data: bytes, mime_type: str = "image/png", **fields) -> chat_pb2.Image:
    return chat_pb2.Image(inline=chat_pb2.InlineImage(data=data, mime_type=mime_type), **fields)


def fields_of(chat_request: chat_pb2.ChatRequest) -> list[str]:
    return [field for field, _problem in check_chat_request(chat_request, SETTINGS)]


def schema_format(**fields) -> chat_pb2.ResponseFormat:
    fields.setdefault("name", "answer")
    fields.setdefault("json_schema", SCHEMA)
    return chat_pb2.ResponseFormat(type=JSON_SCHEMA, **fields)


@pytest.mark.parametrize(
    "chat_request",
    [
        request(),
        request(logit_bias={0: -100, 50256: 100, 1234: 0}),
        request(logit_bias={token: 1 for token in range(300)}),
        request(presence_penalty=-2, frequency_penalty=2),
        request(presence_penalty=0.5, frequency_penalty=-1.5),
        request(response_format=chat_pb2.ResponseFormat()),
        request(response_format=chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_TEXT)),
        request(response_format=chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_JSON_OBJECT)),
        request(response_format=schema_format()),
        request(response_format=schema_format(name="a-Z_0" * 12 + "abcd", strict=True)),
        request(response_format=schema_format(json_schema="{}")),
        request(images=[chat_pb2.Image(url="https://example.com/cat.png?size=large")]),
        request(images=[chat_pb2.Image(url="HTTPS://EXAMPLE.COM/cat.png", detail=chat_pb2.IMAGE_DETAIL_LOW)]),
        request(
            images=[
                inline(png()),
                inline(jpeg(), "image/jpeg", detail=chat_pb2.IMAGE_DETAIL_HIGH),
                inline(webp(), "image/webp"),
            ]
        ),
        request(images=[inline(gif(), "image/gif")]),
        request(images=[inline(png() + bytes(1000 - len(png())))]),  # exactly max_image_bytes
        # An image needs no text.
        request("", images=[chat_pb2.Image(url="https://example.com/cat.png")]),
    ],
)
def test_a_valid_request_passes(chat_request: chat_pb2.ChatRequest) -> None:
    assert check_chat_request(chat_request, SETTINGS) == []


@pytest.mark.parametrize(
    ("chat_request", "field"),
    [
        (request(""), "message"),
        (request("   "), "message"),
        (request(logit_bias={token: 1 for token in range(301)}), "options.logit_bias"),
        (request(logit_bias={-1: 5}), "options.logit_bias"),
        (request(logit_bias={5: 101}), "options.logit_bias"),
        (request(logit_bias={5: -101}), "options.logit_bias"),
        (request(presence_penalty=2.01), "options.presence_penalty"),
        (request(presence_penalty=-2.5), "options.presence_penalty"),
        (request(presence_penalty=float("nan")), "options.presence_penalty"),
        (request(frequency_penalty=3), "options.frequency_penalty"),
        (request(frequency_penalty=-2.01), "options.frequency_penalty"),
        (request(response_format=chat_pb2.ResponseFormat(type=7)), "options.response_format.type"),
        # A schema's fields are only for a schema.
        (
            request(response_format=chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_JSON_OBJECT, name="a")),
            "options.response_format.name",
        ),
        (
            request(response_format=chat_pb2.ResponseFormat(json_schema=SCHEMA)),
            "options.response_format.json_schema",
        ),
        (
            request(response_format=chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_TEXT, strict=True)),
            "options.response_format.strict",
        ),
        (request(response_format=schema_format(name="")), "options.response_format.name"),
        (request(response_format=schema_format(name="a" * 65)), "options.response_format.name"),
        (request(response_format=schema_format(name="has space")), "options.response_format.name"),
        (request(response_format=schema_format(name="dotted.name")), "options.response_format.name"),
        (request(response_format=schema_format(json_schema="")), "options.response_format.json_schema"),
        (request(response_format=schema_format(json_schema="{not json")), "options.response_format.json_schema"),
        (request(response_format=schema_format(json_schema="[]")), "options.response_format.json_schema"),
        (request(response_format=schema_format(json_schema='"object"')), "options.response_format.json_schema"),
        (
            request(response_format=schema_format(json_schema='{"type": "objekt"}')),
            "options.response_format.json_schema",
        ),
        (
            request(response_format=schema_format(json_schema='{"required": "answer"}')),
            "options.response_format.json_schema",
        ),
        (request(response_format=schema_format(json_schema='{"$schema": 5}')), "options.response_format.json_schema"),
        (
            request(response_format=schema_format(json_schema=json.dumps({"description": "x" * 32_000}))),
            "options.response_format.json_schema",
        ),
        (
            request(response_format=schema_format(json_schema='{"a":' * 2000 + "{}" + "}" * 2000)),
            "options.response_format.json_schema",
        ),
        (request(images=[chat_pb2.Image(url="https://example.com/a.png")] * 4), "images"),
        (request(images=[chat_pb2.Image()]), "images[0]"),
        (request(images=[chat_pb2.Image(url="http://example.com/a.png")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="ftp://example.com/a.png")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="example.com/a.png")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="data:image/png;base64,AAAA")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="https://")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="https://example.com/a b.png")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="https://[::1/a.png")]), "images[0].url"),
        (request(images=[chat_pb2.Image(url="https://example.com/" + "a" * 8192)]), "images[0].url"),
        (request(images=[inline(png(), "image/tiff")]), "images[0].inline.mime_type"),
        (request(images=[inline(png(), "")]), "images[0].inline.mime_type"),
        (request(images=[inline(png(), "IMAGE/PNG")]), "images[0].inline.mime_type"),
        (request(images=[inline(b"")]), "images[0].inline.data"),
        (request(images=[inline(png() + bytes(1001 - len(png())))]), "images[0].inline.data"),
        # Bytes that are not of the type they claim.
        (request(images=[inline(jpeg())]), "images[0].inline.data"),
        (request(images=[inline(png(), "image/jpeg")]), "images[0].inline.data"),
        (request(images=[inline(b"GIF88a" + gif()[6:], "image/gif")]), "images[0].inline.data"),
        (request(images=[inline(b"RIFF\x00\x00\x00\x00WAVEfmt ", "image/webp")]), "images[0].inline.data"),
        (request(images=[chat_pb2.Image(url="https://example.com/a.png", detail=9)]), "images[0].detail"),
    ],
)
def test_an_invalid_request_names_the_field(chat_request: chat_pb2.ChatRequest, field: str) -> None:
    assert fields_of(chat_request) == [field]


def test_every_bad_image_is_named_by_its_index() -> None:
    images = [
        chat_pb2.Image(url="https://example.com/ok.png"),
        chat_pb2.Image(url="http://example.com/a.png"),
        inline(png(), "image/jpeg"),
        inline(png(), "image/bmp"),
    ]

    assert fields_of(request(images=images[:1] + images[1:3])) == ["images[1].url", "images[2].inline.data"]
    assert fields_of(request(images=images[2:])) == ["images[0].inline.data", "images[1].inline.mime_type"]


def test_the_problem_says_what_is_wanted() -> None:
    problems = dict(
        check_chat_request(
            request(
                logit_bias={-3: 200},
                presence_penalty=5,
                response_format=schema_format(json_schema='{"type": "objekt"}'),
                images=[chat_pb2.Image(url="http://example.com/a.png"), inline(png(), "image/bmp")],
            ),
            SETTINGS,
        )
    )

    assert problems["images[0].url"] == "must be an https URL"
    assert problems["images[1].inline.mime_type"] == "must be one of image/png, image/jpeg, image/gif, image/webp"
    assert problems["options.presence_penalty"] == "must be between -2 and 2"
    assert problems["options.response_format.json_schema"].startswith("is not a valid JSON Schema: ")
    logit_bias = [problem for field, problem in check_chat_request(request(logit_bias={-3: 200}), SETTINGS)]
    assert logit_bias == [
        "token ids must be at least 0 (not -3)",
        "biases must be between -100 and 100 (not 200 for token -3)",
    ]


def test_the_image_limits_are_settings() -> None:
    images = [inline(png() + bytes(5000))] * 5

    assert (
        check_chat_request(request(images=images), GatewaySettings(max_images_per_message=5, max_image_bytes=6000))
        == []
    )
    assert fields_of(request(images=images)) == ["images"]


def test_image_limits_must_fit_in_a_grpc_message() -> None:
    with pytest.raises(ValueError, match="CHATMESH_GRPC_MAX_MESSAGE_BYTES"):
        GatewaySettings(grpc_max_message_bytes=4 * 1024 * 1024)
    GatewaySettings(
        grpc_max_message_bytes=4 * 1024 * 1024,
        max_images_per_message=1,
        max_image_bytes=3 * 1024 * 1024,
        knowledge_max_document_bytes=3 * 1024 * 1024,
    )


def test_a_document_to_ingest_must_fit_in_a_grpc_message_and_overlap_in_half_a_chunk() -> None:
    with pytest.raises(ValueError, match="CHATMESH_KNOWLEDGE_MAX_DOCUMENT_BYTES"):
        GatewaySettings(knowledge_max_document_bytes=24 * 1024 * 1024)
    with pytest.raises(ValueError, match="CHATMESH_KNOWLEDGE_CHUNK_OVERLAP_TOKENS"):
        DialogueSettings(knowledge_chunk_tokens=100, knowledge_chunk_overlap_tokens=50)
    GatewaySettings(knowledge_max_document_bytes=23 * 1024 * 1024)
    DialogueSettings(knowledge_chunk_tokens=100, knowledge_chunk_overlap_tokens=49)


# Knowledge bases: what a turn searches.


def test_a_request_names_at_most_eight_knowledge_bases_each_once() -> None:
    assert fields_of(request(knowledge_bases=["help", "billing.v2", "FAQ_1", "a" * 64])) == []
    assert fields_of(request(knowledge_bases=[f"kb{number}" for number in range(9)])) == ["options.knowledge_bases"]
    assert fields_of(request(knowledge_bases=["help", "", "has space", "-dash", "a" * 65, "help"])) == [
        "options.knowledge_bases[1]",
        "options.knowledge_bases[2]",
        "options.knowledge_bases[3]",
        "options.knowledge_bases[4]",
        "options.knowledge_bases[5]",
    ]


# Tools: what the caller offers the model, and the results it sends back.

WEATHER = chat_pb2.Tool(
    name="get_weather",
    description="The weather in a city now.",
    parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
)
MODE = chat_pb2.ToolChoice.Mode


def result(call_id: str = "call_1", content: str = "12 °C", **fields) -> chat_pb2.ToolResult:
    return chat_pb2.ToolResult(call_id=call_id, content=content, **fields)


def with_results(*results: chat_pb2.ToolResult, message: str = "") -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(user_id="alice", conversation_id="c-1", message=message, tool_results=results)


@pytest.mark.parametrize(
    "chat_request",
    [
        request(tools=[WEATHER]),
        request(tools=[chat_pb2.Tool(name="no_arguments")], tool_choice=chat_pb2.ToolChoice(mode=MODE.MODE_REQUIRED)),
        request(tools=[WEATHER], tool_choice=chat_pb2.ToolChoice(tool_name="get_weather"), parallel_tool_calls=False),
        request(server_tools=["current_time"], tool_choice=chat_pb2.ToolChoice(tool_name="current_time")),
        request(tools=[WEATHER], server_tools=["current_time"], tool_choice=chat_pb2.ToolChoice(mode=MODE.MODE_NONE)),
        request(tools=[chat_pb2.Tool(name=f"tool_{index}") for index in range(127)], server_tools=["current_time"]),
        with_results(result()),
        with_results(result("call_1"), result("call_2", "", is_error=True), message="and then?"),
    ],
)
def test_a_valid_tool_request_passes(chat_request: chat_pb2.ChatRequest) -> None:
    assert check_chat_request(chat_request, SETTINGS) == []


@pytest.mark.parametrize(
    ("chat_request", "field"),
    [
        (request(tools=[chat_pb2.Tool(name="get weather")]), "options.tools[0].name"),
        (request(tools=[chat_pb2.Tool(name="")]), "options.tools[0].name"),
        (request(tools=[chat_pb2.Tool(name="x" * 65)]), "options.tools[0].name"),
        (request(tools=[WEATHER, WEATHER]), "options.tools[1].name"),
        (request(tools=[chat_pb2.Tool(name="current_time")], server_tools=["current_time"]), "options.server_tools[0]"),
        (request(server_tools=["no/such"]), "options.server_tools[0]"),
        (request(tools=[chat_pb2.Tool(name="t", description="d" * 1025)]), "options.tools[0].description"),
        (request(tools=[chat_pb2.Tool(name="t", parameters="{not json")]), "options.tools[0].parameters"),
        (request(tools=[chat_pb2.Tool(name="t", parameters='{"type": "string"}')]), "options.tools[0].parameters"),
        (request(tools=[chat_pb2.Tool(name="t", parameters='{"type": 5}')]), "options.tools[0].parameters"),
        (request(tools=[chat_pb2.Tool(name=f"tool_{index}") for index in range(129)]), "options.tools"),
        (request(tool_choice=chat_pb2.ToolChoice(mode=MODE.MODE_REQUIRED)), "options.tool_choice"),
        (request(parallel_tool_calls=True), "options.parallel_tool_calls"),
        (request(tools=[WEATHER], tool_choice=chat_pb2.ToolChoice(tool_name="other")), "options.tool_choice.tool_name"),
        (
            request(tools=[WEATHER], tool_choice=chat_pb2.ToolChoice(mode=MODE.MODE_AUTO, tool_name="get_weather")),
            "options.tool_choice",
        ),
        (request(tools=[WEATHER], tool_choice=chat_pb2.ToolChoice(mode=9)), "options.tool_choice.mode"),
        (with_results(result("")), "tool_results[0].call_id"),
        (with_results(result("call\n1")), "tool_results[0].call_id"),
        (with_results(result("c" * 129)), "tool_results[0].call_id"),
        (with_results(result("call_1"), result("call_1")), "tool_results[1].call_id"),
        (with_results(result(content="x" * 32_001)), "tool_results[0].content"),
        (with_results(*(result(f"call_{index}") for index in range(129))), "tool_results"),
    ],
)
def test_an_invalid_tool_request_names_the_field(chat_request: chat_pb2.ChatRequest, field: str) -> None:
    assert fields_of(chat_request) == [field]


def test_a_repeated_call_id_names_the_result_it_repeats() -> None:
    problems = dict(check_chat_request(with_results(result("a"), result("b"), result("a")), SETTINGS))

    assert problems == {"tool_results[2].call_id": "repeats tool_results[0].call_id"}


def test_an_empty_message_needs_images_or_tool_results() -> None:
    assert fields_of(request(message="")) == ["message"]
    assert fields_of(with_results(result(), message="")) == []
