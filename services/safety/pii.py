"""Personal information in text: emails, phone numbers, Chinese resident ID numbers, payment card numbers and IP
addresses, with their positions in code points of the text as given.

One regular expression finds the candidate runs of digits (numbers and IPv4 addresses), and two more the e-mail and
IPv6 candidates (only around an @, and in a text with two colons that only hex digits separate, as in `::` or
`:db8:`); only candidates are validated, so a text without any costs a scan. The scan reads a copy of the text in
which full-width forms are half-width (NFKC: full-width digits, letters and @), Unicode spaces and dashes are ASCII
ones, and zero-width and other format characters are gone; positions in the copy are mapped back to the original, so
a span covers exactly what the caller wrote (separators and full-width digits included).

What counts, kind by kind:

- email: `local@domain.tld`, ASCII, with a top-level domain of letters.
- phone: digits written with or without separators (spaces, hyphens, dots, parentheses), validated with
  phonenumbers (`is_valid_number`), tried in this order and kept at the first that fits:
  1. with `+` or `00` in front: as an international number;
  2. a Chinese mobile (`1[3-9]` and 11 digits) or fixed line with its area code (`0` and 10 to 12 digits), in any
     grouping, as Chinese people write them (`13800138000`, `138 0013 8000`, `0755-12345678`);
  3. as a national number of each of `regions` (after CN: US, GB), only when it is written in groups exactly as
     that region writes its numbers (`(415) 555-2671`, `415.555.2671`, `1-415-555-2671`, `020 7946 0958`): a bare
     run of digits, a date or a timestamp (`2026-12-03 18`, `1796324632`) is not taken for a foreign number.
- cn_id: 18 characters (the last may be X) with a valid checksum, a real birth date (not in the future) and a known
  place of birth (python-stdnum's `cn.ric`).
- payment_card: 13 to 19 digits passing the Luhn check that begin with a known issuer prefix and have a length
  that issuer uses (Visa, Mastercard, American Express, UnionPay, Discover, JCB, Diners Club, Mir), so that a
  Luhn-valid order number is not taken for a card.
- ip_address: IPv4 and IPv6 addresses (the `ipaddress` module decides), but not `::`. A dotted quad right after a
  version marker (`v1.2.3.4`, `version 1.2.3.4`, `版本 1.2.3.4`) is a version; any other valid one, `1.2.3.4`
  included, is an address.

A run of digits is read whole first, then, if it is none of these as a whole, as its longest valid pieces from the
left (split only where the writer put a separator), so `138 0013 8000 2 次` yields the phone number. The same
digits are a cn_id before a payment_card before a phone; of overlapping matches the longest is kept (an e-mail
holding digits is an e-mail). Matches never overlap. Not taken at all: a run glued to a letter (`SF1234567890123`),
an amount (after a currency sign, before 元, 块 or %), a number after # (`Order #13812345678`), and a date alone
(`2026-12-03`).
"""

from __future__ import annotations

import bisect
import collections
import datetime
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum import luhn
from stdnum.cn import ric
from stdnum.exceptions import ValidationError

from chatmesh.safety import metrics
from chatmesh.v1 import safety_pb2

EMAIL = safety_pb2.PII_KIND_EMAIL
PHONE = safety_pb2.PII_KIND_PHONE
CN_ID = safety_pb2.PII_KIND_CN_ID
PAYMENT_CARD = safety_pb2.PII_KIND_PAYMENT_CARD
IP_ADDRESS = safety_pb2.PII_KIND_IP_ADDRESS
# The kinds' names in the PII policy (settings.pii_policy) and in the metrics' `kind` label: email, phone, cn_id,
# payment_card, ip_address.
KIND_BY_NAME: dict[str, int] = {
    name.removeprefix("PII_KIND_").lower(): kind
    for name, kind in safety_pb2.PiiKind.items()
    if kind != safety_pb2.PII_KIND_UNSPECIFIED
}
NAME_BY_KIND: dict[int, str] = {kind: name for name, kind in KIND_BY_NAME.items()}
ALL_KINDS = frozenset(KIND_BY_NAME.values())
# Regions whose national numbers are recognized after China's (see the module's docstring).
DEFAULT_REGIONS = ("US", "GB")


