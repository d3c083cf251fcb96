"""Safety's review policy, policy versions, and the redacted excerpt a review case keeps."""

import pytest

from chatmesh.runtime.settings import SafetySettings
from chatmesh.safety.keywords import KeywordEntry, KeywordList
from chatmesh.safety.policy import PolicyVersion, ReviewPolicy
from chatmesh.safety.review import EXCERPT_CHARS, excerpt
from chatmesh.v1 import review_pb2

BLOCK_AND_REVIEW = review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW
ALLOW_AND_REVIEW = review_pb2.REVIEW_ACTION_ALLOW_AND_REVIEW
NO_REVIEW = review_pb2.REVIEW_ACTION_UNSPECIFIED
POLICY = ReviewPolicy({"fraud": "block_and_review", "spam": "allow_and_review", "rude": "allow_and_review"})


@pytest.mark.parametrize(
    ("categories", "blocked", "review"),
    [
        (["weapons"], True, NO_REVIEW),  # not named: blocks
        (["fraud"], True, BLOCK_AND_REVIEW),
        (["spam"], False, ALLOW_AND_REVIEW),
        (["rude", "spam"], False, ALLOW_AND_REVIEW),
        (["fraud", "spam"], True, BLOCK_AND_REVIEW),
        (["spam", "weapons"], True, NO_REVIEW),  # a text that is blocked anyway is not reviewed for what it let out
        (["fraud", "weapons"], True, BLOCK_AND_REVIEW),
        (["moderation_unavailable"], True, NO_REVIEW),
    ],
)
def test_a_verdict_is_decided_over_all_its_categories(categories: list[str], blocked: bool, review: int):
    decision = POLICY.decide(categories)

    assert (decision.blocked, decision.review) == (blocked, review)
    assert POLICY.passes(categories) is not blocked


def test_the_star_sets_the_default_but_a_failed_moderation_endpoint_still_blocks_unreviewed():
    policy = ReviewPolicy({"*": "allow_and_review", "fraud": "block"})

    assert policy.allows_any and policy.passes(["anything"])
    assert policy.decide(["fraud"]).review == NO_REVIEW
    assert policy.decide(["moderation_unavailable"]) == policy.decide(["fraud"])
    assert not ReviewPolicy({"fraud": "block_and_review"}).allows_any


def test_the_policy_version_changes_with_the_list_the_policy_and_the_moderation_settings_and_only_then():
    keywords = KeywordList([KeywordEntry("fruit", "forbidden fruit")])
    base = SafetySettings(review_policy={"fruit": "block_and_review"})
    version = PolicyVersion(base, moderation=True).of(keywords)

    assert len(version) == 16
    assert PolicyVersion(base, moderation=True).of(KeywordList([KeywordEntry("fruit", "FORBIDDEN fruit")])) == version
    changed = [
        PolicyVersion(base, moderation=True).of(KeywordList([KeywordEntry("fruit", "forbidden apple")])),
        PolicyVersion(base, moderation=False).of(keywords),
        PolicyVersion(SafetySettings(review_policy={"fruit": "block"}), moderation=True).of(keywords),
        PolicyVersion(base.model_copy(update={"safety_moderation_thresholds": {"hate": 0.5}}), True).of(keywords),
        PolicyVersion(base.model_copy(update={"safety_moderate_output": False}), True).of(keywords),
    ]
    assert version not in changed and len(set(changed)) == len(changed)
    # Moderation settings do not count while moderation is off.
    off = PolicyVersion(base.model_copy(update={"safety_moderation_thresholds": {"hate": 0.5}}), False).of(keywords)
    assert off == changed[1]


def test_an_excerpt_is_at_most_500_characters_centred_on_the_match():
    text = "a" * 2000 + "MATCH" + "b" * 2000
    start = text.index("MATCH")

    cut = excerpt(text, start, start + 5)

    assert len(cut) == EXCERPT_CHARS and "MATCH" in cut
    assert cut.index("MATCH") in range(240, 250)
    assert excerpt("short text", 0, 5) == "short text"
    assert excerpt("x" * 1000, 0, 0) == "x" * EXCERPT_CHARS  # no position (moderation): the beginning


def test_a_long_match_keeps_its_beginning():
    text = "intro " + "m" * 800

    assert excerpt(text, 6, len(text)) == "m" * EXCERPT_CHARS


def test_personal_information_is_replaced_and_the_match_is_kept_in_place():
    text = (
        "write to jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111, "
        "host 192.168.10.20, order 123456789 - the forbidden fruit - 身份证 11010519491231002X, "
        "odd@mail.internal"
    )
    start = text.index("forbidden fruit")

    cut = excerpt(text, start, start + len("forbidden fruit"))

    for secret in ("jane.doe", "7946", "4111", "192.168", "123456789", "11010519491231002X", "odd@mail"):
        assert secret not in cut
    for placeholder in ("[EMAIL]", "[PHONE]", "[PAYMENT_CARD]", "[IP_ADDRESS]", "[NUMBER]", "[CN_ID]"):
        assert placeholder in cut
    assert "- the forbidden fruit -" in cut


def test_personal_information_at_the_edge_of_the_excerpt_is_redacted_whole_before_it_is_cut():
    email = "someone.with.a.long.name@example.com"
    text = email + " " + "x" * 240 + " MATCH " + "y" * 300
    start = text.index("MATCH")

    cut = excerpt(text, start, start + 5)

    # Cut from "[EMAIL] xxx…": whatever is left of the placeholder, never a piece of the address.
    assert "MATCH" in cut and "example" not in cut and "someone" not in cut
    assert cut.lstrip("[EMAIL]").startswith(" xxx")
