"""The rule for a knowledge base's name, apart from the store so that the gateway checks names without loading
numpy or the parsers."""

from __future__ import annotations

import re

# A knowledge base's name: what ChatOptions, the KnowledgeService and the CLI use.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"


def is_valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def validate_name(name: str) -> None:
    """Raises ValueError unless `name` is 1 to 64 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit."""
    if not is_valid_name(name):
        raise ValueError(f"knowledge base name {name!r}: {NAME_RULE}")
