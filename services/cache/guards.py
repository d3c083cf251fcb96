"""Guards that keep the semantic answer cache from answering a different question.

A semantic hit needs a cached question close to the asked one; close is not the same. Embeddings put "Can I cancel
my order?" next to "Can't I cancel my order?", the Atlantic next to the Pacific, 30 days next to 60. So before a
candidate may answer, `guard_mismatch` compares what such near-misses differ in, extracted once per question by
`question_features` (after NFKC, so full-width forms are their ASCII selves):

- numbers: digits (`1,000`, `3.5`, `-5`, `１２`), English number words (`twenty five`, `two thousand`,
  `3 million`, `twice`, `half`), Chinese numerals (`三十`, `两千五`, `二〇二四`, `3万`, `半价`) and ordinals
  (`third`, `3rd`, `第三`, `第3`), as values, in the order written: "3 days", "three days" and "三天" are equal,
  "30 days" and "60 days" are not, nor are "30 divided by 5" and "5 divided by 30". Letters glued after digits
  stay part of the value (`4o`, `5G`, `3pm`); letters before them are an entity (`iPhone15` is iphone and 15).
  Order numbers, dates and times are numbers like any other. Not numbers: "one" as a pronoun ("which one",
  "a new one"), "a second", and words that only hold a numeral (一起, 一定, 十分, 二维码; 一个, which is "a").
- negations: how many (not whether), in English (not, n't, no, never, none, nothing, nobody, nowhere, neither,
  nor, without, cannot, unable, and apostrophe-less dont, cant…) and Chinese (不 没 沒 无 無 非 未 别 別 勿 莫
  甭 毋, each character once: 没有 is one). Not counted: the yes-or-no forms 能不能, 是不是, 有没有 and
  "or not"; "not only", "no matter", "No. 5"; and common words that hold one of those characters without
  negating (不过, 不同, 差不多, 非常, 特别, 区别, 别人, 无论, 无线, 未来 …: NEUTRAL_WORDS). Words that negate
  through their meaning and hold such a character (无法, 不足, 非法, 毫无) are counted.
- entities, compared as sets, so paraphrases that name the same things in another order pass:
  capitalised words inside a sentence, ALL-CAPS acronyms (TV, USB), single capitals (plan B), mixed case
  (iPhone, macOS), the letters of words with digits (X2, GPT4), product editions in any case (basic, standard,
  plus, pro, premium, enterprise, ultra, lite, mini), quoted strings ("…", '…', “…”, ‘…’, 「…」, 『…』, 《…》,
  `…`), English names that are rarely ordinary words, in any case (data/en_proper_nouns.txt: atlantic, canada,
  sunday, iphone), and Chinese proper nouns (data/cjk_proper_nouns.txt, from jieba's dictionary: see
  scripts/cjk_proper_nouns.py), longest match first, 武汉市 compared as 武汉.
  Case: acronyms and single capitals keep theirs (US is not us, IT is not it); other entities are case-folded
  (iPhone, IPhone). A capitalised word that starts an English sentence, or stands in a sentence written all
  in title case or in capitals, may be capitalised only for that: it passes when the other question has the
  word anywhere, in any case ("Brightbox: …" and "… the brightbox …"). Common words that open sentences
  (_ORDINARY_WORDS) never count. Everywhere else an entity must be an entity on both sides.

- contrasts, compared as sets: words of opposite pairs and qualifiers that turn a question into another with
  little change to its embedding (CONTRAST_WORDS: enable/disable, upload/download, before/after, monthly/yearly,
  month/year, express, international …), the particle after turn, switch, log, sign, opt and check ("turn on"
  and "turn off": on/off, in/out), and their Chinese counterparts (CJK_CONTRASTS: 开启/关闭, 上传/下载, 每月/每年,
  按月/按年, 加急 …). "How much is Plus per month?" and "… per year?", "turn on two-factor" and "turn off
  two-factor", "How long does shipping take?" and "How long does express shipping take?" differ in them.

What the guards deliberately do not catch, and leave to the similarity threshold:
- ordinary words that change the question and are not contrasts: cancel/pause, doorbell/camera, 门铃/摄像头
  (units, currencies and percent signs are not compared: "30 days" and "30 weeks" pass);
- who does what to whom: entities are a set, so "Is the Atlantic deeper than the Pacific?" and the reverse pass;
- names that no rule sees: in lower case and not listed ("brightbox"), starting a sentence when the other
  question has the same word, Chinese names missing from the gazetteer (two-character personal names such as
  李白, brands newer than the list, traditional characters), Japanese and Korean;
- negation through meaning alone: illegal, fail, refuse, hardly, silent, 否认, 拒绝, 关闭;
- approximate numbers (a few, several, 几天), "a" as one, European decimal commas, "three point five", 三点五.
Where in doubt the guards refuse, since a miss costs one model call and a wrong hit a wrong answer: the same
entity in English and in Chinese ("Pacific", "太平洋"), the same numbers in another order, a name in one
question only ("Canada" and "Canadian"), a different count of negations ("Why is it offline?" and "Why won't
it come online?").
"""