@dataclass(frozen=True, slots=True)
class PiiMatch:
    kind: int  # a safety_pb2.PiiKind
    start: int  # [start, end) in code points of the text
    end: int
    value: str  # text[start:end]


# The copy that is scanned: full-width ASCII forms as NFKC makes them (except the full-width exclamation mark,
# comma, colon, semicolon and question mark of everyday Chinese text, which nothing looked for contains), Unicode
# spaces and dashes as ASCII, and format characters (zero-width space and joiners, soft hyphen, byte-order mark,
# direction marks) dropped.
_REPLACEMENTS: dict[str, str] = {
    **{
        chr(code): unicodedata.normalize("NFKC", chr(code))
        for code in range(0xFF01, 0xFF5F)
        if chr(code) not in "\uff01\uff0c\uff1a\uff1b\uff1f"
    },
    **dict.fromkeys(
        "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000", " "
    ),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63", "-"),
    **dict.fromkeys("\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff", ""),
}
_SPECIAL = "[" + "".join(map(re.escape, _REPLACEMENTS)) + "]"
# One, then any more: re skips to a pattern's first character fast only when it is not repeated (`[...]+`).
_SPECIAL_RUNS = re.compile(_SPECIAL + _SPECIAL + "*")
_TRANSLATION = str.maketrans(_REPLACEMENTS)
_DROPPED = frozenset(char for char, replacement in _REPLACEMENTS.items() if not replacement)

# Runs of digits, found by one scan that skips to each digit that does not continue a word: a dotted quad (for
# IPv4), or at least 7 digits in groups with separators between them, maybe with an X at the end. The run is
# taken whole (possessive), so that one that ends against a letter is dropped rather than read shorter. The
# scan tries most digits that start a word (a date, a price), so its other repeats are possessive too, where
# giving back could not make a match: they fail without backtracking.
_DIGIT_RUNS = re.compile(
    r"""
    \d (?<!\w\d) (?:
        (?<!\.\d) \d{0,2}+ (?:\.\d{1,3}+){3} (?!\w|\.\d) (?P<ipv4>)
        | (?<!\d[.-]\d) (?=(?:[\ .()-]*+\d){6})
            \d*+ (?: (?:[ ]{1,2} | [ ]?[-.][ ]? | [ ]?\([ ]? | \)[ ]?-?[ ]?) \d++ )*+ [Xx]?
    )
    """,
    re.ASCII | re.VERBOSE,
)
_IPV4_IN_RUN = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\d|\.\d)", re.ASCII)
# A date alone, year first or last: not a number of ours.
_DATE = re.compile(
    r"""
    (?:19|20)\d\d ([-./]) (?:0?[1-9]|1[0-2]) \1 (?:0?[1-9]|[12]\d|3[01])
    | (?:0?[1-9]|[12]\d|3[01]) ([-./]) (?:0?[1-9]|1[0-2]) \2 (?:19|20)\d\d
    """,
    re.ASCII | re.VERBOSE,
)
# What may come before a run: +, (, or both.
_LEAD = re.compile(r"(?:\(?\+[ ]?|\([ ]?)$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A local part, @, labels, and a top-level domain of letters. Looked for only around an @.
_EMAILS = re.compile(
    rf"[A-Za-z0-9](?<![\w.%+-][A-Za-z0-9])[\w.%+-]{{0,63}}@(?:{_LABEL}\.)+[A-Za-z]{{2,24}}(?![\w-])", re.ASCII
)
# Hex digits and at least two colons, maybe ending in a dotted quad. Looked for only in a text with `::` or at
# least 7 colons, as every IPv6 address has, and with two colons that only hex digits separate, as every match
# has: a scan of the whole text costs more than the rest of the screen, and times (`18:30`) and labels (`note:`)
# make many texts reach 7 colons.
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)",
    re.ASCII,
)
_IPV6_COLONS = re.compile(r":[0-9A-Fa-f]*:")
# A run glued to a word is none of ours; nor is an amount (after a currency sign, before 元, 块 or %) or a number
# marked with # (an order, a ticket).
_NOT_AFTER = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_元块%")
_NOT_BEFORE = "#$\u00a2\u00a3\u00a5\u20ac\uffe5\uffe1\uffe0"
_DIGIT_GROUPS = re.compile(r"\d+")
_VERSION_MARKER = re.compile(r"(?:\b[Vv]|\b(?:[Vv]ersion|[Vv]er\.?|VERSION)|版本号?)\s*:?\s*$")

