"""What a caller's ChatOptions ask of the model, as ModelRequest's fields; and the end user's id as the provider
sees it."""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import lru_cache
from typing import Any

from chatmesh.v1 import chat_pb2

_RESPONSE_FORMAT_TYPES = {
    chat_pb2.ResponseFormat.TYPE_JSON_OBJECT: "json_object",
    chat_pb2.ResponseFormat.TYPE_JSON_SCHEMA: "json_schema",
}


def model_options(options: chat_pb2.ChatOptions) -> dict[str, Any]:
    """ModelRequest's keyword arguments for the caller's options: temperature, top_p, stop, seed, logit_bias,
    presence_penalty, frequency_penalty and response_format. An option the caller did not set is left out (the
    provider's default applies), and so is a plain-text response_format. Not here: `model` (dialogue resolves
    the default), `max_tokens` (bounded by the tenant's limits) and `user` (`provider_user`).

    `options` is as the gateway validated it (chatmesh.gateway.validation): a JSON_SCHEMA format's json_schema
    parses as a JSON object."""
    kwargs: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if options.HasField(name):
            kwargs[name] = getattr(options, name)
    if options.stop:
        kwargs["stop"] = list(options.stop)
    if options.logit_bias:
        kwargs["logit_bias"] = dict(sorted(options.logit_bias.items()))
    response_format = response_format_param(options.response_format)
    if response_format is not None:
        kwargs["response_format"] = response_format
    return kwargs


def response_format_param(response_format: chat_pb2.ResponseFormat) -> dict[str, Any] | None:
    """OpenAI's `response_format` object, or None for plain text (unset, TYPE_UNSPECIFIED or TYPE_TEXT)."""
    kind = _RESPONSE_FORMAT_TYPES.get(response_format.type)
    if kind is None:
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": response_format.name,
            "schema": json.loads(response_format.json_schema),
            "strict": response_format.strict,
        },
    }


def provider_user(salt: str, tenant: str, user_id: str) -> str:
    """The `user` sent to the model provider: HMAC-SHA256 of "<tenant>\\0<user_id>" under `salt` (the
    log_user_id_salt setting), 16 hex digits. Stable per user of a tenant, so the provider can tell users apart
    for abuse monitoring, without learning ids (or which tenant's); unlike the logs' user_id hash (of the id
    alone), it tells the same id in two tenants apart."""
    digest = _keyed(salt).copy()
    digest.update(f"{tenant}\0{user_id}".encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=4)
def _keyed(salt: str) -> Any:
    return hmac.new(salt.encode(), digestmod=hashlib.sha256)
