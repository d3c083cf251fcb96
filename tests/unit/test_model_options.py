"""What ChatOptions ask of the model, as the model client sends it; and the end user's id as the provider sees it."""

import json

from chatmesh.dialogue.model_options import model_options, provider_user
from chatmesh.model.client import ModelRequest, moderation_input
from chatmesh.v1 import chat_pb2

MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def params(**options) -> dict:
    return ModelRequest(model="gpt-4o", messages=MESSAGES, **model_options(chat_pb2.ChatOptions(**options))).params()


def test_unset_options_are_not_sent() -> None:
    assert params() == {"model": "gpt-4o", "messages": MESSAGES}
    assert params(response_format=chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_TEXT)) == params()


def test_every_option_is_sent_as_the_api_names_it() -> None:
    sent = params(
        temperature=0.5,
        top_p=0.25,
        stop=["END"],
        seed=0,
        logit_bias={50256: -100, 7: 5},
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        response_format=chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_JSON_OBJECT),
    )

    assert sent == {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "temperature": 0.5,
        "top_p": 0.25,
        "stop": ["END"],
        "seed": 0,
        "logit_bias": {"7": 5, "50256": -100},
        "presence_penalty": 0.5,
        "frequency_penalty": -1.5,
        "response_format": {"type": "json_object"},
    }


def test_a_json_schema_goes_as_an_object() -> None:
    response_format = chat_pb2.ResponseFormat(
        type=chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA, name="answer", json_schema=json.dumps(SCHEMA), strict=True
    )

    assert params(response_format=response_format)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }


def test_the_provider_sees_a_keyed_hash_of_tenant_and_user() -> None:
    user = provider_user("salt", "acme", "alice")

    assert len(user) == 16 and int(user, 16) >= 0
    assert user == provider_user("salt", "acme", "alice")
    assert user != provider_user("salt", "globex", "alice")
    assert user != provider_user("salt", "acme", "bob")
    assert user != provider_user("pepper", "acme", "alice")
    # The separator keeps tenant and user apart (a tenant id holds no NUL).
    assert provider_user("salt", "ab", "c") != provider_user("salt", "a", "bc")
    assert "alice" not in user
    sent = ModelRequest(model="gpt-4o", messages=MESSAGES, user=user).params()
    assert sent["user"] == user


def test_moderation_input_is_the_text_or_parts_with_images() -> None:
    assert moderation_input("hello") == "hello"
    assert moderation_input("hello", ["https://example.com/a.png", "data:image/png;base64,AAAA"]) == [
        {"type": "text", "text": "hello"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    assert moderation_input("", ["https://example.com/a.png"]) == [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    ]
