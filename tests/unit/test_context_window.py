"""The context window: which stored messages the model sees, in what form, within the budget; with tool calls,
an assistant's calls and their results are kept or left out whole."""

from collections.abc import Sequence
from typing import Any

import pytest

from chatmesh.dialogue.context_window import (
    TOOL_CALL_TOKENS,
    WITHHELD_TOOL_RESULT,
    Budget,
    MessageTooLong,
    Window,
    build_window,
    counted,
    model_message,
    pending_tool_calls,
)
from chatmesh.dialogue.store import Role, StoredMessage, StoredToolCall, Summary
from chatmesh.dialogue.tokens import TokenCounter

MODEL = "gpt-4o-mini"
ENCODING = "o200k_base"
# Every message below is counted as TOKENS, so each costs COST in the window (the chat format's 3 per message
# and 1 for the role); the fixed part without a system prompt is the 3 tokens priming the reply.
TOKENS = 10
COST = TOKENS + 4
PRIMING = 3


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def message(role: Role, content: str = "", **fields: Any) -> StoredMessage:
    """A message counted for MODEL as TOKENS tokens."""
    return StoredMessage(role, content, 0.0, tokens=TOKENS, encoding=ENCODING, **fields)


def call(n: int, *, server_side: bool = False) -> StoredToolCall:
    return StoredToolCall(f"call_{n}", "order_status", f'{{"id":{n}}}', server_side)


def result(n: int, content: str = "shipped", **fields: Any) -> StoredMessage:
    return message("tool", content, tool_call_id=f"call_{n}", **fields)


def window(
    counter: TokenCounter,
    history: Sequence[StoredMessage],
    new_messages: Sequence[StoredMessage],
    *,
    room: int,
    summary: Summary | None = None,
    tools_tokens: int = 0,
) -> Window:
    """The window with a prompt budget of `room` messages beside the fixed part (and `tools_tokens`)."""
    budget = Budget(context_tokens=PRIMING + tools_tokens + room * COST, reply_tokens=0, margin_tokens=0)
    return build_window(
        counter,
        MODEL,
        budget,
        system_prompt="",
        summary=summary,
        history=history,
        new_messages=new_messages,
        tools_tokens=tools_tokens,
    )


def roles(window: Window) -> list[str]:
    return [sent["role"] for sent in window.messages]


# A conversation: a question, the assistant's two calls and their results, its answer, then one more exchange.
HISTORY = [
    message("user", "where are orders 1 and 2?"),
    message("assistant", tool_calls=(call(1), call(2))),
    result(1),
    result(2, "lost", tool_error=True),
    message("assistant", "One shipped, one was lost."),
    message("user", "thanks"),
    message("assistant", "You are welcome."),
]
QUESTION = message("user", "anything else?")


def test_a_call_and_its_results_are_never_split_by_the_budget(counter: TokenCounter) -> None:
    # Room for the new message and four stored ones: the three newest fit, the unit of three does not.
    four = window(counter, HISTORY, [QUESTION], room=5)
    assert four.history == HISTORY[4:]
    assert four.left_out == 4
    assert four.prompt_tokens == PRIMING + 4 * COST

    six = window(counter, HISTORY, [QUESTION], room=7)
    assert six.history == HISTORY[1:]
    assert six.left_out == 1
    assert roles(six) == ["assistant", "tool", "tool", "assistant", "user", "assistant", "user"]

    everything = window(counter, HISTORY, [QUESTION], room=8)
    assert (everything.history, everything.left_out) == (HISTORY, 0)


def test_tool_messages_whose_call_is_not_in_the_history_are_dropped(counter: TokenCounter) -> None:
    # The history was read with a message-count limit that cut the assistant's calls off.
    cut = HISTORY[2:]
    built = window(counter, cut, [QUESTION], room=10)
    assert built.history == HISTORY[4:]
    assert built.left_out == 2
    assert roles(built) == ["assistant", "user", "assistant", "user"]

    # A refused assistant message keeps no calls: what follows it as a tool message answers nothing.
    refused = [message("user", "hi"), message("assistant", refused=True), result(1), message("user", "again")]
    built = window(counter, refused, [QUESTION], room=10)
    assert built.history == [refused[0], refused[3]]
    assert built.left_out == 0


def test_calls_a_turn_left_without_results_are_not_sent(counter: TokenCounter) -> None:
    unanswered = [message("user", "where?"), message("assistant", tool_calls=(call(1), call(2))), result(1)]
    history = [*unanswered, message("user", "never mind"), message("assistant", "Fine.")]

    built = window(counter, history, [QUESTION], room=10)

    assert built.history == [history[0], *history[3:]]


def test_tool_calls_and_results_in_the_chat_apis_form() -> None:
    calls = message("assistant", tool_calls=(call(1), call(2, server_side=True)))
    assert model_message(calls) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "order_status", "arguments": '{"id":1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "order_status", "arguments": '{"id":2}'}},
        ],
    }
    assert model_message(message("assistant", "Let me look.", tool_calls=(call(1),)))["content"] == "Let me look."
    assert model_message(result(1)) == {"role": "tool", "tool_call_id": "call_1", "content": "shipped"}
    assert model_message(result(1, "timed out", tool_error=True))["content"] == "Error: timed out"
    withheld = result(1, "", refused=True, tool_error=True)
    assert model_message(withheld) == {"role": "tool", "tool_call_id": "call_1", "content": WITHHELD_TOOL_RESULT}


