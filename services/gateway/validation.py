"""The checks on what a caller sends, each naming the field it is about."""

import json
import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import jsonschema
import jsonschema.validators

from chatmesh.dialogue.knowledge.names import NAME_RULE, is_valid_name
from chatmesh.runtime.settings import GatewaySettings, ServiceSettings
from chatmesh.v1 import chat_pb2

MAX_ID_CHARS = 128
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_MODEL_CHARS = 128
_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]+")
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_JSON_SCHEMA_CHARS = 32_000
# The names OpenAI takes for JSON schemas and tools.
_OPENAI_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_IMAGE_URL_CHARS = 8192
MAX_TOOL_DESCRIPTION_CHARS = 1024
# One per pending call: a model makes far fewer calls in one answer.
MAX_TOOL_RESULTS = 128
# The knowledge bases one turn may search (a request's, or its tenant's defaults).
MAX_KNOWLEDGE_BASES = 8
# The image types a model reads, and how their bytes begin.
IMAGE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),  # then 4 bytes of length, then b"WEBP"
}

Violations = list[tuple[str, str]]


def is_well_formed_id(value: str) -> bool:
    """Ids (conversation ids, request ids) are 1 to MAX_ID_CHARS printable ASCII characters of a safe set."""
    return len(value) <= MAX_ID_CHARS and _ID_PATTERN.fullmatch(value) is not None


def check_user_id(user_id: str) -> Violations:
    if not user_id:
        return [("user_id", "is required")]
    if len(user_id) > MAX_ID_CHARS:
        return [("user_id", f"must be at most {MAX_ID_CHARS} characters")]
    return []


def check_conversation_id(conversation_id: str, *, required: bool) -> Violations:
    if not conversation_id:
        return [("conversation_id", "is required")] if required else []
    if not is_well_formed_id(conversation_id):
        return [("conversation_id", f"must be 1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 _ . : @ -")]
    return []


MAX_PAGE_SIZE = 200
MAX_PAGE_TOKEN_CHARS = 64


def check_page(request: chat_pb2.GetConversationRequest) -> Violations:
    violations: Violations = []
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        violations.append(("page_size", f"must be between 0 (the default, 50) and {MAX_PAGE_SIZE}"))
    if len(request.page_token) > MAX_PAGE_TOKEN_CHARS:
        violations.append(("page_token", "is not one that GetConversation returned; omit it"))
    return violations


def check_knowledge_bases(field: str, names: Sequence[str]) -> Violations:
    """At most MAX_KNOWLEDGE_BASES names of knowledge bases, each once."""
    if len(names) > MAX_KNOWLEDGE_BASES:
        return [(field, f"must name at most {MAX_KNOWLEDGE_BASES} knowledge bases")]
    violations: Violations = []
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if not is_valid_name(name):
            violations.append((f"{field}[{index}]", f"must be {NAME_RULE}"))
        elif name in seen:
            violations.append((f"{field}[{index}]", f"repeats {field}[{seen[name]}]"))
        else:
            seen[name] = index
    return violations


def check_chat_request(request: chat_pb2.ChatRequest, settings: GatewaySettings) -> Violations:
    violations = check_user_id(request.user_id) + check_conversation_id(request.conversation_id, required=False)
    if request.idempotency_key and not is_well_formed_id(request.idempotency_key):
        violations.append(("idempotency_key", f"must be 1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 _ . : @ -"))
    if not request.message.strip():
        if not request.images and not request.tool_results:
            violations.append(("message", "must not be empty without images or tool_results"))
    elif len(request.message) > settings.max_message_chars:
        violations.append(("message", f"must be at most {settings.max_message_chars} characters"))
    return (
        violations
        + check_images(request.images, settings)
        + _check_options(request.options, settings)
        + _check_tool_results(request.tool_results, settings)
    )


def check_images(images: Sequence[chat_pb2.Image], settings: GatewaySettings) -> Violations:
    """At most max_images_per_message; each an https URL, or inline bytes of at most max_image_bytes of a PNG,
    JPEG, WebP or GIF that begin as that type's do."""
    if len(images) > settings.max_images_per_message:
        return [("images", f"must be at most {settings.max_images_per_message} images")]
    violations: Violations = []
    for index, image in enumerate(images):
        field = f"images[{index}]"
        source = image.WhichOneof("source")
        if source == "url":
            violations.extend(_check_image_url(f"{field}.url", image.url))
        elif source == "inline":
            violations.extend(_check_inline_image(f"{field}.inline", image.inline, settings.max_image_bytes))
        else:
            violations.append((field, "needs a url or inline data"))
        if image.detail not in chat_pb2.ImageDetail.values():
            violations.append((f"{field}.detail", "must be one of IMAGE_DETAIL_AUTO, _LOW or _HIGH"))
    return violations


