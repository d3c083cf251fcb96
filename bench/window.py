"""What building a turn's window costs dialogue: the CPU of `build_window` over a history of stored messages
(with the token counts they were committed with), the new message counted, as a turn does it.

Measured in this process, with the process's CPU clock, over many builds: the cost is tens of microseconds,
below what the clusters' per-call CPU (whole processes, over whole calls) can resolve.
"""

from __future__ import annotations

import time
from typing import Any

from chatmesh.dialogue.context_window import Budget, build_window, counted
from chatmesh.dialogue.store import StoredMessage
from chatmesh.dialogue.tokens import TokenCounter

MODEL = "gpt-4o-mini"
# A question and an answer of about the bench's turn-10 cases' length.
QUESTION = "How do I rotate the API keys of a tenant without downtime, and what happens to streams in flight?"
ANSWER = " ".join(["Keys are rotated by issuing a new key first, then revoking the old one once callers use it."] * 3)


def measure(stored_messages: int = 20, builds: int = 2000) -> dict[str, Any]:
    """CPU ms per window build (and per new-message count, its part) at `stored_messages` stored messages."""
    counter = TokenCounter()
    counter.preload()
    history = [
        counted(
            counter,
            MODEL,
            StoredMessage("user" if n % 2 == 0 else "assistant", QUESTION if n % 2 == 0 else ANSWER, 0.0),
        )
        for n in range(stored_messages)
    ]
    budget = Budget(context_tokens=128_000, reply_tokens=4096, margin_tokens=128)
    started = time.process_time()
    for n in range(builds):
        new_message = counted(counter, MODEL, StoredMessage("user", f"{QUESTION} ({n})", 0.0))
        window = build_window(
            counter,
            MODEL,
            budget,
            system_prompt="You are terse.",
            summary=None,
            history=history,
            new_messages=[new_message],
        )
    elapsed = time.process_time() - started
    assert len(window.history) == stored_messages
    return {
        "stored_messages": stored_messages,
        "builds": builds,
        "cpu_ms_per_build": round(elapsed * 1000 / builds, 4),
        "prompt_tokens": window.prompt_tokens,
    }
