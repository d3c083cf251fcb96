"""Reads everything a Redis holds, whatever the type of each key, to find where a text is kept."""

from __future__ import annotations

from redis.asyncio import Redis


async def key_contents(client: Redis, key: bytes) -> list[bytes]:
    """Every field, member and value of `key` (with the key's name first), read as its type requires."""
    kind = (await client.type(key)).decode()
    parts: list[bytes] = [key]
    if kind == "string":
        value = await client.get(key)
        parts += [] if value is None else [value]
    elif kind == "hash":
        parts += [part for pair in (await client.hgetall(key)).items() for part in pair]
    elif kind == "set":
        parts += list(await client.smembers(key))
    elif kind == "zset":
        parts += list(await client.zrange(key, 0, -1))
    elif kind == "list":
        parts += list(await client.lrange(key, 0, -1))
    elif kind == "stream":
        parts += [part for _, fields in await client.xrange(key) for pair in fields.items() for part in pair]
    elif kind != "none":  # gone since SCAN listed it
        raise AssertionError(f"a key of a type this scan cannot read: {kind}")
    return parts


async def keys_holding(url: str, *texts: str) -> dict[str, list[str]]:
    """For each text, the keys whose name or content holds it (every key is read, with SCAN)."""
    found: dict[str, list[str]] = {text: [] for text in texts}
    client = Redis.from_url(url)
    try:
        async for key in client.scan_iter(count=1000):
            contents = b"\n".join(await key_contents(client, key))
            for text in texts:
                if text.encode() in contents:
                    found[text].append(key.decode(errors="replace"))
    finally:
        await client.aclose()
    return found
