"""Labelled texts for the PII screen (chatmesh.safety.pii), in English and Chinese: what each text holds, kind by
kind, written as the exact text of each item in order. test_pii.py measures precision and recall over them.

How items are labelled:
- A number covers what the writer wrote as the number: `+` or `00` in front, the separators inside it, its
  parentheses when both are inside it (`(010) 1234 5678`, `+44 (0)20 7946 0958`), not the punctuation around it.
- Every item is labelled as what it is, including a few that the screen is known to miss (a US number written as
  a bare run of digits, Chinese numerals, a dotted quad spaced out, an extension glued on with x), and a few
  negatives that it is known to flag.
- A dotted quad is an IP address, `1.2.3.4` and section numbers too, unless a version marker (`v`, `version`,
  `ver`, `版本`, `版本号`) is right before it: it is one syntactically, and taking it out would take out real
  addresses. Version strings of other shapes (`2.14.3`, `10.0.19045.2006`) are not addresses.
- IPv6 in brackets (`[2001:db8::8]:443`) is labelled without the brackets; `::` alone is not an address.
- Obfuscated spellings (`ada at example dot com`) are out of scope and left out of this set.
"""

# Full-width forms and zero-width characters are what many of these texts are about.
# ruff: noqa: RUF001

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    language: str  # "en" or "zh"
    text: str
    # (kind, the item's exact text), in order of appearance; kind as in the PII policy.
    pii: tuple[tuple[str, str], ...] = ()


def en(text: str, *pii: tuple[str, str]) -> Case:
    return Case("en", text, pii)


def zh(text: str, *pii: tuple[str, str]) -> Case:
    return Case("zh", text, pii)


def email(value: str) -> tuple[str, str]:
    return ("email", value)


def phone(value: str) -> tuple[str, str]:
    return ("phone", value)


def cn_id(value: str) -> tuple[str, str]:
    return ("cn_id", value)


def card(value: str) -> tuple[str, str]:
    return ("payment_card", value)


def ip(value: str) -> tuple[str, str]:
    return ("ip_address", value)


