"""Sections into chunks: the pieces of a knowledge base that are embedded, searched and put into the window.

- **Headings are hard boundaries.** A chunk never spans two sections, so its title (the heading path) says what
  all of it is about; a short section is a short chunk.
- **Paragraphs are kept whole where they fit.** A section's paragraphs are packed into chunks of at most
  `chunk_tokens` tokens. A paragraph that does not fit in what is left of the current chunk, but fits in an empty
  one, starts the next chunk. A paragraph longer than a whole chunk is split between its sentences (at line
  breaks, after `.`, `!` or `?` and a space, or after Chinese sentence ends: the ideographic full stop and the
  full-width exclamation mark, question mark and semicolon), and a sentence still too long at a space near the
  limit (or anywhere, in Chinese).
- **Overlap.** Each chunk after the first of a section starts with the last whole sentences of the chunk before
  it, up to `overlap_tokens` tokens, so that a passage cut in two can still be found by either half. A sentence
  longer than the overlap is not repeated.
- **Tokens** are counted with the project's TokenCounter in the encoding of `token_model` (the embedding model's:
  cl100k_base for OpenAI's). A chunk's `tokens` is its text's exact count; packing adds up its pieces' counts
  plus one per separator, which the exact count does not exceed in practice.

The defaults (300 tokens, 50 of overlap) keep several chunks within a window's budget for context while giving
each one a paragraph or three of meaning; OpenAI's file search uses 800 with 400 of overlap, for long documents
and larger windows. Chunks are embedded and indexed with their title in front (`indexed_text`), since a
heading often names what its paragraphs only allude to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from chatmesh.dialogue.knowledge.documents import ParsedDocument
from chatmesh.dialogue.tokens import TokenCounter

DEFAULT_CHUNK_TOKENS = 300
DEFAULT_OVERLAP_TOKENS = 50
DEFAULT_TOKEN_MODEL = "text-embedding-3-small"
# The smallest chunk size accepted: below it, headings and overlap would be most of every chunk.
MIN_CHUNK_TOKENS = 32

_PARAGRAPH = "\n\n"
_LINE = "\n"
# After . ! ? followed by whitespace, or after Chinese (full-width) sentence punctuation.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])(?=\S)")  # noqa: RUF001 (Chinese punctuation)


@dataclass(frozen=True, slots=True)
class ChunkSettings:
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
    # The model whose encoding counts the tokens (see chatmesh.dialogue.tokens).
    token_model: str = DEFAULT_TOKEN_MODEL

    def __post_init__(self) -> None:
        if self.chunk_tokens < MIN_CHUNK_TOKENS:
            raise ValueError(f"chunk_tokens is {self.chunk_tokens}; it must be at least {MIN_CHUNK_TOKENS}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise ValueError(
                f"overlap_tokens is {self.overlap_tokens}; it must be from 0 to less than half of chunk_tokens"
            )


@dataclass(frozen=True, slots=True)
class Chunk:
    source: str  # the document's path
    title: str  # the heading path of its section
    position: int  # its index among the document's chunks, from 0
    text: str
    tokens: int

    @property
    def id(self) -> str:
        """Unique in a knowledge base: `<source>#<position>`."""
        return f"{self.source}#{self.position}"

    @property
    def indexed_text(self) -> str:
        """What is embedded and keyword-indexed: the title, then the text."""
        return f"{self.title}\n{self.text}"


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    separator: str  # what joins it to the piece before it, within a chunk
    tokens: int


def chunk_document(
    document: ParsedDocument, source: str, settings: ChunkSettings, counter: TokenCounter
) -> list[Chunk]:
    """The document's chunks, numbered from 0 in reading order. CPU-bound: run it off the event loop."""

    def count(text: str) -> int:
        return counter.count_text(settings.token_model, text)

    chunks: list[Chunk] = []
    for section in document.sections:
        for pieces in _pack(section.paragraphs, settings, count):
            text = pieces[0].text + "".join(piece.separator + piece.text for piece in pieces[1:])
            chunks.append(Chunk(source, section.title, len(chunks), text, count(text)))
    return chunks


def _size(pieces: list[_Piece]) -> int:
    return sum(piece.tokens for piece in pieces) + len(pieces) - 1


def _pack(paragraphs: tuple[str, ...], settings: ChunkSettings, count: Callable[[str], int]) -> Iterator[list[_Piece]]:
    budget = settings.chunk_tokens
    current: list[_Piece] = []

    def next_chunk(following: int) -> list[_Piece]:
        """The overlap that starts the chunk after `current`: its last whole pieces (never all of them), within
        the overlap and leaving room for `following` tokens."""
        room = min(settings.overlap_tokens, budget - following - 1)
        tail: list[_Piece] = []
        for piece in reversed(current[1:]):
            if _size([piece, *tail]) > room:
                break
            tail.insert(0, piece)
        return tail

    for paragraph in paragraphs:
        pieces = list(_split(paragraph, budget, count))
        paragraph_tokens = _size(pieces)
        if paragraph_tokens <= budget:
            if current and _size(current) + 1 + paragraph_tokens > budget:
                yield current
                current = next_chunk(paragraph_tokens)
            current.extend(pieces)
            continue
        for piece in pieces:
            if current and _size(current) + 1 + piece.tokens > budget:
                yield current
                current = next_chunk(piece.tokens)
            current.append(piece)
    if current:
        yield current


def _split(paragraph: str, budget: int, count: Callable[[str], int]) -> Iterator[_Piece]:
    """A paragraph as pieces of at most `budget` tokens: its lines' sentences, and the parts of sentences too
    long for the budget."""
    lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
    for line_number, line in enumerate(lines):
        line_separator = _PARAGRAPH if line_number == 0 else _LINE
        for sentence, sentence_separator in _sentences(line):
            tokens = count(sentence)
            piece_separator = line_separator if sentence_separator is None else sentence_separator
            if tokens <= budget:
                yield _Piece(sentence, piece_separator, tokens)
            else:
                yield from _hard_split(sentence, piece_separator, budget, count)


def _sentences(line: str) -> Iterator[tuple[str, str | None]]:
    """The line's sentences, each with what separated it from the one before (None for the first)."""
    start = 0
    separator: str | None = None
    for end in _SENTENCE_END.finditer(line):
        yield line[start : end.start()], separator
        separator = " " if end.group() else ""
        start = end.end()
    yield line[start:], separator


def _hard_split(text: str, separator: str, budget: int, count: Callable[[str], int]) -> Iterator[_Piece]:
    """`text` cut into pieces of at most `budget` tokens: each the longest prefix that fits (found by bisection),
    cut back to its last space when that keeps at least half of it."""
    while text:
        low, high = 1, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            if count(text[:middle]) <= budget:
                low = middle
            else:
                high = middle - 1
        cut = low
        space = text.rfind(" ", 0, cut + 1) if cut < len(text) else -1
        if space > cut // 2:
            cut = space
        piece = text[:cut].rstrip()
        yield _Piece(piece, separator, count(piece))
        rest = text[cut:]
        separator = " " if rest[:1].isspace() else ""
        text = rest.lstrip()
