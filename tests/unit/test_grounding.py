"""A grounded turn's sources in the window, and the citations read back from the reply."""

import pytest

from chatmesh.dialogue.grounding import INSTRUCTION, citations, sources_message
from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.retrieval import RetrievedChunk
from chatmesh.dialogue.tokens import DEFAULT_MODEL_ENCODINGS, TokenCounter
from chatmesh.v1 import chat_pb2

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(DEFAULT_MODEL_ENCODINGS)


def retrieved(
    source: str, title: str, text: str, position: int = 0, knowledge_base: str = "handbook"
) -> RetrievedChunk:
    return RetrievedChunk(knowledge_base, Chunk(source, title, position, text, 0), 1.0, 0.9, 1.0)


REFUNDS = retrieved("billing.md", "Billing > Refunds", "Refunds reach your card within five working days.", 2)
RESET = retrieved("security.txt", "Security", "Reset your password from Settings, then Security.")
LONG = retrieved("long.md", "Long", "word " * 2000)


def test_the_sources_follow_the_instruction_numbered_best_first_with_title_and_source(counter: TokenCounter) -> None:
    sources = sources_message([REFUNDS, RESET], counter, MODEL, 1000)

    assert sources is not None and sources.chunks == (REFUNDS, RESET)
    assert sources.message["role"] == "system"
    assert sources.message["content"] == (
        f"{INSTRUCTION}\n\n"
        "[1] Billing > Refunds (billing.md)\nRefunds reach your card within five working days.\n\n"
        "[2] Security (security.txt)\nReset your password from Settings, then Security."
    )


def test_the_sources_tokens_are_what_the_message_takes_of_the_window(counter: TokenCounter) -> None:
    sources = sources_message([REFUNDS, RESET], counter, MODEL, 1000)

    assert sources is not None
    with_it = counter.count_messages(MODEL, [{"role": "user", "content": "hi"}, sources.message])
    without = counter.count_messages(MODEL, [{"role": "user", "content": "hi"}])
    assert sources.tokens == pytest.approx(with_it - without, abs=2)


def test_a_source_that_does_not_fit_is_left_out_and_a_smaller_one_after_it_still_goes_in(
    counter: TokenCounter,
) -> None:
    sources = sources_message([LONG, RESET], counter, MODEL, 200)

    assert sources is not None and sources.chunks == (RESET,)
    assert sources.tokens <= 200
    assert "[1] Security" in sources.message["content"]


def test_no_sources_when_none_fits(counter: TokenCounter) -> None:
    assert sources_message([LONG], counter, MODEL, 200) is None
    assert sources_message([], counter, MODEL, 200) is None


def test_citations_are_the_sources_the_reply_cites_each_once_in_number_order() -> None:
    cited = citations("Refunds take five days [2]. See also [1, 2] and [1][7].", [RESET, REFUNDS])

    assert cited == [
        chat_pb2.Citation(number=1, knowledge_base="handbook", source="security.txt", title="Security", position=0),
        chat_pb2.Citation(
            number=2, knowledge_base="handbook", source="billing.md", title="Billing > Refunds", position=2
        ),
    ]


def test_a_reply_that_cites_nothing_has_no_citations() -> None:
    assert citations("I do not know.", [RESET]) == []
    assert citations("Set items[1] to true.", [RESET]) == []
    assert citations("See [1].", []) == []
