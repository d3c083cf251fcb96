"""Conversation ids that name their home region."""

import pytest

from chatmesh.runtime import regions

HEX = "0123456789abcdef0123456789abcdef"


def test_new_ids_carry_the_region_when_there_is_one() -> None:
    assert regions.conversation_id("eu-west", HEX) == f"eu-west.{HEX}"
    assert regions.conversation_id("", HEX) == HEX


@pytest.mark.parametrize(
    ("conversation_id", "home"),
    [
        (f"eu-west.{HEX}", "eu-west"),
        (f"apac.{HEX}", "apac"),
        (HEX, None),  # made without a region
        (f"eu-west.{HEX[:-1]}", None),  # not an id chatmesh made
        (f"EU.{HEX}", None),
        (f"eu-.{HEX}", None),
        (f"eu-west.{HEX}.x", None),
    ],
)
def test_the_home_region_is_read_only_from_ids_chatmesh_makes(conversation_id: str, home: str | None) -> None:
    assert regions.home_region(conversation_id) == home


def test_only_a_region_installs_refuse_other_regions_ids() -> None:
    assert regions.foreign_home(f"us-east.{HEX}", "eu-west") == "us-east"
    assert regions.foreign_home(f"eu-west.{HEX}", "eu-west") is None
    assert regions.foreign_home(HEX, "eu-west") is None
    # An install without a region serves whatever id it is given (and finds it or not).
    assert regions.foreign_home(f"us-east.{HEX}", "") is None
