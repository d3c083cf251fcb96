"""modelsim's HTTP server: OpenAI's chat completions (JSON and SSE), moderations and models, plus /sim/ controls.

Requests are checked as OpenAI checks them (a malformed one is a 400 in OpenAI's error shape), including image
content parts (https URLs, which are not fetched, or base64 data: URLs of PNG, JPEG, WebP or GIF), logit_bias,
the penalties, response_format and user. Images are billed in prompt_tokens by OpenAI's image rule at the model
family's rates (chatmesh.dialogue.tokens): an inline image by its size, an https one as the most its detail costs.

A reply is a deterministic function of (model, messages, seed): `reply_tokens` words from a fixed
vocabulary, picked by a hash of the request; but a last user message that holds `[echo]` is answered with the
text that follows it (to test what a caller receives of what the model writes). When a system message numbers
sources (`[1] title (source)`, as chatmesh's knowledge step writes them), the reply ends by citing the one that
shares the most words with the question, as `[n]`. Streams are written from
prebuilt byte templates, so a zero-latency stream costs little more than one write.

It also serves /v1/embeddings (chatmesh.modelsim.embeddings): hashed word and character n-grams, so that paraphrases
sharing words come out close.

One process can serve several independent deployments (CHATMESH_MODELSIM_DEPLOYMENTS), each a Simulator on its
own port with its own config, faults, stats and /sim/ endpoints, so that a router over several upstreams can be
tested on one machine. Faults are OpenAI's: 429 (with retry-after and x-ratelimit-reset-requests), 500, 401 for
a key named in `unauthorized_keys`, and hangs (no response at all). Faults queued through POST /sim/faults may
target one API key.

Function calling is OpenAI's chat-completions tool protocol: `tools`, `tool_choice` and `parallel_tool_calls` are
checked as OpenAI checks them, and so are assistant `tool_calls` and `role: "tool"` messages (every call answered
by a tool message right after it, no tool message that answers nothing). When tools are offered and the last
message is the user's, its text holds directives:

    call <tool_name> [<JSON object>]

(the word `call`, whitespace, an offered tool's name, then optionally whitespace and a `{`). Each directive for an
offered tool is one call, in order; directives for other names are ignored. Its arguments are the object, written
compactly; when the text after the name is not valid JSON, the raw text from its `{` through the `}` that closes
it (braces counted, strings not considered) or to the end of the message, as-is: `call x {not json}` sends
`{not json}`. Without an object, each `required` property of the tool's `parameters` gets its first `enum` value,
else a value by type: "sim", 1, 1.5, true, [], {} (null for another type). tool_choice "none" makes no call,
"required" calls the first tool when there is no directive, a named function makes exactly one call of it;
`parallel_tool_calls: false` keeps the first call. No call → the usual text reply. Calls end with finish_reason
"tool_calls", ids are "call_" + 24 hex digits of a hash of (model, messages, index), and a stream sends each call's
id and name, then its arguments 8 characters a chunk. When the last messages are tool results, the reply is the
text `tool results: <tool_call_id>=<content>; ...` (in their order), unless the last user message holds
`[keep-calling]`: then its directives are called again, so that a bounded tool loop can be tested. The tool
definitions count in prompt_tokens as their JSON text, a call's arguments in completion_tokens.
"""

import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from typing import Any, Self

import uvloop
from aiohttp import web

from chatmesh.dialogue.content import image_size
from chatmesh.dialogue.tokens import TokenCounter, context_tokens
from chatmesh.modelsim.embeddings import EMBEDDING_MODELS, SHORTENABLE, as_base64, embed
from chatmesh.runtime.settings import ModelContextSettings, ModelsimDeployment, ModelsimSettings

MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "modelsim-1")
REQUEST_LOG_SIZE = 256
# The largest request body modelsim reads (OpenAI takes up to 50 MB of images in one request).
MAX_BODY_BYTES = 64 * 1024 * 1024
# The request log keeps a data: URL longer than this as its beginning and a summary, not its bytes.
LOGGED_DATA_URL_CHARS = 1024
# How often a hanging request looks whether its client has gone away.
HANG_POLL_SECONDS = 0.05
# A user message with this marker is answered with the text that follows it.
ECHO_MARKER = "[echo]"
# A numbered source in a system message, to its end: the next source, or the end of the message.
_SOURCE = re.compile(r"^\[(\d+)\] (.*?)(?=^\[\d+\] |\Z)", re.MULTILINE | re.DOTALL)
# The status that a queued or drawn fault has when it is a hang (POST /sim/faults {"status": "hang"}).
HANG = 0

# 64 words, so each byte of the request's hash picks one uniformly.
_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip "
    "ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla "
    "pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim "
    "at vero eos accusamus iusto"
)
_VOCABULARY = tuple(f" {word}" for word in _WORDS.split())
# A streamed tool call's arguments are sent in pieces of at most this many characters.
TOOL_ARGUMENTS_PIECE_CHARS = 8
# OpenAI's limit on the tools of one request.
MAX_TOOLS = 128
# In the last user message, makes modelsim answer tool results with its directives' calls again.
KEEP_CALLING_MARKER = "[keep-calling]"
_MODELS_CREATED = 1_700_000_000
_FINGERPRINT = "fp_modelsim"

# Pieces of a `chat.completion.chunk` SSE event, as OpenAI sends them.
_CHUNK_HEAD = (
    b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
    b'"system_fingerprint":"' + _FINGERPRINT.encode() + b'","choices":'
)
_DELTA_OPEN = b'[{"index":0,"delta":'
_DELTA_CLOSE = b',"logprobs":null,"finish_reason":null}]'
_ROLE_CHOICES = _DELTA_OPEN + b'{"role":"assistant","content":"","refusal":null}' + _DELTA_CLOSE
# A reply of tool calls starts with no content at all, as OpenAI's do.
_TOOL_ROLE_CHOICES = _DELTA_OPEN + b'{"role":"assistant","content":null,"refusal":null}' + _DELTA_CLOSE


def _text_choices(token: str) -> bytes:
    return _DELTA_OPEN + b'{"content":' + json.dumps(token).encode() + b"}" + _DELTA_CLOSE


_TOKEN_CHOICES = {token: _text_choices(token) for token in _VOCABULARY}
_FINISH_CHOICES = b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]'
_DONE = b"data: [DONE]\n\n"