_CN_MOBILE = re.compile(r"1[3-9]\d{9}")
_CN_FIXED_LINE = re.compile(r"0[1-9]\d{8,10}")
_MIN_PHONE_DIGITS = 7
_MAX_RUN_DIGITS = 19

# Card numbers by issuer prefix and the lengths the issuer uses: Visa; Mastercard; American Express; UnionPay;
# Discover; JCB; Diners Club; Mir.
_PAYMENT_CARD = re.compile(
    r"""
    4 (?:\d{12}|\d{15}|\d{18})
    | (?:5[1-5]\d\d | 222[1-9] | 22[3-9]\d | 2[3-6]\d\d | 27[01]\d | 2720) \d{12}
    | 3[47] \d{13}
    | (?:62\d\d | 6011 | 64[4-9]\d | 65\d\d | 352[89] | 35[3-8]\d | 220[0-4]) \d{12,15}
    | (?:30[0-5] | 36\d) \d{11,16}
    | 3[89] \d{14,17}
    """,
    re.ASCII | re.VERBOSE,
)

# What one group of digits, without + in front, may be: a Chinese mobile number, a Chinese fixed line or a number
# after 00, an ID number, or a card number.
_SINGLE_NUMBER = re.compile(rf"{_CN_MOBILE.pattern}|0\d{{9,17}}|\d{{18}}|(?x:{_PAYMENT_CARD.pattern})", re.ASCII)
# What the digits of a number without + in front, of several groups, may begin with (besides a national number of
# one of the regions): one of those, an ID number ending in X, or China's code before a mobile number.
_NUMBER_START = re.compile(rf"{_SINGLE_NUMBER.pattern}|\d{{17}}X|86{_CN_MOBILE.pattern}", re.ASCII)


def find_pii(
    text: str, kinds: Collection[int] = ALL_KINDS, *, regions: Sequence[str] = DEFAULT_REGIONS
) -> list[PiiMatch]:
    """The personal information of `kinds` (safety_pb2.PiiKind values) in `text`, in order, not overlapping.
    `regions`: the regions whose national phone numbers are recognized besides China's (CLDR codes)."""
    if not kinds:
        return []
    scanned, dropped = _normalize(text)
    found = []
    for kind, start, end in _without_overlaps(_matches(scanned, regions)):
        if kind in kinds:
            start, end = _original(start, dropped), _original(end - 1, dropped) + 1
            found.append(PiiMatch(kind, start, end, text[start:end]))
    return found


class PiiScreen:
    """What safety reports: the kinds the PII policy (settings.pii_policy) does not leave as they are, found in a
    screened text, and counted in chatmesh_safety_pii_found_total."""

    def __init__(self, policy: Mapping[str, str]) -> None:
        self.kinds = frozenset(KIND_BY_NAME[name] for name, action in policy.items() if action != "leave")
        metrics.safety_pii_kinds(NAME_BY_KIND[kind] for kind in self.kinds)

    def spans(self, stage: str, text: str) -> list[safety_pb2.PiiSpan]:
        """The spans in `text`, in order and not overlapping; `stage`: input or output."""
        if not self.kinds:
            return []
        found = find_pii(text, self.kinds)
        for kind, count in collections.Counter(match.kind for match in found).items():
            metrics.safety_pii_found(stage, NAME_BY_KIND[kind], count)
        return [safety_pb2.PiiSpan(kind=match.kind, start=match.start, end=match.end) for match in found]


