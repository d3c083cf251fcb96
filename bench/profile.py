"""Summaries of py-spy's raw (collapsed) stacks: where each process spends its samples.

With `--native`, py-spy also samples threads that wait for work (the event loop's epoll, grpc's pollers, an idle
thread pool's workers on their lock): those samples are counted apart, as waiting, and the shares are of the
others, the busy ones.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

# "function (path/to/file.py:123)"; the line number is dropped so that a function counts as one place.
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")
# Where a thread waits for work: the system calls of pollers, and a lock (an idle thread pool's worker); below a
# lock, libc's frames have no symbols, so the first named frame from the top decides.
_WAITING = frozenset({"epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect", "PyThread_acquire_lock_timed"})


class Summary(NamedTuple):
    samples: int
    waiting: int  # samples of a thread waiting for work (see _waiting)
    own: list[tuple[str, int]]  # the functions most often on top of a busy stack
    anywhere: list[tuple[str, int]]  # the functions most often anywhere on a busy stack


def _place(frame: str) -> str:
    match = _FRAME.match(frame)
    return f"{match['function']} ({match['file']})" if match else frame


def _waiting(frames: list[str]) -> bool:
    """Whether the first frame from the top that has a name (libc's often have only an address) is a wait."""
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        if match is None or not match["function"].startswith("0x"):
            return match is not None and match["function"] in _WAITING
    return False


def summarize(path: Path, top: int = 15) -> Summary:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        weight = int(count)
        samples += weight
        frames = stack.split(";")
        if _waiting(frames):
            waiting += weight
            continue
        places = [_place(frame) for frame in frames]
        own[places[-1]] += weight
        for place in set(places):
            anywhere[place] += weight
    return Summary(samples, waiting, own.most_common(top), anywhere.most_common(top))


def markdown(paths: dict[str, str], case: str, top: int = 15) -> str:
    lines = [
        f"# Where each chatmesh process of the chart configuration spends its CPU (py-spy --native during {case})",
        "",
        "py-spy stops each process to read its native stacks: these shares say where the time goes, the run's "
        "latencies while profiling mean nothing. Samples of a thread waiting for work (epoll, poll, an idle "
        "worker's lock) are left out of the shares.",
        "",
    ]
    for name, path in paths.items():
        summary = summarize(Path(path), top)
        busy = summary.samples - summary.waiting
        lines += [
            f"## {name}: {summary.samples} samples, {busy} busy",
            "",
            "| self | function | | inclusive | function |",
            "|---|---|---|---|---|",
        ]
        for (own_place, own_count), (any_place, any_count) in zip(summary.own, summary.anywhere, strict=False):
            own_share, any_share = 100 * own_count / busy, 100 * any_count / busy
            lines.append(f"| {own_share:.1f}% | `{own_place}` | | {any_share:.1f}% | `{any_place}` |")
        lines.append("")
    return "\n".join(lines)