# OpenAI's moderation categories; modelsim flags only SIM_MODERATION_CATEGORY, for texts that contain
# one of SimConfig.moderation_flag_words.
_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
SIM_MODERATION_CATEGORY = "harassment"
# The score of SIM_MODERATION_CATEGORY for a text with a flag word; every other score is _LOW_SCORE.
_FLAG_SCORE = 0.97
_LOW_SCORE = 0.0001
# modelsim flags a category whose score (from moderation_word_scores) is at least this.
_SIM_FLAG_THRESHOLD = 0.5
_MODERATION_MODEL = "omni-moderation-latest"


@dataclass
class SimConfig:
    """What modelsim does with each chat request; mutable at runtime (POST /sim/config)."""

    reply_tokens: int = 50
    first_token_latency_seconds: float = 0.0
    token_delay_seconds: float = 0.0
    error_429_rate: float = 0.0
    error_500_rate: float = 0.0
    retry_after_seconds: float = 1.0
    # The share of chat requests that hang: no response, not even headers, until the client goes away or
    # hang_seconds pass (then the connection is closed without a response). One draw decides a request's fault:
    # error_429_rate, then error_500_rate, then hang_rate.
    hang_rate: float = 0.0
    hang_seconds: float = 300.0
    # API keys refused with 401 (invalid_api_key) on every /v1/ endpoint, before anything else.
    unauthorized_keys: list[str] = field(default_factory=list)
    # POST /v1/moderations flags a text that contains one of these (ignoring case) as harassment.
    moderation_flag_words: list[str] = field(default_factory=lambda: ["simflag"])
    # A word (ignoring case) to the category scores a text containing it gets, e.g. {"borderline":
    # {"violence": 0.3}}: a category is flagged at 0.5 and above. Several words: each category's highest score.
    moderation_word_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    # Each model's context in tokens (longest model-name prefix), as chatmesh's settings give them: a request
    # whose prompt and max_tokens pass it is refused as OpenAI refuses it (context_length_exceeded).
    context_tokens: dict[str, int] = field(
        default_factory=lambda: dict(ModelContextSettings.model_fields["model_context_tokens"].default)
    )
    default_context_tokens: int = ModelContextSettings.model_fields["default_context_tokens"].default
    # POST /v1/embeddings waits this long before answering, and answers with this HTTP status (an OpenAI error
    # body) when it is not 0: an embedding endpoint that is slow, or failing.
    embedding_latency_seconds: float = 0.0
    embedding_error_status: int = 0

    @classmethod
    def from_settings(cls, settings: ModelsimSettings, deployment: ModelsimDeployment | None = None) -> Self:
        """The modelsim_* settings, with what `deployment` (an entry of modelsim_deployments) sets instead."""
        config = cls(
            reply_tokens=settings.modelsim_reply_tokens,
            first_token_latency_seconds=settings.modelsim_first_token_latency_seconds,
            token_delay_seconds=settings.modelsim_token_delay_seconds,
            error_429_rate=settings.modelsim_error_429_rate,
            error_500_rate=settings.modelsim_error_500_rate,
            retry_after_seconds=settings.modelsim_retry_after_seconds,
            hang_rate=settings.modelsim_hang_rate,
            hang_seconds=settings.modelsim_hang_seconds,
            context_tokens=dict(settings.model_context_tokens),
            default_context_tokens=settings.default_context_tokens,
        )
        if deployment is not None:
            for name, value in deployment.model_dump(exclude={"port"}, exclude_none=True).items():
                setattr(config, name, value)
        return config


@dataclass
class SimStats:
    """Counters served by GET /sim/stats; `streams_open` is a gauge."""

    requests: int = 0
    streams_open: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    errors_injected: int = 0
    # /v1/moderations calls, apart from `requests` (chat completions).
    moderation_requests: int = 0
    # /v1/embeddings calls.
    embedding_requests: int = 0
    moderation_errors_injected: int = 0
    # Chat requests that hung (drawn by hang_rate or queued), and those still hanging (a gauge).
    hangs: int = 0
    hangs_open: int = 0
    # Chat requests by their bearer API key (those without one are in `requests` only).
    requests_by_key: dict[str, int] = field(default_factory=dict)


class FaultQueue:
    """Faults queued through POST /sim/faults, as (status, retry_after): those for one API key, which only
    requests with that key get (first), and those for any request."""

    def __init__(self) -> None:
        self._queues: dict[str | None, deque[tuple[int, float]]] = {}

    def add(self, key: str | None, status: int, retry_after: float, count: int) -> int:
        """Queues `count` faults (for requests with `key`, or any when None); returns that queue's length."""
        queue = self._queues.setdefault(key, deque())
        queue.extend([(status, retry_after)] * count)
        return len(queue)

    def pop(self, key: str) -> tuple[int, float] | None:
        for queue_key in (key, None):
            queue = self._queues.get(queue_key)
            if queue:
                return queue.popleft()
        return None

    def clear(self) -> None:
        self._queues.clear()


