"""Function calling in a turn: the tools a request offers the model, the results a caller sends back for the
calls its last turn ended with, and the model's tool calls as dialogue stores and sends them.

A call is the caller's when it names one of the request's own `tools`; any other call is run by chatmesh
(`chatmesh.dialogue.server_tools`): a server-side tool the request enabled, or, for a name the model made up,
an error result that tells the model so. The caller's calls end the turn (FINISH_REASON_TOOL_CALLS) and stay
pending until the next request answers each of them in `tool_results`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from chatmesh.dialogue.store import StoredMessage, StoredToolCall
from chatmesh.model.client import ModelToolCall
from chatmesh.v1 import chat_pb2

# A tool without parameters takes an empty object.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def offers_tools(options: chat_pb2.ChatOptions) -> bool:
    return bool(options.tools or options.server_tools)


def caller_tool_definitions(options: chat_pb2.ChatOptions) -> list[dict[str, Any]]:
    """The request's own tools as OpenAI `tools` entries (their schemas as the gateway validated them)."""
    definitions = []
    for tool in options.tools:
        function: dict[str, Any] = {
            "name": tool.name,
            "parameters": json.loads(tool.parameters) if tool.parameters else _NO_PARAMETERS,
        }
        if tool.description:
            function["description"] = tool.description
        if tool.strict:
            function["strict"] = True
        definitions.append({"type": "function", "function": function})
    return definitions


def tool_choice_param(choice: chat_pb2.ToolChoice) -> str | dict[str, Any] | None:
    """OpenAI's `tool_choice`, or None for the provider's default (auto)."""
    if choice.tool_name:
        return {"type": "function", "function": {"name": choice.tool_name}}
    return {
        chat_pb2.ToolChoice.MODE_AUTO: "auto",
        chat_pb2.ToolChoice.MODE_NONE: "none",
        chat_pb2.ToolChoice.MODE_REQUIRED: "required",
    }.get(choice.mode)


def results_problem(
    results: Sequence[chat_pb2.ToolResult], pending: Sequence[StoredToolCall], conversation_id: str
) -> tuple[grpc.StatusCode, str] | None:
    """Why `results` do not answer exactly the `pending` calls (FAILED_PRECONDITION when none are pending,
    INVALID_ARGUMENT otherwise), or None when they do. The gateway has refused repeated call ids."""
    if not pending:
        if not results:
            return None
        return (
            grpc.StatusCode.FAILED_PRECONDITION,
            f"tool_results: conversation {conversation_id or '(new)'} has no pending tool calls; send results only "
            "after a turn that ended with FINISH_REASON_TOOL_CALLS",
        )
    pending_ids = [call.id for call in pending]
    answered = {result.call_id for result in results}
    missing = [call_id for call_id in pending_ids if call_id not in answered]
    unknown = [result.call_id for result in results if result.call_id not in pending_ids]
    if not missing and not unknown:
        return None
    problems = []
    if missing:
        problems.append(f"no result for the pending call(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"no pending call has the id(s) {', '.join(unknown)}")
    return (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"tool_results: must answer exactly the pending tool calls {', '.join(pending_ids)}: {'; '.join(problems)}",
    )


def result_messages(
    results: Sequence[chat_pb2.ToolResult], pending: Sequence[StoredToolCall], created_at: float
) -> list[StoredMessage]:
    """The caller's results as tool messages, in the order of the calls they answer (as the model made them)."""
    by_id = {result.call_id: result for result in results}
    return [
        StoredMessage(
            role="tool",
            content=by_id[call.id].content,
            created_at=created_at,
            tool_call_id=call.id,
            tool_error=by_id[call.id].is_error,
        )
        for call in pending
    ]


def stored_calls(calls: Iterable[ModelToolCall], caller_tools: set[str]) -> tuple[StoredToolCall, ...]:
    return tuple(
        StoredToolCall(id=call.id, name=call.name, arguments=call.arguments, server_side=call.name not in caller_tools)
        for call in calls
    )


def call_proto(call: StoredToolCall) -> chat_pb2.ToolCall:
    return chat_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments, server_side=call.server_side)


def result_proto(message: StoredMessage) -> chat_pb2.ToolResult:
    return chat_pb2.ToolResult(call_id=message.tool_call_id, content=message.content, is_error=message.tool_error)


def tool_calls_event(calls: Sequence[StoredToolCall]) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(tool_calls=chat_pb2.ToolCalls(calls=[call_proto(call) for call in calls]))


def tool_results_event(results: Sequence[StoredMessage]) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(tool_results=chat_pb2.ToolResults(results=[result_proto(result) for result in results]))