def test_a_refused_tool_result_still_answers_its_call_in_the_window(counter: TokenCounter) -> None:
    history = [message("user", "hi", refused=True), message("assistant", tool_calls=(call(1),))]
    history.append(result(1, refused=True))

    built = window(counter, history, [QUESTION], room=10)

    assert built.history == history[1:]
    assert built.messages[1] == {"role": "tool", "tool_call_id": "call_1", "content": WITHHELD_TOOL_RESULT}


def test_counted_counts_tool_calls_and_results(counter: TokenCounter) -> None:
    def text(value: str) -> int:
        return counter.count_text(MODEL, value)

    calls = counted(counter, MODEL, StoredMessage("assistant", "", 0.0, tool_calls=(call(1), call(22))))
    assert calls.tokens == sum(text("order_status") + text(f'{{"id":{n}}}') + TOOL_CALL_TOKENS for n in (1, 22))
    assert calls.encoding == ENCODING
    error = counted(counter, MODEL, StoredMessage("tool", "timed out", 0.0, tool_call_id="call_1", tool_error=True))
    assert error.tokens == text("Error: timed out") + text("call_1")
    withheld = counted(counter, MODEL, StoredMessage("tool", "", 0.0, tool_call_id="call_1", refused=True))
    assert withheld.tokens == text(WITHHELD_TOOL_RESULT) + text("call_1")
    assert (withheld.tool_call_id, withheld.refused) == ("call_1", True)


def test_pending_tool_calls_are_the_last_assistants_unanswered_calls() -> None:
    asked = [message("user", "where?"), message("assistant", tool_calls=(call(1), call(2), call(3)))]

    assert pending_tool_calls([]) == ()
    assert pending_tool_calls(asked[:1]) == ()
    assert pending_tool_calls(asked) == (call(1), call(2), call(3))
    assert pending_tool_calls([*asked, result(2)]) == (call(1), call(3))
    assert pending_tool_calls([*asked, result(1), result(2), result(3)]) == ()
    assert pending_tool_calls([*asked, message("assistant", "Never mind.")]) == ()
    assert pending_tool_calls([*asked, message("assistant", refused=True)]) == ()


def test_new_tool_results_keep_the_calls_they_answer(counter: TokenCounter) -> None:
    # The turn ended with a server-side call answered and one call for the caller, who now answers it.
    asked = message("assistant", tool_calls=(call(1, server_side=True), call(2)))
    history = [message("user", "one"), message("assistant", "two"), message("user", "where?"), asked, result(1)]
    new = [result(2), message("user", "and?")]

    built = window(counter, history, new, room=4)

    assert built.history == [asked, history[4]]
    assert built.left_out == 3
    assert roles(built) == ["assistant", "tool", "tool", "user"]
    assert built.messages[2] == {"role": "tool", "tool_call_id": "call_2", "content": "shipped"}
    assert built.prompt_tokens == PRIMING + 4 * COST
    # With only the results, and room to spare, older messages come first.
    assert roles(window(counter, history, new[:1], room=10)) == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "tool",
    ]

    with pytest.raises(MessageTooLong) as too_long:
        window(counter, history, new, room=3)
    assert (too_long.value.tokens, too_long.value.available) == (4 * COST - 4, 3 * COST - 4)


def test_tool_results_must_answer_the_historys_last_calls(counter: TokenCounter) -> None:
    with pytest.raises(ValueError, match="answer no call"):
        window(counter, HISTORY, [result(1)], room=10)


def test_new_messages_that_cannot_fit_even_alone_are_too_long(counter: TokenCounter) -> None:
    with pytest.raises(MessageTooLong) as too_long:
        window(counter, HISTORY, [QUESTION], room=0)
    assert (too_long.value.tokens, too_long.value.available) == (TOKENS, 0)

    # The tools offered are a fixed cost, as the system prompt is.
    fits = window(counter, HISTORY, [QUESTION], room=1, tools_tokens=50)
    assert (fits.history, fits.left_out, fits.prompt_tokens) == ([], len(HISTORY), PRIMING + 50 + COST)
    budget = Budget(context_tokens=PRIMING + 50 + COST - 1, reply_tokens=0, margin_tokens=0)
    with pytest.raises(MessageTooLong):
        build_window(
            counter, MODEL, budget, system_prompt="", summary=None, history=[], new_messages=[QUESTION], tools_tokens=50
        )


def test_a_summary_that_fits_is_sent_and_said_to_be(counter: TokenCounter) -> None:
    summary = Summary("they talked about orders", 4, 0.0)

    built = window(counter, HISTORY[4:], [QUESTION], room=10, summary=summary)

    assert built.with_summary
    assert built.messages[0]["role"] == "system" and "they talked about orders" in built.messages[0]["content"]
    assert not window(counter, HISTORY[4:], [QUESTION], room=1, summary=summary).with_summary