class InvalidRequestError(ValueError):
    """A chat request OpenAI would answer with 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(slots=True)
class ChatRequest:
    """The fields of a chat completion request that shape the reply."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None
    # The prompt's image parts, as (image_url object, (width, height) or None when modelsim cannot tell).
    images: list[tuple[dict[str, Any], tuple[int, int] | None]] = field(default_factory=list)
    # The offered tools' `function` objects by name, in their order.
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "none", "auto" or "required"; a named function is "required" with that name in forced_tool.
    tool_choice: str = "auto"
    forced_tool: str | None = None
    parallel_tool_calls: bool = True

    @classmethod
    def parse(cls, body: Any) -> Self:
        if not isinstance(body, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        for name in ("model", "messages"):
            if name not in body:
                raise InvalidRequestError(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        model, messages = body["model"], body["messages"]
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("Invalid 'model': expected a non-empty string.", "model")
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise InvalidRequestError("Invalid 'messages': expected a non-empty array of message objects.", "messages")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise InvalidRequestError("Invalid 'stream': expected a boolean.", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise InvalidRequestError("Invalid 'stream_options': expected an object.", "stream_options")
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = body.get(name)
            if value is not None and not (_is_number(value) and low <= value <= high):
                raise InvalidRequestError(f"Invalid '{name}': expected a number in [{low}, {high}].", name)
        max_tokens = None
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None:
                if not (_is_int(value) and value >= 1):
                    raise InvalidRequestError(f"Invalid '{name}': expected an integer of at least 1.", name)
                max_tokens = value
        stop = body.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise InvalidRequestError("Invalid 'stop': expected a string or up to 4 strings.", "stop")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise InvalidRequestError("Invalid 'seed': expected an integer.", "seed")
        _check_sampling_options(body)
        images = [image for index, message in enumerate(messages) for image in _message_images(index, message)]
        _check_response_format(body.get("response_format"), messages)
        tools = _check_tools(body.get("tools"))
        tool_choice, forced_tool = _check_tool_choice(body.get("tool_choice"), tools)
        parallel_tool_calls = body.get("parallel_tool_calls")
        if parallel_tool_calls is not None:
            if not isinstance(parallel_tool_calls, bool):
                raise InvalidRequestError("Invalid 'parallel_tool_calls': expected a boolean.", "parallel_tool_calls")
            if not tools:
                raise InvalidRequestError(
                    "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' "
                    "are specified.",
                    "parallel_tool_calls",
                )
        _check_tool_messages(messages)
        return cls(
            model=model,
            messages=messages,
            stream=stream,
            include_usage=bool(options.get("include_usage")),
            max_tokens=max_tokens,
            stop=tuple(s for s in stops if s),
            seed=seed,
            images=images,
            tools=tools,
            tool_choice=tool_choice,
            forced_tool=forced_tool,
            parallel_tool_calls=parallel_tool_calls is not False,
        )


_IMAGE_DETAILS = ("auto", "low", "high")
_CONTENT_PART_TYPES = ("text", "image_url")
# The names of response_format schemas and of tools.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DATA_URL = re.compile(r"data:(image/(?:png|jpeg|webp|gif));base64,(.*)", re.DOTALL)


def _check_sampling_options(body: dict[str, Any]) -> None:
    """logit_bias, presence_penalty, frequency_penalty and user, as OpenAI checks them."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and not (_is_number(value) and -2 <= value <= 2):
            raise InvalidRequestError(f"Invalid '{name}': expected a number in [-2.0, 2.0].", name)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict) or len(logit_bias) > 300:
            raise InvalidRequestError("Invalid 'logit_bias': expected an object of at most 300 entries.", "logit_bias")
        for token, bias in logit_bias.items():
            if not token.isdigit():
                raise InvalidRequestError(
                    f"Invalid key in 'logit_bias': {token}. Keys must be token ids (integers, as strings).",
                    "logit_bias",
                )
            if not (_is_number(bias) and -100 <= bias <= 100):
                raise InvalidRequestError(
                    f"Invalid value for 'logit_bias': {bias!r}. Values must be in [-100, 100].", "logit_bias"
                )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequestError("Invalid 'user': expected a string.", "user")


def _check_response_format(response_format: Any, messages: list[dict[str, Any]]) -> None:
    if response_format is None:
        return
    param = "response_format"
    if not isinstance(response_format, dict):
        raise InvalidRequestError("Invalid 'response_format': expected an object.", param)
    kind = response_format.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError(
            f"Invalid value: {kind!r}. Supported values are: 'text', 'json_object', and 'json_schema'.",
            "response_format.type",
            "invalid_value",
        )
    if kind == "json_object" and "json" not in json.dumps(messages).lower():
        raise InvalidRequestError(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
            "messages",
        )
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("Missing required parameter: 'response_format.json_schema'.", param)
        name = schema.get("name")
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise InvalidRequestError(
                "Invalid 'response_format.json_schema.name': expected 1 to 64 of a-z, A-Z, 0-9, '_' and '-'.",
                "response_format.json_schema.name",
            )
        if not isinstance(schema.get("schema", {}), dict) or not isinstance(schema.get("strict", False), bool):
            raise InvalidRequestError("Invalid 'response_format.json_schema'.", "response_format.json_schema")


def _check_tools(tools: Any) -> dict[str, dict[str, Any]]:
    """The offered tools' `function` objects by name; a malformed `tools` is refused as OpenAI refuses it."""
    if tools is None:
        return {}
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("Invalid 'tools': expected a non-empty array of tools.", "tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(
            f"Invalid 'tools': array too long. Expected an array with maximum length {MAX_TOOLS}, but got an array "
            f"with length {len(tools)} instead.",
            "tools",
            "array_above_max_length",
        )
    functions: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"Invalid '{where}': expected an object.", where)
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"Invalid value: {tool.get('type')!r}. Supported values are: 'function'.",
                f"{where}.type",
                "invalid_value",
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(
                f"Missing required parameter: '{where}.function'.", f"{where}.function", "missing_required_parameter"
            )
        name = function.get("name")
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise InvalidRequestError(
                f"Invalid '{where}.function.name': string does not match pattern. Expected a string that matches the "
                "pattern '^[a-zA-Z0-9_-]{1,64}$'.",
                f"{where}.function.name",
                "invalid_value",
            )
        if name in functions:
            raise InvalidRequestError(f"Invalid 'tools': tool names must be unique; {name!r} is repeated.", "tools")
        for key, kind, expected in (
            ("description", str, "a string"),
            ("parameters", dict, "an object"),
            ("strict", bool, "a boolean"),
        ):
            if key in function and not isinstance(function[key], kind):
                param = f"{where}.function.{key}"
                raise InvalidRequestError(f"Invalid type for '{param}': expected {expected}.", param, "invalid_type")
        functions[name] = function
    return functions


def _check_tool_choice(tool_choice: Any, tools: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    """(mode, forced tool): "none", "auto" or "required", and the function a named choice forces."""
    if tool_choice is None:
        return "auto", None
    if not tools:
        raise InvalidRequestError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.", "tool_choice"
        )
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                f"Invalid value: {tool_choice!r}. Supported values are: 'none', 'auto', and 'required'.",
                "tool_choice",
                "invalid_value",
            )
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise InvalidRequestError(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    if name not in tools:
        raise InvalidRequestError(
            f"Invalid value for 'tool_choice': function {name!r} is not among the tools provided.", "tool_choice"
        )
    return "required", name


def _check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Assistant `tool_calls` and tool messages, as OpenAI checks them: the tool messages right after an assistant
    message with tool_calls answer each of its calls, and no other tool message is allowed."""
    unanswered: dict[str, None] = {}  # ordered, for the error message
    answerable: set[str] = set()
    asked_at = 0
    for index, message in enumerate(messages):
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                param = f"messages[{index}].tool_call_id"
                raise InvalidRequestError(
                    f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
                )
            if not isinstance(message.get("content"), str):
                param = f"messages[{index}].content"
                raise InvalidRequestError(f"Invalid '{param}': expected a string.", param)
            if call_id not in answerable:
                raise InvalidRequestError(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                    "'tool_calls'.",
                    f"messages.[{index}].role",
                )
            unanswered.pop(call_id, None)
            continue
        # The calls had to be answered before this message.
        _check_answered(unanswered, index)
        answerable = set()
        if message.get("role") == "assistant" and message.get("tool_calls") is not None:
            unanswered = dict.fromkeys(_tool_call_ids(index, message["tool_calls"]))
            answerable, asked_at = set(unanswered), index
    _check_answered(unanswered, asked_at)


def _check_answered(unanswered: dict[str, None], index: int) -> None:
    if unanswered:
        raise InvalidRequestError(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(unanswered)}",
            f"messages.[{index}].role",
        )


def _tool_call_ids(index: int, tool_calls: Any) -> list[str]:
    """The ids of an assistant message's well-formed `tool_calls`."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(tool_calls, list) or not tool_calls:
        raise InvalidRequestError(f"Invalid '{where}': expected a non-empty array of tool calls.", where)
    ids = []
    for number, call in enumerate(tool_calls):
        param = f"{where}[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and isinstance(call.get("id"), str)
            and call.get("type") == "function"
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            raise InvalidRequestError(
                f"Invalid '{param}': expected an object with an 'id', 'type': 'function' and a 'function' with a "
                "'name' and 'arguments' (a string).",
                param,
            )
        ids.append(call["id"])
    return ids


def _message_images(index: int, message: dict[str, Any]) -> list[tuple[dict[str, Any], tuple[int, int] | None]]:
    """The image parts of a message's content, checked as OpenAI checks them: content is a string or a non-empty
    array of parts; only a user's message may hold image_url parts."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return []
    param = f"messages[{index}].content"
    if not isinstance(content, list) or not content:
        raise InvalidRequestError(f"Invalid '{param}': expected a string or a non-empty array of content parts.", param)
    images = []
    for number, part in enumerate(content):
        where = f"{param}[{number}]"
        if not isinstance(part, dict):
            raise InvalidRequestError(f"Invalid '{where}': expected an object.", where)
        kind = part.get("type")
        allowed = _CONTENT_PART_TYPES if message.get("role") == "user" else ("text",)
        if kind not in allowed:
            supported = ", ".join(f"'{name}'" for name in allowed)
            raise InvalidRequestError(
                f"Invalid value: {kind!r}. Supported values are: {supported}.", f"{where}.type", "invalid_value"
            )
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"Missing required parameter: '{where}.text'.", f"{where}.text")
            continue
        image_url = part.get("image_url")
        if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
            raise InvalidRequestError(f"Missing required parameter: '{where}.image_url.url'.", f"{where}.image_url")
        detail = image_url.get("detail", "auto")
        if detail not in _IMAGE_DETAILS:
            raise InvalidRequestError(
                f"Invalid value: {detail!r}. Supported values are: 'auto', 'low', and 'high'.",
                f"{where}.image_url.detail",
                "invalid_value",
            )
        images.append((image_url, _image_size(image_url["url"], f"{where}.image_url.url")))
    return images


def _image_size(url: str, param: str) -> tuple[int, int] | None:
    """An inline image's (width, height); None for an https URL, which modelsim does not fetch. Other URLs, and
    data: URLs that are not base64 of a PNG, JPEG, WebP or GIF of that type, are refused as OpenAI does."""
    if url.startswith("https://") and len(url) > len("https://"):
        return None
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise InvalidRequestError(
            "Invalid image URL: expected an https URL or a base64 data URL of a PNG, JPEG, WebP or GIF image.",
            param,
            "invalid_image_url",
        )
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("Invalid base64 image_url.", param, "invalid_image_url") from None
    size = image_size(data, match.group(1))
    if size is None:
        raise InvalidRequestError(
            "You uploaded an unsupported image. Please make sure your image is valid.", param, "invalid_image_format"
        )
    return size


class Simulator:
    """The state behind one modelsim app: config, counters, request log and queued faults."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self.request_log: deque[Any] = deque(maxlen=REQUEST_LOG_SIZE)
        # The bodies of recent /v1/moderations requests.
        self.moderation_log: deque[Any] = deque(maxlen=REQUEST_LOG_SIZE)
        # Prompts are counted with the model's encoding (loaded on first use), images by OpenAI's rule.
        self._tokens = TokenCounter()
        # The W3C `traceparent` header of recent chat requests, as a tracing provider would see it.
        self.traceparents: deque[str] = deque(maxlen=REQUEST_LOG_SIZE)
        self.faults = FaultQueue()
        self.moderation_faults = FaultQueue()
        self._rng = random.Random()
        # Set at shutdown: hanging requests then end at once.
        self._closing = asyncio.Event()

    async def release_hangs(self, app: web.Application | None = None) -> None:
        """Ends every hang (their connections close without a response); the app's on_shutdown."""
        self._closing.set()

    def _refusal(self, request: web.Request) -> web.Response | None:
        """401 for a request without a bearer key, or with one of config.unauthorized_keys."""
        key = _bearer_key(request)
        if not key:
            return _unauthorized()
        if key in self.config.unauthorized_keys:
            return _error(
                401,
                "invalid_request_error",
                "Incorrect API key provided (simulated). You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        key = _bearer_key(request)
        if key:
            self.stats.requests_by_key[key] = self.stats.requests_by_key.get(key, 0) + 1
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "invalid_request_error", "We could not parse the JSON body of your request.")
        self.request_log.append(_loggable(body))
        self.traceparents.append(request.headers.get("traceparent", ""))
        try:
            chat = ChatRequest.parse(body)
        except InvalidRequestError as exc:
            return _error(400, "invalid_request_error", str(exc), param=exc.param, code=exc.code)
        fault = self._fault(key)
        if fault is not None:
            status, retry_after = fault
            if status == HANG:
                return await self._hang(request)
            self.stats.errors_injected += 1
            return _fault_response(status, retry_after)

        sizes = {image_url["url"]: size for image_url, size in chat.images if size is not None}
        prompt_tokens = self._tokens.count_messages(chat.model, chat.messages, sizes)
        if chat.tools:
            # The model reads the definitions too: their JSON text is about what they cost.
            prompt_tokens += self._tokens.count_text(chat.model, json.dumps(list(chat.tools.values())))
        context = context_tokens(self.config.context_tokens, self.config.default_context_tokens, chat.model)
        if prompt_tokens + (chat.max_tokens or 0) > context:
            return _error(
                400,
                "invalid_request_error",
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + (chat.max_tokens or 0)} tokens ({prompt_tokens} in the messages, "
                f"{chat.max_tokens or 0} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        calls = _tool_calls(chat)
        if calls:
            tokens, finish_reason = [], "tool_calls"
            completion_tokens = sum(self._tokens.count_text(chat.model, c["function"]["arguments"]) for c in calls)
        else:
            tokens, finish_reason = self._reply(chat)
            completion_tokens = len(tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion_id = f"chatcmpl-{os.urandom(12).hex()}"
        if chat.stream:
            if calls:
                role, deltas = _TOOL_ROLE_CHOICES, _tool_call_choices(calls)
            else:
                role, deltas = _ROLE_CHOICES, [_TOKEN_CHOICES.get(token) or _text_choices(token) for token in tokens]
            return await self._stream(request, chat, completion_id, role, deltas, finish_reason, usage)
        if calls:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
        else:
            message = {"role": "assistant", "content": "".join(tokens)}
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {**message, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        return web.Response(
            body=json.dumps(payload).encode(),
            content_type="application/json",
            headers={"x-request-id": completion_id},
        )

    def _reply(self, chat: ChatRequest) -> tuple[list[str], str]:
        """The reply's tokens and finish reason; a prefix of the same sequence whatever max_tokens is. After tool
        results, their echo, a word a token; after a user message with `[echo]`, the text that follows it; else
        `reply_tokens` words of the vocabulary."""
        echo = _tool_results_text(chat.messages)
        if echo is None:
            echo = _echoed_text(chat.messages[-1])
        if echo is None:
            key = json.dumps([chat.model, chat.messages, chat.seed], sort_keys=True, separators=(",", ":"))
            picks = hashlib.shake_128(key.encode()).digest(self.config.reply_tokens)
            tokens = [_VOCABULARY[pick % len(_VOCABULARY)] for pick in picks]
            cited = _source_to_cite(chat.messages)
            if cited is not None and tokens:
                tokens[-1] = f"{tokens[-1].rstrip()} [{cited}]"
        else:
            tokens = re.findall(r"\S+\s*", echo)
        finish_reason = "stop"
        if chat.max_tokens is not None and chat.max_tokens < len(tokens):
            tokens, finish_reason = tokens[: chat.max_tokens], "length"
        if chat.stop:
            text = "".join(tokens)
            cut = min((i for i in (text.find(s) for s in chat.stop) if i >= 0), default=-1)
            if cut >= 0:
                return _cut_tokens(tokens, cut), "stop"
        return tokens, finish_reason

    async def _stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        completion_id: str,
        role_choices: bytes,
        deltas: list[bytes],
        finish_reason: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        """Streams the role chunk, then one chunk for each of `deltas` (their `choices`), then the finish chunk."""
        head = _CHUNK_HEAD % (completion_id.encode(), int(time.time()), json.dumps(chat.model).encode())
        end = b',"usage":null}\n\n' if chat.include_usage else b"}\n\n"
        role = head + role_choices + end
        pieces = [head + delta + end for delta in deltas]
        tail = head + _FINISH_CHOICES % finish_reason.encode() + end
        if chat.include_usage:
            tail += head + b'[],"usage":' + json.dumps(usage).encode() + b"}\n\n"
        tail += _DONE

        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "x-request-id": completion_id,
            }
        )
        self.stats.streams_open += 1
        try:
            await self._send_events(request, response, role, pieces, tail)
            await response.write_eof()
        except ConnectionResetError:
            self.stats.streams_cancelled += 1
        except asyncio.CancelledError:
            self.stats.streams_cancelled += 1
            raise
        else:
            self.stats.streams_completed += 1
        finally:
            self.stats.streams_open -= 1
        return response

    async def _send_events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        role: bytes,
        pieces: list[bytes],
        tail: bytes,
    ) -> None:
        first_latency = self.config.first_token_latency_seconds
        delay = self.config.token_delay_seconds
        if first_latency <= 0 and delay <= 0:
            body = b"".join((role, *pieces, tail))
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body)
            return
        await response.prepare(request)
        pending = role
        if first_latency > 0:
            await response.write(pending)
            pending = b""
            await asyncio.sleep(first_latency)
        for index, piece in enumerate(pieces):
            if index and delay > 0:
                await response.write(pending)
                pending = b""
                await asyncio.sleep(delay)
            pending += piece
        await response.write(pending + tail)

    def _fault(self, key: str) -> tuple[int, float] | None:
        """The (status, retry_after) of the fault this chat request gets, HANG for a hang: a fault queued for
        its key, else one queued for any request, else one drawn by the config's rates; None for none."""
        queued = self.faults.pop(key)
        if queued is not None:
            return queued
        config = self.config
        if config.error_429_rate <= 0 and config.error_500_rate <= 0 and config.hang_rate <= 0:
            return None
        draw = self._rng.random()
        for status, rate in ((429, config.error_429_rate), (500, config.error_500_rate), (HANG, config.hang_rate)):
            if draw < rate:
                return status, config.retry_after_seconds
            draw -= rate
        return None

    async def _hang(self, request: web.Request) -> web.Response:
        """Sends nothing until the client goes away, hang_seconds pass or modelsim shuts down; then closes the
        connection without a response."""
        self.stats.hangs += 1
        self.stats.hangs_open += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.hang_seconds
        try:
            while not self._closing.is_set():
                transport = request.transport
                remaining = deadline - loop.time()
                if transport is None or transport.is_closing() or remaining <= 0:
                    break
                await asyncio.sleep(min(HANG_POLL_SECONDS, remaining))
        finally:
            self.stats.hangs_open -= 1
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Never sent: the connection is closed.
        return web.Response(status=504)

    async def embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's POST /v1/embeddings: a vector per input string (chatmesh.modelsim.embeddings), as floats or
        base64 (what the openai SDK asks for by default), of the model's dimensions or fewer for a v3 model."""
        self.stats.embedding_requests += 1
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if self.config.embedding_latency_seconds > 0:
            await asyncio.sleep(self.config.embedding_latency_seconds)
        if self.config.embedding_error_status:
            return _fault_response(self.config.embedding_error_status, self.config.retry_after_seconds)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "invalid_request_error", "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "invalid_request_error", "The request body must be a JSON object.")
        model = body.get("model")
        if model not in EMBEDDING_MODELS:
            return _error(
                404,
                "invalid_request_error",
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        texts = [body["input"]] if isinstance(body.get("input"), str) else body.get("input")
        if (
            not isinstance(texts, list)
            or not 1 <= len(texts) <= 2048
            or not all(isinstance(text, str) and text for text in texts)
        ):
            return _error(
                400,
                "invalid_request_error",
                "'$.input' is invalid: expected a non-empty string or an array of 1 to 2048 non-empty strings.",
                param="input",
            )
        dimensions = body.get("dimensions", EMBEDDING_MODELS[model])
        if "dimensions" in body and model not in SHORTENABLE:
            return _error(
                400, "invalid_request_error", "This model does not support specifying dimensions.", param="dimensions"
            )
        if not _is_int(dimensions) or not 1 <= dimensions <= EMBEDDING_MODELS[model]:
            return _error(
                400,
                "invalid_request_error",
                f"Invalid 'dimensions': expected an integer from 1 to {EMBEDDING_MODELS[model]}.",
                param="dimensions",
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return _error(
                400,
                "invalid_request_error",
                "Invalid 'encoding_format': expected float or base64.",
                param="encoding_format",
            )
        vectors = [embed(text, dimensions) for text in texts]
        # Counted with cl100k_base, the encoding of OpenAI's embedding models.
        tokens = sum(self._tokens.count_text("gpt-4", text) for text in texts)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": as_base64(vector) if encoding == "base64" else vector,
                    }
                    for index, vector in enumerate(vectors)
                ],
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def moderations(self, request: web.Request) -> web.Response:
        """OpenAI's POST /v1/moderations: one result per input string (one for a multi-modal list)."""
        self.stats.moderation_requests += 1
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "invalid_request_error", "We could not parse the JSON body of your request.")
        self.moderation_log.append(_loggable(body))
        inputs = _moderation_inputs(body)
        if inputs is None:
            return _error(
                400,
                "invalid_request_error",
                "Invalid 'input': expected a string, an array of strings, or an array of input objects.",
                param="input",
            )
        fault = self.moderation_faults.pop(_bearer_key(request))
        if fault is not None:
            self.stats.moderation_errors_injected += 1
            return _fault_response(*fault)
        results = []
        for text, input_types in inputs:
            scores = self._moderation_scores(text.casefold())
            categories = {name: score >= _SIM_FLAG_THRESHOLD for name, score in scores.items()}
            results.append(
                {
                    "flagged": any(categories.values()),
                    "categories": categories,
                    "category_scores": scores,
                    "category_applied_input_types": {name: input_types for name in _MODERATION_CATEGORIES},
                }
            )
        model = body.get("model") or _MODERATION_MODEL
        return web.json_response({"id": f"modr-{os.urandom(12).hex()}", "model": model, "results": results})

    def _moderation_scores(self, folded: str) -> dict[str, float]:
        """Every category's score for a case-folded text: from its flag words and word scores, else low."""
        scores = dict.fromkeys(_MODERATION_CATEGORIES, _LOW_SCORE)
        if any(word and word.casefold() in folded for word in self.config.moderation_flag_words):
            scores[SIM_MODERATION_CATEGORY] = _FLAG_SCORE
        for word, word_scores in self.config.moderation_word_scores.items():
            if word and word.casefold() in folded:
                for name, score in word_scores.items():
                    scores[name] = max(scores[name], score)
        return scores

    async def models(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        data = [
            {"id": model, "object": "model", "created": _MODELS_CREATED, "owned_by": "modelsim"} for model in MODEL_IDS
        ]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.stats))

    async def get_requests(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", REQUEST_LOG_SIZE))
        except ValueError:
            limit = -1
        if limit < 0:
            return web.json_response({"error": "limit must be a non-negative integer"}, status=400)
        start = max(len(self.request_log) - limit, 0)
        return web.json_response({"requests": list(islice(self.request_log, start, None))})

    async def get_moderations(self, request: web.Request) -> web.Response:
        """The bodies of recent /v1/moderations requests, oldest first (long data: URLs summarized)."""
        return web.json_response({"requests": list(self.moderation_log)})

    async def get_traceparents(self, request: web.Request) -> web.Response:
        """The `traceparent` header of each recent chat request ("" when it had none), oldest first."""
        return web.json_response({"traceparents": list(self.traceparents)})

    async def set_config(self, request: web.Request) -> web.Response:
        updates = await _json_object(request)
        if updates is None:
            return web.json_response({"error": "expected a JSON object"}, status=400)
        types = {field.name: field.type for field in fields(SimConfig)}
        for name, value in updates.items():
            if name not in types:
                return web.json_response({"error": f"unknown field {name!r}"}, status=400)
            if types[name] == list[str]:
                if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
                    return web.json_response({"error": f"invalid value for {name!r}: expected strings"}, status=400)
                continue
            if name == "moderation_word_scores":
                if not _word_scores(value):
                    return web.json_response(
                        {"error": f"invalid value for {name!r}: expected words to {{category: score in [0, 1]}}"},
                        status=400,
                    )
                continue
            valid = _is_int(value) if types[name] is int else _is_number(value)
            if not valid or value < 0 or (name.endswith("_rate") and value > 1):
                return web.json_response({"error": f"invalid value for {name!r}: {value!r}"}, status=400)
        for name, value in updates.items():
            setattr(self.config, name, list(value) if isinstance(value, list) else value)
        return web.json_response(asdict(self.config))

    async def queue_faults(self, request: web.Request) -> web.Response:
        spec = await _json_object(request)
        if spec is None:
            return web.json_response({"error": "expected a JSON object"}, status=400)
        status = spec.get("status")
        count = spec.get("count", 1)
        retry_after = spec.get("retry_after", self.config.retry_after_seconds)
        # Which endpoint the faults are for: "chat" (the default) or "moderations".
        endpoint = spec.get("endpoint", "chat")
        # Only requests with this bearer API key get them; without one, any request does.
        key = spec.get("key")
        if endpoint not in ("chat", "moderations"):
            return web.json_response({"error": 'endpoint must be "chat" or "moderations"'}, status=400)
        if status == "hang" and endpoint == "chat":
            status = HANG
        elif status not in _FAULT_STATUSES or status == HANG:
            status = None
        if status is None or not _is_int(count) or count < 0:
            return web.json_response(
                {"error": f'expected a status of {sorted(_FAULT_STATUSES)} (or "hang", for chat) and a count >= 0'},
                status=400,
            )
        if not _is_number(retry_after) or retry_after < 0:
            return web.json_response({"error": "retry_after must be a number >= 0"}, status=400)
        if key is not None and not (isinstance(key, str) and key):
            return web.json_response({"error": "key must be a non-empty string"}, status=400)
        queue = self.faults if endpoint == "chat" else self.moderation_faults
        return web.json_response({"queued": queue.add(key, status, retry_after, count)})

    async def reset(self, request: web.Request) -> web.Response:
        self.stats = SimStats(streams_open=self.stats.streams_open, hangs_open=self.stats.hangs_open)
        self.request_log.clear()
        self.moderation_log.clear()
        self.traceparents.clear()
        self.faults.clear()
        self.moderation_faults.clear()
        return web.json_response(asdict(self.stats))


def _word_scores(value: Any) -> bool:
    """Whether `value` is a valid SimConfig.moderation_word_scores."""
    return isinstance(value, dict) and all(
        isinstance(word, str)
        and isinstance(scores, dict)
        and all(
            name in _MODERATION_CATEGORIES and _is_number(score) and 0 <= score <= 1 for name, score in scores.items()
        )
        for word, scores in value.items()
    )


def _tool_call_choices(calls: list[dict[str, Any]]) -> list[bytes]:
    """The `choices` of a stream's tool-call chunks, as OpenAI streams them: each call's id and name, then its
    arguments in pieces of at most TOOL_ARGUMENTS_PIECE_CHARS."""
    deltas = []
    for index, call in enumerate(calls):
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        items = [{"index": index, "id": call["id"], "type": "function", "function": {"name": name, "arguments": ""}}]
        items += [
            {"index": index, "function": {"arguments": arguments[start : start + TOOL_ARGUMENTS_PIECE_CHARS]}}
            for start in range(0, len(arguments), TOOL_ARGUMENTS_PIECE_CHARS)
        ]
        deltas += [
            _DELTA_OPEN + json.dumps({"tool_calls": [item]}, separators=(",", ":")).encode() + _DELTA_CLOSE
            for item in items
        ]
    return deltas


# Directives in a user's message: `call <tool name>`, then optional whitespace and maybe a JSON object.
_DIRECTIVE = re.compile(r"\bcall\s+([A-Za-z0-9_-]+)\s*")
_JSON_DECODER = json.JSONDecoder()
# The arguments built for a required property, by its type (null for another type).
_SCHEMA_VALUES: dict[str, Any] = {
    "string": "sim",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}


def _tool_calls(chat: ChatRequest) -> list[dict[str, Any]]:
    """The tool calls that answer `chat`, in OpenAI's shape (see the module's docstring); none for a text reply."""
    if not chat.tools or chat.tool_choice == "none":
        return []
    text = _user_text(chat.messages)
    last_role = chat.messages[-1].get("role")
    if not (last_role == "user" or (last_role == "tool" and KEEP_CALLING_MARKER in text)):
        return []
    calls = [(name, arguments) for name, arguments in _directives(text) if name in chat.tools]
    if chat.forced_tool is not None:
        calls = [next((call for call in calls if call[0] == chat.forced_tool), (chat.forced_tool, None))]
    elif chat.tool_choice == "required" and not calls:
        calls = [(next(iter(chat.tools)), None)]
    if not chat.parallel_tool_calls:
        calls = calls[:1]
    return [
        {
            "id": _call_id(chat, index),
            "type": "function",
            "function": {
                "name": name,
                "arguments": _schema_arguments(chat.tools[name]) if arguments is None else arguments,
            },
        }
        for index, (name, arguments) in enumerate(calls)
    ]


def _directives(text: str) -> list[tuple[str, str | None]]:
    """Each `call <name> [<JSON object>]` in `text` as (name, arguments), None when it has no object. A malformed
    object is passed as its raw text: from its `{` through the `}` that closes it, or to the end of `text`."""
    found: list[tuple[str, str | None]] = []
    position = 0
    while (match := _DIRECTIVE.search(text, position)) is not None:
        arguments, position = None, match.end()
        if text.startswith("{", position):
            try:
                value, end = _JSON_DECODER.raw_decode(text, position)
                arguments = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            except ValueError:
                end = _closing_brace_end(text, position)
                arguments = text[position:end]
            # A directive inside the object is part of it, not another one.
            position = end
        found.append((match.group(1), arguments))
    return found


def _closing_brace_end(text: str, start: int) -> int:
    """The index after the `}` that closes the `{` at `start` (braces counted, nothing else), or len(text)."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


def _schema_arguments(function: dict[str, Any]) -> str:
    """Arguments for a tool from its parameters: each `required` property's first enum value, else a value by its
    type."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    values = {}
    for name in parameters.get("required") or ():
        schema = properties.get(name) or {}
        kind = schema.get("type")
        if isinstance(kind, list):  # ["string", "null"], say: the first
            kind = kind[0] if kind else None
        values[name] = schema["enum"][0] if schema.get("enum") else _SCHEMA_VALUES.get(kind)
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def _call_id(chat: ChatRequest, index: int) -> str:
    key = json.dumps([chat.model, chat.messages, index], sort_keys=True, separators=(",", ":"))
    return "call_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message ("" when there is none); a content array's text parts, joined."""
    content = next((message.get("content") for message in reversed(messages) if message.get("role") == "user"), "")
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if part.get("type") == "text")
    return content or ""


