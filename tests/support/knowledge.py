"""The knowledge-base tests' corpus and questions (tests/data/knowledge), modelsim's embeddings as an async `embed`,
and a PDF made on the spot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from chatmesh.dialogue.knowledge.chunking import ChunkSettings
from chatmesh.modelsim.embeddings import embed as simulated_embedding

DATA = Path(__file__).resolve().parent.parent / "data" / "knowledge"
CORPUS = DATA / "corpus"
QUESTIONS = DATA / "questions.yaml"

EMBEDDING_MODEL = "text-embedding-3-small"
# The embedding size of CHATMESH_EMBEDDING_DIMENSIONS' default.
DIMENSIONS = 256
# Small enough that every section of the corpus is one chunk (a plain-text file, several).
CORPUS_CHUNKS = ChunkSettings(chunk_tokens=120, overlap_tokens=20)


@dataclass(frozen=True, slots=True)
class Question:
    question: str
    source: str
    title: str
    contains: str = ""  # for a plain-text document, whose chunks share one title

    def answered_by(self, source: str, title: str, text: str) -> bool:
        return source == self.source and title == self.title and self.contains in text


def questions(language: str) -> list[Question]:
    """The questions written for the corpus in `language` ("english" or "chinese")."""
    return [Question(**fields) for fields in yaml.safe_load(QUESTIONS.read_text(encoding="utf-8"))[language]]


async def embed(texts: list[str]) -> list[np.ndarray]:
    """modelsim's deterministic embeddings of `texts`, at DIMENSIONS."""
    return [np.asarray(simulated_embedding(text, DIMENSIONS), dtype=np.float32) for text in texts]


class CountingEmbed:
    """`embed`, remembering every text it was asked for."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, texts: list[str]) -> list[np.ndarray]:
        self.texts += texts
        return await embed(texts)


def pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A PDF with one page per item of `pages`, each line of it drawn in Helvetica, and `title` in its metadata."""
    fonts = "<< /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    page_numbers = []
    for lines in pages:
        drawn = " ".join(f"1 0 0 1 72 {720 - 16 * index} Tm ({line}) Tj" for index, line in enumerate(lines))
        content = f"BT /F1 12 Tf {drawn} ET".encode("latin-1")
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content.decode('latin-1')}\nendstream")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources {fonts} /Contents {len(objects)} 0 R >>"
        )
        page_numbers.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{n} 0 R' for n in page_numbers)}] /Count {len(pages)} >>"
    trailer_info = ""
    if title is not None:
        objects.append(f"<< /Title ({title}) >>")
        trailer_info = f" /Info {len(objects)} 0 R"
    output = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(output))
        output += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(output)
    output += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    output += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    output += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{trailer_info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(output)
