"""What the model sees of a conversation: the system prompt (and the tools the request offers), the summary
of its beginning (if any), then as many of the newest messages as fit the model's context, then the turn's
new messages.

The budget is the model's context size minus the reply's max_tokens and a margin. Stored messages carry
their token count from when they were committed, so building a window counts only the new messages, the
system prompt and the summary (in a worker thread when they are long).

With function calling, an assistant message with tool calls and the tool messages that follow it (the calls'
results) are one unit, kept or left out whole: the chat API rejects a tool message without its call, and a
call without a tool message for its id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from chatmesh.dialogue.content import image_detail, image_part, image_sizes
from chatmesh.dialogue.store import StoredImage, StoredMessage, StoredToolCall, Summary
from chatmesh.dialogue.tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TokenCounter
from chatmesh.v1 import chat_pb2

# The role's own token in the chat format ("user", "assistant", "system", "tool": one token in every encoding).
_ROLE_TOKENS = 1
# A tool call's tokens beside its name and arguments (its id, its type, the chat format's framing of a call):
# an estimate, since OpenAI does not publish how calls are rendered; the window's margin is for its error.
TOOL_CALL_TOKENS = 8
SUMMARY_PREFIX = "Summary of the earlier part of this conversation:\n"
# What the model is told of a tool result: the chat API has no error flag, and a call needs its answer even
# when safety policy refused the result (whose content is not kept).
TOOL_ERROR_PREFIX = "Error: "
WITHHELD_TOOL_RESULT = "The tool's result was withheld by content policy."


class MessageTooLong(Exception):
    """The turn's new messages (with the calls their tool results answer) cannot fit the model's context even
    alone."""

    def __init__(self, tokens: int, available: int) -> None:
        super().__init__(f"{tokens} tokens, with room for {available}")
        self.tokens = tokens
        self.available = available


@dataclass(frozen=True, slots=True)
class Budget:
    """The model's context size, what its reply may take, and a margin for the counts' error."""

    context_tokens: int
    reply_tokens: int
    margin_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens - self.reply_tokens - self.margin_tokens


@dataclass(frozen=True, slots=True)
class Window:
    """The messages the model is sent and their tokens; the stored messages among them (`history`) and
    whether the summary is; and how many of the oldest stored messages were left out (never part of a unit),
    which a summary may later cover."""

    messages: list[dict[str, Any]]
    prompt_tokens: int
    history: list[StoredMessage]
    with_summary: bool
    left_out: int


def stored_image(image: chat_pb2.Image) -> StoredImage:
    detail = image_detail(image)
    if image.WhichOneof("source") == "inline":
        return StoredImage(mime_type=image.inline.mime_type, data=image.inline.data, detail=detail)
    return StoredImage(url=image.url, detail=detail)


def image_proto(image: StoredImage) -> chat_pb2.Image:
    detail = {"low": chat_pb2.IMAGE_DETAIL_LOW, "high": chat_pb2.IMAGE_DETAIL_HIGH}.get(
        image.detail, chat_pb2.IMAGE_DETAIL_AUTO
    )
    if image.url:
        return chat_pb2.Image(url=image.url, detail=detail)
    return chat_pb2.Image(inline=chat_pb2.InlineImage(data=image.data, mime_type=image.mime_type), detail=detail)


def model_message(message: StoredMessage) -> dict[str, Any]:
    """A stored message as the chat API takes it: its text and its images as content parts, an assistant's
    tool calls, a tool message's result (see TOOL_ERROR_PREFIX and WITHHELD_TOOL_RESULT)."""
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": _tool_result(message)}
    if message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in message.tool_calls
            ],
        }
    if not message.images:
        return {"role": message.role, "content": message.content}
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    parts.extend(image_part(image_proto(image)) for image in message.images)
    return {"role": message.role, "content": parts}


def _tool_result(message: StoredMessage) -> str:
    if message.refused:
        return WITHHELD_TOOL_RESULT
    if message.tool_error:
        return TOOL_ERROR_PREFIX + message.content
    return message.content


def counted(counter: TokenCounter, model: str, message: StoredMessage) -> StoredMessage:
    """`message` with its tokens for `model`, without the chat format's per message: its content and images as
    the model sees them, a tool message's call id, and per tool call its name, its arguments and
    TOOL_CALL_TOKENS (an estimate)."""
    encoding = counter.encoding_for(model) or ""
    if message.encoding and message.encoding == encoding:
        return message
    sizes = image_sizes(image_proto(image) for image in message.images)
    content = model_message(message)["content"]
    tokens = counter.count_messages(model, [{"content": content}], sizes) - TOKENS_PER_MESSAGE - REPLY_PRIMING_TOKENS
    tokens += counter.count_text(model, message.tool_call_id)
    for call in message.tool_calls:
        tokens += counter.count_text(model, call.name) + counter.count_text(model, call.arguments) + TOOL_CALL_TOKENS
    return replace(message, tokens=tokens, encoding=encoding or "estimate")


