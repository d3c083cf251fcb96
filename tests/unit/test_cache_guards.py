"""The semantic cache's guards (chatmesh.cache.guards): a cached answer may serve a paraphrase of its question, never
a near-miss that differs in a number, a negation or a named entity, in English or in Chinese."""

# Full-width forms and curly quotes are what several of these cases are about.
# ruff: noqa: RUF001

import dataclasses
import unicodedata

import pytest

from chatmesh.cache.guards import (
    ENGLISH_PROPER_NOUNS,
    PROPER_NOUNS,
    QuestionFeatures,
    guard_mismatch,
    question_features,
)

# (asked, cached): the same question in other words; the cached answer may serve it.
PARAPHRASES = [
    ("How do I reset my password?", "I forgot my password, what now?"),
    ("What is the refund policy?", "How do refunds work?"),
    ("Can I get a refund within 30 days?", "Is a refund possible within thirty days?"),
    ("Does delivery take 3 days?", "Does delivery take three days?"),
    ("Is the Pro plan worth it?", "Is it worth upgrading to the Pro plan?"),
    ("How much does the iPhone 15 cost?", "What's the price of an iPhone 15?"),
    ("How much does the iPhone15 cost?", "What's the price of an iPhone 15?"),
    ("Why can't I cancel my order?", "I can't cancel my order, why?"),
    ("Do you ship to the US for free?", "Is shipping to the US free?"),
    ("Do you accept PayPal?", "Is PayPal accepted?"),
    ("Which is deeper, the Atlantic or the Pacific?", "Is the Pacific deeper than the Atlantic?"),
    ("Can you tell me whether or not I can cancel?", "Can I cancel?"),
    ("What does 'rm -rf' do?", "Explain what 'rm -rf' does"),
    ("Where is my order #12345?", "Has order 12345 shipped yet?"),
    ("Does the plan include 1,000 messages?", "Does the plan include 1000 messages?"),
    ("Does the plan include two thousand five hundred messages?", "Does the plan include 2,500 messages?"),
    # Capitalised only by where they stand: the other question has the words.
    ("Reset password?", "How do I reset my password?"),
    ("How To Reset My Password", "how to reset my password"),
    ("HOW DO I RESET MY PASSWORD", "How do I reset my password?"),
    ("Quick question: how do I reset my password?", "How do I reset my password?"),
    # Names that are rarely ordinary words are found in lower case too.
    ("how deep is the atlantic?", "How deep is the Atlantic Ocean?"),
    ("Can I get a refund on Sunday?", "can i get a refund on sunday"),
    ("怎么重置密码？", "忘记密码了怎么办？"),
    ("退款政策是什么？", "怎么申请退款？"),
    ("能不能退款？", "可以退款吗？"),
    ("有没有学生优惠？", "学生有优惠吗？"),
    ("三天能到吗？", "3天能到吗？"),
    ("３０天内可以退货吗", "30天内可以退货吗"),
    ("两千五百元够吗", "2500元够吗"),
    ("第三天可以发货吗", "第3天可以发货吗"),
    ("华为手机怎么截屏", "华为手机如何截图"),
    ("太平洋有多深？", "太平洋的深度是多少？"),
    ("武汉市今天下雨吗", "武汉今天下雨吗"),
    ("专业版和企业版有什么区别", "企业版和专业版有什么不同"),
    ("为什么收不到验证码", "验证码一直收不到怎么办"),
    ("一共多少钱", "总共多少钱"),
    ("高级版一个月多少钱？", "高级版每月多少钱？"),
    ("iPhone 15多少钱", "iPhone 15的价格是多少"),
    ("Apple的退货政策是什么", "Apple怎么退货"),
]