# Full-width forms, curly quotes and Chinese numerals are what much of this module is about.
# ruff: noqa: RUF001, RUF002, RUF003

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from pathlib import Path

import ahocorasick

PROPER_NOUNS = Path(__file__).parent / "data" / "cjk_proper_nouns.txt"
ENGLISH_PROPER_NOUNS = Path(__file__).parent / "data" / "en_proper_nouns.txt"


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


def _numbered(words: str, values: range) -> dict[str, int]:
    return dict(zip(words.split(), values, strict=True))


@dataclass(frozen=True, slots=True)
class QuestionFeatures:
    """What the guards compare of one question (see the module's docstring)."""

    # Canonical values in the order written: "30", "3.5", "-5", "4o", ordinals as "3rd", 十几 as itself.
    numbers: tuple[str, ...]
    negations: int
    # Acronyms and single capitals as written, other words case-folded, quoted strings as “…”.
    entities: frozenset[str]
    # Case-folded words capitalised perhaps only because of where they stand (a sentence's first word).
    initial_words: frozenset[str]
    # Every Latin-script word, case-folded: where an initial word of the other question is looked for.
    words: frozenset[str]
    # Contrast words and particles, case-folded, and Chinese contrast terms.
    contrasts: frozenset[str] = frozenset()


def guard_mismatch(asked: QuestionFeatures, cached: QuestionFeatures) -> str | None:
    """None when the cached question may answer the asked one; else the name of the guard that refused."""
    if asked.numbers != cached.numbers:
        return "numbers"
    if asked.negations != cached.negations:
        return "negation"
    if not (_entities_found(asked, cached) and _entities_found(cached, asked)):
        return "entities"
    if asked.contrasts != cached.contrasts:
        return "contrast"
    return None


def _entities_found(one: QuestionFeatures, other: QuestionFeatures) -> bool:
    """Whether every entity of `one` is an entity of `other` (or stands where `other` starts a sentence), and every
    initial word of `one` is a word of `other`."""
    return one.entities - other.entities <= other.initial_words and one.initial_words <= other.words


# Latin, Latin-1, Latin Extended, Greek and Cyrillic letters; CJK ideographs (with 〇).
_LETTERS = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0370-\u03ff\u0400-\u04ff"
_CJK = "\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKENS = re.compile(
    rf"(?P<cjk>[{_CJK}]+)"
    rf"|(?P<word>[{_LETTERS}][{_LETTERS}0-9]*(?:['’][{_LETTERS}]+)*)"
    # A minus sign only where no digit, word or closing bracket is right before it ("3 - 5" is a range).
    rf"|(?P<number>(?:(?<![\w.,)\]])(?<![0-9] )[-−])?[0-9]+(?:,[0-9]{{3}}(?![0-9]))*(?:\.[0-9]+)?)"
    rf"(?P<suffix>[{_LETTERS}]+)?"
    r"|(?P<end>[.!?]+(?=[\s\"'”’)\]]|$)|[!?。;:\n])"
)
_QUOTES = re.compile(
    r"\"([^\"\n]+)\"|“([^”\n]+)”|‘([^\n]+?)’(?![A-Za-z])|(?<![\w])'([^'\n]+?)'(?![\w])"
    r"|「([^」\n]+)」|『([^』\n]+)』|《([^》\n]+)》|`([^`\n]+)`"
)
_DIGIT = re.compile(r"[0-9]")
_DIGIT_RUNS = re.compile(r"[0-9]+|[^0-9]+")
# The next word after a negation, or (group 2) a digit after "No.".
_NEXT_WORD = re.compile(r"\s+([A-Za-z]+)|\.\s*([0-9])")

