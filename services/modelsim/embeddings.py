"""modelsim's embeddings (POST /v1/embeddings): deterministic vectors in which texts that share words come out
close, so that a semantic cache or a knowledge base can be tested without a real model.

A text's features are its words (NFKC, case-folded) and their character trigrams, and for Chinese, Japanese and
Korean runs (which have no spaces) their characters and character bigrams. Each feature adds its weight, with a
sign, to one dimension picked by a hash (the "hashing trick"); the vector is then scaled to length 1, so the dot
product of two vectors is their cosine similarity. Paraphrases that share most words score high; a text that
differs in one word still scores fairly high (as with real models: near-misses are a cache's problem to catch).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import unicodedata
from collections.abc import Iterator

# The embedding models modelsim serves, and their default (and largest) dimensions, as OpenAI's.
EMBEDDING_MODELS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
# Models whose `dimensions` may be lowered (OpenAI's v3 models).
SHORTENABLE = frozenset({"text-embedding-3-small", "text-embedding-3-large"})

_WORD_WEIGHT = 1.0
_TRIGRAM_WEIGHT = 0.25
_CJK_CHAR_WEIGHT = 0.5
_CJK_BIGRAM_WEIGHT = 1.0
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
# A CJK run, or a word of other letters and digits: "30天内" is the word "30" and the run "天内".
_TOKENS = re.compile(f"[{_CJK_RANGES}]+|[^\\W_{_CJK_RANGES}]+")
_CJK = re.compile(f"[{_CJK_RANGES}]")


def embed(text: str, dimensions: int) -> list[float]:
    """The text's vector: `dimensions` floats of length 1 (all zeros for a text without words)."""
    vector = [0.0] * dimensions
    for feature, weight in _features(text):
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        number = int.from_bytes(digest, "little")
        vector[number % dimensions] += weight if number >> 63 else -weight
    length = math.sqrt(sum(value * value for value in vector))
    return [value / length for value in vector] if length else vector


def as_base64(vector: list[float]) -> str:
    """The vector as OpenAI's `encoding_format: base64` sends it: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _features(text: str) -> Iterator[tuple[str, float]]:
    for token in _TOKENS.findall(unicodedata.normalize("NFKC", text).casefold()):
        if _CJK.match(token):
            yield from ((f"c:{character}", _CJK_CHAR_WEIGHT) for character in token)
            yield from ((f"b:{token[i : i + 2]}", _CJK_BIGRAM_WEIGHT) for i in range(len(token) - 1))
            continue
        yield f"w:{token}", _WORD_WEIGHT
        padded = f" {token} "
        yield from ((f"t:{padded[i : i + 3]}", _TRIGRAM_WEIGHT) for i in range(len(padded) - 2))
