"""The step `summary`: once the messages that no longer fit a conversation's window hold enough tokens,
a model summarizes them (with the summary before, if any), and the summary stands in for them in later
windows.

It runs after the caller has the turn's reply, never on its path. It does not race with turns: it writes
the summary alone, and only if the summary it replaces is still the current one (`commit_summary`), while
turns never write the summary; a window reads summary and messages in one step.
"""

from __future__ import annotations

import asyncio
import time

from chatmesh.dialogue.context_window import Window
from chatmesh.dialogue.store import ConversationStore, StoredMessage, Summary, TurnHistory
from chatmesh.model.client import ModelClient, ModelOutcome, ModelRequest
from chatmesh.model.errors import ModelError
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import DialogueSettings

log = get_logger(__name__)

INSTRUCTIONS = (
    "You keep the memory of a conversation between a user and an assistant. Summarize the conversation below "
    "for the assistant, who will no longer see it: the user's goals, facts and preferences the user stated, "
    "decisions made, questions still open. Be concise and factual; write in the conversation's language."
)
# The most tokens of messages one summary call reads; what is left is summarized after a later turn.
MAX_INPUT_TOKENS = 16_000
SUMMARY_SECONDS = 120.0


def _tokens_of(message: StoredMessage) -> int:
    if message.encoding:
        return message.tokens
    # Messages stored before token counts were kept: about 3 characters a token.
    calls = sum(len(call.name) + len(call.arguments) for call in message.tool_calls)
    return (len(message.content) + calls) // 3


def _lines(messages: list[StoredMessage]) -> list[str]:
    """The messages as the summarizer reads them, one or more lines each; refused ones are left out."""
    names = {call.id: call.name for message in messages for call in message.tool_calls}
    lines: list[str] = []
    for message in messages:
        if message.refused:
            continue
        if message.role == "tool":
            name = names.get(message.tool_call_id)
            call = f"{name}, {message.tool_call_id}" if name else message.tool_call_id
            kind = "error" if message.tool_error else "result"
            lines.append(f"Tool {kind} ({call}): {message.content}")
            continue
        if message.content or not message.tool_calls:
            images = f" [{len(message.images)} image(s)]" if message.images else ""
            lines.append(f"{message.role.capitalize()}: {message.content}{images}")
        lines.extend(f"Assistant called {call.name}({call.arguments})" for call in message.tool_calls)
    return lines


class Summarizer:
    def __init__(self, settings: DialogueSettings, store: ConversationStore, model: ModelClient) -> None:
        self._settings = settings
        self._store = store
        self._model = model
        self._retention = settings.conversation_retention_seconds or None
        # Conversations this process is summarizing: a second turn's trigger does not start another call.
        self._running: set[tuple[str, str]] = set()

    def due(self, history: TurnHistory | None, window: Window) -> bool:
        """Whether the messages left out of `window` (beyond the summary) have reached the trigger."""
        if history is None or window.left_out == 0:
            return False
        covered = history.summary.message_count if history.summary is not None else 0
        if history.first_index > covered:
            return True  # older messages than the turn read are not summarized yet
        left_out = sum(_tokens_of(message) for message in history.messages[: window.left_out])
        return left_out >= self._settings.summary_trigger_tokens

    async def summarize(
        self, tenant: str, conversation_id: str, user_id: str, history: TurnHistory, window: Window, model: str
    ) -> None:
        """Summarizes the messages from the current summary's end up to the first one in `window`."""
        key = (tenant, conversation_id)
        if key in self._running:
            return
        self._running.add(key)
        try:
            await self._summarize(tenant, conversation_id, user_id, history, window, model)
        except ModelError as error:
            log.warning("summary_failed", extra={"kind": error.kind.value})
        finally:
            self._running.discard(key)

    async def _summarize(
        self, tenant: str, conversation_id: str, user_id: str, history: TurnHistory, window: Window, model: str
    ) -> None:
        previous = history.summary
        covered = previous.message_count if previous is not None else 0
        until = history.first_index + window.left_out
        page = await self._store.get(tenant, conversation_id, user_id, start=covered, limit=until - covered)
        if not page.messages:
            return
        taken: list[StoredMessage] = []
        budget = MAX_INPUT_TOKENS
        for message in page.messages:
            budget -= _tokens_of(message)
            # Tool results stay with their call: the summary never ends between them.
            if taken and budget < 0 and message.role != "tool":
                break
            taken.append(message)
        summary_model = self._settings.summary_model or model
        text, input_tokens, output_tokens = await self._ask(summary_model, previous, taken)
        summary = Summary(text=text, message_count=page.first_index + len(taken), updated_at=time.time())
        newest = taken[-1].created_at
        covered_until = newest + self._retention if self._retention is not None else float("inf")
        stored = await self._store.commit_summary(
            tenant, conversation_id, summary, replaces=covered, covered_until=covered_until
        )
        await self._store.add_usage(tenant, conversation_id, input_tokens, output_tokens)
        log.info("summarized", extra={"messages": summary.message_count, "stored": stored})

    async def _ask(self, model: str, previous: Summary | None, messages: list[StoredMessage]) -> tuple[str, int, int]:
        """The model's summary, and the call's (input, output) tokens."""
        lines = [] if previous is None else [f"Summary so far: {previous.text}", ""]
        lines += _lines(messages)
        request = ModelRequest(
            model=model,
            messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "\n".join(lines)}],
            max_tokens=self._settings.summary_max_tokens,
            temperature=0.0,
        )
        parts: list[str] = []
        outcome = ModelOutcome()
        deadline = asyncio.get_running_loop().time() + SUMMARY_SECONDS
        async for item in self._model.stream_chat(request, deadline):
            if isinstance(item, str):
                parts.append(item)
            else:
                outcome = item
        return "".join(parts).strip(), outcome.input_tokens, outcome.output_tokens
