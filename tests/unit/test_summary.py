"""The summary step with tool calls: what the summarizer reads of calls and results, and where it stops."""

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from chatmesh.dialogue import summary as summary_module
from chatmesh.dialogue.context_window import Window
from chatmesh.dialogue.store import CommittedTurn, MemoryConversationStore, StoredMessage, StoredToolCall
from chatmesh.dialogue.summary import Summarizer
from chatmesh.model.client import ModelOutcome, ModelRequest
from chatmesh.runtime.settings import DialogueSettings

TENANT = "acme"
CONVERSATION = "conv-1"
ALICE = "alice"
LOOKUP = StoredToolCall("call_x", "order_status", '{"id":7}')
CLOCK = StoredToolCall("call_y", "current_time", "{}", server_side=True)


class RecordingModel:
    """Answers every call with the same summary, and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[ModelRequest] = []

    async def stream_chat(self, request: ModelRequest, deadline: float) -> AsyncIterator[str | ModelOutcome]:
        self.requests.append(request)
        yield "Order 7 shipped."
        yield ModelOutcome(input_tokens=40, output_tokens=4)


MESSAGES = [
    StoredMessage("user", "where is order 7?", 1.0),
    StoredMessage("assistant", "", 2.0, tool_calls=(LOOKUP,)),
    StoredMessage("tool", '{"status":"shipped"}', 3.0, tool_call_id="call_x"),
    StoredMessage("assistant", "Let me check the date.", 4.0, tool_calls=(CLOCK,)),
    StoredMessage("tool", "clock down", 5.0, tool_call_id="call_y", tool_error=True),
    StoredMessage("tool", "", 6.0, tool_call_id="call_z", refused=True),
    StoredMessage("assistant", "It shipped.", 7.0),
    StoredMessage("user", "thanks", 8.0),
]


async def summarized(messages: list[StoredMessage], left_out: int) -> tuple[RecordingModel, MemoryConversationStore]:
    store = MemoryConversationStore()
    await store.commit_turn(
        TENANT, CONVERSATION, ALICE, CommittedTurn(tuple(messages), input_tokens=0, output_tokens=0), new=True
    )
    model = RecordingModel()
    summarizer = Summarizer(DialogueSettings(summary_trigger_tokens=1), store, model)  # type: ignore[arg-type]
    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=100, lease_seconds=30)
    window = Window(messages=[], prompt_tokens=0, history=[], with_summary=False, left_out=left_out)
    assert summarizer.due(history, window)
    await summarizer.summarize(TENANT, CONVERSATION, ALICE, history, window, "gpt-4o-mini")
    return model, store


async def test_the_summarizer_reads_tool_calls_and_results() -> None:
    model, store = await summarized(MESSAGES, left_out=7)

    assert model.requests[0].messages[1]["content"] == "\n".join(
        [
            "User: where is order 7?",
            'Assistant called order_status({"id":7})',
            'Tool result (order_status, call_x): {"status":"shipped"}',
            "Assistant: Let me check the date.",
            "Assistant called current_time({})",
            "Tool error (current_time, call_y): clock down",
            "Assistant: It shipped.",
        ]
    )
    stored = (await store.get(TENANT, CONVERSATION, ALICE)).summary
    assert stored is not None and (stored.text, stored.message_count) == ("Order 7 shipped.", 7)


async def test_a_summary_never_ends_between_a_call_and_its_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # Room for two messages of 10 tokens: the results of the call in the second go with it.
    monkeypatch.setattr(summary_module, "MAX_INPUT_TOKENS", 25)

    _, store = await summarized(
        [replace(message, tokens=10, encoding="o200k_base") for message in MESSAGES], left_out=7
    )

    stored = (await store.get(TENANT, CONVERSATION, ALICE)).summary
    assert stored is not None and stored.message_count == 3


async def test_uncounted_tool_calls_count_toward_the_trigger() -> None:
    store = MemoryConversationStore()
    calls = StoredMessage("assistant", "", 1.0, tool_calls=(StoredToolCall("call_1", "search", "x" * 294),))
    turn = CommittedTurn((calls, StoredMessage("tool", "", 2.0, tool_call_id="call_1")), 0, 0)
    await store.commit_turn(TENANT, CONVERSATION, ALICE, turn, new=True)
    history = await store.open_turn(TENANT, CONVERSATION, ALICE, limit=100, lease_seconds=30)
    window = Window(messages=[], prompt_tokens=0, history=[], with_summary=False, left_out=2)

    assert Summarizer(DialogueSettings(summary_trigger_tokens=100), store, RecordingModel()).due(history, window)  # type: ignore[arg-type]
    assert not Summarizer(DialogueSettings(summary_trigger_tokens=101), store, RecordingModel()).due(history, window)  # type: ignore[arg-type]