# Ordinary English words that are capitalised where a sentence or a title starts (or, in chat, anywhere): never
# taken for a name. The longer the list, the fewer misses the initial-word rule costs.
_ORDINARY_WORDS = _word_set(
    """a an the this that these those there here it its it's i i'm i've i'll i'd me my mine you you're your yours
    we we're our ours us they they're their theirs them he his him she her hers what what's how how's why when
    where where's which who who's whom whose whether is are was were be been being am do does did done doing have
    has had having can could will would shall should may might must need needs ought to of in on at by for from
    with about as into onto over under after before between through during since until till upon within than
    then so and or but if else also too just only even still yet again ever please pls plz kindly thanks thank
    thx cheers hi hiya hey hello dear greetings good morning afternoon evening ok okay alright yes yeah well now
    any some all each every both other another such same more most less least much many few lot lots very really
    quite rather something anything everything someone anyone everyone somebody anybody everybody let let's
    quick question questions query issue problem note update urgent sorry excuse pardon actually basically
    anyway however meanwhile today yesterday tomorrow tonight recently currently apparently unfortunately
    honestly seriously maybe perhaps probably hopefully wondering curious tell show give explain describe list
    say help find get got make take know want wanted like try tried trying use keep look looking see check
    reset change update delete remove cancel add set turn enable disable install uninstall connect disconnect
    confirm verify send resend open close start stop restart reboot log sign create register subscribe
    unsubscribe upgrade downgrade buy order purchase pay return refund track ship deliver contact call email
    message write read view search move switch transfer link activate deactivate book schedule request apply
    access share download upload save edit fix forgot forget lost receive received bought paid charged noticed
    think guess mean happened going ocean oceans sea seas island islands lake river mountain mountains bay gulf coast
    city state province county street road avenue"""
)
# All-caps words that name nothing.
_NOT_ENTITIES = frozenset({"OK", "AM", "PM", "ASAP", "FYI", "BTW", "PLS", "PLZ", "THX", "I"})
# Product editions: compared even when written in lower case ("the pro plan" is not "the premium plan").
_EDITIONS = frozenset({"basic", "standard", "plus", "pro", "premium", "enterprise", "ultra", "lite", "mini"})

_NEGATIONS = _word_set(
    """not no never none nothing nobody nowhere neither nor without cannot unable noone dont doesnt didnt cant
    couldnt wont wouldnt shouldnt isnt arent wasnt werent havent hasnt hadnt mustnt neednt aint"""
)

_UNITS = _numbered("zero one two three four five six seven eight nine", range(10))
_TEENS = _numbered("ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen", range(10, 20))
_TENS = _numbered("twenty thirty forty fifty sixty seventy eighty ninety", range(20, 100, 10))
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12, "dozen": 12}
_ORDINALS = {
    **_numbered(
        """first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth
        fifteenth sixteenth seventeenth eighteenth nineteenth""",
        range(1, 20),
    ),
    **_numbered("twentieth thirtieth fortieth fiftieth sixtieth seventieth eightieth ninetieth", range(20, 100, 10)),
    "hundredth": 100,
    "thousandth": 1000,
    "millionth": 10**6,
}
# Standalone values: combined with no other number word.
_OTHER_NUMBERS = {"half": "0.5", "twice": "2", "thrice": "3"}
_VAGUE_NUMBERS = frozenset({"dozens", "hundreds", "thousands", "millions", "billions"})
_NUMBER_WORDS = frozenset(_UNITS) | frozenset(_TEENS) | frozenset(_TENS) | frozenset(_SCALES) | frozenset(_ORDINALS)
# "which one", "a new one", "the first one": a pronoun, not a count.
_ONE_AS_PRONOUN_AFTER = _word_set(
    """the this that which each every any no another other new old same different right wrong only last next good
    better best big bigger small smaller cheap cheaper free paid current previous main first second third"""
)
# "a second", "30 second": a unit of time, not an ordinal.
_SECOND_AS_TIME_AFTER = frozenset({"a", "per", "each", "every"})

