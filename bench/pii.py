"""What the PII screen costs safety: the CPU of `find_pii` (every kind looked for) on one message, as ScreenInput
spends it on a caller's message and ScreenOutput on a whole reply.

Messages of just under 2,000 characters, in English and in Chinese, with personal information (an e-mail, a phone
number, a payment card, and an IP address or a Chinese ID number; the Chinese ones full-width) and without it. All
of them hold numbers that are none (dates, times, prices, versions, order numbers, timestamps), about one every 50
characters: each is a candidate the screen reads and rejects. Measured in this process, with the process's CPU
clock, over many screens.
"""

# Full-width forms are part of what is measured.
# ruff: noqa: RUF001

from __future__ import annotations

import time
from typing import Any

from chatmesh.safety.pii import ALL_KINDS, find_pii

MESSAGE_CHARS = 1_990
EN_FILLER = (
    "Thanks for the quick reply. The release of version 2.14.3 went out on 2026-12-03 at 18:30, and build "
    "10.0.19045.2006 of the desktop client follows on Friday, once the 3 remaining checks pass. Order "
    "20261203183000 was refunded ($1,299.99) at timestamp 1796324632, and the other orders shipped as planned. "
    "We compared the latency of the gateway before and after the change: the 99th percentile moved by 12 ms. "
)
EN_PII = (
    "Reach Ada at ada.lovelace@example.com or +1 (415) 555-2671; she paid with 4111 1111 1111 1111 from 203.0.113.7. "
)
ZH_FILLER = (
    "谢谢你的回复。版本2.14.3已于2026年12月3日18:30发布，订单号2026120318300012已经退款，金额为￥1,299.00元，"
    "时间戳是1796324632。我们比较了改动前后网关的延迟，第99百分位下降了12毫秒，其余3个订单已经按计划发货，"
    "请大家留意后续的通知和安排。"
)
ZH_PII = (
    "联系人张三，手机１３８－００１３－８０００，身份证110101199003071233，"
    "银行卡6222 0212 3456 7890 128，邮箱ｚｈａｎｇｓａｎ＠ｅｘａｍｐｌｅ．ｃｏｍ。"
)


def _message(filler: str, pii: str = "") -> str:
    """`pii` once, in the middle of as much of `filler` as makes MESSAGE_CHARS characters."""
    padding = (filler * (MESSAGE_CHARS // len(filler) + 1))[: MESSAGE_CHARS - len(pii)]
    middle = padding.rfind(" ", 0, len(padding) // 2) + 1 or len(padding) // 2
    return padding[:middle] + pii + padding[middle:]


MESSAGES = {
    "en_with_pii": _message(EN_FILLER, EN_PII),
    "en_without": _message(EN_FILLER),
    "zh_with_pii": _message(ZH_FILLER, ZH_PII),
    "zh_without": _message(ZH_FILLER),
}


def measure(screens: int = 1000) -> dict[str, Any]:
    """CPU ms per screen of each message, and the most of them."""
    messages = {}
    for name, text in MESSAGES.items():
        find_pii(text, ALL_KINDS)  # phonenumbers and stdnum load their metadata on first use
        started = time.process_time()
        for _ in range(screens):
            found = find_pii(text, ALL_KINDS)
        elapsed = time.process_time() - started
        messages[name] = {
            "chars": len(text),
            "found": len(found),
            "cpu_ms_per_message": round(elapsed * 1000 / screens, 4),
        }
    return {
        "screens": screens,
        "messages": messages,
        "cpu_ms_per_message": max(message["cpu_ms_per_message"] for message in messages.values()),
    }
