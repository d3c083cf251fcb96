"""Conversation ids that name their home region, for installs in several regions (CHATMESH_REGION).

Each region runs its own chatmesh with its own Redis, and a conversation's text never leaves the region
that created it. Its id says which one: `eu-west.3f2a…` (32 hex digits after the region). A call about it
that reaches another region is refused with FAILED_PRECONDITION naming the home region, before any store
is read; ids without a region (made by an install without CHATMESH_REGION) are looked up where they land.
"""

import re

_REGIONAL_ID = re.compile(r"([a-z][a-z0-9-]{0,30}[a-z0-9])\.[0-9a-f]{32}")


def conversation_id(region: str, random_hex: str) -> str:
    """The id of a new conversation: `random_hex` (32 hex digits), after the region when there is one."""
    return f"{region}.{random_hex}" if region else random_hex


def home_region(conversation_id: str) -> str | None:
    """The region named in a conversation id, or None for an id without one."""
    match = _REGIONAL_ID.fullmatch(conversation_id)
    return match.group(1) if match else None


def foreign_home(conversation_id: str, region: str) -> str | None:
    """The other region a conversation lives in, when this install (in `region`) cannot serve it."""
    home = home_region(conversation_id)
    return home if region and home is not None and home != region else None
