"""The workload of `make bench-cache` (bench/cache_workload.yaml) and the sequence of requests drawn from it.

Every question belongs to one intent: an FAQ intent (several ways of asking one thing), a near-miss (a question
that shares most words with an FAQ question but asks something else) or an unrelated one-off question. A reply
answers a request rightly only when it was made for a question of the request's own intent.

The sequence (`request_sequence`) is fixed by its seed: FAQ intents drawn by a Zipf law over a seeded popularity
order within each language, English and Chinese equally often, each as one of its questions picked uniformly; every
near-miss asked twice and every unrelated question once, at seeded positions. A share of the intents' and
near-misses' requests are sent as a variant of their question (a greeting, thanks, no question mark, lower case), as
users type them.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

WORKLOAD_PATH = Path(__file__).with_name("cache_workload.yaml")
LANGUAGES = ("en", "zh")
FAQ, NEAR_MISS, UNRELATED = "faq", "near_miss", "unrelated"
# How often each near-miss is asked: its second asking may be answered by its own first answer.
NEAR_MISS_ASKINGS = 2
_QUESTION_MARKS = "?？"  # noqa: RUF001


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    language: str
    kind: str  # FAQ, NEAR_MISS or UNRELATED
    questions: tuple[str, ...]  # the first is the canonical one
    # For a near-miss: the FAQ intent it resembles, and what sets it apart (ocean, number, negation, ...).
    resembles: str | None = None
    differs_by: str | None = None


@dataclass(frozen=True, slots=True)
class VariantRules:
    """How users of one language type a question besides as written."""

    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    lowercase: bool
    drop_question_mark: bool

    def variants(self, question: str) -> list[str]:
        """Every variant of `question` that differs from it, in a fixed order."""
        forms = [prefix + question for prefix in self.prefixes] + [question + suffix for suffix in self.suffixes]
        if self.lowercase:
            forms.append(question.lower())
        if self.drop_question_mark:
            forms.append(question.rstrip(_QUESTION_MARKS))
        return [form for form in dict.fromkeys(forms) if form != question]


@dataclass(frozen=True, slots=True)
class Workload:
    system_prompt: str
    intents: tuple[Intent, ...]
    # The share of the intents' and near-misses' requests sent as a variant.
    variant_share: float
    variant_rules: dict[str, VariantRules]

    def of_kind(self, kind: str) -> list[Intent]:
        return [intent for intent in self.intents if intent.kind == kind]

    def intent(self, intent_id: str) -> Intent:
        return next(intent for intent in self.intents if intent.id == intent_id)

    def forms(self, intent: Intent) -> list[tuple[str, str]]:
        """(text, question) for every text a request of `intent` may send: its questions and, but for unrelated
        questions, their variants."""
        forms = []
        for question in intent.questions:
            forms.append((question, question))
            if intent.kind != UNRELATED:
                forms += [(variant, question) for variant in self.variant_rules[intent.language].variants(question)]
        return forms


@dataclass(frozen=True, slots=True)
class Request:
    intent: Intent
    text: str  # what is sent
    question: str  # the workload's question it is (a variant of)


def load_workload(path: Path = WORKLOAD_PATH) -> Workload:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    variants = data["variants"]
    intents = [Intent(entry["id"], entry["language"], FAQ, tuple(entry["questions"])) for entry in data["intents"]]
    intents += [
        Intent(entry["id"], entry["language"], NEAR_MISS, (entry["question"],), entry["resembles"], entry["kind"])
        for entry in data["near_misses"]
    ]
    intents += [
        Intent(f"unrelated.{language}.{number:02d}", language, UNRELATED, (question,))
        for language, questions in data["unrelated"].items()
        for number, question in enumerate(questions, 1)
    ]
    return Workload(
        system_prompt=data["system_prompt"],
        intents=tuple(intents),
        variant_share=float(variants["share"]),
        variant_rules={
            language: VariantRules(
                tuple(variants[language]["prefixes"]),
                tuple(variants[language]["suffixes"]),
                bool(variants[language]["lowercase"]),
                bool(variants[language]["drop_question_mark"]),
            )
            for language in LANGUAGES
        },
    )


def normalized_question(text: str) -> str:
    """A question as two askings of it compare alike: NFKC, case-folded, without punctuation or spaces."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(character for character in folded if character.isalnum())