def _tool_results_text(messages: list[dict[str, Any]]) -> str | None:
    """`tool results: <tool_call_id>=<content>; ...` for the tool messages that end `messages`; None when the last
    message is not one."""
    if messages[-1].get("role") != "tool":
        return None
    asked_at = max(index for index, message in enumerate(messages) if message.get("role") == "assistant")
    results = "; ".join(f"{message['tool_call_id']}={message['content']}" for message in messages[asked_at + 1 :])
    return f"tool results: {results}"


def _echoed_text(message: dict[str, Any]) -> str | None:
    """What follows `[echo]` in a user message's text, which the reply repeats; None without it."""
    if message.get("role") != "user":
        return None
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    if not isinstance(content, str) or ECHO_MARKER not in content:
        return None
    return content.split(ECHO_MARKER, 1)[1].strip() or None


def _moderation_inputs(body: Any) -> list[tuple[str, list[str]]] | None:
    """What to judge, one per result: the text (an image counts as its URL, so that a flag word in the URL
    flags it) and the input types it holds; None when `input` is malformed. A multi-modal array is one input
    of text and image_url parts, each well formed."""
    if not isinstance(body, dict):
        return None
    value = body.get("input")
    if isinstance(value, str):
        return [(value, ["text"])]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, str) for item in value):
        return [(text, ["text"]) for text in value]
    if not all(isinstance(item, dict) for item in value):
        return None
    texts, types = [], []
    for item in value:
        if item.get("type") == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
            kind = "text"
        elif item.get("type") == "image_url" and isinstance((item.get("image_url") or {}).get("url"), str):
            texts.append(item["image_url"]["url"])
            kind = "image"
        else:
            return None
        if kind not in types:
            types.append(kind)
    return [(" ".join(texts), types)]