def _normalize(text: str) -> tuple[str, list[int]]:
    """The copy to scan, and where characters were dropped from it: for each dropped character, the number of
    characters of the copy before it (non-decreasing). Replacements are one character for one."""
    dropped: list[int] = []
    if text.isascii():
        return text, dropped

    def replace(match: re.Match[str]) -> str:
        run = match.group()
        if not _DROPPED.isdisjoint(run):
            for offset, char in enumerate(run, start=match.start()):
                if char in _DROPPED:
                    dropped.append(offset - len(dropped))
        return run.translate(_TRANSLATION)

    return _SPECIAL_RUNS.sub(replace, text), dropped


def _original(index: int, dropped: list[int]) -> int:
    """The position in the original text of the copy's character at `index`."""
    return index + bisect.bisect_right(dropped, index)


def _matches(text: str, regions: Sequence[str]) -> Iterator[tuple[int, int, int]]:
    """Every match in `text` as (kind, start, end); those of different kinds may overlap."""
    for candidate in _DIGIT_RUNS.finditer(text):
        start, end = candidate.span()
        if candidate.group("ipv4") is not None:
            if _ipv4(candidate.group(), text, start):
                yield IP_ADDRESS, start, end
            continue
        run = candidate.group()
        if run.isdigit() and not _SINGLE_NUMBER.fullmatch(run) and "+" not in text[start - 2 : start]:
            continue  # one group of digits (as most are) that can be nothing without a + in front
        if "." in run:  # a dotted quad after a separator: "13800138000 192.168.1.1"
            for quad in _IPV4_IN_RUN.finditer(text, start, end):
                if _ipv4(quad.group(), text, quad.start()):
                    yield IP_ADDRESS, quad.start(), quad.end()
        if (end < len(text) and text[end] in _NOT_AFTER) or _marked(text, start) or _DATE.fullmatch(run):
            continue
        lead = _LEAD.search(text, max(0, start - 3), start) if text[start - 1 : start] in "+( " else None
        if lead is None and run.isdigit():  # a single group, as most numbers are: no pieces to try
            kind = _classify(run, False, [len(run)], regions)
            if kind is not None:
                yield kind, start, end
        elif lead is None and " " not in run and not _may_begin_number(run, regions):
            continue  # every piece would begin where the run does, and no number can: "10.0.19045.2006"
        else:
            run_start = start if lead is None else lead.start()
            yield from _numbers(text[run_start:end], run_start, regions)
    at = text.find("@")
    while at != -1:
        # The address around this @: its local part is at most 64 characters, its domain at most 255.
        for email in _EMAILS.finditer(text, max(0, at - 64), at + 256):
            if email.start() < at < email.end():
                local = email.group().partition("@")[0]
                if ".." not in local and not local.endswith("."):
                    yield EMAIL, email.start(), email.end()
                break
        at = text.find("@", at + 1)
    if ("::" in text or text.count(":") >= 7) and _IPV6_COLONS.search(text):
        for address in _IPV6.finditer(text):
            if _ipv6(address.group()):
                yield IP_ADDRESS, address.start(), address.end()


def _may_begin_number(run: str, regions: Sequence[str]) -> bool:
    """Whether a number without + in front could begin the digits of `run`: a quick test, as reading a run piece by
    piece costs several times more."""
    digits = "".join(_DIGIT_GROUPS.findall(run)) + ("X" if run[-1] in "Xx" else "")
    return _NUMBER_START.match(digits) is not None or any(
        _national_numbers(region).may_begin(digits) for region in regions
    )


