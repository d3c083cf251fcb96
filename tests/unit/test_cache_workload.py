"""The workload of `make bench-cache` (bench/cache_workload.yaml) is well formed, and its request sequence is what
bench/cache.py reports on."""

import re
import sys
from collections import Counter
from pathlib import Path

import pytest

# bench/ is the repository's, not the installed package's.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.cache_workload import (
    FAQ,
    NEAR_MISS,
    NEAR_MISS_ASKINGS,
    UNRELATED,
    Workload,
    load_workload,
    normalized_question,
    request_sequence,
)

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def workload() -> Workload:
    return load_workload()


def in_language(text: str, language: str) -> bool:
    """English has no Chinese characters; Chinese is mostly Chinese characters."""
    letters = [character for character in text if character.isalnum()]
    chinese = sum(bool(_CJK.match(character)) for character in letters)
    return chinese == 0 if language == "en" else chinese >= len(letters) / 2


def shared_share(text: str, other: str, language: str) -> float:
    """The share of `text`'s words (characters in Chinese) that `other` has too."""
    if language == "zh":
        units, others = set(normalized_question(text)), set(normalized_question(other))
    else:
        units, others = set(re.findall(r"\w+", text.casefold())), set(re.findall(r"\w+", other.casefold()))
    return len(units & others) / len(units)


def test_about_forty_faq_intents_half_english_half_chinese_each_asked_five_to_eight_ways(workload: Workload) -> None:
    faqs = workload.of_kind(FAQ)

    assert 36 <= len(faqs) <= 48
    assert Counter(intent.language for intent in faqs) == {"en": len(faqs) // 2, "zh": len(faqs) // 2}
    for intent in faqs:
        assert 5 <= len(intent.questions) <= 9, intent.id
        assert intent.id.startswith(f"{intent.language}."), intent.id


def test_every_question_and_variant_is_in_its_intents_language(workload: Workload) -> None:
    for intent in workload.intents:
        for text, _ in workload.forms(intent):
            assert in_language(text, intent.language), (intent.id, text)


def test_at_least_sixty_near_misses_each_resembling_an_faq_intent_of_its_language_in_most_words(
    workload: Workload,
) -> None:
    near_misses = workload.of_kind(NEAR_MISS)
    faqs = {intent.id: intent for intent in workload.of_kind(FAQ)}

    assert len(near_misses) >= 60
    assert {intent.language for intent in near_misses} == {"en", "zh"}
    assert {intent.differs_by for intent in near_misses} >= {"ocean", "product", "plan", "negation", "number"}
    for near_miss in near_misses:
        assert near_miss.resembles in faqs, near_miss.id
        resembled = faqs[near_miss.resembles]
        assert resembled.language == near_miss.language, near_miss.id
        (question,) = near_miss.questions
        assert max(shared_share(question, other, near_miss.language) for other in resembled.questions) >= 0.5, (
            near_miss.id
        )


def test_no_text_a_request_may_send_belongs_to_two_intents(workload: Workload) -> None:
    owners: dict[str, set[str]] = {}
    for intent in workload.intents:
        for text, _ in workload.forms(intent):
            owners.setdefault(normalized_question(text), set()).add(intent.id)

    assert {text: ids for text, ids in owners.items() if len(ids) > 1} == {}


def test_unrelated_questions_are_one_offs_in_both_languages(workload: Workload) -> None:
    unrelated = workload.of_kind(UNRELATED)

    assert Counter(intent.language for intent in unrelated) == {"en": 50, "zh": 50}
    assert all(len(intent.questions) == 1 for intent in unrelated)


def test_the_sequence_is_fixed_by_its_seed_and_asks_near_misses_twice_and_unrelated_questions_once(
    workload: Workload,
) -> None:
    sequence = request_sequence(workload, 1000, seed=17, zipf_exponent=1.0)

    assert len(sequence) == 1000
    assert [request.text for request in sequence] == [
        request.text for request in request_sequence(workload, 1000, seed=17, zipf_exponent=1.0)
    ]
    asked = Counter(request.intent.id for request in sequence)
    assert all(asked[intent.id] == NEAR_MISS_ASKINGS for intent in workload.of_kind(NEAR_MISS))
    assert all(asked[intent.id] == 1 for intent in workload.of_kind(UNRELATED))
    for request in sequence:
        assert request.question in request.intent.questions
        assert (request.text, request.question) in workload.forms(request.intent)
    # Zipf within each language: its most asked FAQ intent is asked far more often than its least; the two
    # languages about equally often.
    faq_requests = [request for request in sequence if request.intent.kind == FAQ]
    for language in ("en", "zh"):
        counts = sorted(asked[intent.id] for intent in workload.of_kind(FAQ) if intent.language == language)
        assert counts[-1] > 10 * max(counts[0], 1)
        share = sum(request.intent.language == language for request in faq_requests) / len(faq_requests)
        assert 0.4 <= share <= 0.6


def test_a_sequence_too_short_for_the_near_misses_and_unrelated_questions_is_refused(workload: Workload) -> None:
    with pytest.raises(ValueError, match="requests are needed"):
        request_sequence(workload, 100, seed=17, zipf_exponent=1.0)