def _loggable(body: Any) -> Any:
    """`body` as the request logs keep it: a data: URL longer than LOGGED_DATA_URL_CHARS becomes its beginning
    and its length and SHA-256, so that the logs do not hold megabytes of images."""
    if isinstance(body, dict):
        return {key: _loggable(value) for key, value in body.items()}
    if isinstance(body, list):
        return [_loggable(value) for value in body]
    if isinstance(body, str) and body.startswith("data:") and len(body) > LOGGED_DATA_URL_CHARS:
        digest = hashlib.sha256(body.encode()).hexdigest()[:16]
        return f"{body[:64]}…[{len(body)} characters, sha256 {digest}]"
    return body


_FAULT_STATUSES = frozenset({401, 404, 429, 500})


def _fault_response(status: int, retry_after: float) -> web.Response:
    """An injected error as OpenAI sends it: 401 (a bad key), 404 (an unknown model), 429 (with retry-after,
    retry-after-ms and x-ratelimit-reset-requests) or 500."""
    if status == 401:
        return _error(401, "invalid_request_error", "Incorrect API key provided (simulated).", code="invalid_api_key")
    if status == 404:
        return _error(
            404, "invalid_request_error", "The model does not exist (simulated).", param="model", code="model_not_found"
        )
    if status == 429:
        return _error(
            429,
            "rate_limit_error",
            "Rate limit reached for requests (simulated).",
            code="rate_limit_exceeded",
            headers={
                "retry-after": str(math.ceil(retry_after)),
                "retry-after-ms": str(round(retry_after * 1000)),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": _duration(retry_after),
            },
        )
    return _error(500, "server_error", "The server had an error while processing your request (simulated).")


