"""A turn grounded in knowledge bases: the retrieved chunks as numbered sources in the window, and the citations a
reply makes of them.

The sources are one system message after the system prompt, best first, each headed `[n] title (source)`, with an
instruction to answer from them and cite them by number. As many as fit the turn's room for them go in (see
`sources_message`). A reply cites a source by writing its number in square brackets; `citations` reads them back,
so `Completed.citations` lists what the reply used, not everything it was given.
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
        chunk = retrieved.chunk
        part = f"[{len(used) + 1}] {chunk.title} ({chunk.source})\n{chunk.text}"
        cost = counter.count_text(model, "\n\n" + part)
        if tokens + cost > room_tokens:
            continue
        parts.append(part)
        used.append(retrieved)
        tokens += cost
    if not used:
        return None
    return Sources({"role": "system", "content": "\n\n".join(parts)}, tokens, tuple(used))


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