def _check_image_url(field: str, url: str) -> Violations:
    if len(url) > MAX_IMAGE_URL_CHARS:
        return [(field, f"must be at most {MAX_IMAGE_URL_CHARS} characters")]
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return [(field, "must be a valid https URL")]
    if parts.scheme.lower() != "https":
        return [(field, "must be an https URL")]
    if not host or any(character.isspace() or ord(character) < 0x20 for character in url):
        return [(field, "must be a valid https URL")]
    return []


def _check_inline_image(field: str, image: chat_pb2.InlineImage, max_bytes: int) -> Violations:
    signatures = IMAGE_SIGNATURES.get(image.mime_type)
    if signatures is None:
        return [(f"{field}.mime_type", f"must be one of {', '.join(IMAGE_SIGNATURES)}")]
    data = image.data
    if not data:
        return [(f"{field}.data", "is required")]
    if len(data) > max_bytes:
        return [(f"{field}.data", f"must be at most {max_bytes} bytes")]
    if not data.startswith(signatures) or (image.mime_type == "image/webp" and data[8:12] != b"WEBP"):
        return [(f"{field}.data", f"is not an {image.mime_type} image (its first bytes are not that type's)")]
    return []


def _check_options(options: chat_pb2.ChatOptions, settings: GatewaySettings) -> Violations:
    violations: Violations = []
    if len(options.model) > MAX_MODEL_CHARS:
        violations.append(("options.model", f"must be at most {MAX_MODEL_CHARS} characters"))
    if len(options.system_prompt) > settings.max_system_prompt_chars:
        violations.append(("options.system_prompt", f"must be at most {settings.max_system_prompt_chars} characters"))
    if options.HasField("temperature") and not 0 <= options.temperature <= 2:
        violations.append(("options.temperature", "must be between 0 and 2"))
    if options.HasField("top_p") and not 0 < options.top_p <= 1:
        violations.append(("options.top_p", "must be greater than 0 and at most 1"))
    if options.HasField("max_tokens") and not 1 <= options.max_tokens <= settings.max_output_tokens:
        violations.append(("options.max_tokens", f"must be between 1 and {settings.max_output_tokens}"))
    if len(options.stop) > MAX_STOP_SEQUENCES:
        violations.append(("options.stop", f"must have at most {MAX_STOP_SEQUENCES} sequences"))
    elif any(not sequence or len(sequence) > MAX_STOP_CHARS for sequence in options.stop):
        violations.append(("options.stop", f"sequences must be 1 to {MAX_STOP_CHARS} characters"))
    violations.extend(_check_logit_bias(options.logit_bias))
    for name in ("presence_penalty", "frequency_penalty"):
        if options.HasField(name) and not -2 <= getattr(options, name) <= 2:
            violations.append((f"options.{name}", "must be between -2 and 2"))
    if options.HasField("response_format"):
        violations.extend(_check_response_format(options.response_format))
    violations.extend(check_knowledge_bases("options.knowledge_bases", options.knowledge_bases))
    return violations + _check_tools(options, settings)


def _check_tools(options: chat_pb2.ChatOptions, settings: GatewaySettings) -> Violations:
    """Tool names unique across `tools` and `server_tools` (whether a server-side tool exists is dialogue's to
    say), each tool's description and schema, and a tool_choice and parallel_tool_calls that have tools to
    apply to."""
    offered = len(options.tools) + len(options.server_tools)
    if offered > settings.tool_max_tools:
        return [("options.tools", f"must be at most {settings.tool_max_tools} tools with options.server_tools")]
    violations: Violations = []
    names: dict[str, str] = {}
    for field, name in [
        *((f"options.tools[{index}].name", tool.name) for index, tool in enumerate(options.tools)),
        *((f"options.server_tools[{index}]", name) for index, name in enumerate(options.server_tools)),
    ]:
        if not _OPENAI_NAME.fullmatch(name):
            violations.append((field, "must be 1 to 64 characters of a-z A-Z 0-9 _ -"))
        elif name in names:
            violations.append((field, f"repeats the name of {names[name]}"))
        else:
            names[name] = field
    for index, tool in enumerate(options.tools):
        field = f"options.tools[{index}]"
        if len(tool.description) > MAX_TOOL_DESCRIPTION_CHARS:
            violations.append((f"{field}.description", f"must be at most {MAX_TOOL_DESCRIPTION_CHARS} characters"))
        if tool.parameters:
            problem = _json_schema_problem(tool.parameters)
            if problem is None and json.loads(tool.parameters).get("type") != "object":
                problem = 'must be the schema of an object ("type": "object")'
            if problem:
                violations.append((f"{field}.parameters", problem))
    choice = options.tool_choice
    if choice.mode not in chat_pb2.ToolChoice.Mode.values():
        violations.append(("options.tool_choice.mode", "must be one of MODE_AUTO, MODE_NONE or MODE_REQUIRED"))
    if choice.tool_name and choice.mode != chat_pb2.ToolChoice.MODE_UNSPECIFIED:
        violations.append(("options.tool_choice", "sets either mode or tool_name, not both"))
    elif choice.tool_name and choice.tool_name not in names:
        violations.append(("options.tool_choice.tool_name", "must name one of options.tools or options.server_tools"))
    if not offered:
        if options.HasField("tool_choice"):
            violations.append(("options.tool_choice", "needs options.tools or options.server_tools"))
        if options.HasField("parallel_tool_calls"):
            violations.append(("options.parallel_tool_calls", "needs options.tools or options.server_tools"))
    return violations