def _duration(seconds: float) -> str:
    """A time as OpenAI's x-ratelimit-reset-* headers give it: "20ms", "1s", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


def build_app(config: SimConfig) -> web.Application:
    """The modelsim application; `config` stays live, so changing it changes the app's behaviour."""
    simulator = Simulator(config)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.on_shutdown.append(simulator.release_hangs)
    app.router.add_post("/v1/chat/completions", simulator.chat_completions)
    app.router.add_get("/v1/models", simulator.models)
    app.router.add_post("/v1/moderations", simulator.moderations)
    app.router.add_post("/v1/embeddings", simulator.embeddings)
    app.router.add_get("/sim/stats", simulator.get_stats)
    app.router.add_get("/sim/requests", simulator.get_requests)
    app.router.add_get("/sim/traceparents", simulator.get_traceparents)
    app.router.add_get("/sim/moderations", simulator.get_moderations)
    app.router.add_post("/sim/config", simulator.set_config)
    app.router.add_post("/sim/faults", simulator.queue_faults)
    app.router.add_post("/sim/reset", simulator.reset)
    return app


def main() -> None:
    """Run modelsim until SIGTERM or SIGINT: on settings.bind_host:settings.modelsim_port, or as each of
    settings.modelsim_deployments on its own port."""
    uvloop.run(serve(ModelsimSettings()))