def pending_tool_calls(messages: Sequence[StoredMessage]) -> tuple[StoredToolCall, ...]:
    """The calls of the last assistant message of `messages` (oldest first) that no tool message after it
    answers; () when it made none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "assistant":
            answered = {message.tool_call_id for message in messages[index + 1 :] if message.role == "tool"}
            return tuple(call for call in messages[index].tool_calls if call.id not in answered)
    return ()


def build_window(
    counter: TokenCounter,
    model: str,
    budget: Budget,
    *,
    system_prompt: str,
    summary: Summary | None,
    history: Sequence[StoredMessage],
    new_messages: Sequence[StoredMessage],
    tools_tokens: int = 0,
) -> Window:
    """The window for a turn. `history` is the newest stored messages, oldest first, refused ones included
    (they are skipped, except refused tool messages, see `model_message`); it is kept newest first in units
    (see the module's docstring), and tool messages whose call it does not hold are dropped. `new_messages`
    (at least one) are the turn's, counted (see `counted`): the caller's tool results, then the user's message
    if any; when they begin with tool results, the history's last unit (the calls they answer) is kept with
    them. `tools_tokens` is what the tool definitions the request offers take. Raises MessageTooLong when the
    new messages, with that unit, cannot fit."""
    if not new_messages:
        raise ValueError("a window needs at least one new message")
    fixed: list[dict[str, Any]] = []
    fixed_tokens = REPLY_PRIMING_TOKENS + tools_tokens
    if system_prompt:
        fixed.append({"role": "system", "content": system_prompt})
        fixed_tokens += _overhead() + counter.count_text(model, system_prompt)
    units = _units(history)
    # The oldest messages left out: all before the oldest unit taken (kept, or skipped as never sent).
    left_out = len(history)
    answered: list[StoredMessage] = []
    if new_messages[0].role == "tool":
        if not units or not history[units[-1].start].tool_calls:
            raise ValueError("tool results that answer no call of the history")
        answers = units.pop()
        answered = [history[index] for index in answers]
        left_out = answers.start
    required = sum(_cost(counter, model, message) for message in answered)
    required += sum(window_tokens(message) for message in new_messages)
    available = budget.prompt_tokens - fixed_tokens - required
    if available < 0:
        raise MessageTooLong(required - _overhead(), max(0, budget.prompt_tokens - fixed_tokens - _overhead()))
    with_summary = False
    if summary is not None:
        summary_text = SUMMARY_PREFIX + summary.text
        summary_tokens = _overhead() + counter.count_text(model, summary_text)
        if summary_tokens <= available:
            fixed.append({"role": "system", "content": summary_text})
            with_summary = True
            available -= summary_tokens
            fixed_tokens += summary_tokens
    kept: list[StoredMessage] = []
    kept_tokens = 0
    for unit in reversed(units):
        messages = [history[index] for index in unit]
        # Refused, or calls that a turn left without results: never sent.
        if messages[0].refused or pending_tool_calls(messages):
            left_out = unit.start
            continue
        cost = sum(_cost(counter, model, message) for message in messages)
        if kept_tokens + cost > available:
            break
        kept[:0] = messages
        kept_tokens += cost
        left_out = unit.start
    kept += answered
    return Window(
        messages=[*fixed, *(model_message(message) for message in [*kept, *new_messages])],
        prompt_tokens=fixed_tokens + kept_tokens + required,
        history=kept,
        with_summary=with_summary,
        left_out=left_out,
    )


def _units(history: Sequence[StoredMessage]) -> list[range]:
    """The indices of `history` in units: an assistant message with tool calls with the tool messages after it,
    any other message alone. A tool message whose call is not in `history` (not loaded, or refused) is in none."""
    units: list[range] = []
    for index, message in enumerate(history):
        if message.role != "tool":
            units.append(range(index, index + 1))
        elif units and history[units[-1].start].tool_calls:
            units[-1] = range(units[-1].start, index + 1)
    return units


def _cost(counter: TokenCounter, model: str, message: StoredMessage) -> int:
    return window_tokens(counted(counter, model, message))


def window_tokens(message: StoredMessage) -> int:
    """What a counted message (see `counted`) takes of a window: its tokens and the chat format's around it."""
    return _overhead() + message.tokens


def _overhead() -> int:
    return TOKENS_PER_MESSAGE + _ROLE_TOKENS
