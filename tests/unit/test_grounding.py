"""A grounded turn's sources in the window, and the citations read back from the reply."""

import pytest

from chatmesh.dialogue.grounding import (
    INSTRUCTION,
    NOTHING_FITS,
    NOTHING_FOUND,
    SEARCH_INSTRUCTION,
    SearchResult,
    citations,
    search_result,
    sources_message,
)
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


# knowledge_search's result: more sources, numbered after the turn's.

SHIPPING = retrieved("shipping.md", "Shipping", "Orders ship within two days.")


def test_a_search_result_numbers_its_chunks_after_the_turns_sources_headed_as_in_the_window(
    counter: TokenCounter,
) -> None:
    result = search_result([SHIPPING, LONG], [REFUNDS, RESET], counter, MODEL, 200)

    assert result.text == f"{SEARCH_INSTRUCTION}\n\n[3] Shipping (shipping.md)\nOrders ship within two days."
    assert result.added == (SHIPPING,)  # LONG did not fit
    assert citations(f"It ships in two days [3]. {result.text}", [REFUNDS, RESET, *result.added]) == [
        chat_pb2.Citation(number=3, knowledge_base="handbook", source="shipping.md", title="Shipping", position=0)
    ]


def test_a_chunk_the_turn_has_numbered_keeps_its_number_in_a_search_result(counter: TokenCounter) -> None:
    # The same chunk as found by another query: another score, the same passage.
    refunds_again = RetrievedChunk("handbook", REFUNDS.chunk, 0.4, 0.3, 0.2)

    result = search_result([SHIPPING, refunds_again], [REFUNDS, RESET], counter, MODEL, 1000)

    assert "[3] Shipping (shipping.md)" in result.text and "[1] Billing > Refunds (billing.md)" in result.text
    assert result.added == (SHIPPING,)
    # The same document and position in another knowledge base is another source.
    elsewhere = RetrievedChunk("other-handbook", REFUNDS.chunk, 1.0, 0.9, 1.0)
    assert search_result([elsewhere], [REFUNDS], counter, MODEL, 1000).added == (elsewhere,)


def test_a_search_result_says_when_nothing_was_found_or_nothing_fits(counter: TokenCounter) -> None:
    assert search_result([], [REFUNDS], counter, MODEL, 1000) == SearchResult(NOTHING_FOUND, ())
    assert search_result([LONG], [REFUNDS], counter, MODEL, 200) == SearchResult(NOTHING_FITS, ())