async def serve(settings: ModelsimSettings) -> None:
    """modelsim as `settings` describe it, until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    deployments: list[ModelsimDeployment | None] = list(settings.modelsim_deployments) or [None]
    runners: list[web.AppRunner] = []
    try:
        for index, deployment in enumerate(deployments):
            runner = web.AppRunner(
                build_app(SimConfig.from_settings(settings, deployment)),
                access_log=None,
                shutdown_timeout=settings.shutdown_grace_seconds,
            )
            runners.append(runner)
            await runner.setup()
            port = settings.modelsim_port if deployment is None else deployment.port
            await web.TCPSite(runner, settings.bind_host, port).start()
            event: dict[str, Any] = {"service": "modelsim", "event": "listening", "port": runner.addresses[0][1]}
            if deployment is not None:
                event["deployment"] = index
            sys.stderr.write(json.dumps(event, separators=(",", ":")) + "\n")
            sys.stderr.flush()
        await stop.wait()
    finally:
        await asyncio.gather(*(runner.cleanup() for runner in runners))


def _source_to_cite(messages: list[dict[str, Any]]) -> int | None:
    """Of the sources a system message numbers (`[n] title (source)` heads, as chatmesh's knowledge step writes
    them), the number of the one that shares the most words with the last user message, the first on a tie;
    None without sources. The reply cites it, as a grounded model would."""
    question = _words(_content_text(messages[-1]))
    best: tuple[int, int] | None = None
    for message in messages:
        if message.get("role") != "system":
            continue
        for number, text in _SOURCE.findall(_content_text(message)):
            shared = len(question & _words(text))
            if best is None or shared > best[1]:
                best = (int(number), shared)
    return None if best is None else best[0]


def _words(text: str) -> set[str]:
    """Casefolded words, and single CJK characters."""
    return set(re.findall(r"[^\W\d_]{2,}|[\u4e00-\u9fff]", text.casefold()))


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if isinstance(part, dict))


def _bearer_key(request: web.Request) -> str:
    """The request's bearer API key; "" when it has none."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def _unauthorized() -> web.Response:
    return _error(
        401,
        "invalid_request_error",
        "You didn't provide an API key. Provide it in an Authorization header using Bearer auth.",
        code="invalid_api_key",
    )


def _error(
    status: int,
    error_type: str,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _cut_tokens(tokens: list[str], cut: int) -> list[str]:
    """The tokens whose text ends before character `cut`, plus the part of the token that spans it."""
    kept: list[str] = []
    length = 0
    for token in tokens:
        if length + len(token) > cut:
            if cut > length:
                kept.append(token[: cut - length])
            break
        kept.append(token)
        length += len(token)
    return kept


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


if __name__ == "__main__":
    main()