# (asked, cached, the guard that refuses): most words shared, another question.
NEAR_MISSES = [
    # Contrasts: opposites and qualifiers.
    ("How do I turn on two-factor authentication?", "How do I turn off two-factor authentication?", "contrast"),
    ("How much is the Plus plan per month?", "How much is the Plus plan per year?", "contrast"),
    ("How long does shipping take?", "How long does express shipping take?", "contrast"),
    ("How do I enable notifications?", "How do I disable notifications?", "contrast"),
    ("Can I upload videos from the app?", "Can I download videos from the app?", "contrast"),
    ("怎么开启两步验证？", "怎么关闭两步验证？", "contrast"),
    ("套餐按月付多少钱？", "套餐按年付多少钱？", "contrast"),
    # Another number.
    ("Can I return it within 30 days?", "Can I return it within 60 days?", "numbers"),
    ("Is the iPhone 14 waterproof?", "Is the iPhone 15 waterproof?", "numbers"),
    ("Does the plan include 1,000 messages?", "Does the plan include 10,000 messages?", "numbers"),
    ("Is 30 divided by 5 equal to 6?", "Is 5 divided by 30 equal to 6?", "numbers"),
    ("Is GPT-4o available?", "Is GPT-4 available?", "numbers"),
    ("What happened in the second World War?", "What happened in the first World War?", "numbers"),
    ("Where is order #12345?", "Where is order #12346?", "numbers"),
    ("Is shipping free over $50?", "Is shipping free over $100?", "numbers"),
    ("Does the price drop by half?", "Does the price drop?", "numbers"),
    ("Does delivery take three days?", "Does delivery take 3 weeks or 5 days?", "numbers"),
    ("三天能到吗？", "五天能到吗？", "numbers"),
    ("退货期是三十天吗", "退货期是六十天吗", "numbers"),
    ("会员费一年多少钱", "会员费两年多少钱", "numbers"),
    ("下午3点开门吗", "下午5点开门吗", "numbers"),
    ("第一天可以退吗", "第二天可以退吗", "numbers"),
    # A negation.
    ("Can I cancel my order?", "Can't I cancel my order?", "negation"),
    ("Can I cancel my order?", "Can’t I cancel my order?", "negation"),
    ("Is the app free?", "Is the app not free?", "negation"),
    ("Why do I receive emails?", "Why don't I receive emails?", "negation"),
    ("Can I log in with a password?", "Can I log in without a password?", "negation"),
    ("Which plans include support?", "Which plans include no support?", "negation"),
    ("Did it ever work?", "Did it never work?", "negation"),
    ("Why can't I log in?", "Why can't I log in when I don't use my phone?", "negation"),
    ("Why can't I log in with 2FA?", "Why can't I log in when I don't use 2FA?", "negation"),
    ("能退款吗", "不能退款吗", "negation"),
    ("有优惠吗", "没有优惠吗", "negation"),
    ("为什么能收到验证码", "为什么收不到验证码", "negation"),
    ("别人能看到我的订单吗", "别让人看到我的订单", "negation"),
    ("可以使用优惠券", "请勿使用优惠券", "negation"),
    ("数据同步了吗", "数据不同步怎么办", "negation"),
    # Another entity.
    ("How deep is the Atlantic?", "How deep is the Pacific?", "entities"),
    ("how deep is the atlantic?", "how deep is the pacific?", "entities"),
    ("do you ship to mexico?", "do you ship to canada?", "entities"),
    ("Atlantic ocean: how deep?", "Pacific ocean: how deep?", "entities"),
    ("What is the function of TV?", "What is the function of money?", "entities"),
    ("How much is the Pro plan?", "How much is the Air plan?", "entities"),
    ("Does the pro plan include backups?", "Does the premium plan include backups?", "entities"),
    ("Is plan A cheaper?", "Is plan B cheaper?", "entities"),
    ("Can you ship to the US?", "Can you ship to us?", "entities"),
    ("How do I reset my iPhone?", "How do I reset my iPad?", "entities"),
    ("How do I install it on macOS?", "How do I install it on Windows?", "entities"),
    ("What is the refund policy in Canada?", "What is the refund policy?", "entities"),
    ("What does 'ls' do?", "What does 'rm' do?", "entities"),
    ('What does "Reset all" do?', 'What does "Reset" do?', "entities"),
    ("大西洋有多深？", "太平洋有多深？", "entities"),
    ("华为手机怎么截屏", "小米手机怎么截屏", "entities"),
    ("北京今天下雨吗", "上海今天下雨吗", "entities"),
    ("专业版多少钱", "企业版多少钱", "entities"),
    ("用支付宝可以付款吗", "用微信可以付款吗", "entities"),
    ("第一次世界大战是哪年开始的", "第二次世界大战是哪年开始的", "entities"),
    ("「设置」在哪里", "「帮助」在哪里", "entities"),
    ("《围城》的作者是谁", "《活着》的作者是谁", "entities"),
]

# (asked, cached, the guard that refuses): the same question, refused all the same. Where the guards cannot tell,
# they refuse: a miss costs one model call, a wrong hit a wrong answer.
KNOWN_MISSES = [
    ("Is my flight at 10:30 on 2024-05-01?", "On 2024-05-01, is my flight at 10:30?", "numbers"),
    ("Can I enable 2FA?", "Can I enable two-factor authentication?", "numbers"),
    ("How deep is the Pacific?", "太平洋有多深？", "entities"),
    ("Do you ship to Canada?", "Do you deliver orders to Canadian addresses?", "entities"),
    # A name that no list knows, in lower case.
    ("How do I reset my brightbox cam?", "How do I reset my Brightbox Cam?", "entities"),
]


