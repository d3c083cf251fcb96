"""What the model sees of a conversation: the system prompt, then a sliding window of recent messages."""

from chatmesh.dialogue.store import StoredMessage


def build_messages(system_prompt: str, history: list[StoredMessage], message: str) -> list[dict[str, str]]:
    """`history` is already the window: the last N messages, refused ones left out. The new message comes last."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.extend({"role": stored.role, "content": stored.content} for stored in history)
    messages.append({"role": "user", "content": message})
    return messages
