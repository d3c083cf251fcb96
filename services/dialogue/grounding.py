"""A turn grounded in knowledge bases: the retrieved chunks as numbered sources in the window, and the citations a
reply makes of them.

The sources are one system message after the system prompt, best first, each headed `[n] title (source)`, with an
instruction to answer from them and cite them by number. As many as fit the turn's room for them go in (see
`sources_message`). A reply cites a source by writing its number in square brackets; `citations` reads them back,
so `Completed.citations` lists what the reply used, not everything it was given.

The server-side tool `knowledge_search` gives the model more of them in its result (`search_result`), headed the
same way and numbered after those the turn has already: a chunk it has numbered keeps its number, so one passage
is one source however often it is found.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatmesh.dialogue.knowledge.retrieval import RetrievedChunk
from chatmesh.dialogue.tokens import TOKENS_PER_MESSAGE, TokenCounter
from chatmesh.v1 import chat_pb2

INSTRUCTION = (
    "Answer from the numbered sources below when they answer the question, and cite each source you use by its "
    "number in square brackets, such as [1]. If they do not answer it, say so rather than guess."
)
# Heads a knowledge_search result. No example number in it: a model that echoes it would cite that source.
SEARCH_INSTRUCTION = (
    "Passages of the knowledge bases that match the query, best first. Cite each one you use by its number in "
    "square brackets."
)
NOTHING_FOUND = "No passage of the knowledge bases matches the query."
NOTHING_FITS = "The passages that match the query are too long to be given here."
# [1], [2, 3] and [1][3]; not an index written against a word, as in item[1].
_CITED = re.compile(r"(?<!\w)\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


@dataclass(frozen=True, slots=True)
class Sources:
    """The system message of the sources that fit, its tokens, and the chunks it numbers (the first is [1])."""

    message: dict[str, Any]
    tokens: int
    chunks: tuple[RetrievedChunk, ...]


def sources_message(
    chunks: Sequence[RetrievedChunk], counter: TokenCounter, model: str, room_tokens: int
) -> Sources | None:
    """The sources message of the best `chunks` that fit in `room_tokens` (counted in `model`'s encoding); a chunk
    that does not fit is left out, and the next, smaller one may still go in. None when not one fits."""
    parts = [INSTRUCTION]
    used: list[RetrievedChunk] = []
    # The chat format's tokens around a system message, and the instruction's.
    tokens = TOKENS_PER_MESSAGE + counter.count_text(model, "system") + counter.count_text(model, INSTRUCTION)
    for retrieved in chunks:
        part = _source(len(used) + 1, retrieved)
        cost = counter.count_text(model, "\n\n" + part)
        if tokens + cost > room_tokens:
            continue
        parts.append(part)
        used.append(retrieved)
        tokens += cost
    if not used:
        return None
    return Sources({"role": "system", "content": "\n\n".join(parts)}, tokens, tuple(used))


@dataclass(frozen=True, slots=True)
class SearchResult:
    """A knowledge_search call's result for the model, and the chunks it numbered anew (after the turn's others)."""

    text: str
    added: tuple[RetrievedChunk, ...]


def search_result(
    chunks: Sequence[RetrievedChunk],
    numbered: Sequence[RetrievedChunk],
    counter: TokenCounter,
    model: str,
    room_tokens: int,
) -> SearchResult:
    """The best `chunks` that fit in `room_tokens` as numbered sources, after SEARCH_INSTRUCTION. `numbered` are the
    turn's sources so far ([1] first: the window's, then earlier calls'): a chunk among them keeps its number, and
    the others are numbered after them."""
    numbers = {_identity(retrieved): number for number, retrieved in enumerate(numbered, start=1)}
    parts = [SEARCH_INSTRUCTION]
    added: list[RetrievedChunk] = []
    tokens = counter.count_text(model, SEARCH_INSTRUCTION)
    for retrieved in chunks:
        number = numbers.get(_identity(retrieved), len(numbered) + len(added) + 1)
        part = _source(number, retrieved)
        cost = counter.count_text(model, "\n\n" + part)
        if tokens + cost > room_tokens:
            continue
        parts.append(part)
        if number > len(numbered) + len(added):
            added.append(retrieved)
        tokens += cost
    if len(parts) == 1:
        return SearchResult(NOTHING_FOUND if not chunks else NOTHING_FITS, ())
    return SearchResult("\n\n".join(parts), tuple(added))


def _source(number: int, retrieved: RetrievedChunk) -> str:
    chunk = retrieved.chunk
    return f"[{number}] {chunk.title} ({chunk.source})\n{chunk.text}"


def _identity(retrieved: RetrievedChunk) -> tuple[str, str]:
    return retrieved.knowledge_base, retrieved.chunk.id


def citations(text: str, sources: Sequence[RetrievedChunk]) -> list[chat_pb2.Citation]:
    """The sources `text` cites by number, each once, in the order of their numbers."""
    numbers = {
        int(number) for group in _CITED.findall(text) for number in group.split(",") if 1 <= int(number) <= len(sources)
    }
    return [
        chat_pb2.Citation(
            number=number,
            knowledge_base=sources[number - 1].knowledge_base,
            source=sources[number - 1].chunk.source,
            title=sources[number - 1].chunk.title,
            position=sources[number - 1].chunk.position,
        )
        for number in sorted(numbers)
    ]