def mismatch(asked: str, cached: str) -> str | None:
    return guard_mismatch(question_features(asked), question_features(cached))


@pytest.mark.parametrize(("asked", "cached"), PARAPHRASES)
def test_a_paraphrase_may_be_answered_from_the_cache(asked: str, cached: str) -> None:
    assert mismatch(asked, cached) is None


@pytest.mark.parametrize(("asked", "cached", "guard"), NEAR_MISSES)
def test_a_near_miss_is_refused_by_the_guard_it_differs_in(asked: str, cached: str, guard: str) -> None:
    assert mismatch(asked, cached) == guard


@pytest.mark.parametrize(("asked", "cached", "guard"), KNOWN_MISSES)
def test_where_the_guards_cannot_tell_they_refuse(asked: str, cached: str, guard: str) -> None:
    assert mismatch(asked, cached) == guard


def test_an_english_article_is_not_a_number() -> None:
    assert mismatch("I have a question: how do refunds work?", "How do refunds work?") is None


@pytest.mark.parametrize(
    ("one", "other"), [*PARAPHRASES, *((asked, cached) for asked, cached, _ in NEAR_MISSES + KNOWN_MISSES)]
)
def test_the_guards_give_the_same_verdict_either_way_round(one: str, other: str) -> None:
    assert mismatch(one, other) == mismatch(other, one)


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("30 days", ("30",)),
        ("thirty days", ("30",)),
        ("三十天", ("30",)),
        ("３０天", ("30",)),
        ("1,000 messages", ("1000",)),
        ("１，０００ messages", ("1000",)),
        ("1000.50 dollars", ("1000.5",)),
        ("twenty-five", ("25",)),
        ("two thousand five hundred and twenty one", ("2521",)),
        ("a hundred thousand", ("100000",)),
        ("3 million users", ("3000000",)),
        ("3 hundred thousand", ("300000",)),
        ("twice a day", ("2",)),
        ("half price", ("0.5",)),
        ("半价", ("0.5",)),
        ("十五", ("15",)),
        ("两天", ("2",)),
        ("两千五", ("2500",)),
        ("一万五", ("15000",)),
        ("一百零五", ("105",)),
        ("一亿三千万", ("130000000",)),
        ("3万", ("30000",)),
        ("1.5亿元", ("150000000",)),
        ("二〇二四年", ("2024",)),
        ("百分之三十", ("30",)),
        ("30%", ("30",)),
        ("-5 °C", ("-5",)),
        ("pages 3 - 5", ("3", "5")),
        ("third", ("3rd",)),
        ("3rd", ("3rd",)),
        ("twenty first", ("21st",)),
        ("第三", ("3rd",)),
        ("第3天", ("3rd",)),
        ("the second time", ("2nd",)),
        ("30 second timeout", ("30",)),
        ("wait a second", ()),
        ("which one is better?", ()),
        ("5G", ("5g",)),
        ("GPT-4o", ("4o",)),
        ("iPhone15", ("15",)),
        ("十几天", ("十几",)),
        ("要几天", ()),
        ("一起去，一样的，一定要", ()),
        ("二维码", ()),
        ("三星手机", ()),
    ],
)
def test_numbers_are_compared_as_values(text: str, numbers: tuple[str, ...]) -> None:
    assert question_features(text).numbers == numbers


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("Where is order #00123?", ("123",)),
        ("Order 987654321 arrived late", ("987654321",)),
        ("charged at 2024-05-01 10:30:00", ("2024", "5", "1", "10", "30", "0")),
        ("订单号20240501123456什么时候发货", ("20240501123456",)),
        ("No. 5", ("5",)),
    ],
)
def test_order_numbers_and_timestamps_are_just_numbers(text: str, numbers: tuple[str, ...]) -> None:
    features = question_features(text)
    assert features.numbers == numbers
    assert features.negations == 0


@pytest.mark.parametrize(
    ("text", "negations"),
    [
        ("Can I cancel?", 0),
        ("Can't I cancel?", 1),
        ("Can’t I cancel?", 1),
        ("cant I cancel", 1),
        ("I do not want it and will never use it", 2),
        ("Is it free or not?", 0),
        ("not only this", 0),
        ("no matter what", 0),
        ("without a receipt", 1),
        ("I am unable to log in", 1),
        ("能退款吗", 0),
        ("不能退款吗", 1),
        ("没有收到", 1),
        ("没收到货", 1),
        ("能不能退款", 0),
        ("有没有优惠", 0),
        ("可不可以退", 0),
        ("是不是免费的", 0),
        ("有什么不同", 0),
        ("差不多", 0),
        ("非常好", 0),
        ("特别快", 0),
        ("别人的订单", 0),
        ("别担心", 1),
        ("无线网络", 0),
        ("无法登录", 1),
        ("未来的价格", 0),
        ("尚未发货", 1),
        ("请勿吸烟", 1),
        ("我不同意", 1),
        ("非洲", 0),
        ("不知道也没有", 2),
    ],
)
def test_negations_are_counted(text: str, negations: int) -> None:
    assert question_features(text).negations == negations


