"""The cache key of an answer: a SHA-256 over a canonical encoding of everything that shapes it.

Text normalization decides which requests share an answer, so it is deliberately small:

- Message contents and the system prompt are Unicode NFKC-normalized (full-width and half-width
  forms, ligatures and compatibility characters compare equal), and every run of whitespace
  becomes one space, with none at either end. Whitespace-only differences change no answer a
  chat model gives in practice, except for indentation-sensitive text (code), which is accepted.
- Case is kept: "US" and "us", "Turkey" and "turkey" are different questions, and a wrong hit
  costs more than a miss.
- Stop sequences, tenant and model are compared exactly: a stop sequence of "\\n\\n" is not " ".
  So is a response format's JSON schema, as text.

Every message keeps its role and its place in the window, so a follow-up question after a
different history never shares a key with it. Tenant and model also appear, percent-encoded,
in the key's readable prefix, so that one tenant's or model's entries can be found by pattern.
"""

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from urllib.parse import quote

from chatmesh.v1 import cache_pb2

KEY_PREFIX = "chatmesh:cache:"
# The questions of the semantic cache (chatmesh.cache.semantic), and each scope's list of them.
QUESTION_PREFIX = "chatmesh:cache-question:"
SCOPE_PREFIX = "chatmesh:cache-scope:"
# The sets of the keys stored from one conversation or one user of a tenant, which erasure reads.
INDEX_PREFIX = "chatmesh:cache-origin:"
# An erased index's tombstone, which refuses the stores that list it for a while (chatmesh.cache.tiers).
TOMBSTONE_PREFIX = "chatmesh:cache-erased:"

# Part of what is hashed: bump it when the encoding or the normalization changes, so that old
# entries are never read under the new rules (they expire with their TTL).
_ENCODING_VERSION = 3


def normalize_text(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped; case kept."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _response_format(context: cache_pb2.AnswerContext) -> list[object] | None:
    if not context.HasField("response_format"):
        return None
    response_format = context.response_format
    return [response_format.type, response_format.name, response_format.json_schema, response_format.strict]


def _digest(context: cache_pb2.AnswerContext, messages: Sequence[cache_pb2.ContextMessage], *extra: object) -> str:
    """The SHA-256 (hex) of everything in `context` that shapes an answer, with `messages` as its window."""
    canonical = [
        _ENCODING_VERSION,
        context.tenant,
        context.model,
        normalize_text(context.system_prompt),
        # None (unset) and every set value encode differently, 0 included.
        context.temperature if context.HasField("temperature") else None,
        context.top_p if context.HasField("top_p") else None,
        context.max_tokens if context.HasField("max_tokens") else None,
        list(context.stop),
        context.seed if context.HasField("seed") else None,
        [[message.role, normalize_text(message.content)] for message in messages],
        context.presence_penalty if context.HasField("presence_penalty") else None,
        context.frequency_penalty if context.HasField("frequency_penalty") else None,
        sorted(context.logit_bias.items()),
        _response_format(context),
        sorted(context.knowledge_versions.items()),
        *extra,
    ]
    encoded = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def _readable(context: cache_pb2.AnswerContext) -> str:
    return f"{quote(context.tenant, safe='')}:{quote(context.model, safe='')}"


def answer_key(context: cache_pb2.AnswerContext) -> str:
    """`chatmesh:cache:{tenant}:{model}:{sha256 hex}`, with tenant and model percent-encoded."""
    return f"{KEY_PREFIX}{_readable(context)}:{_digest(context, context.messages)}"


def semantic_scope(context: cache_pb2.AnswerContext, embedding_model: str, dimensions: int) -> str:
    """`{tenant}:{model}:{sha256 hex}`: the answers a question may be matched against by meaning. Everything that
    shapes an answer but the question itself (so the history before it too, empty on a first turn), and the
    embedding model and its dimensions, so that vectors of different models never meet."""
    digest = _digest(context, context.messages[:-1], embedding_model, dimensions)
    return f"{_readable(context)}:{digest}"


def question_key(scope: str, answer: str) -> str:
    """`chatmesh:cache-question:{scope}:{the answer key's digest}`: a question of `scope`, stored for `answer`."""
    return f"{QUESTION_PREFIX}{scope}:{answer.rpartition(':')[2]}"


def scope_of_question(key: str) -> str | None:
    """The scope of a `question_key`; None for any other key."""
    if not key.startswith(QUESTION_PREFIX):
        return None
    return key[len(QUESTION_PREFIX) :].rpartition(":")[0]


def scope_members(scope: str) -> str:
    """`chatmesh:cache-scope:{scope}`: the questions of a scope (a sorted set, by expiry), for loading it."""
    return f"{SCOPE_PREFIX}{scope}"


def conversation_index(tenant: str, conversation_id: str) -> str:
    """`chatmesh:cache-origin:{tenant}:conversation:{conversation_id}`, both percent-encoded: the keys of the
    replies stored from that conversation."""
    return f"{INDEX_PREFIX}{quote(tenant, safe='')}:conversation:{quote(conversation_id, safe='')}"


def user_index(tenant: str, user_id: str) -> str:
    """`chatmesh:cache-origin:{tenant}:user:{user_id}`, both percent-encoded: the keys of the replies stored
    from any conversation of that user."""
    return f"{INDEX_PREFIX}{quote(tenant, safe='')}:user:{quote(user_id, safe='')}"


def tombstone(index: str) -> str:
    """`chatmesh:cache-erased:{tenant}:…`: the tombstone of the conversation or user `index` (same tenant, same id)."""
    if not index.startswith(INDEX_PREFIX):
        raise ValueError("not an index of chatmesh.cache.keys")
    return f"{TOMBSTONE_PREFIX}{index[len(INDEX_PREFIX) :]}"