_CJK_DIGITS = {
    "〇": 0, "零": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9,
    "壹": 1, "贰": 2, "貳": 2, "叁": 3, "參": 3, "肆": 4, "伍": 5, "陆": 6, "陸": 6, "柒": 7, "捌": 8, "玖": 9,
}  # fmt: skip
_CJK_SMALL_UNITS = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
_CJK_LARGE_UNITS = {"万": 10**4, "萬": 10**4, "亿": 10**8, "億": 10**8}
_CJK_UNITS = _CJK_SMALL_UNITS | _CJK_LARGE_UNITS
_CJK_NUMERALS = frozenset(_CJK_DIGITS) | frozenset(_CJK_UNITS) | {"几"}
_CJK_NEGATIONS = frozenset("不没沒无無非未别別勿莫甭毋")
# 半 is a half before these (半价, 半年, 半个小时); elsewhere it is part of a word (半导体, 多半).
_HALF_BEFORE = frozenset("价年天个小月斤周杯份场")

# Words that hold a numeral or a negation character without being a number or a negation. Longest match wins,
# so 不一样 is one neutral word. 一个 is "a" as often as "one", so it is no number either (两个 is 2).
NEUTRAL_WORDS = _word_set(
    """一些 一般 一般来说 一定 一样 一直 一切 一起 一点 一点儿 一下 一下子 一旦 一边 一致 一时 一阵 一向 一再 一律 一齐
    一同 一道 一番 一面 一方面 另一方面 进一步 统一 唯一 同一 一体 一体化 一流 一带 一路 一生 一辈子 一口气 一会
    一会儿 一手 一身 一概 一贯 一味 一心 一举 一早 一开始 万一 一一 一旁 一连 一并 一共 之一 一模一样 一个 十分 十足
    万分 万能 万岁 万物 万事 百姓 老百姓 百科 百货 百合 百分之 千克 千米 千瓦 三明治 二维码 二手 八卦 四周 四处
    乱七八糟 七上八下 五金 五花八门 五颜六色 一次性 一键 零钱 零售 零件 零部件 零食 零星
    不过 只不过 不断 不仅 不仅仅 不但 不管 不论 不同 不一样 不少 不久 不然 要不然 要不 不禁 不由得 不免 不料 不妨
    不停 不时 不止 不只 不光 不愧 不惜 不得不 不能不 差不多 对不起 了不起 不错 说不定 不好意思 不客气 非常 特别
    特别是 分别 别人 别的 区别 个别 差别 级别 识别 类别 告别 性别 别处 别名 别墅 各别 派别 鉴别 辨别 有别 别扭 别致
    国别 别称 判别 辞别 作别 送别 道别 甄别 别样 临别 永别 离别 别离 别克 无论 无论如何 无论是 无线 无线电 无人机
    无数 无比 无限 无聊 无疑 无非 无奈 无所谓 无穷 无辜 未来 莫非 莫名其妙 莫名 约莫 莫过于 莫大 除非 是非 非得 非凡
    非典 淹没 出没 沉没 吞没 埋没 湮没 覆没 没落 隐没 辱没"""
)
# Negations that begin with a neutral word, which would otherwise hide them (不同 in 不同意).
_NEGATED_WORDS = frozenset({"不同意", "不同步", "不管用"})
# Words that are a number without holding a numeral.
_NUMBER_WORDS_CJK = {"一半": "0.5"}

_ENTITY, _NEUTRAL, _NEGATED, _NUMBER = range(4)


def question_features(text: str) -> QuestionFeatures:
    """The numbers, negations and entities of a question, for `guard_mismatch`. Pure; the word lists are loaded by
    the first call (about 10 ms and 1.5 MiB), which a process may make at start."""
    text = unicodedata.normalize("NFKC", text)
    scan = _Scan(text)
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "word":
            scan.word(match)
        elif kind in {"number", "suffix"}:  # the last group that matched: "3rd" ends with its suffix
            scan.number(match)
        elif kind == "cjk":
            scan.cjk(match)
        elif kind == "end":
            scan.end_sentence()
    scan.end_sentence()
    entities = scan.entities
    if scan.words:
        entities.update(_english_proper_nouns(text))
    for quoted in _QUOTES.finditer(text):
        content = next(group for group in quoted.groups() if group is not None)
        entities.add(f"“{' '.join(content.split())}”")
    words = frozenset(scan.words)
    contrasts = {CONTRAST_WORDS[word] for word in words if word in CONTRAST_WORDS}
    contrasts |= {match.group(1).casefold() for match in _PARTICLES.finditer(text)}
    contrasts |= {concept for term, concept in CJK_CONTRASTS.items() if term in text}
    return QuestionFeatures(
        numbers=tuple(scan.numbers),
        negations=scan.negations,
        entities=frozenset(entities),
        initial_words=frozenset(scan.initial_words),
        words=words,
        contrasts=frozenset(contrasts),
    )


