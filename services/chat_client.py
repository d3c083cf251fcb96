"""The terminal client behind `chatmesh chat`."""

import argparse
import asyncio
import sys

import grpc

from chatmesh.admin_client import bearer_metadata, open_gateway_channel
from chatmesh.v1 import chat_pb2, chat_pb2_grpc

_FINISH_NAMES = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in chat_pb2.FinishReason.items()}


async def run_chat(args: argparse.Namespace) -> int:
    async with open_gateway_channel(args) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        conversation_id = args.conversation
        if args.once is not None:
            return 0 if await _turn(stub, args, conversation_id, args.once) else 1
        print("chatmesh chat: type a message and press Enter; Ctrl-D to quit.", file=sys.stderr)
        while True:
            try:
                message = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not message.strip():
                continue
            conversation_id = await _turn(stub, args, conversation_id, message) or conversation_id


async def _turn(
    stub: chat_pb2_grpc.ChatServiceStub, args: argparse.Namespace, conversation_id: str, message: str
) -> str:
    """Streams one reply to stdout; returns the conversation id, or "" after printing the error."""
    request = chat_pb2.ChatRequest(
        conversation_id=conversation_id,
        user_id=args.user,
        message=message,
        options=chat_pb2.ChatOptions(model=args.model, system_prompt=args.system, knowledge_bases=args.knowledge_bases),
    )
    try:
        async for event in stub.StreamChat(request, metadata=bearer_metadata(args.api_key)):
            kind = event.WhichOneof("event")
            if kind == "started":
                conversation_id = event.started.conversation_id
            elif kind == "delta":
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
            else:
                sys.stdout.write("\n")
                print(_summary(event.completed, conversation_id), file=sys.stderr)
    except grpc.aio.AioRpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        return ""
    return conversation_id


def _summary(completed: chat_pb2.Completed, conversation_id: str) -> str:
    """One line after the reply: how it ended, what it cost, and how to continue it."""
    parts = [_FINISH_NAMES[completed.finish_reason]]
    if completed.HasField("content_filter"):
        stage = chat_pb2.ContentFilter.Stage.Name(completed.content_filter.stage).removeprefix("STAGE_").lower()
        parts.append(f"refused at {stage}: {', '.join(completed.content_filter.categories)}")
    if completed.cache_match == chat_pb2.CACHE_MATCH_SEMANTIC:
        parts.append(f"from the cache (a question of similarity {completed.cache_similarity:.2f})")
    elif completed.cached:
        parts.append("from the cache")
    if completed.replayed:
        parts.append("replayed")
    for citation in completed.citations:
        parts.append(f"[{citation.number}] {citation.title} ({citation.knowledge_base}: {citation.source})")
    usage = completed.usage
    parts.append(f"{usage.input_tokens} in, {usage.output_tokens} out; ${completed.cost_usd:.6f}")
    parts.append(f"conversation {conversation_id}")
    return "[" + "; ".join(parts) + "]"