@pytest.mark.parametrize(
    ("text", "entities"),
    [
        ("What is the function of TV?", {"TV"}),
        ("Is the Atlantic deep?", {"atlantic"}),
        ("Ship to the US", {"US"}),
        ("Is IT open on Sunday?", {"IT", "sunday"}),
        ("Is plan B cheaper?", {"B"}),
        ("iPhone or IPhone on macOS", {"iphone", "macos"}),
        ("GPT4 or X2", {"GPT", "X"}),
        ("I am OK at 3 PM", set()),
        ("does the pro plan have it", {"pro"}),
        ('the "Pro" plan', {"pro", "“Pro”"}),
        ("what does `ls -la` do", {"“ls -la”"}),
        ("don't use the users' 'Pro' plan", {"“Pro”", "pro"}),
        ("「设置」在哪里", {"“设置”"}),
        ("大西洋有多深", {"大西洋"}),
        ("武汉市和湖北省", {"武汉", "湖北"}),
        ("华为和小米", {"华为", "小米"}),
        ("香港地区", {"香港"}),
        ("Apple的退货政策", {"apple"}),
        ("怎么重置密码", set()),
        ("系统日志里下拉菜单的满意度", set()),
    ],
)
def test_entities(text: str, entities: set[str]) -> None:
    assert question_features(text).entities == entities


def test_a_word_capitalised_at_a_sentence_start_needs_only_to_be_in_the_other_question() -> None:
    features = question_features("Brightbox: does it work with the Hub?")

    assert features.entities == {"hub"}
    assert features.initial_words == {"brightbox"}
    assert mismatch("Brightbox: does it work with the Hub?", "Does the brightbox work with the Hub?") is None
    assert mismatch("Brightbox: does it work with the Hub?", "Does the Lumina work with the Hub?") == "entities"


def test_features_are_frozen_and_equal_for_the_same_text() -> None:
    features = question_features("Can't I return my iPhone 15 within 30 days?")

    assert features == question_features("Can't I return my iPhone 15 within 30 days?")
    assert hash(features) == hash(question_features("Can't I return my iPhone 15 within 30 days?"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        features.negations = 0  # type: ignore[misc]
    assert isinstance(features, QuestionFeatures)


def test_full_width_forms_are_their_ascii_selves() -> None:
    assert question_features("ｉＰｈｏｎｅ　１５，ｃａｎ＇ｔ　I　ｒｅｔｕｒｎ　ｉｔ？") == question_features(
        "iPhone 15, can't I return it?"
    )


def test_the_gazetteer_names_its_source_and_licence_and_is_well_formed() -> None:
    lines = PROPER_NOUNS.read_text(encoding="utf-8").splitlines()
    header = "\n".join(line for line in lines if line.startswith("#"))
    entries = [line.split("\t") for line in lines if line and not line.startswith("#")]
    words = {entry[0] for entry in entries}

    assert "jieba" in header and "MIT License" in header and "Copyright (c) 2013 Sun Junyi" in header
    assert "scripts/cjk_proper_nouns.py" in header
    assert len(entries) == len(words) > 1000
    for entry in entries:
        assert len(entry[0]) >= 2 and all(unicodedata.name(char).startswith("CJK") for char in entry[0])
        # A short form is itself an entry: 武汉市 -> 武汉.
        assert len(entry) == 1 or (len(entry) == 2 and entry[1] in words and entry[0].startswith(entry[1]))
    assert {"大西洋", "太平洋", "华为", "小米", "北京"} <= words
    assert not {"城市", "东西", "聊天", "日志", "普通"} & words


def test_the_english_names_are_lower_case_and_none_is_an_ordinary_word() -> None:
    lines = ENGLISH_PROPER_NOUNS.read_text(encoding="utf-8").splitlines()
    names = [line for line in lines if line and not line.startswith("#")]

    assert len(names) == len(set(names)) > 300
    assert all(name == name.lower().strip() and "  " not in name for name in names)
    assert {"atlantic", "pacific", "canada", "new york", "sunday", "iphone"} <= set(names)
    assert not {"may", "march", "turkey", "chad", "apple", "windows", "polish", "us", "uk"} & set(names)