# Words whose opposite (or absence) asks another question, though an embedding barely moves (see the docstring),
# each to what it is compared as: a period is one however it is said ("per month", "monthly", 每月, 一个月).
_PERIODS = {
    "month": "month",
    "monthly": "month",
    "year": "year",
    "yearly": "year",
    "annual": "year",
    "annually": "year",
    "week": "week",
    "weekly": "week",
    "day": "day",
    "daily": "day",
    "hour": "hour",
    "hourly": "hour",
    "minute": "minute",
}
CONTRAST_WORDS = {
    **{
        word: word
        for word in _word_set(
            """
        enable enabled disable disabled activate deactivate upload download import export increase decrease raise
        lower upgrade downgrade add remove lock unlock subscribe unsubscribe pause resume buy sell before after
        earliest latest minimum maximum min max express overnight international domestic
        """
        )
    },
    **_PERIODS,
}
# The particle after a phrasal verb whose meaning it reverses: turn on / turn off, log in / log out.
_PARTICLES = re.compile(
    r"\b(?:turn|turning|turned|switch|switching|switched|log|logging|logged|sign|signing|signed|opt|opting|opted|"
    r"check|checking|checked)\s+(on|off|in|out)\b",
    re.IGNORECASE,
)
CJK_CONTRASTS = {
    **{
        term: term
        for term in (
            "开启",
            "打开",
            "关闭",
            "关掉",
            "上传",
            "下载",
            "导入",
            "导出",
            "升级",
            "降级",
            "增加",
            "减少",
            "添加",
            "删除",
            "登录",
            "退出",
            "之前",
            "之后",
            "以前",
            "以后",
            "最早",
            "最晚",
            "最多",
            "最少",
            "加急",
            "特快",
            "国际",
            "国内",
        )
    },
    **dict.fromkeys(("每月", "个月", "按月", "月付", "包月", "月费"), "month"),
    **dict.fromkeys(("每年", "一年", "按年", "年付", "包年", "年费"), "year"),
    **dict.fromkeys(("每周", "按周"), "week"),
    **dict.fromkeys(("每天", "按天"), "day"),
}