def request_sequence(workload: Workload, count: int, seed: int, zipf_exponent: float) -> list[Request]:
    """`count` requests as the module's docstring says. `count` must leave room for the near-misses and the
    unrelated questions, and at least one FAQ request."""
    rng = np.random.default_rng(seed)
    faqs = workload.of_kind(FAQ)
    near_misses = workload.of_kind(NEAR_MISS) * NEAR_MISS_ASKINGS
    unrelated = workload.of_kind(UNRELATED)
    faq_count = count - len(near_misses) - len(unrelated)
    if faq_count < 1:
        raise ValueError(f"at least {len(near_misses) + len(unrelated) + 1} requests are needed, not {count}")
    # Each language's intents by seeded popularity, Zipf-weighted by rank; the two languages equally often.
    popularity: list[Intent] = []
    weights: list[float] = []
    for language in LANGUAGES:
        group = [intent for intent in faqs if intent.language == language]
        ranked = 1.0 / np.arange(1, len(group) + 1) ** zipf_exponent
        popularity += [group[index] for index in rng.permutation(len(group))]
        weights += list(ranked / ranked.sum() / len(LANGUAGES))
    drawn = [popularity[index] for index in rng.choice(len(popularity), size=faq_count, p=weights)]
    intents = drawn + near_misses + unrelated
    requests = []
    for index in rng.permutation(len(intents)):
        intent = intents[index]
        question = intent.questions[rng.integers(len(intent.questions))]
        text = question
        if intent.kind != UNRELATED and rng.random() < workload.variant_share:
            variants = workload.variant_rules[intent.language].variants(question)
            text = variants[rng.integers(len(variants))]
        requests.append(Request(intent, text, question))
    return requests


def similarity_census(
    workload: Workload,
    embed: Callable[[str], np.ndarray],
    guard: Callable[[str, str], str | None],
    thresholds: list[float],
) -> dict[str, Any]:
    """How the workload's questions stand to each other under an embedding (unit vectors) and the cache's guards
    (`guard(asked, cached)`: the name of the guard that refuses, or None):

    - near-misses: for each, the closest pair of a text it may be sent as and one of the intent it resembles (a
      question or a variant), and the closest pair that no guard refuses: at or above the threshold, such a pair is a
      wrong hit waiting for its turn in the sequence;
    - variants: each one's similarity to its question, which a semantic hit needs;
    - paraphrases: each question's closest other question of the same intent."""
    vectors: dict[str, np.ndarray] = {}

    def vector(text: str) -> np.ndarray:
        if text not in vectors:
            vectors[text] = embed(text)
        return vectors[text]

    near_misses = []
    for near_miss in workload.of_kind(NEAR_MISS):
        pairs = sorted(
            (
                (float(vector(asked) @ vector(cached)), asked, cached)
                for asked, _ in workload.forms(near_miss)
                for cached, _ in workload.forms(workload.intent(near_miss.resembles or ""))
            ),
            reverse=True,
        )
        unguarded = next(((sim, asked, cached) for sim, asked, cached in pairs if guard(asked, cached) is None), None)
        near_misses.append(
            {
                "near_miss": near_miss.id,
                "differs_by": near_miss.differs_by,
                "closest": {"asked": pairs[0][1], "cached": pairs[0][2], "similarity": round(pairs[0][0], 4)},
                "closest_unguarded": None
                if unguarded is None
                else {"asked": unguarded[1], "cached": unguarded[2], "similarity": round(unguarded[0], 4)},
            }
        )
    near_misses.sort(key=lambda entry: -entry["closest"]["similarity"])
    variants, paraphrases = [], []
    for intent in workload.of_kind(FAQ):
        for text, question in workload.forms(intent):
            if text != question:
                variants.append(float(vector(text) @ vector(question)))
        for question in intent.questions:
            paraphrases.append(
                max(float(vector(question) @ vector(other)) for other in intent.questions if other != question)
            )

    def above(values: list[float]) -> dict[str, int]:
        return {f"{threshold:g}": sum(value >= threshold for value in values) for threshold in thresholds}

    return {
        "near_misses": {
            "count": len(near_misses),
            "at_or_above": above([entry["closest"]["similarity"] for entry in near_misses]),
            "unguarded_at_or_above": above(
                [entry["closest_unguarded"]["similarity"] for entry in near_misses if entry["closest_unguarded"]]
            ),
            "pairs": near_misses,
        },
        "variants": {"count": len(variants), "at_or_above": above(variants)},
        "paraphrases": {"count": len(paraphrases), "at_or_above": above(paraphrases)},
    }