CASES: tuple[Case, ...] = (
    # English: e-mail addresses.
    en("Write to ada.lovelace@example.com for the invite.", email("ada.lovelace@example.com")),
    en("Contact: bob+billing@mail.example.co.uk.", email("bob+billing@mail.example.co.uk")),
    en("CC j_smith-99@sub.domain.io and ops@example.org", email("j_smith-99@sub.domain.io"), email("ops@example.org")),
    en("My address is ＪＯＨＮ＠ＥＸＡＭＰＬＥ．ＣＯＭ, full-width.", email("ＪＯＨＮ＠ＥＸＡＭＰＬＥ．ＣＯＭ")),
    en("send it to john\u200b@\u200bexample.com please", email("john\u200b@\u200bexample.com")),
    en("(reach me at carol@example.net)", email("carol@example.net")),
    en("Email: 13800138000@qq.com is my QQ mail", email("13800138000@qq.com")),
    en("<dave@example.com>", email("dave@example.com")),
    # English: phone numbers.
    en("Call me on +1 415-555-2671 after five.", phone("+1 415-555-2671")),
    en("Office: (415) 555-2671.", phone("(415) 555-2671")),
    en("US support line 1-650-253-0000, weekdays.", phone("1-650-253-0000")),
    en("Her cell is 312.555.1234", phone("312.555.1234")),
    en("Ring +44 20 7946 0958 or +44 (0)20 7946 0958.", phone("+44 20 7946 0958"), phone("+44 (0)20 7946 0958")),
    en("UK mobile 07911 123456, landline 0161 496 0000", phone("07911 123456"), phone("0161 496 0000")),
    en("In London dial 020 7946 0958.", phone("020 7946 0958")),
    en("Berlin office: +49 30 901820", phone("+49 30 901820")),
    en("Tokyo: +81 3-1234-5678; Paris: +33 1 42 68 53 00", phone("+81 3-1234-5678"), phone("+33 1 42 68 53 00")),
    en("Sydney +61 2 9374 4000", phone("+61 2 9374 4000")),
    en("Singapore desk +65 6123 4567.", phone("+65 6123 4567")),
    en("HK +852 2345 6789 and Taipei +886 2 2345 6789", phone("+852 2345 6789"), phone("+886 2 2345 6789")),
    en("My India number is +91 98765 43210", phone("+91 98765 43210")),
    en("Brazil: +55 11 98765-4321", phone("+55 11 98765-4321")),
    en("WhatsApp me at +8613800138000", phone("+8613800138000")),
    en("China mobile 138-0013-8000, or 139 1234 5678", phone("138-0013-8000"), phone("139 1234 5678")),
    en("Beijing office 010-12345678, Shenzhen 0755 8888 1234", phone("010-12345678"), phone("0755 8888 1234")),
    en("dial 0086 138 0013 8000 from abroad", phone("0086 138 0013 8000")),
    en("my number: 1 3 8 0 0 1 3 8 0 0 0", phone("1 3 8 0 0 1 3 8 0 0 0")),
    en("phone ＋１ ４１５ ５５５ ２６７１ (full width)", phone("＋１ ４１５ ５５５ ２６７１")),
    en("call +1\u200b415\u200b555\u200b2671 now", phone("+1\u200b415\u200b555\u200b2671")),
    en("numbers: 13800138000 13912345678", phone("13800138000"), phone("13912345678")),
    en("Call 138 0013 8000 2 times if needed", phone("138 0013 8000")),
    en("Tel.+1 (650) 253-0000", phone("+1 (650) 253-0000")),
    en("call (+44) 20 7946 0958 or tel:+14155552671", phone("(+44) 20 7946 0958"), phone("+14155552671")),
    en("Desk 415-555-2671 ext. 12", phone("415-555-2671")),
    en("Desk 415-555-2671x12", phone("415-555-2671")),
    en("Call me at 4155552671 tonight", phone("4155552671")),
    en("The router is 192 . 168 . 1 . 1", ip("192 . 168 . 1 . 1")),
    en("China: 86-138-0013-8000 (no plus)", phone("86-138-0013-8000")),
    en("Reply to mailto:John.Doe1990@Gmail.com", email("John.Doe1990@Gmail.com")),
    en("Connect to 10.0.0.1.", ip("10.0.0.1")),
    # English: Chinese resident ID numbers.
    en("Passenger ID 110101199003071233, seat 14C.", cn_id("110101199003071233")),
    en("ID card: 11010519491231002X", cn_id("11010519491231002X")),
    en("id 11010519491231002x in lower case", cn_id("11010519491231002x")),
    en(
        "Her ID is 310104198511224568 and his is 440305199312057892",
        cn_id("310104198511224568"),
        cn_id("440305199312057892"),
    ),
    en("ID with spaces: 330106 20010228 3459", cn_id("330106 20010228 3459")),
    en("full-width ID １１０１０１１９９００３０７１２３３", cn_id("１１０１０１１９９００３０７１２３３")),
    # English: payment cards.
    en("Charge my Visa 4111 1111 1111 1111, exp 12/28.", card("4111 1111 1111 1111")),
    en("card 4012-8888-8888-1881", card("4012-8888-8888-1881")),
    en("Old Visa 4222222222222 still works", card("4222222222222")),
    en("Mastercard 5555555555554444 and 5105 1051 0510 5100", card("5555555555554444"), card("5105 1051 0510 5100")),
    en("New Mastercard range: 2221 0000 0000 0009", card("2221 0000 0000 0009")),
    en("Amex 3782 822463 10005 or 371449635398431", card("3782 822463 10005"), card("371449635398431")),
    en("Discover 6011 1111 1111 1117", card("6011 1111 1111 1117")),
    en("JCB: 3530 1113 3330 0000", card("3530 1113 3330 0000")),
    en("UnionPay 6222 0212 3456 7890 128", card("6222 0212 3456 7890 128")),
    en("Diners 3056 930902 5904", card("3056 930902 5904")),
    en("card ４１１１ １１１１ １１１１ １１１１ in full width", card("４１１１ １１１１ １１１１ １１１１")),
    en("pay with 4111\u200b1111\u200b1111\u200b1111", card("4111\u200b1111\u200b1111\u200b1111")),
    # English: IP addresses.
    en("The server is at 192.168.1.10, port 22.", ip("192.168.1.10")),
    en("Use DNS 8.8.8.8 or 1.1.1.1", ip("8.8.8.8"), ip("1.1.1.1")),
    en("Blocked requests from 203.0.113.7:8080", ip("203.0.113.7")),
    en("subnet 10.0.0.0/8", ip("10.0.0.0")),
    en("http://172.16.254.1/admin", ip("172.16.254.1")),
    en("IPv6 2001:db8::1 is in the docs range", ip("2001:db8::1")),
    en("full form 2001:0db8:85a3:0000:0000:8a2e:0370:7334", ip("2001:0db8:85a3:0000:0000:8a2e:0370:7334")),
    en("link-local fe80::1ff:fe23:4567:890a", ip("fe80::1ff:fe23:4567:890a")),
    en("mapped ::ffff:192.0.2.128 here", ip("::ffff:192.0.2.128")),
    en("connect to [2001:db8::8]:443", ip("2001:db8::8")),
    en("See section 1.2.3.4 of the spec", ip("1.2.3.4")),
    en("ping ::1 to test", ip("::1")),
    # English: several kinds together.
    en(
        "Ada (ada@example.com, +44 20 7946 0958) paid with 4111111111111111 from 198.51.100.23.",
        email("ada@example.com"),
        phone("+44 20 7946 0958"),
        card("4111111111111111"),
        ip("198.51.100.23"),
    ),
    en(
        "Name: Li Wei; ID 110101199003071233; mobile 13800138000; mail liwei@example.cn",
        cn_id("110101199003071233"),
        phone("13800138000"),
        email("liwei@example.cn"),
    ),
    # English: hard negatives.
    en("Order 20261203183000 shipped."),
    en("The timestamp 1796324632 is in seconds; 1796324632123 in milliseconds."),
    en("Release version 2.14.3 is out; build 10.0.19045.2006."),
    en("Upgrade to v1.2.3.4 or version 1.2.3.4 today."),
    en("It costs $1,299.99, or $12,345.00 for the bundle."),
    en("Meeting on 2026-12-03 at 18:30:00, or 03.12.2026."),
    en("Tracking number 1Z999AA10123456784 (UPS)."),
    en("USPS tracking 9400 1118 9922 3197 4284 90"),
    en("Order no. 1234567812345670 passes Luhn but is no card."),
    en("IMEI 490154203237518 is Luhn-valid too."),
    en("Invoice 7992739871 and reference 79927398713."),
    en("ISBN 978-3-16-148410-0"),
    en("pi is 3.14159265358979323846"),
    en("The code 31415926535897932384626 is long."),
    en("ID 110101199003071234 has a bad checksum."),
    en("ID 110101199002301238 has no such date (Feb 30)."),
    en("ID 990101199003071237 names no place."),
    en("not an IP: 999.1.1.1, 256.256.256.256, 01.02.03.04, 1.2.3.4.5"),
    en("A time 12:30:45 and a MAC 00:1A:2B:3C:4D:5E."),
    en("C++ std::vector<int> and Rust Foo::bar()"),
    en("Room 1203, floor 18, building 7."),
    en("Score 98 87 76 65 54 43"),
    en("Call extension 4521 or 4522."),
    en("Population 1,411,750,000 in 2026."),
    en("Unix time 1733245200 and 20261203."),
    en("Product SKU A1234567890 and ref X-1234567-Z."),
    en("A random run 5123456789012345 fails Luhn."),
    en("Card-like 9111 1111 1111 1111 has no issuer."),
    en("a 2026-12-03 18:30 reminder"),
    en("Random email-ish text: user@localhost and @handle and a@b.c"),
    en("An unspecified address :: is not anyone's."),
    en("Order #13812345678 shipped yesterday."),
    en("Coordinates 39.9042, 116.4074 (Beijing)."),
    en("UUID 123e4567-e89b-12d3-a456-426614174000"),
    en("ISBN 7-111-12345-6 and IBAN GB29 NWBK 6016 1331 9268 19"),
    en("Revenue was $13812345678 last year, up 15%."),
    # Chinese: e-mail addresses.
    zh("我的邮箱是zhangsan@example.com，欢迎联系。", email("zhangsan@example.com")),
    zh("邮箱：ｌｉｓｉ＠ｅｘａｍｐｌｅ．ｃｏｍ", email("ｌｉｓｉ＠ｅｘａｍｐｌｅ．ｃｏｍ")),
    zh(
        "请发到wang.wu@mail.example.cn或者13800138000@163.com",
        email("wang.wu@mail.example.cn"),
        email("13800138000@163.com"),
    ),
    zh("联系人邮箱（zhao@example.org）", email("zhao@example.org")),
    zh("邮件地址：qian\u200b@example.com", email("qian\u200b@example.com")),
    # Chinese: phone numbers.
    zh("我的手机号是13800138000，有事打给我。", phone("13800138000")),
    zh("电话：１３８００１３８０００", phone("１３８００１３８０００")),
    zh("手机 138-0013-8000", phone("138-0013-8000")),
    zh("手机号码：138 0013 8000", phone("138 0013 8000")),
    zh("号码是1 3 8 0 0 1 3 8 0 0 0，记一下", phone("1 3 8 0 0 1 3 8 0 0 0")),
    zh("打这个：１３８－００１３－８０００", phone("１３８－００１３－８０００")),
    zh("手机138\u200b0013\u200b8000", phone("138\u200b0013\u200b8000")),
    zh("手机号138.0013.8000", phone("138.0013.8000")),
    zh("联系电话：+86 138 0013 8000", phone("+86 138 0013 8000")),
    zh("国际拨打0086-13912345678", phone("0086-13912345678")),
    zh("座机010-12345678，分机请转人工", phone("010-12345678")),
    zh("深圳办公室0755 8888 1234", phone("0755 8888 1234")),
    zh("上海总部（021）6234 5678", phone("（021）6234 5678")),
    zh("广州：020-87654321；杭州：0571-87654321", phone("020-87654321"), phone("0571-87654321")),
    zh("客服热线+86 10 1234 5678", phone("+86 10 1234 5678")),
    zh("我的号码：15012345678和18612345678", phone("15012345678"), phone("18612345678")),
    zh("新号17712345678，旧号16612345678", phone("17712345678"), phone("16612345678")),
    zh("请拨打１５０ １２３４ ５６７８", phone("１５０ １２３４ ５６７８")),
    zh("电话138 0013 8000 2次都没人接", phone("138 0013 8000")),
    zh("美国朋友的电话是+1 (415) 555-2671", phone("+1 (415) 555-2671")),
    zh("英国号码+44 7911 123456", phone("+44 7911 123456")),
    zh("手机：１３８‐００１３‐８０００", phone("１３８‐００１３‐８０００")),
    zh("联系方式：(+86) 138 0013 8000", phone("(+86) 138 0013 8000")),
    zh("电话：010－12345678转123", phone("010－12345678")),
    zh("手机号：13800138000/13912345678", phone("13800138000"), phone("13912345678")),
    zh("手机86 13800138000", phone("86 13800138000")),
    zh("电话号码是一三八零零一三八零零零", phone("一三八零零一三八零零零")),
    # Chinese: resident ID numbers.
    zh("身份证号：110101199003071233", cn_id("110101199003071233")),
    zh("身份证11010519491231002X已登记", cn_id("11010519491231002X")),
    zh("证件号码：１１０１０５１９４９１２３１００２Ｘ", cn_id("１１０１０５１９４９１２３１００２Ｘ")),
    zh("身份证号 420106 19990101 1114", cn_id("420106 19990101 1114")),
    zh(
        "他的身份证是610113200002295672，她的是320102198704178907",
        cn_id("610113200002295672"),
        cn_id("320102198704178907"),
    ),
    zh("身份证号码：4403\u200b0519\u200b9312\u200b0578\u200b92", cn_id("4403\u200b0519\u200b9312\u200b0578\u200b92")),
    zh("身份证330106200102283459。", cn_id("330106200102283459")),
    # Chinese: payment cards.
    zh("银行卡号：6222 0212 3456 7890 128", card("6222 0212 3456 7890 128")),
    zh("卡号6212345678901232，请核对", card("6212345678901232")),
    zh("信用卡：４１１１ １１１１ １１１１ １１１１", card("４１１１ １１１１ １１１１ １１１１")),
    zh(
        "Visa卡4111-1111-1111-1111，万事达5555 5555 5555 4444", card("4111-1111-1111-1111"), card("5555 5555 5555 4444")
    ),
    zh("银联卡号6250941006528599", card("6250941006528599")),
    zh("运通卡3782 822463 10005", card("3782 822463 10005")),
    zh("JCB卡３５６６００２０２０３６０５０５", card("３５６６００２０２０３６０５０５")),
    zh("卡号6200\u200b0000\u200b0000\u200b0005", card("6200\u200b0000\u200b0000\u200b0005")),
    # Chinese: IP addresses.
    zh("服务器地址是192.168.1.1，请勿外传。", ip("192.168.1.1")),
    zh("登录IP：１０．０．０．８", ip("１０．０．０．８")),
    zh("异常访问来自203.0.113.45和198.51.100.7", ip("203.0.113.45"), ip("198.51.100.7")),
    zh("IPv6地址2001:db8::ff00:42:8329", ip("2001:db8::ff00:42:8329")),
    zh("内网地址172.16.0.1:3306", ip("172.16.0.1")),
    # Chinese: several kinds together.
    zh(
        "姓名：张三，身份证110101199003071233，手机13800138000，"
        "邮箱zhangsan@example.com，银行卡6222 0212 3456 7890 128",
        cn_id("110101199003071233"),
        phone("13800138000"),
        email("zhangsan@example.com"),
        card("6222 0212 3456 7890 128"),
    ),
    zh(
        "收货人李四，电话０７５５－８８８８１２３４，登录地址10.1.2.3",
        phone("０７５５－８８８８１２３４"),
        ip("10.1.2.3"),
    ),
    # Chinese: hard negatives.
    zh("订单号：2026120318300012，请保存。"),
    zh("订单编号20261203183000已发货"),
    zh("时间戳1796324632，毫秒1796324632123"),
    zh("金额￥1,299.00元，优惠￥12345.67"),
    zh("价格：１２９９．００元"),
    zh("日期2026-12-03 18:30，或2026年12月3日"),
    zh("顺丰单号SF1234567890123，圆通YT1234567890123"),
    zh("京东订单JD0012345678901"),
    zh("快递单号773012345678901"),
    zh("版本号1.2.3.4，版本 10.0.0.1"),
    zh("软件版本v2.3.4.5发布了"),
    zh("固件版本2.14.3，内核5.15.0"),
    zh("身份证110101199003071234校验位不对"),
    zh("身份证号110101199002301238日期不存在"),
    zh("身份证990101199003071237地区码不存在"),
    zh("身份证110101209901011239出生日期在未来"),
    zh("流水号1234567812345670"),
    zh("设备IMEI：490154203237518"),
    zh("会员卡号9111 1111 1111 1111"),
    zh("这个数字很长：31415926535897932384626"),
    zh("房间号1203，楼层18，7号楼"),
    zh("人口14亿1175万，即1411750000人"),
    zh("地址不是IP：999.1.1.1，01.02.03.04"),
    zh("会议时间12:30:45"),
    zh("验证码是384756，五分钟内有效"),
    zh("QQ号12345678"),
    zh("第3章第2节第1条"),
    zh("分数98 87 76 65 54 43"),
    zh("邮编100080，区号010"),
    zh("今天天气很好，我们一起去公园散步吧。"),
    zh("编号A1234567890B"),
    zh("公司去年营收13812345678元，同比增长15%"),
    zh("坐标39.9042, 116.4074"),
    zh("转账￥13912345678.00"),
    zh("第3期中奖号码：01 05 12 18 23 30 07"),
    zh("会员编号13812345678，积分3000"),
)