class _Scan:
    """The state of one pass over a question's tokens."""

    __slots__ = (
        "capitalised",
        "capitalised_words",
        "entities",
        "initial_words",
        "last_word",
        "negations",
        "numbers",
        "ordinal_next",
        "plain_number_at",
        "sentence_has_cjk",
        "sentence_start",
        "spelled",
        "text",
        "upper_words",
        "words",
        "words_with_letters",
    )

    def __init__(self, text: str) -> None:
        self.text = text
        self.numbers: list[str] = []
        self.negations = 0
        self.entities: set[str] = set()
        self.initial_words: set[str] = set()
        self.words: set[str] = set()
        self.spelled = _SpelledNumber()
        # The previous token's lower-case word, "" after anything else.
        self.last_word = ""
        # Where the number just added ends in the text, if it was a plain digit literal (3 before 万 or million).
        self.plain_number_at = -1
        # A 第 was the last thing before this token.
        self.ordinal_next = False
        self._start_sentence()

    def _start_sentence(self) -> None:
        self.sentence_start = True
        self.sentence_has_cjk = False
        # (value as written, case-folded value, shape, at the sentence's start) of capitalised words.
        self.capitalised: list[tuple[str, str, str, bool]] = []
        # Words of two letters or more, and how many of them start with a capital or are all capitals.
        self.words_with_letters = 0
        self.capitalised_words = 0
        self.upper_words = 0

    def end_sentence(self) -> None:
        self._flush_spelled()
        title_case = self.words_with_letters >= 3 and self.capitalised_words == self.words_with_letters
        all_caps = self.words_with_letters >= 3 and self.upper_words == self.words_with_letters
        for written, folded, shape, initial in self.capitalised:
            if self.sentence_has_cjk:
                self.entities.add(folded if shape == "title" else written)
            elif all_caps or (shape == "title" and (initial or title_case)) or (shape == "letter" and initial):
                self.initial_words.add(folded)
            else:
                self.entities.add(folded if shape == "title" else written)
        self.last_word = ""
        self.plain_number_at = -1
        self._start_sentence()

    def _add_number(self, value: str, plain_end: int = -1) -> None:
        self.numbers.append(value)
        self.plain_number_at = plain_end

    def _flush_spelled(self) -> None:
        value = self.spelled.value()
        if value is not None:
            self._add_number(value)
            self.spelled = _SpelledNumber()

    def word(self, match: re.Match[str]) -> None:
        token = match.group().replace("’", "'")
        if token.endswith(("'s", "'S")):
            token = token[:-2]
        lower = token.casefold()
        self.words.add(lower)
        initial, self.sentence_start = self.sentence_start, False
        previous, self.last_word = self.last_word, lower
        after_plain_number, self.plain_number_at = self.plain_number_at >= 0, -1
        self.ordinal_next = False
        if self._number_word(lower, previous, after_plain_number, match.end()):
            return
        self._flush_spelled()
        if lower in _NEGATIONS or lower.endswith("n't"):
            self.negations += not self._neutral_negation(lower, previous, match.end())
        elif not token.isalpha() and _DIGIT.search(token):
            self._word_with_digits(token)
        else:
            self._shape(token, lower, initial)

    def _number_word(self, lower: str, previous: str, after_plain_number: bool, end: int) -> bool:
        """Whether the word is (part of) a number, which it then records."""
        if lower == "and" and self.spelled.may_continue_after_and():
            return True
        if lower in _SCALES and after_plain_number and self.spelled.value() is None:
            # "3 million", "1.5 billion": the digits before it are multiplied (and may be again: "3 hundred thousand").
            self.numbers[-1] = _canonical(Decimal(self.numbers[-1]) * _SCALES[lower])
            self.plain_number_at = end
            return True
        if lower not in _NUMBER_WORDS and lower not in _OTHER_NUMBERS and lower not in _VAGUE_NUMBERS:
            return False
        if lower == "one" and previous in _ONE_AS_PRONOUN_AFTER:
            return False
        if lower == "second" and (
            previous in _SECOND_AS_TIME_AFTER or after_plain_number or self.spelled.value() is not None
        ):
            self._flush_spelled()
            return True
        if lower in _OTHER_NUMBERS or lower in _VAGUE_NUMBERS:
            self._flush_spelled()
            self._add_number(_OTHER_NUMBERS.get(lower, lower))
            return True
        if not self.spelled.feed(lower):
            self._flush_spelled()
            self.spelled.feed(lower)
        if self.spelled.closed:
            self._flush_spelled()
        return True

    def _neutral_negation(self, lower: str, previous: str, end: int) -> bool:
        """Whether the negation word is one of "whether or not", "not only", "no matter", "No. 5" (a label)."""
        if lower == "not" and previous == "or":
            return True
        following = _NEXT_WORD.match(self.text, end)
        if following is None:
            return False
        if following.group(1) is not None:
            return (lower, following.group(1).casefold()) in {("not", "only"), ("no", "matter")}
        return lower == "no"

    def _word_with_digits(self, token: str) -> None:
        for part in _DIGIT_RUNS.findall(token):
            if part[0].isdigit():
                self._add_number(_canonical(Decimal(part)))
            elif part not in _NOT_ENTITIES:
                self.words.add(part.casefold())
                self.entities.add(part if part.isupper() else part.casefold())

    def _shape(self, token: str, lower: str, initial: bool) -> None:
        letters = len(token) - token.count("'")
        upper = token.isupper()
        if letters >= 2:
            self.words_with_letters += 1
            self.capitalised_words += token[0].isupper()
            self.upper_words += upper
        if lower in _EDITIONS:
            self.entities.add(lower)
            return
        if token.islower():
            return
        acronym = upper and letters >= 2
        # An ordinary word capitalised is still one ("How", "The"), unless written as an acronym (US, IT) or a
        # single capital inside a sentence (plan A).
        if token in _NOT_ENTITIES or (lower in _ORDINARY_WORDS and not acronym and (initial or letters > 1)):
            return
        if acronym:
            shape = "upper"
        elif upper:
            shape = "letter"
        elif token[0].isupper() and not any(char.isupper() for char in token[1:]):
            shape = "title"
        else:
            self.entities.add(lower)  # mixed case: iPhone, macOS, PayPal
            return
        self.capitalised.append((token, lower, shape, initial))

    def number(self, match: re.Match[str]) -> None:
        self._flush_spelled()
        self.sentence_start = False
        self.last_word = ""
        literal = match.group("number").replace("−", "-").replace(",", "")
        suffix = (match.group("suffix") or "").casefold()
        value = Decimal(literal)
        ordinal = self.ordinal_next or suffix in {"st", "nd", "rd", "th"}
        self.ordinal_next = False
        if ordinal and value == value.to_integral_value():
            self._add_number(_ordinal(int(value)))
        elif suffix:
            self._add_number(_canonical(value) + suffix)
        else:
            self._add_number(_canonical(value), plain_end=match.end())

    def cjk(self, match: re.Match[str]) -> None:
        self._flush_spelled()
        self.sentence_start = False
        self.sentence_has_cjk = True
        self.last_word = ""
        run = match.group()
        glued_to_number = self.plain_number_at == match.start()
        self.plain_number_at = -1
        ordinal = self.ordinal_next
        self.ordinal_next = False
        for start, end, kind, value in _cjk_pieces(run):
            if kind == _ENTITY:
                self.entities.add(value)
            elif kind == _NUMBER:
                self._add_number(value)
            elif kind == _NEGATED:
                self.negations += 1
            elif kind is None:
                ordinal = self._cjk_free_text(run, start, end, ordinal, glued_to_number and start == 0)
            else:
                ordinal = False
            glued_to_number = False
        self.ordinal_next = ordinal and run[-1] == "第"

    def _cjk_free_text(self, run: str, start: int, end: int, ordinal: bool, glued_to_number: bool) -> bool:
        """Numerals and negations in a stretch of a CJK run that no listed word covers; returns whether a 第 is
        waiting for its number."""
        index = start
        while index < end:
            char = run[index]
            if char in _CJK_NUMERALS:
                stop = index
                while stop < end and run[stop] in _CJK_NUMERALS:
                    stop += 1
                numeral = run[index:stop]
                if glued_to_number and index == start and all(unit in _CJK_UNITS for unit in numeral):
                    # 3万, 1.5亿, 2千万: the digits right before are multiplied.
                    multiplier = math.prod(_CJK_UNITS[unit] for unit in numeral)
                    self.numbers[-1] = _canonical(Decimal(self.numbers[-1]) * multiplier)
                else:
                    value = _cjk_number(numeral)
                    if value is not None:
                        self._add_number(_ordinal(int(value)) if ordinal else _canonical(value))
                    elif "几" in numeral and numeral != "几" * len(numeral):
                        self._add_number(numeral)
                ordinal = False
                index = stop
                continue
            if char in _CJK_NEGATIONS and not (0 < index < len(run) - 1 and run[index - 1] == run[index + 1]):
                self.negations += 1
            elif char == "半" and index + 1 < len(run) and run[index + 1] in _HALF_BEFORE:
                self._add_number("0.5")
            ordinal = char == "第"
            index += 1
        return ordinal


