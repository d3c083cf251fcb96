"""The keyword half of retrieval: BM25 over a knowledge base's chunks, for English and Chinese text.

**Terms.** Text is NFKC-normalized and case-folded, then cut into runs of letters and digits and runs of CJK
characters (Han, kana, Hangul):
- An English (or any space-separated) word is a term after Lucene's English stop words are dropped and the
  Snowball English (Porter2) stemmer has run ("refunds", "refunded" → "refund"), through snowballstemmer, the
  Snowball project's own pure-Python build; each distinct word is stemmed once per process.
- A CJK run is cut into overlapping character bigrams ("退款政策" → 退款, 款政, 政策); a run of one character
  is that character. This is the CJK analyzer of Lucene and Elasticsearch (CJKBigramFilter). Why bigrams: Chinese
  has no spaces, and a word segmenter such as jieba needs a dictionary (about 150 MB of memory per process) and
  still cuts a product's own names and new words wrongly, and a question cut differently from the document
  matches nothing. Bigrams need no dictionary and cannot be cut wrongly: every two-character word (the most common
  length in Chinese) is a bigram, a longer word is a run of them, and the bigrams that straddle two words are
  noise that idf weighs low where it is common. The costs: more terms per text, and a one-character word ("钱")
  matches only where it stands alone.

**Scores.** Okapi BM25 with k1 = 1.2 and b = 0.75 (Lucene's defaults) and Lucene's idf,
ln(1 + (N - df + 0.5) / (df + 0.5)), which is never negative. Each term's whole weight in each chunk is computed
when the index is built, so a query adds up one slice of an array per term: about 50 µs for a 10-word question
over 5,000 chunks here. Building the index for 5,000 chunks of 200 words takes about a second of CPU.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

K1 = 1.2
B = 0.75
# Lucene's EnglishAnalyzer stop words (ENGLISH_STOP_WORDS_SET).
ENGLISH_STOP_WORDS = frozenset(
    (
        *("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no"),
        *("not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to"),
        *("was", "will", "with"),
    )
)
_CJK_CLASS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_RUNS = re.compile(f"[{_CJK_CLASS}]+")
_WORDS = re.compile(f"[^\\W_{_CJK_CLASS}]+")
# A stemmer keeps its state between calls: one per thread.
_STEMMERS = threading.local()
# Word -> its term ("" for a stop word).
_STEMS: dict[str, str] = dict.fromkeys(ENGLISH_STOP_WORDS, "")
# Beyond this many distinct words, stems are computed without being remembered (a bound on memory).
_MAX_REMEMBERED_STEMS = 200_000


def _stem(word: str) -> str:
    stemmer = getattr(_STEMMERS, "english", None)
    if stemmer is None:
        # Loaded on a process's first keyword search or ingest, not at start: a turn without knowledge bases never
        # needs it (about 3 MiB).
        import snowballstemmer

        stemmer = _STEMMERS.english = snowballstemmer.stemmer("english")
    stem = stemmer.stemWord(word)
    if len(_STEMS) < _MAX_REMEMBERED_STEMS:
        _STEMS[word] = stem
    return stem


def term_counts(text: str) -> Counter[str]:
    """The text's terms, each with how often it occurs."""
    normalized = unicodedata.normalize("NFKC", text).casefold()
    counts: Counter[str] = Counter()
    for word, count in Counter(_WORDS.findall(normalized)).items():
        term = _STEMS.get(word)
        if term is None:
            term = _stem(word)
        if term:
            counts[term] += count
    for run in _CJK_RUNS.findall(normalized):
        if len(run) == 1:
            counts[run] += 1
        else:
            counts.update(run[index : index + 2] for index in range(len(run) - 1))
    return counts


def terms(text: str) -> list[str]:
    """The text's distinct terms."""
    return list(term_counts(text))


class KeywordIndex:
    """BM25 over a fixed list of texts (a knowledge base's chunks), numbered as given. Immutable once built;
    safe to query from any thread.

    The postings are two arrays sorted by term: the texts that hold each term, and the term's weight in each (all
    of BM25 but the idf, which is multiplied in too); a term's postings are one slice of them.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self._size = len(texts)
        self._term_ids: dict[str, int] = {}
        term_ids: list[int] = []
        frequencies: list[int] = []
        lengths = np.zeros(self._size, dtype=np.float32)
        counted: list[int] = []  # each text's distinct terms
        for number, text in enumerate(texts):
            counts = term_counts(text)
            term_ids += [self._term_ids.setdefault(term, len(self._term_ids)) for term in counts]
            frequencies += counts.values()
            lengths[number] = counts.total()
            counted.append(len(counts))
        text_numbers = np.repeat(np.arange(self._size, dtype=np.int32), counted)
        term_array = np.asarray(term_ids, dtype=np.int32)
        by_term = np.argsort(term_array, kind="stable")
        document_frequencies = np.bincount(term_array, minlength=len(self._term_ids))
        self._starts = np.concatenate(([0], np.cumsum(document_frequencies))).astype(np.int64)
        self._texts = text_numbers[by_term]
        tf = np.asarray(frequencies, dtype=np.float32)[by_term]
        average = float(lengths.mean()) if self._size and lengths.any() else 1.0
        norms = K1 * (1 - B + B * lengths / average)
        idf = np.log1p((self._size - document_frequencies + 0.5) / (document_frequencies + 0.5)).astype(np.float32)
        term_of_posting = np.repeat(np.arange(len(self._term_ids)), document_frequencies)
        self._weights = (idf[term_of_posting] * tf * (K1 + 1) / (tf + norms[self._texts])).astype(np.float32)

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """The bytes of its arrays (its dictionary of terms not counted)."""
        return self._texts.nbytes + self._weights.nbytes + self._starts.nbytes

    def scores(self, query: str) -> np.ndarray:
        """Every text's BM25 score for `query` (float32, 0 where no term matches). A term repeated in the query
        counts once."""
        return self.term_scores(terms(query))

    def term_scores(self, query_terms: Iterable[str]) -> np.ndarray:
        """`scores` for a query's terms (see `terms`); a term given more than once counts once."""
        scores = np.zeros(self._size, dtype=np.float32)
        for term in set(query_terms):
            term_id = self._term_ids.get(term)
            if term_id is not None:
                start, end = self._starts[term_id], self._starts[term_id + 1]
                scores[self._texts[start:end]] += self._weights[start:end]
        return scores
