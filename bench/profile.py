"""Summaries of py-spy's raw (collapsed) stacks: where each process spends its samples."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

# "function (path/to/file.py:123)"; the line number is dropped so that a function counts as one place.
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def _place(frame: str) -> str:
    match = _FRAME.match(frame)
    return f"{match['function']} ({match['file']})" if match else frame


def summarize(path: Path, top: int = 15) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, the functions most often on top of the stack, the functions most often anywhere on it)."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        weight = int(count)
        samples += weight
        places = [_place(frame) for frame in stack.split(";")]
        own[places[-1]] += weight
        for place in set(places):
            anywhere[place] += weight
    return samples, own.most_common(top), anywhere.most_common(top)


def markdown(paths: dict[str, str], case: str, top: int = 15) -> str:
    lines = [f"# Where each chatmesh process spends its CPU (py-spy during {case})", ""]
    for name, path in paths.items():
        samples, own, anywhere = summarize(Path(path), top)
        lines += [
            f"## {name}: {samples} samples",
            "",
            "| self | function | | inclusive | function |",
            "|---|---|---|---|---|",
        ]
        for (own_place, own_count), (any_place, any_count) in zip(own, anywhere, strict=False):
            own_share, any_share = 100 * own_count / samples, 100 * any_count / samples
            lines.append(f"| {own_share:.1f}% | `{own_place}` | | {any_share:.1f}% | `{any_place}` |")
        lines.append("")
    return "\n".join(lines)
