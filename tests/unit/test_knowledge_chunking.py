"""Sections into chunks: never across headings, paragraphs whole where they fit, at most the target in tokens, with
an overlap of whole sentences, counted with the project's tokenizer."""

import itertools

import pytest
from support.knowledge import CORPUS, CORPUS_CHUNKS

from chatmesh.dialogue.knowledge.chunking import Chunk, ChunkSettings, chunk_document
from chatmesh.dialogue.knowledge.documents import ParsedDocument, Section, parse_document, read_documents
from chatmesh.dialogue.tokens import TokenCounter

MODEL = "text-embedding-3-small"


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def sentences(count: int, word: str) -> str:
    return " ".join(f"Sentence {number} is about {word} and nothing else at all." for number in range(count))


def chunks_of(sections: list[Section], settings: ChunkSettings, counter: TokenCounter) -> list[Chunk]:
    return chunk_document(ParsedDocument("Doc", tuple(sections)), "docs/a.md", settings, counter)


def test_short_sections_are_one_chunk_each_numbered_in_reading_order(counter: TokenCounter) -> None:
    chunks = chunks_of(
        [Section("Doc > Install", ("Run the installer.", "Sign in.")), Section("Doc > Refunds", ("Within 14 days.",))],
        ChunkSettings(),
        counter,
    )
    assert chunks == [
        Chunk(
            "docs/a.md",
            "Doc > Install",
            0,
            "Run the installer.\n\nSign in.",
            counter.count_text(MODEL, "Run the installer.\n\nSign in."),
        ),
        Chunk("docs/a.md", "Doc > Refunds", 1, "Within 14 days.", counter.count_text(MODEL, "Within 14 days.")),
    ]
    assert chunks[1].id == "docs/a.md#1"
    assert chunks[1].indexed_text == "Doc > Refunds\nWithin 14 days."


def test_paragraphs_stay_whole_when_they_fit_and_chunks_stay_within_the_target(counter: TokenCounter) -> None:
    paragraphs = tuple(sentences(3, f"topic{number}") for number in range(6))  # about 40 tokens each
    settings = ChunkSettings(chunk_tokens=100, overlap_tokens=0)
    chunks = chunks_of([Section("Doc", paragraphs)], settings, counter)
    assert len(chunks) == 3
    assert [chunk.text.split("\n\n") for chunk in chunks] == [
        list(paragraphs[0:2]),
        list(paragraphs[2:4]),
        list(paragraphs[4:6]),
    ]
    assert all(chunk.tokens <= 100 for chunk in chunks)


def test_a_long_paragraph_is_split_between_sentences_with_an_overlap_of_whole_sentences(counter: TokenCounter) -> None:
    paragraph = sentences(30, "refunds")
    settings = ChunkSettings(chunk_tokens=80, overlap_tokens=30)
    chunks = chunks_of([Section("Doc > Refunds", (paragraph,))], settings, counter)
    assert len(chunks) > 3
    for before, after in itertools.pairwise(chunks):
        assert after.tokens <= 80
        # The overlap: the last whole sentences of the chunk before, at most 30 tokens of them.
        starts = [index + 2 for index in range(len(before.text)) if before.text.startswith(". ", index)]
        overlap = next(before.text[start:] for start in starts if after.text.startswith(before.text[start:]))
        assert 0 < counter.count_text(MODEL, overlap) <= 30
    assert all(chunk.text.endswith(".") for chunk in chunks)  # cut between sentences only
    # Nothing is lost: every sentence is in some chunk.
    assert all(sentence in " ".join(chunk.text for chunk in chunks) for sentence in paragraph.split(". "))


def test_chinese_is_split_after_its_sentence_ends_and_overlong_sentences_anywhere(counter: TokenCounter) -> None:
    paragraph = "年付套餐在购买后七天内可以申请全额退款。" * 12 + "没有标点的很长的句子" * 30
    chunks = chunks_of([Section("退款", (paragraph,))], ChunkSettings(chunk_tokens=60, overlap_tokens=10), counter)
    assert all(chunk.tokens <= 60 for chunk in chunks)
    assert chunks[0].text.endswith("。")
    assert chunks[-1].text.endswith("句子")
    assert " " not in "".join(chunk.text for chunk in chunks)  # Chinese sentences are joined without spaces


def test_chunks_never_span_two_sections_and_overlap_stays_within_a_section(counter: TokenCounter) -> None:
    chunks = chunks_of(
        [Section("Doc > A", (sentences(8, "alpha"),)), Section("Doc > B", (sentences(8, "beta"),))],
        ChunkSettings(chunk_tokens=50, overlap_tokens=15),
        counter,
    )
    assert {chunk.title for chunk in chunks} == {"Doc > A", "Doc > B"}
    assert all(("alpha" in chunk.text) == (chunk.title == "Doc > A") for chunk in chunks)
    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize(
    ("chunk_tokens", "overlap_tokens", "error"),
    [(16, 0, "at least 32"), (100, 50, "less than half"), (100, -1, "less than half")],
)
def test_settings_are_checked(chunk_tokens: int, overlap_tokens: int, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ChunkSettings(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)


def test_the_corpus_chunks_within_the_target_one_chunk_per_section_of_a_structured_document(
    counter: TokenCounter,
) -> None:
    total = 0
    for document in read_documents(CORPUS):
        parsed = parse_document(document)
        chunks = chunk_document(parsed, document.path, CORPUS_CHUNKS, counter)
        assert all(0 < chunk.tokens <= CORPUS_CHUNKS.chunk_tokens for chunk in chunks), document.path
        if not document.path.endswith(".txt"):
            assert [chunk.title for chunk in chunks] == [section.title for section in parsed.sections]
        total += len(chunks)
    assert 30 <= total <= 60
