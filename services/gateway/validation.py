"""The checks on what a caller sends, each naming the field it is about."""

import re

from chatmesh.runtime.settings import Settings
from chatmesh.v1 import chat_pb2

MAX_ID_CHARS = 128
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_MODEL_CHARS = 128
_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]+")

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


def check_chat_request(request: chat_pb2.ChatRequest, settings: Settings) -> Violations:
    violations = check_user_id(request.user_id) + check_conversation_id(request.conversation_id, required=False)
    if request.idempotency_key and not is_well_formed_id(request.idempotency_key):
        violations.append(("idempotency_key", f"must be 1 to {MAX_ID_CHARS} characters of A-Z a-z 0-9 _ . : @ -"))
    if not request.message.strip():
        violations.append(("message", "must not be empty"))
    elif len(request.message) > settings.max_message_chars:
        violations.append(("message", f"must be at most {settings.max_message_chars} characters"))
    return violations + _check_options(request.options, settings)


def _check_options(options: chat_pb2.ChatOptions, settings: Settings) -> Violations:
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
    return violations
