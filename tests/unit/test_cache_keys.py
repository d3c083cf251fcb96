"""The cache key: everything that shapes an answer is in it, and nothing that does not."""

from urllib.parse import unquote

import pytest

from chatmesh.cache.keys import KEY_PREFIX, answer_key, conversation_index, normalize_text, tombstone, user_index
from chatmesh.v1 import cache_pb2, chat_pb2

USER = chat_pb2.ROLE_USER
ASSISTANT = chat_pb2.ROLE_ASSISTANT


def context(*messages: tuple[int, str], **fields) -> cache_pb2.AnswerContext:
    """A first-turn context by default; `fields` override any AnswerContext field."""
    fields.setdefault("tenant", "default")
    fields.setdefault("model", "gpt-4o-mini")
    return cache_pb2.AnswerContext(
        messages=[cache_pb2.ContextMessage(role=role, content=content) for role, content in messages]
        or [cache_pb2.ContextMessage(role=USER, content="What is the capital of France?")],
        **fields,
    )


def test_the_same_inputs_give_the_same_key() -> None:
    assert answer_key(context(temperature=0.2, stop=["END"])) == answer_key(context(temperature=0.2, stop=["END"]))


def test_the_key_is_prefixed_and_scoped_by_tenant_and_model() -> None:
    key = answer_key(context(tenant="acme", model="gpt-4o"))

    prefix, digest = key.rsplit(":", 1)
    assert prefix == f"{KEY_PREFIX}acme:gpt-4o"
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_separators_and_wildcards_in_tenant_or_model_are_percent_encoded() -> None:
    key = answer_key(context(tenant="a:b*{c}", model="org/model:latest"))

    tenant, model, _digest = key.removeprefix(KEY_PREFIX).split(":")
    assert (unquote(tenant), unquote(model)) == ("a:b*{c}", "org/model:latest")
    assert not set("*{}") & set(key)


FOLLOW_UP = (USER, "And its population?")
JSON_OBJECT = chat_pb2.ResponseFormat(type=chat_pb2.ResponseFormat.TYPE_JSON_OBJECT)


def schema_format(
    name: str = "answer", schema: str = '{"type":"object"}', strict: bool = True
) -> chat_pb2.ResponseFormat:
    return chat_pb2.ResponseFormat(
        type=chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA, name=name, json_schema=schema, strict=strict
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # A follow-up after a different history.
        (
            context((USER, "What is the capital of France?"), (ASSISTANT, "Paris."), FOLLOW_UP),
            context((USER, "What is the capital of Spain?"), (ASSISTANT, "Madrid."), FOLLOW_UP),
        ),
        # A follow-up against the same question asked first.
        (context((USER, "Hi"), (ASSISTANT, "Hello!"), FOLLOW_UP), context(FOLLOW_UP)),
        # The same text under a different role.
        (context((USER, "x"), (ASSISTANT, "y"), (USER, "z")), context((USER, "x"), (USER, "y"), (USER, "z"))),
        # The same text split differently between messages.
        (context((USER, "a b"), (ASSISTANT, "c"), (USER, "d")), context((USER, "a"), (ASSISTANT, "b c"), (USER, "d"))),
        (context(system_prompt="be brief"), context(system_prompt="be thorough")),
        (context(system_prompt=""), context(system_prompt="be brief")),
        (context(model="gpt-4o-mini"), context(model="gpt-4o")),
        (context(tenant="acme"), context(tenant="globex")),
        (context(), context(temperature=0)),
        (context(temperature=0), context(temperature=0.25)),
        (context(), context(top_p=1)),
        (context(top_p=0.5), context(top_p=0.9)),
        (context(), context(max_tokens=100)),
        (context(max_tokens=100), context(max_tokens=101)),
        (context(), context(stop=["END"])),
        (context(stop=["END"]), context(stop=["STOP"])),
        (context(stop=["a", "b"]), context(stop=["b", "a"])),
        (context(stop=["\n\n"]), context(stop=[" "])),
        (context(), context(seed=0)),
        (context(seed=1), context(seed=2)),
        (context(), context(presence_penalty=0)),
        (context(presence_penalty=0.5), context(presence_penalty=-0.5)),
        (context(), context(frequency_penalty=0)),
        (context(presence_penalty=1), context(frequency_penalty=1)),
        (context(), context(logit_bias={50256: -100})),
        (context(logit_bias={1: 5}), context(logit_bias={1: 6})),
        (context(logit_bias={1: 5}), context(logit_bias={2: 5})),
        (context(), context(response_format=JSON_OBJECT)),
        (context(response_format=JSON_OBJECT), context(response_format=schema_format())),
        (context(response_format=schema_format()), context(response_format=schema_format(name="other"))),
        (context(response_format=schema_format()), context(response_format=schema_format(strict=False))),
        (context(response_format=schema_format()), context(response_format=schema_format(schema='{"type":"array"}'))),
        # Case is kept.
        (context((USER, "What is US?")), context((USER, "What is us?"))),
    ],
)
def test_anything_that_shapes_the_answer_changes_the_key(
    first: cache_pb2.AnswerContext, second: cache_pb2.AnswerContext
) -> None:
    assert answer_key(first) != answer_key(second)