class _SpelledNumber:
    """An English number written in words, fed word by word: `feed` says whether the word continues it."""

    __slots__ = ("closed", "current", "last_big", "previous", "total")

    def __init__(self) -> None:
        self.total = 0  # the thousands, millions… already complete
        self.current = 0  # the part below the last of those
        self.last_big = 10**15
        self.previous = ""  # the kind of the last word fed, "" before the first
        self.closed = False  # an ordinal, or zero, ends a number: "twenty first"

    def value(self) -> str | None:
        if not self.previous:
            return None
        value = self.total + self.current
        return _ordinal(value) if self.closed and self.previous != "zero" else str(value)

    def may_continue_after_and(self) -> bool:
        """Whether an "and" may go on with the number, as after a hundred or a thousand ("one hundred and five")."""
        return self.previous in {"hundred", "big"} and not self.closed

    def feed(self, word: str) -> bool:
        value = _ORDINALS.get(word) or _SCALES.get(word) or _UNITS.get(word, _TEENS.get(word, _TENS.get(word, 0)))
        if word == "zero":
            kind = "zero"
        elif word in {"hundred", "hundredth"}:
            kind = "hundred"
        elif word in _SCALES or value >= 1000:
            kind = "big"
        else:
            kind = "unit" if value < 10 else "teen" if value < 20 else "tens"
        if self.previous and not self._follows(kind, value):
            return False
        if kind == "hundred":
            self.current = (self.current or 1) * 100
        elif kind == "big":
            self.total += (self.current or 1) * value
            self.current, self.last_big = 0, value
        else:
            self.current += value
        self.previous = kind
        self.closed = word in _ORDINALS or kind == "zero"
        return True

    def _follows(self, kind: str, value: int) -> bool:
        if self.closed or kind == "zero":
            return False
        previous = self.previous
        if kind == "big":
            return previous != "big" and value < self.last_big
        if kind == "hundred":
            return previous in {"unit", "teen", "tens"} and self.current < 100
        if previous == "tens":
            return kind == "unit"
        return previous in {"hundred", "big"}


