"""Each process loads its own domains' code and no other's, and nothing that only some of its configurations use.
The gateway calls no model, so neither the openai SDK nor chatmesh.model is loaded in it (about 25 MiB with its HTTP
stacks, and a slower start); safety loads them only when moderation is on, cache only when the semantic cache is;
and since importing a domain's metrics module registers its series, a process exports only the metrics of the
domains it uses."""

import subprocess
import sys

import pytest

# By process: what its main module must load, and what it must not (a package includes its modules).
OWN_AND_FOREIGN = {
    "gateway": (
        ("chatmesh.tenancy.metrics", "chatmesh.review.metrics"),
        (
            "openai",
            "httpx2",
            "numpy",
            "tiktoken",
            "chatmesh.model",
            "chatmesh.cache",
            "chatmesh.dialogue.metrics",
            "chatmesh.safety.metrics",
        ),
    ),
    # The knowledge bases' stemmer only on their first keyword search or ingest.
    "dialogue": (
        ("openai", "chatmesh.model.metrics", "chatmesh.dialogue.metrics", "chatmesh.tenancy.metrics"),
        ("snowballstemmer", "chatmesh.cache", "chatmesh.safety.metrics", "chatmesh.review.metrics", "chatmesh.gateway"),
    ),
    # The model client only when moderation is on (chatmesh.safety.main imports it then).
    "safety": (
        ("chatmesh.safety.metrics",),
        (
            "openai",
            "aiohttp",
            "httpx2",
            "numpy",
            "tiktoken",
            "chatmesh.model.client",
            "chatmesh.model.metrics",
            "chatmesh.cache",
            "chatmesh.dialogue.metrics",
            "chatmesh.review.metrics",
            "chatmesh.tenancy",
            "chatmesh.gateway",
        ),
    ),
    # The model client and numpy only when the semantic cache is on (chatmesh.cache.main imports it then).
    "cache": (
        ("chatmesh.cache.metrics",),
        (
            "openai",
            "numpy",
            "chatmesh.model.client",
            "chatmesh.cache.semantic",
            "chatmesh.dialogue",
            "chatmesh.safety",
            "chatmesh.review",
            "chatmesh.tenancy",
            "chatmesh.gateway",
        ),
    ),
}


def loaded_by(process: str) -> set[str]:
    """The modules loaded by importing `process`'s main module in a fresh interpreter."""
    code = f"import sys, chatmesh.{process}.main; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(done.stdout.split())


@pytest.mark.parametrize("process", OWN_AND_FOREIGN)
def test_a_process_loads_its_own_domains_and_no_others(process: str) -> None:
    own, foreign = OWN_AND_FOREIGN[process]
    loaded = loaded_by(process)
    assert set(own) <= loaded
    assert sorted(name for name in loaded if name in foreign or name.startswith(tuple(f"{f}." for f in foreign))) == []