def test_every_field_of_the_context_is_in_the_key() -> None:
    """Guards the proto: a field added to AnswerContext but forgotten in the key would share answers."""
    base = context()
    changed = {
        "tenant": lambda c: setattr(c, "tenant", "other"),
        "model": lambda c: setattr(c, "model", "other"),
        "system_prompt": lambda c: setattr(c, "system_prompt", "other"),
        "temperature": lambda c: setattr(c, "temperature", 0.0),
        "top_p": lambda c: setattr(c, "top_p", 1.0),
        "max_tokens": lambda c: setattr(c, "max_tokens", 1),
        "stop": lambda c: c.stop.append("x"),
        "seed": lambda c: setattr(c, "seed", 0),
        "messages": lambda c: c.messages.add(role=USER, content="more"),
        "presence_penalty": lambda c: setattr(c, "presence_penalty", 0.0),
        "frequency_penalty": lambda c: setattr(c, "frequency_penalty", 0.0),
        "logit_bias": lambda c: c.logit_bias.update({1: 1}),
        "response_format": lambda c: c.response_format.CopyFrom(JSON_OBJECT),
        "knowledge_versions": lambda c: c.knowledge_versions.update({"handbook": "1.2"}),
    }
    assert set(changed) == {field.name for field in cache_pb2.AnswerContext.DESCRIPTOR.fields}
    for name, change in changed.items():
        other = cache_pb2.AnswerContext()
        other.CopyFrom(base)
        change(other)
        assert answer_key(other) != answer_key(base), name


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("What is  the capital\tof\nFrance?", "What is the capital of France?"),
        ("  What is the capital of France?  \n", "What is the capital of France?"),
        # Full-width letters and an ideographic space (NFKC).
        ("Ｗｈａｔ　ｉｓ　ＡＩ？", "What is AI?"),  # noqa: RUF001
        ("ﬁnd the ﬂag", "find the flag"),
        ("你好，世界", "你好,世界"),  # noqa: RUF001
        ("e\u0301te", "\u00e9te"),  # combining acute accent composes
    ],
)
def test_whitespace_and_nfkc_equivalent_text_gives_the_same_key(first: str, second: str) -> None:
    assert answer_key(context((USER, first))) == answer_key(context((USER, second)))
    assert answer_key(context(system_prompt=first)) == answer_key(context(system_prompt=second))


def test_the_order_of_logit_bias_entries_does_not_change_the_key() -> None:
    first = context()
    first.logit_bias[1] = 5
    first.logit_bias[2] = -5
    second = context()
    second.logit_bias[2] = -5
    second.logit_bias[1] = 5
    assert answer_key(first) == answer_key(second)


def test_normalization_keeps_case_and_inner_text() -> None:
    assert normalize_text(" Hello \u3000 WORLD\n") == "Hello WORLD"
    assert normalize_text("") == ""


def test_an_indexs_tombstone_sits_beside_it_with_the_same_tenant_and_id() -> None:
    assert tombstone(user_index("acme corp", "u/1")) == "chatmesh:cache-erased:acme%20corp:user:u%2F1"
    assert tombstone(conversation_index("acme", "c-1")) == "chatmesh:cache-erased:acme:conversation:c-1"
    with pytest.raises(ValueError, match="not an index"):
        tombstone(KEY_PREFIX + "acme:gpt-4o:abc")