def _cjk_number(numeral: str) -> Decimal | None:
    """The value of a run of Chinese numerals: 三十 30, 十五 15, 一百零五 105, 两千五 2500, 二〇二四 2024."""
    if "几" in numeral:
        return None
    if not any(char in _CJK_SMALL_UNITS or char in _CJK_LARGE_UNITS for char in numeral):
        return Decimal("".join(str(_CJK_DIGITS[char]) for char in numeral))
    total = section = digit = 0
    last_unit = 1
    after_zero = False
    for char in numeral:
        if char in _CJK_DIGITS:
            digit = _CJK_DIGITS[char]
            after_zero = after_zero or digit == 0
            continue
        after_zero = False
        if char in _CJK_SMALL_UNITS:
            last_unit = _CJK_SMALL_UNITS[char]
            section += (digit or 1) * last_unit
            digit = 0
        else:
            last_unit = _CJK_LARGE_UNITS[char]
            if last_unit == 10**8:
                total = (total + section + digit) * last_unit
            else:
                total += (section + digit) * last_unit
            section = digit = 0
    # 两千五 is 2500 and 一万五 15000: a digit right after a unit counts in the next unit down.
    if digit and not after_zero and numeral[-1] in _CJK_DIGITS and len(numeral) > 1 and last_unit >= 100:
        digit *= last_unit // 10
    return Decimal(total + section + digit)


def _canonical(value: Decimal) -> str:
    return "0" if value == 0 else format(value.normalize(), "f")


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _cjk_pieces(run: str) -> Iterator[tuple[int, int, int | None, str]]:
    """The run cut into listed words, longest first, and the stretches between them (kind None)."""
    position = 0
    for end_index, (kind, value, length) in _lexicon().iter_long(run):
        start = end_index + 1 - length
        if start > position:
            yield position, start, None, ""
        yield start, end_index + 1, kind, value
        position = end_index + 1
    if position < len(run):
        yield position, len(run), None, ""


def _english_proper_nouns(text: str) -> Iterator[str]:
    """The words of the listed names (data/en_proper_nouns.txt) that stand as whole words in the text, in any case."""
    lowered = text.lower()
    for end, name in _english_lexicon().iter_long(lowered):
        start = end + 1 - len(name)
        if (start == 0 or not lowered[start - 1].isalnum()) and (
            end + 1 == len(lowered) or not lowered[end + 1].isalnum()
        ):
            yield from (word for word in name.split() if word not in _ORDINARY_WORDS)


@cache
def _english_lexicon() -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for line in ENGLISH_PROPER_NOUNS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            automaton.add_word(line, line)
    automaton.make_automaton()
    return automaton


@cache
def _lexicon() -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for line in PROPER_NOUNS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            word, _, form = line.partition("\t")
            automaton.add_word(word, (_ENTITY, form or word, len(word)))
    for word in NEUTRAL_WORDS:
        automaton.add_word(word, (_NEUTRAL, "", len(word)))
    for word in _NEGATED_WORDS:
        automaton.add_word(word, (_NEGATED, "", len(word)))
    for word, value in _NUMBER_WORDS_CJK.items():
        automaton.add_word(word, (_NUMBER, value, len(word)))
    automaton.make_automaton()
    return automaton
