"""What the model sees of a conversation: the system prompt, the summary of its beginning (if any), then as
many of the newest messages as fit the model's context, then the new message.

The budget is the model's context size minus the reply's max_tokens and a margin. Stored messages carry
their token count from when they were committed, so building a window counts only the new message, the
system prompt and the summary (in a worker thread when they are long).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatmesh.dialogue.content import image_detail, image_part, image_sizes
from chatmesh.dialogue.store import StoredImage, StoredMessage, Summary
from chatmesh.dialogue.tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TokenCounter
from chatmesh.v1 import chat_pb2

# The role's own token in the chat format ("user", "assistant", "system": one token in every encoding).
_ROLE_TOKENS = 1
SUMMARY_PREFIX = "Summary of the earlier part of this conversation:\n"


class MessageTooLong(Exception):
    """The new message cannot fit the model's context even alone."""

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
    whether the summary is; and how many of the oldest stored messages were left out, which a summary
    may later cover."""

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
    """A stored message as the chat API takes it: its text, and its images as content parts."""
    if not message.images:
        return {"role": message.role, "content": message.content}
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    parts.extend(image_part(image_proto(image)) for image in message.images)
    return {"role": message.role, "content": parts}


def counted(counter: TokenCounter, model: str, message: StoredMessage) -> StoredMessage:
    """`message` with its tokens for `model` (the message's content and images, without the chat format's)."""
    encoding = counter.encoding_for(model) or ""
    if message.encoding and message.encoding == encoding:
        return message
    sizes = image_sizes(image_proto(image) for image in message.images)
    content = model_message(message)["content"]
    tokens = counter.count_messages(model, [{"content": content}], sizes) - TOKENS_PER_MESSAGE - REPLY_PRIMING_TOKENS
    return StoredMessage(
        role=message.role,
        content=message.content,
        created_at=message.created_at,
        refused=message.refused,
        tokens=tokens,
        encoding=encoding or "estimate",
        images=message.images,
    )


def build_window(
    counter: TokenCounter,
    model: str,
    budget: Budget,
    *,
    system_prompt: str,
    summary: Summary | None,
    history: list[StoredMessage],
    new_message: StoredMessage,
) -> Window:
    """The window for a turn. `history` is the newest stored messages, oldest first, refused ones included
    (they are skipped); `new_message` is counted (see `counted`). Raises MessageTooLong."""
    fixed: list[dict[str, Any]] = []
    fixed_tokens = REPLY_PRIMING_TOKENS
    if system_prompt:
        fixed.append({"role": "system", "content": system_prompt})
        fixed_tokens += _overhead() + counter.count_text(model, system_prompt)
    new_tokens = _overhead() + new_message.tokens
    available = budget.prompt_tokens - fixed_tokens - new_tokens
    if available < 0:
        raise MessageTooLong(new_message.tokens, max(0, budget.prompt_tokens - fixed_tokens - _overhead()))
    if summary is not None:
        summary_text = SUMMARY_PREFIX + summary.text
        summary_tokens = _overhead() + counter.count_text(model, summary_text)
        if summary_tokens <= available:
            fixed.append({"role": "system", "content": summary_text})
            with_summary = True
            available -= summary_tokens
            fixed_tokens += summary_tokens
    with_summary = False
    kept: list[StoredMessage] = []
    kept_tokens = 0
    left_out = 0
    for index in range(len(history) - 1, -1, -1):
        message = history[index]
        if message.refused:
            continue
        cost = _overhead() + counted(counter, model, message).tokens
        if kept_tokens + cost > available:
            left_out = index + 1
            break
        kept.append(message)
        kept_tokens += cost
    kept.reverse()
    return Window(
        messages=[*fixed, *(model_message(message) for message in kept), model_message(new_message)],
        prompt_tokens=fixed_tokens + kept_tokens + new_tokens,
        history=kept,
        with_summary=with_summary,
        left_out=left_out,
    )


def _overhead() -> int:
    return TOKENS_PER_MESSAGE + _ROLE_TOKENS