def _marked(text: str, start: int) -> bool:
    """Whether the run at `start` comes after # or a currency sign (and maybe a space)."""
    before = text[max(0, start - 2) : start].rstrip(" ")
    return bool(before) and before[-1] in _NOT_BEFORE


def _without_overlaps(matches: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Of matches that overlap, the longest (an e-mail over the phone number in it, an IPv6 address over the IPv4
    address at its end); in order."""
    kept: list[tuple[int, int, int]] = []
    for match in sorted(matches, key=lambda match: (match[1], -match[2])):
        if kept and match[1] < kept[-1][2]:
            if match[2] - match[1] > kept[-1][2] - kept[-1][1]:
                kept[-1] = match
            continue
        kept.append(match)
    return kept


def _ipv4(value: str, text: str, start: int) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return _VERSION_MARKER.search(text, max(0, start - 12), start) is None


def _ipv6(value: str) -> bool:
    try:
        return not ipaddress.IPv6Address(value).is_unspecified
    except ValueError:
        return False


def _numbers(run: str, offset: int, regions: Sequence[str]) -> Iterator[tuple[int, int, int]]:
    """The numbers in one run of digit groups that starts at `offset`: the whole run if it is one, else its longest
    valid pieces from the left. A piece starts at the run's start, after a space, or where the one before ended
    (so "010-12345678-8001" yields its phone number, "10.0.19045.2006" is not searched for one)."""
    groups = list(_DIGIT_GROUPS.finditer(run))
    digits = [group.group() for group in groups]
    if run[-1] in "Xx":
        digits[-1] += "X"
    starts = [index for index in range(1, len(groups)) if " " in run[groups[index - 1].end() : groups[index].start()]]
    international = run.lstrip("( ").startswith("+")
    first = 0
    while first < len(groups):
        found = _longest_number(digits, first, international and first == 0, regions)
        if found is None:
            first = next((start for start in starts if start > first), len(groups))
            continue
        kind, last = found
        start = groups[first].start()
        if first == 0 and ")" in run[: groups[last - 1].start()]:
            start = 0  # the number begins with its parenthesis
        elif first == 0 and international:
            start = run.index("+")
        yield kind, offset + start, offset + groups[last - 1].start() + len(digits[last - 1])
        first = last


def _longest_number(
    digits: list[str], first: int, international: bool, regions: Sequence[str]
) -> tuple[int, int] | None:
    """The kind of the longest number made of the groups `digits[first:last]`, and its `last`."""
    for last in range(len(digits), first, -1):
        number = "".join(digits[first:last])
        if len(number) > _MAX_RUN_DIGITS:
            continue
        if len(number) < _MIN_PHONE_DIGITS:
            return None
        kind = _classify(number, international, [len(part) for part in digits[first:last]], regions)
        if kind is not None:
            return kind, last
    return None


def _classify(number: str, international: bool, lengths: list[int], regions: Sequence[str]) -> int | None:
    """The kind of one number (its digits, and an X maybe), written in groups of `lengths` digits."""
    if number.endswith("X"):
        return CN_ID if _cn_id(number) else None
    if not international:
        if len(number) == 18 and _cn_id(number):
            return CN_ID
        if _payment_card(number):
            return PAYMENT_CARD
    return PHONE if _phone(number, international, lengths, regions) else None


def _cn_id(number: str) -> bool:
    """python-stdnum's `cn.ric.is_valid`, its checks cheapest first, and a birth date not in the future."""
    if len(number) != 18 or not number[:-1].isdigit() or ric.calc_check_digit(number) != number[-1]:
        return False
    try:
        born = ric.get_birth_date(number)
    except ValidationError:
        return False
    return _known_birth_place(number[:6], born.year) and born <= datetime.date.today()


@functools.lru_cache(maxsize=4096)
def _known_birth_place(area: str, year: int) -> bool:
    """Whether the area code (an ID number's first 6 digits) was a place in `year`; cached, as the lookup costs
    15 µs, most of a valid ID number's checks, and depends on nothing else."""
    try:
        ric.get_birth_place(f"{area}{year:04d}01010000")  # an ID number of the place, born on 1 January
    except ValidationError:
        return False
    except KeyError:
        # stdnum fails this way on a known province with an unknown county (its data has no county entry there),
        # where is_valid raises too: such a number is no ID, and must not fail the caller's screen.
        return False
    return True


def _payment_card(number: str) -> bool:
    return _PAYMENT_CARD.fullmatch(number) is not None and luhn.is_valid(number)


def _phone(number: str, international: bool, lengths: list[int], regions: Sequence[str]) -> bool:
    if international or number.startswith("00"):
        national = number.removeprefix("00") if not international else number
        return 8 <= len(national) <= 15 and _valid_number("+" + national, None)
    if _cn_phone(number, lengths) and _valid_number(number, "CN"):
        return True
    if len(lengths) > 1 and lengths[0] == 2 and number.startswith("86") and _CN_MOBILE.fullmatch(number[2:]):
        return _valid_number("+" + number, None)  # China's country code without its +, as a group of its own
    return len(lengths) > 1 and any(_written_as_in(number, lengths, region) for region in regions)


def _cn_phone(number: str, lengths: list[int]) -> bool:
    """A Chinese mobile number however grouped, or a fixed line whose area code (3 or 4 digits with its 0) is a
    group of its own when it is written in groups."""
    if _CN_MOBILE.fullmatch(number):
        return True
    return _CN_FIXED_LINE.fullmatch(number) is not None and (len(lengths) == 1 or lengths[0] in (3, 4))


def _valid_number(number: str, region: str | None) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(number, region))
    except phonenumbers.NumberParseException:
        return False


