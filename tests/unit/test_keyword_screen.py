"""KeywordScreen: normalization, word boundaries, the streamed screen's hold-back, and reloading."""

# Full-width letters and punctuation are what these tests are about.
# ruff: noqa: RUF001

import asyncio
import itertools
import logging
import os
import threading
from pathlib import Path

import pytest

from chatmesh.safety import keywords as keywords_module
from chatmesh.safety.keywords import (
    DEFAULT_KEYWORDS,
    KeywordEntry,
    KeywordFileError,
    KeywordList,
    KeywordScreen,
    normalize,
    parse_keyword_file,
)

TERMS = KeywordList(
    [
        KeywordEntry("fruit", "forbidden fruit"),
        KeywordEntry("drink", "tea"),
        KeywordEntry("drink", "green tea"),
        KeywordEntry("plant", "green"),
        KeywordEntry("cn", "演示屏蔽词"),
        KeywordEntry("cn-fruit", "苹果"),
    ]
)


def write_list(path: Path, text: str) -> None:
    """Replaces the file at once, as an operator's deploy tool should (a new inode, never half a file)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Hello, World!", "helloworld"),
        ("ＦＵＬＬ－ＷＩＤＴＨ　１２３", "fullwidth123"),
        ("zero\u200bwidth\u200d\ufeffjoin\u00ad", "zerowidthjoin"),
        ("Ｃａｆé Straße", "cafestrasse"),
        ("ﬁne ① Ⓐ", "fine1a"),
        ("演示，屏蔽。词", "演示屏蔽词"),
        ("\t\n spaced\x00out ", "spacedout"),
    ],
)
def test_normalization(raw: str, normalized: str):
    assert normalize(raw) == normalized


@pytest.mark.parametrize(
    "text",
    [
        "you may not eat the forbidden fruit",
        "FORBIDDEN Fruit",
        "ｆｏｒｂｉｄｄｅｎ ｆｒｕｉｔ",
        "f o r b i d d e n f r u i t",
        "for\u200bbid\u200cden\u2060 fr\ufeffuit",
        "forbidden-fruit!",
        "f.o.r.b.i.d.d.e.n...f_r_u_i_t",
        "ForBiDDen\u3000FRUIT",
    ],
)
def test_an_english_term_matches_in_every_disguise(text: str):
    assert TERMS.screen(text) == ["fruit"]


@pytest.mark.parametrize(
    "text",
    [
        "这是演示屏蔽词。",
        "这是演 示 屏 蔽 词",
        "演\u200b示\u200b屏\u200b蔽\u200b词",
        "演，示！屏？蔽、词",
        "ｘ演示屏蔽词ｙ",
    ],
)
def test_a_chinese_term_matches_in_every_disguise(text: str):
    assert TERMS.screen(text) == ["cn"]


def test_chinese_terms_match_inside_words_and_latin_terms_only_whole_words():
    assert TERMS.screen("我爱吃苹果派") == ["cn-fruit"]
    assert TERMS.screen("steam and teapots") == []
    assert TERMS.screen("tea time") == ["drink"]
    assert TERMS.screen("我喜欢tea") == ["drink"]
    assert TERMS.screen("s\u200btea") == []  # an invisible character does not make a word boundary


def test_every_category_found_is_reported_once_and_sorted():
    assert TERMS.screen("green tea and tea, forbidden fruit") == ["drink", "fruit", "plant"]
    assert TERMS.screen("a clean sentence") == []
    assert KeywordList([]).screen("anything") == []


def test_a_term_split_across_deltas_is_blocked_before_any_of_it_is_cleared():
    text = "Here it is: the forbidden fruit, enjoy."
    term_start = text.index("forbidden")
    for first, second in itertools.combinations(range(1, len(text)), 2):
        screen = TERMS.stream()
        cleared = 0
        blocked = False
        for piece in (text[:first], text[first:second], text[second:]):
            step = screen.feed(piece)
            assert step.cleared >= cleared
            cleared = step.cleared
            assert cleared <= term_start, (first, second)
            if step.blocked:
                assert step.categories == ("fruit",)
                blocked = True
                break
        assert blocked, (first, second)


def test_a_split_chinese_term_is_blocked_before_any_of_it_is_cleared():
    screen = TERMS.stream()
    assert screen.feed("好的，演示").cleared == len("好的，")
    step = screen.feed("屏蔽词")
    assert step.blocked and step.cleared == len("好的，")


def test_text_is_held_only_while_it_could_begin_a_term():
    screen = TERMS.stream()
    assert screen.feed("hello ").cleared == len("hello ")
    assert screen.feed("world forb").cleared == len("hello world ")
    assert screen.feed("id").cleared == len("hello world ")
    assert screen.feed("ding rules").cleared == len("hello world forbidding rules")
    final = screen.feed(" apply", final=True)
    assert final.complete and not final.blocked
    assert final.cleared == len("hello world forbidding rules apply")


def test_the_end_of_a_word_is_not_held_for_a_term_that_could_only_start_a_word():
    screen = TERMS.stream()
    assert screen.feed("ask the chef").cleared == len("ask the chef")
    assert screen.feed(" f").cleared == len("ask the chef ")
    assert screen.feed("or me").cleared == len("ask the chef for me")
    # Chinese terms may start anywhere, so their beginnings are held even inside a run of text.
    assert screen.feed("，我想吃苹").cleared == len("ask the chef for me，我想吃")


def test_a_whole_latin_term_at_the_end_waits_for_the_next_character():
    screen = TERMS.stream()
    assert screen.feed("I like tea").cleared == len("I like ")
    assert screen.feed("pots").cleared == len("I like teapots")
    screen = TERMS.stream()
    screen.feed("I like tea")
    assert screen.feed("", final=True).categories == ("drink",)


def test_the_hold_back_is_bounded_by_the_longest_term():
    text = "forbidden fruits? no: forbiddenly greenish teak forests, for a forbidden frui" * 3
    screen = TERMS.stream()
    for index, char in enumerate(text, start=1):
        step = screen.feed(char)
        assert not step.blocked
        assert len(normalize(text[step.cleared : index])) <= TERMS.longest
    final = screen.feed("", final=True)
    assert final.complete and final.cleared == len(text)


def test_a_final_feed_clears_all_or_blocks():
    screen = TERMS.stream()
    screen.feed("the forbidden fr")
    assert screen.feed("uit", final=True).blocked
    with pytest.raises(RuntimeError):
        screen.feed("more")


def test_keyword_files_parse_with_comments_and_blank_lines():
    entries = parse_keyword_file("# a comment\n\n  \t\nfruit\tforbidden fruit\n  cn\t演示屏蔽词  \n", "list.txt")
    assert [(e.category, e.term, e.source) for e in entries] == [
        ("fruit", "forbidden fruit", "list.txt:4"),
        ("cn", "演示屏蔽词", "list.txt:5"),
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("ok\tfine\nno tab here secretword\n", 2),
        ("bad category!\tsecretword\n", 1),
        ("fruit\t\n", 1),
    ],
)
def test_a_bad_line_names_the_file_and_line_but_not_the_term(text: str, line: int):
    with pytest.raises(KeywordFileError) as raised:
        parse_keyword_file(text, "list.txt")
    assert f"list.txt:{line}:" in str(raised.value)
    assert "secretword" not in str(raised.value)


def test_a_term_without_letters_or_digits_is_refused():
    with pytest.raises(KeywordFileError, match=r"list\.txt:3"):
        KeywordList([KeywordEntry("x", "?!  ...", "list.txt:3")])


def test_the_shipped_list_has_english_and_chinese_demo_terms():
    screen = KeywordScreen()
    assert screen.path == DEFAULT_KEYWORDS
    assert screen.current.categories == {"demo"}
    assert screen.screen("say the Forbidden-Demo-Term now") == ["demo"]
    assert screen.screen("演示屏蔽词") == ["demo"]
    assert screen.screen("a perfectly ordinary sentence") == []


def test_a_folder_of_lists_is_read_without_hidden_or_backup_files(tmp_path: Path):
    (tmp_path / "a.txt").write_text("fruit\tforbidden fruit\n", encoding="utf-8")
    (tmp_path / "b.list").write_text("cn\t演示屏蔽词\n", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("not a valid line\n", encoding="utf-8")
    (tmp_path / "a.txt~").write_text("not a valid line\n", encoding="utf-8")

    screen = KeywordScreen(tmp_path)

    assert screen.current.categories == {"fruit", "cn"}


def test_a_missing_or_broken_list_fails_at_start(tmp_path: Path):
    with pytest.raises(KeywordFileError):
        KeywordScreen(tmp_path / "missing.txt")
    broken = tmp_path / "broken.txt"
    broken.write_text("no tab\n", encoding="utf-8")
    with pytest.raises(KeywordFileError):
        KeywordScreen(broken)


async def test_a_changed_file_is_reloaded_and_a_stream_keeps_the_list_it_started_with(tmp_path: Path):
    path = tmp_path / "list.txt"
    write_list(path, "fruit\tforbidden fruit\n")
    screen = KeywordScreen(path)
    assert not await screen.reload_if_changed()
    in_flight = screen.stream()
    in_flight.feed("the forbidden ")

    write_list(path, "drink\tgreen tea\n")
    assert await screen.reload_if_changed()

    assert screen.screen("forbidden fruit") == []
    assert screen.screen("green tea") == ["drink"]
    assert in_flight.feed("fruit", final=True).categories == ("fruit",)
    assert not await screen.reload_if_changed()


async def test_requests_see_the_whole_old_list_until_the_new_one_is_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "list.txt"
    write_list(path, "".join(f"old\told term {i}\n" for i in range(50)))
    screen = KeywordScreen(path)
    building = threading.Event()
    release = threading.Event()
    real_load = keywords_module.load_keyword_entries

    def slow_load(files):
        building.set()
        assert release.wait(30)
        return real_load(files)

    monkeypatch.setattr(keywords_module, "load_keyword_entries", slow_load)
    write_list(path, "".join(f"new\tnew term {i}\n" for i in range(50)))
    reload = asyncio.create_task(screen.reload_if_changed())
    try:
        assert await asyncio.to_thread(building.wait, 30)
        # The new list is being built off the event loop, which keeps serving from the old one, whole.
        old = screen.current
        assert all(screen.screen(f"old term {i}") == ["old"] for i in range(50))
        assert screen.screen("new term 0") == []
    finally:
        release.set()
    assert await reload
    assert screen.current is not old
    assert all(screen.screen(f"new term {i}") == ["new"] for i in range(50))
    assert screen.screen("old term 0") == []


async def test_a_broken_file_keeps_the_old_list_and_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "list.txt"
    write_list(path, "fruit\tforbidden fruit\n")
    screen = KeywordScreen(path)

    write_list(path, "fruit\tforbidden fruit\nthis line has no tab secretword\n")
    with caplog.at_level(logging.ERROR, logger=keywords_module.__name__):
        assert not await screen.reload_if_changed()
        assert not await screen.reload_if_changed()
    failures = [record for record in caplog.records if record.msg == "keywords_reload_failed"]
    assert len(failures) == 1
    assert "list.txt:2" in failures[0].error and "secretword" not in failures[0].error
    assert screen.screen("forbidden fruit") == ["fruit"]

    write_list(path, "fruit\tforbidden fruit\ndrink\tgreen tea\n")
    assert await screen.reload_if_changed()
    assert screen.screen("green tea") == ["drink"]


async def test_a_deleted_list_keeps_the_old_one(tmp_path: Path):
    path = tmp_path / "list.txt"
    write_list(path, "fruit\tforbidden fruit\n")
    screen = KeywordScreen(path)
    path.unlink()

    assert not await screen.reload_if_changed()
    assert screen.screen("forbidden fruit") == ["fruit"]


def test_find_says_where_the_first_term_is_in_the_text_as_written():
    text = "Ａ ＦＯＲＢＩＤＤＥＮ fruit, and tea"

    match = TERMS.find(text)

    assert match is not None and match.categories == ("drink", "fruit")
    assert text[match.start : match.end] == "ＦＯＲＢＩＤＤＥＮ fruit"
    assert TERMS.find("steam and apples") is None


def test_a_stream_lets_out_what_passes_and_reports_it_but_blocks_the_rest():
    passes = {("drink",)}.__contains__
    screen = TERMS.stream(passes)

    screen.feed("have some tea ")
    assert screen.feed("with milk").cleared == len("have some tea with milk")
    blocked = screen.feed(", then the forbidden fruit", final=True)

    assert blocked.categories == ("drink", "fruit")
    assert screen.passed == {"drink"} and screen.passed_span == (len("have some "), len("have some tea"))
    text = screen.text
    assert text[slice(*screen.blocked_span)] == "forbidden fruit"


def test_a_stream_whose_terms_all_pass_completes_with_them():
    screen = TERMS.stream(lambda categories: True)

    screen.feed("tea, forbidden ")
    step = screen.feed("fruit", final=True)

    assert step.complete and not step.blocked and step.cleared == len("tea, forbidden fruit")
    assert screen.passed == {"drink", "fruit"}


def test_the_digest_depends_on_what_the_list_matches_not_how_it_is_written():
    same = KeywordList([KeywordEntry("a", "Green  TEA"), KeywordEntry("b", "x")])
    reordered = KeywordList([KeywordEntry("b", "X"), KeywordEntry("a", "green tea")])
    recategorized = KeywordList([KeywordEntry("c", "green tea"), KeywordEntry("b", "x")])

    assert same.digest == reordered.digest
    assert same.digest != recategorized.digest


async def test_added_terms_join_the_files_terms_and_survive_a_file_reload(tmp_path: Path):
    path = tmp_path / "list.txt"
    write_list(path, "fruit\tforbidden fruit\n")
    screen = KeywordScreen(path)
    before = screen.current

    assert await screen.set_added_terms([("fraud", "wire the money"), ("fraud", "wire the money")])
    assert not await screen.set_added_terms([("fraud", "wire the money")])

    assert screen.current is not before and screen.current.digest != before.digest
    assert screen.screen("please WIRE the money now") == ["fraud"]
    assert screen.screen("forbidden fruit") == ["fruit"]
    write_list(path, "drink\tgreen tea\n")
    assert await screen.reload_if_changed()
    assert screen.screen("wire the money") == ["fraud"] and screen.screen("green tea") == ["drink"]

    assert await screen.set_added_terms([])
    assert screen.screen("wire the money") == []


async def test_added_terms_that_cannot_be_used_are_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    screen = KeywordScreen()

    with caplog.at_level(logging.WARNING, logger=keywords_module.__name__):
        assert await screen.set_added_terms([("fraud", "wire money"), ("bad category!", "x"), ("fraud", "?!")])

    assert screen.screen("wire money") == ["fraud"]
    (record,) = [record for record in caplog.records if record.msg == "keywords_added_terms_unusable"]
    assert record.terms == 2
