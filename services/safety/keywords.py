"""Keyword lists: terms and their categories, matched with one Aho-Corasick automaton over normalized text.

Normalization maps each raw character on its own, so a prefix of a text normalizes the same whatever
follows it, which is what lets a streamed reply be cleared piece by piece:

- compatibility decomposition (NFKD, so whatever NFKC equates is equal here too: full-width to
  half-width, ligatures, circled and styled letters), case folding, and again NFKD;
- then whitespace, separators, punctuation, symbols, control and format characters (zero-width
  space and joiners, soft hyphen, byte-order mark) and combining marks are dropped. A term therefore
  matches with any of them inserted between its characters, and accents are ignored.

An edge of a term written in a script that separates words with spaces (Latin, Greek, Cyrillic, …)
matches only at a word boundary, so "tea" is not found in "steam"; an edge in Chinese, Japanese,
Korean or Thai matches anywhere.

Files: one term per line as `category<TAB>term`; blank lines and lines starting with `#` are skipped.
A path is one such file or a folder of them (every file whose name does not start with "." or end
with "~"). `KeywordScreen` polls the files and swaps in a new list when they change; terms that review
decisions added are merged into the same list.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import ahocorasick

from chatmesh.runtime.logs import get_logger

log = get_logger(__name__)

DEFAULT_KEYWORDS = Path(__file__).with_name("default_keywords.txt")

_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,63}")
# Characters below this that are letters or digits belong to scripts that put spaces between words.
_SPACED_SCRIPTS_END = 0x0E00
_DROPPED_PREFIXES = frozenset("ZPS")
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Mn", "Me"})
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Mn", "Me"})
_FOLD_CACHE_LIMIT = 100_000


class KeywordFileError(ValueError):
    """A keyword file that cannot be used; the message names the file and line, never a term."""


def _dropped(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] in _DROPPED_PREFIXES or category in _DROPPED_CATEGORIES or unicodedata.combining(char) != 0


def _fold_char(char: str) -> str:
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", char).casefold())
    return "".join(c for c in decomposed if not _dropped(c))


class _FoldTable(dict[str, str]):
    """Raw character to normalized text, computed on first use; bounded so odd input cannot grow it forever."""

    def __missing__(self, char: str) -> str:
        folded = _fold_char(char)
        if len(self) < _FOLD_CACHE_LIMIT:
            self[char] = folded
        return folded


_FOLD = _FoldTable()
_fold = _FOLD.__getitem__


def normalize(text: str) -> str:
    """The text that terms are matched against (see the module's docstring)."""
    return "".join(map(_fold, text))


def _spaced_word_char(char: str) -> bool:
    return char.isalnum() and ord(char) < _SPACED_SCRIPTS_END


def _invisible(char: str) -> bool:
    return unicodedata.category(char) in _INVISIBLE_CATEGORIES


@dataclass(frozen=True, slots=True)
class KeywordEntry:
    category: str
    term: str
    # Where it came from, "file:line", for error messages.
    source: str = ""


@dataclass(frozen=True, slots=True)
class KeywordMatch:
    """The terms found in a text: every one's categories, sorted, and where the first is, [start, end) in code
    points of the text."""

    categories: tuple[str, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Term:
    length: int
    categories: tuple[str, ...]
    bounded_start: bool
    bounded_end: bool


def parse_keyword_file(text: str, source: str) -> list[KeywordEntry]:
    """The entries of one file's text. Raises KeywordFileError at the first bad line."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        category, tab, term = stripped.partition("\t")
        category, term = category.strip(), term.strip()
        where = f"{source}:{number}"
        if not tab or not term:
            raise KeywordFileError(f"{where}: expected category<TAB>term")
        if not _CATEGORY.fullmatch(category):
            raise KeywordFileError(f"{where}: a category is 1-64 of A-Z a-z 0-9 _ . / -, starting with a letter/digit")
        entries.append(KeywordEntry(category, term, where))
    return entries


class KeywordList:
    """An immutable set of terms compiled into one automaton; safe to share between concurrent requests."""

    def __init__(self, entries: Iterable[KeywordEntry]) -> None:
        categories_by_term: dict[str, set[str]] = {}
        for entry in entries:
            normalized = normalize(entry.term)
            if not normalized:
                raise KeywordFileError(f"{entry.source}: the term has no letters or digits")
            categories_by_term.setdefault(normalized, set()).add(entry.category)
        self.size = len(categories_by_term)
        self.categories = frozenset().union(*categories_by_term.values()) if categories_by_term else frozenset()
        # What the list matches, as a hash: the same for the same terms and categories, however written.
        digest = hashlib.sha256()
        for normalized in sorted(categories_by_term):
            digest.update(f"{normalized}\t{','.join(sorted(categories_by_term[normalized]))}\n".encode())
        self.digest = digest.hexdigest()
        # The longest term, in normalized characters: the most a stream ever holds back.
        self.longest = max(map(len, categories_by_term), default=0)
        self._automaton: ahocorasick.Automaton | None = None
        if categories_by_term:
            automaton = ahocorasick.Automaton()
            for normalized, categories in categories_by_term.items():
                automaton.add_word(
                    normalized,
                    _Term(
                        len(normalized),
                        tuple(sorted(categories)),
                        _spaced_word_char(normalized[0]),
                        _spaced_word_char(normalized[-1]),
                    ),
                )
            automaton.make_automaton()
            self._automaton = automaton

    def screen(self, text: str) -> list[str]:
        """The sorted categories of the terms found in `text`; empty when it is clean."""
        match = self.find(text)
        return [] if match is None else list(match.categories)

    def find(self, text: str) -> KeywordMatch | None:
        """The terms found in `text`; None when it is clean."""
        automaton = self._automaton
        if automaton is None or next(automaton.iter(normalize(text)), None) is None:
            return None  # the common case, without the position bookkeeping that word boundaries need
        screen = self.stream()
        step = screen.feed(text, final=True)
        return KeywordMatch(step.categories, *screen.blocked_span) if step.blocked else None

    def stream(self, passes: Callable[[tuple[str, ...]], bool] | None = None) -> StreamScreen:
        """A screen for one streamed text, bound to this list for its whole life; see StreamScreen for `passes`."""
        return StreamScreen(self, passes)


@dataclass(frozen=True, slots=True)
class ScreenStep:
    """Where a streamed screen stands after a feed."""

    # Code points of raw text, from its start, that are cleared. Never decreases.
    cleared: int
    # Non-empty when the text is blocked: the sorted categories of the terms found.
    categories: tuple[str, ...] = ()
    # The final text was screened and all of it is cleared.
    complete: bool = False

    @property
    def blocked(self) -> bool:
        return bool(self.categories)


class _Match(Enum):
    NO = 0
    BLOCK = 1
    UNDECIDED = 2  # a term at the very end whose word boundary depends on what comes next


class StreamScreen:
    """Screens a text that arrives in pieces, clearing all of it except what could still begin a term.

    After each feed, everything is cleared up to the start of the longest normalized suffix that is
    the beginning of some term, so a term split across pieces is caught before any character of it
    is cleared; the hold-back is never more than the longest term in normalized characters. The
    final feed screens and clears or blocks the rest.

    Terms whose categories `passes` accepts (the review policy lets them out) do not block: the text
    is cleared as if they were not there, and their categories are gathered in `passed`.
    """

    def __init__(self, keywords: KeywordList, passes: Callable[[tuple[str, ...]], bool] | None = None) -> None:
        self._keywords = keywords
        self._passes = passes
        # Categories of terms found that `passes` accepted, and where the first such term is (raw code points).
        self.passed: set[str] = set()
        self.passed_span = (0, 0)
        # Where the first term of a blocking step is (raw code points).
        self.blocked_span = (0, 0)
        self._raw: list[str] = []
        self._normalized: list[str] = []
        # For each normalized character, the index of the raw character it came from.
        self._origin: list[int] = []
        self._cleared = 0
        self._searched = 0
        self._done = False

    @property
    def cleared(self) -> int:
        return self._cleared

    @property
    def text(self) -> str:
        """The text fed so far."""
        return "".join(self._raw)

    def feed(self, text: str, final: bool = False) -> ScreenStep:
        """Appends `text` and returns what is cleared now. No feed may follow a blocked or final one."""
        if self._done:
            raise RuntimeError("the screen already gave its final step")
        base = len(self._raw)
        self._raw.extend(text)
        for offset, part in enumerate(map(_fold, text)):
            if part:
                self._normalized.extend(part)
                self._origin.extend([base + offset] * len(part))

        keywords = self._keywords
        automaton = keywords._automaton
        if automaton is None:
            return self._clear_all(final)
        # Matches that end in the new text, or that were waiting at the old end for a boundary.
        start = max(0, self._searched - keywords.longest)
        window = "".join(self._normalized[start:])
        self._searched = len(self._normalized)
        found: set[str] = set()
        # Where the first term found is, and the first that does not pass.
        span: tuple[int, int] | None = None
        blocking: tuple[int, int] | None = None
        for last, term in automaton.iter(window):
            end = start + last + 1
            if self._match(end - term.length, end, term, final) is _Match.BLOCK:
                term_span = (self._origin[end - term.length], self._origin[end - 1] + 1)
                span = span or term_span
                if blocking is None and (self._passes is None or not self._passes(term.categories)):
                    blocking = term_span
                found.update(term.categories)
        if span is not None:
            if blocking is not None:
                self._done = True
                self.blocked_span = blocking
                return ScreenStep(self._cleared, tuple(sorted(found | self.passed)))
            if not self.passed:
                self.passed_span = span
            self.passed.update(found)
        if final:
            return self._clear_all(final)

        length = len(self._normalized)
        base = length - min(length, keywords.longest)
        tail = "".join(self._normalized[base:])
        held = next(
            (
                i
                for i in range(len(tail))
                if automaton.match(tail[i:]) and (not _spaced_word_char(tail[i]) or self._at_word_start(base + i))
            ),
            None,
        )
        if held is None:
            self._cleared = len(self._raw)
        else:
            self._cleared = max(self._cleared, self._origin[base + held])
        return ScreenStep(self._cleared)

    def _clear_all(self, final: bool) -> ScreenStep:
        self._cleared = len(self._raw)
        self._done = final
        return ScreenStep(self._cleared, complete=final)

    def _at_word_start(self, start: int) -> bool:
        """Whether normalized position `start` begins a word: not inside one character's expansion,
        and not right after a letter or digit of a spaced script (invisible characters between don't count).
        Only what came before decides, so the answer never changes as more text arrives."""
        origin, raw = self._origin, self._raw
        first = origin[start]
        if start > 0 and origin[start - 1] == first:
            return False
        before = first - 1
        while before >= 0 and _invisible(raw[before]):
            before -= 1
        return before < 0 or not ((folded := _fold(raw[before])) and _spaced_word_char(folded[-1]))

    def _match(self, start: int, end: int, term: _Term, final: bool) -> _Match:
        """Whether the term found at normalized [start, end) counts, given its word-boundary edges."""
        origin, raw = self._origin, self._raw
        if term.bounded_start and not self._at_word_start(start):
            return _Match.NO
        if term.bounded_end:
            last = origin[end - 1]
            if end < len(origin) and origin[end] == last:
                return _Match.NO
            after = last + 1
            while after < len(raw) and _invisible(raw[after]):
                after += 1
            if after == len(raw):
                return _Match.BLOCK if final else _Match.UNDECIDED
            if (folded := _fold(raw[after])) and _spaced_word_char(folded[0]):
                return _Match.NO
        return _Match.BLOCK


def keyword_files(path: Path) -> list[Path]:
    """The files a keyword path names: itself, or the visible files of the folder, sorted."""
    if path.is_dir():
        return sorted(
            child
            for child in path.iterdir()
            if not child.name.startswith(".") and not child.name.endswith("~") and child.is_file()
        )
    if not path.is_file():
        raise KeywordFileError(f"{path}: no such keyword file or folder")
    return [path]


def load_keyword_entries(files: Sequence[Path]) -> list[KeywordEntry]:
    """Reads and parses the files. Raises KeywordFileError naming the first problem."""
    entries: list[KeywordEntry] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise KeywordFileError(f"{file}: cannot be read as UTF-8 ({type(error).__name__})") from None
        entries.extend(parse_keyword_file(text, str(file)))
    return entries


def usable_term(category: str, term: str) -> bool:
    """Whether a term from elsewhere than a file (a review decision) can join a list: a valid category, and
    letters or digits in the term."""
    return bool(_CATEGORY.fullmatch(category)) and bool(normalize(term))


# What the files looked like when last loaded: (file, mtime, size, inode) each, or why they could not be listed.
_Signature = tuple[tuple[str, int, int, int], ...] | str


def _signature(path: Path) -> tuple[list[Path], _Signature]:
    try:
        files = keyword_files(path)
        stats = []
        for file in files:
            stat = file.stat()
            stats.append((str(file), stat.st_mtime_ns, stat.st_size, stat.st_ino))
    except KeywordFileError as error:
        return [], str(error)
    except OSError as error:
        return [], f"{path}: cannot be listed ({type(error).__name__})"
    return files, tuple(stats)


class KeywordScreen:
    """The live keyword list of a process, loaded from `path` (the shipped list when None), with the terms
    review decisions added (`set_added_terms`).

    `reload_if_changed` (or `watch`, which calls it every few seconds) stats the files and, when any
    changed, builds the new list in a thread and swaps the reference in one assignment: a request
    keeps the list it started with, and never sees a half-built one. A file that fails to load
    leaves the old list in place and is logged; it is tried again when it changes again.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or DEFAULT_KEYWORDS
        files, self._signature = _signature(self.path)
        if isinstance(self._signature, str):
            raise KeywordFileError(self._signature)
        self._file_entries = load_keyword_entries(files)
        self._files = len(files)
        self._added: tuple[KeywordEntry, ...] = ()
        self._current = KeywordList(self._file_entries)
        self._lock = asyncio.Lock()
        self._log_loaded()

    @property
    def current(self) -> KeywordList:
        return self._current

    def screen(self, text: str) -> list[str]:
        return self._current.screen(text)

    def stream(self) -> StreamScreen:
        return self._current.stream()

    async def reload_if_changed(self) -> bool:
        """Loads the files again if they changed since the last look. True when a new list is in use."""
        async with self._lock:
            result = await asyncio.to_thread(self._build_if_changed, self._signature)
            if result is None:
                return False
            self._signature, files, loaded = result
            if loaded is None:
                return False
            self._files, (self._file_entries, self._current) = files, loaded
            self._log_loaded()
            return True

    async def set_added_terms(self, terms: Iterable[tuple[str, str]]) -> bool:
        """Makes these (category, term) pairs, and no others, the added terms of the list, beside the files'.
        Pairs that cannot be used (see usable_term) are left out and counted in the log. True when a new list
        is in use."""
        pairs = set(terms)
        usable = tuple(sorted(pair for pair in pairs if usable_term(*pair)))
        async with self._lock:
            added = tuple(KeywordEntry(category, term, "review decision") for category, term in usable)
            if added == self._added:
                return False
            if len(usable) < len(pairs):
                log.warning("keywords_added_terms_unusable", extra={"terms": len(pairs) - len(usable)})
            self._current = await asyncio.to_thread(KeywordList, [*self._file_entries, *added])
            self._added = added
            self._log_loaded()
            return True

    async def watch(self, interval_seconds: float) -> None:
        """Reloads on change every `interval_seconds`, until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.reload_if_changed()
            except Exception:
                log.exception("keywords_watch_failed")

    def _build_if_changed(
        self, seen: _Signature
    ) -> tuple[_Signature, int, tuple[list[KeywordEntry], KeywordList] | None] | None:
        """Runs in a thread. None when nothing changed, or when the files changed again while being
        read (a writer not done yet: the next look tries again). Otherwise the new signature, with
        the files' entries and the new list (with the added terms), or with None when the files are
        broken, so that they are reported only once."""
        files, signature = _signature(self.path)
        if signature == seen:
            return None
        if isinstance(signature, str):
            log.error("keywords_reload_failed", extra={"error": signature})
            return signature, 0, None
        loaded: tuple[list[KeywordEntry], KeywordList] | None
        try:
            entries = load_keyword_entries(files)
            loaded = entries, KeywordList([*entries, *self._added])
        except KeywordFileError as error:
            loaded = None
            failure = str(error)
        if _signature(self.path)[1] != signature:
            return None
        if loaded is None:
            log.error("keywords_reload_failed", extra={"error": failure})
        return signature, len(files), loaded

    def _log_loaded(self) -> None:
        keywords = self._current
        log.info(
            "keywords_loaded",
            extra={
                "files": self._files,
                "added_terms": len(self._added),
                "terms": keywords.size,
                "categories": sorted(keywords.categories),
            },
        )