def _written_as_in(number: str, lengths: list[int], region: str) -> bool:
    """Whether `number` is a valid national number of `region`, grouped as the region writes it (with its
    national prefix in a group of its own, or not)."""
    national = _national_numbers(region)
    prefixed = bool(national.prefix) and number.startswith(national.prefix)
    significant = number[len(national.prefix) :] if prefixed else number
    # What the region's numbers cannot be, before the cost of parsing (tens of microseconds).
    if national.prefix_written and not (prefixed and lengths[0] > len(national.prefix)):
        return False
    if len(significant) not in national.lengths or not national.pattern.fullmatch(significant):
        return False
    try:
        parsed = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException:
        return False
    if not phonenumbers.is_valid_number(parsed):  # of the region's country code (GB's +44 is also GG's, IM's, JE's)
        return False
    written = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    expected = [len(part) for part in _DIGIT_GROUPS.findall(written)]
    return lengths == expected or (prefixed and lengths[0] == len(national.prefix) and lengths[1:] == expected)


@dataclass(frozen=True, slots=True)
class _NationalNumbers:
    prefix: str  # the national (trunk) prefix: "1" in the US, "0" in the UK
    prefix_written: bool  # whether the region writes it in front of national numbers (the UK does)
    lengths: tuple[int, ...]  # of national significant numbers
    pattern: re.Pattern[str]  # of national significant numbers

    def may_begin(self, digits: str) -> bool:
        """Whether a national number of the region, with its prefix as `_written_as_in` takes it, could begin
        `digits` (the pattern has no anchors or lookarounds, so what it matches whole it matches at the start)."""
        if self.prefix and digits.startswith(self.prefix):
            digits = digits[len(self.prefix) :]
        elif self.prefix_written:
            return False
        return self.pattern.match(digits) is not None


@functools.cache
def _national_numbers(region: str) -> _NationalNumbers:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    example = phonenumbers.example_number(region)
    if metadata is None or example is None:
        raise ValueError(f"{region!r} is not a region phonenumbers knows (a CLDR code, such as US or GB)")
    prefix = metadata.national_prefix or ""
    written = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
    return _NationalNumbers(
        prefix,
        bool(prefix) and written.startswith(prefix),
        tuple(metadata.general_desc.possible_length),
        re.compile(metadata.general_desc.national_number_pattern),
    )
