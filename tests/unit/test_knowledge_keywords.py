"""The keyword index: English words stemmed without stop words, Chinese as character bigrams, scored with BM25."""

# Full-width forms are part of what is tested.
# ruff: noqa: RUF001

import math

import numpy as np
import pytest

from chatmesh.dialogue.knowledge.keywords import K1, B, KeywordIndex, term_counts, terms


def test_english_words_are_case_folded_and_stemmed_and_stop_words_dropped() -> None:
    assert term_counts("The REFUNDS were refunded, and the refund is in the account.") == {
        "refund": 3,
        "were": 1,
        "account": 1,
    }


def test_chinese_runs_become_character_bigrams_and_a_lone_character_a_term() -> None:
    assert term_counts("退款政策：钱") == {"退款": 1, "款政": 1, "政策": 1, "钱": 1}


def test_full_width_and_mixed_text_are_normalized() -> None:
    assert sorted(terms("ＫＥＳＴＲＥＬ 同步 E102")) == sorted(["kestrel", "同步", "e102"])


def test_bm25_scores_match_the_formula() -> None:
    texts = ["refund policy refund", "invoice policy", "proxy settings"]
    index = KeywordIndex(texts)
    scores = index.scores("refund")
    average_length = (3 + 2 + 2) / 3
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 2 * (K1 + 1) / (2 + K1 * (1 - B + B * 3 / average_length))
    assert scores[0] == pytest.approx(expected, rel=1e-5)
    assert scores[1] == scores[2] == 0


def test_a_rare_term_weighs_more_than_a_common_one_and_repeats_in_the_query_count_once() -> None:
    index = KeywordIndex(["sync error E301", "sync paused", "sync folder", "sync logs"])
    assert index.scores("E301")[0] > index.scores("sync")[0] > 0
    np.testing.assert_array_equal(index.scores("sync sync sync"), index.scores("sync"))


def test_chinese_questions_match_by_shared_bigrams() -> None:
    index = KeywordIndex(["年付套餐在七天内可以申请全额退款。", "支持支付宝和微信支付。", "开启两步验证。"])
    assert int(np.argmax(index.scores("年付套餐能退款吗？"))) == 0
    assert int(np.argmax(index.scores("可以用微信付款吗"))) == 1


def test_an_empty_index_and_an_unmatched_query_score_zero() -> None:
    assert KeywordIndex([]).scores("anything").shape == (0,)
    np.testing.assert_array_equal(KeywordIndex(["a text", ""]).scores("nothing here"), [0, 0])