def _check_tool_results(results: Sequence[chat_pb2.ToolResult], settings: ServiceSettings) -> Violations:
    """Each result names a call once, with a well-formed id, and holds at most tool_max_result_chars; which calls
    are pending is dialogue's to check."""
    if len(results) > MAX_TOOL_RESULTS:
        return [("tool_results", f"must be at most {MAX_TOOL_RESULTS} results")]
    violations: Violations = []
    seen: dict[str, int] = {}
    for index, result in enumerate(results):
        field = f"tool_results[{index}]"
        if not result.call_id or len(result.call_id) > MAX_ID_CHARS or not result.call_id.isprintable():
            violations.append((f"{field}.call_id", f"must be 1 to {MAX_ID_CHARS} printable characters"))
        elif result.call_id in seen:
            violations.append((f"{field}.call_id", f"repeats tool_results[{seen[result.call_id]}].call_id"))
        else:
            seen[result.call_id] = index
        if len(result.content) > settings.tool_max_result_chars:
            violations.append((f"{field}.content", f"must be at most {settings.tool_max_result_chars} characters"))
    return violations


def _check_logit_bias(logit_bias: Mapping[int, int]) -> Violations:
    if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        return [("options.logit_bias", f"must have at most {MAX_LOGIT_BIAS_ENTRIES} entries")]
    violations: Violations = []
    negative = sorted(token for token in logit_bias if token < 0)
    if negative:
        violations.append(("options.logit_bias", f"token ids must be at least 0 (not {negative[0]})"))
    out_of_range = sorted(token for token, bias in logit_bias.items() if not -100 <= bias <= 100)
    if out_of_range:
        token = out_of_range[0]
        violations.append(
            ("options.logit_bias", f"biases must be between -100 and 100 (not {logit_bias[token]} for token {token})")
        )
    return violations


def _check_response_format(response_format: chat_pb2.ResponseFormat) -> Violations:
    field = "options.response_format"
    kind = response_format.type
    if kind not in chat_pb2.ResponseFormat.Type.values():
        return [(f"{field}.type", "must be one of TYPE_TEXT, TYPE_JSON_OBJECT or TYPE_JSON_SCHEMA")]
    if kind != chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        return [
            (f"{field}.{name}", "is only for TYPE_JSON_SCHEMA")
            for name, value in (
                ("name", response_format.name),
                ("json_schema", response_format.json_schema),
                ("strict", response_format.strict),
            )
            if value
        ]
    violations: Violations = []
    if not _OPENAI_NAME.fullmatch(response_format.name):
        violations.append((f"{field}.name", "must be 1 to 64 characters of a-z A-Z 0-9 _ -"))
    problem = _json_schema_problem(response_format.json_schema)
    if problem:
        violations.append((f"{field}.json_schema", problem))
    return violations


def _json_schema_problem(text: str) -> str | None:
    """Why `text` is not a JSON Schema as a JSON object, or None when it is one."""
    if not text:
        return "is required for TYPE_JSON_SCHEMA"
    if len(text) > MAX_JSON_SCHEMA_CHARS:
        return f"must be at most {MAX_JSON_SCHEMA_CHARS} characters"
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        return "is not valid JSON"
    if not isinstance(schema, dict):
        return "must be a JSON object"
    if not isinstance(schema.get("$schema", ""), str):
        return "is not a valid JSON Schema: its $schema must be a string"
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        return f"is not a valid JSON Schema: {_short(error.message)}"
    except RecursionError:
        return "is nested too deeply"
    return None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
