"""A scope's question vectors in a cache process: the nearest above a threshold, bounded, and never confused by
rows that move."""

import numpy as np
import pytest

from chatmesh.cache.semantic import ScopeVectors

LATER = 2e9  # an expiry far in the future, in time.time() terms
NOW = 1e9


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def nearest(vectors: ScopeVectors, vector: np.ndarray, count: int = 4, threshold: float = 0.5) -> list[str]:
    return [key for key, _ in vectors.nearest(vector, vectors.scores(vector), count, threshold, NOW)]


def test_the_nearest_questions_above_the_threshold_come_best_first_with_their_similarity() -> None:
    vectors = ScopeVectors(max_entries=10)
    vectors.add("close", unit(1, 0.1, 0), LATER)
    vectors.add("closest", unit(1, 0, 0), LATER)
    vectors.add("far", unit(0, 1, 0), LATER)

    found = vectors.nearest(unit(1, 0, 0), vectors.scores(unit(1, 0, 0)), 4, 0.9, NOW)

    assert [key for key, _ in found] == ["closest", "close"]
    assert found[0][1] == pytest.approx(1.0)
    assert found[1][1] == pytest.approx(float(unit(1, 0.1, 0) @ unit(1, 0, 0)))


def test_at_most_count_candidates_are_returned() -> None:
    vectors = ScopeVectors(max_entries=100)
    for n in range(50):
        vectors.add(f"q{n}", unit(1, n / 1000, 0), LATER)

    assert nearest(vectors, unit(1, 0, 0), count=3) == ["q0", "q1", "q2"]


def test_an_empty_scope_has_no_candidates() -> None:
    assert nearest(ScopeVectors(max_entries=10), unit(1, 0)) == []


def test_a_full_scope_lets_the_question_that_expires_first_go() -> None:
    vectors = ScopeVectors(max_entries=2)
    vectors.add("first", unit(1, 0), LATER + 1)
    vectors.add("soonest", unit(1, 0.01), LATER)
    vectors.add("third", unit(1, 0.02), LATER + 2)

    assert len(vectors) == 2
    assert "soonest" not in vectors
    assert set(nearest(vectors, unit(1, 0))) == {"first", "third"}


def test_adding_a_question_again_replaces_its_vector() -> None:
    vectors = ScopeVectors(max_entries=10)
    vectors.add("q", unit(1, 0), LATER)
    vectors.add("q", unit(0, 1), LATER)

    assert len(vectors) == 1
    assert nearest(vectors, unit(0, 1)) == ["q"]
    assert nearest(vectors, unit(1, 0)) == []


def test_a_discarded_question_is_never_found_and_the_others_still_are() -> None:
    vectors = ScopeVectors(max_entries=10)
    for key, vector in (("a", unit(1, 0, 0)), ("b", unit(0, 1, 0)), ("c", unit(0, 0, 1))):
        vectors.add(key, vector, LATER)

    vectors.discard("a")  # the last row moves into its place
    vectors.discard("missing")

    assert nearest(vectors, unit(1, 0, 0)) == []
    assert nearest(vectors, unit(0, 0, 1)) == ["c"]
    assert nearest(vectors, unit(0, 1, 0)) == ["b"]


def test_an_expired_question_is_dropped_when_found() -> None:
    vectors = ScopeVectors(max_entries=10)
    vectors.add("expired", unit(1, 0), NOW - 1)

    assert nearest(vectors, unit(1, 0)) == []
    assert "expired" not in vectors


def test_scores_computed_before_rows_moved_never_pass_one_question_off_as_another() -> None:
    """A search that ran off the event loop may come back after rows moved: each candidate's similarity is
    computed again from its current row."""
    vectors = ScopeVectors(max_entries=10)
    vectors.add("gone", unit(1, 0, 0), LATER)
    vectors.add("other", unit(0, 1, 0), LATER)
    query = unit(1, 0, 0)
    scores = vectors.scores(query)

    vectors.discard("gone")  # "other" now sits in the row that scored 1.0

    assert vectors.nearest(query, scores, 4, 0.5, NOW) == []


def test_vectors_of_another_length_are_refused() -> None:
    vectors = ScopeVectors(max_entries=10)
    assert vectors.accepts(unit(1, 0, 0))
    vectors.add("q", unit(1, 0, 0), LATER)

    assert not vectors.accepts(unit(1, 0))
    with pytest.raises(ValueError, match="dimensions"):
        vectors.add("r", unit(1, 0), LATER)


def test_the_matrix_grows_with_the_questions_up_to_the_bound() -> None:
    vectors = ScopeVectors(max_entries=1000)
    for n in range(300):
        vectors.add(f"q{n}", unit(1, n, 0), LATER)

    assert len(vectors) == 300
    assert vectors.nbytes < 1000 * (3 * 4 + 8)
    assert nearest(vectors, unit(1, 299, 0), count=1, threshold=0.999) == ["q299"]
