"""The clients behind `chatmesh tenants …`, `chatmesh keys …` and `chatmesh usage`: one gRPC call each,
the answer printed as JSON (protobuf's JSON mapping), errors as `error: CODE: message` with exit status 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

# The parser is built for every `chatmesh` command, gRPC processes included: gRPC and the generated code
# are imported only when a command of this module runs.
if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

    from chatmesh.v1 import admin_pb2_grpc, chat_pb2

# The limit flags of `tenants create|update`, as (flag, TenantLimits field, type).
LIMIT_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--requests-per-minute", "requests_per_minute", int),
    ("--tokens-per-minute", "tokens_per_minute", int),
    ("--concurrent-streams", "concurrent_streams", int),
    ("--daily-budget-usd", "daily_budget_usd", float),
    ("--monthly-budget-usd", "monthly_budget_usd", float),
)


def gateway_options(default_target: str) -> argparse.ArgumentParser:
    """The flags of every command that calls the gateway: where it is, and how to trust its certificate."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--target", default=default_target, help="the gateway's host:port")
    options.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the gateway's certificate to the system's CAs"
    )
    options.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, trusting this CA for the gateway")
    return options


def open_gateway_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A channel to `args.target`: TLS with `--tls` or `--tls-ca`, else plaintext (for `make run`)."""
    import grpc

    if args.tls_ca:
        with open(args.tls_ca, "rb") as file:
            return grpc.aio.secure_channel(args.target, grpc.ssl_channel_credentials(file.read()))
    if args.tls:
        return grpc.aio.secure_channel(args.target, grpc.ssl_channel_credentials())
    return grpc.aio.insecure_channel(args.target)


def add_commands(commands: Any, default_target: str) -> None:
    """Adds the `tenants`, `keys` and `usage` commands to the CLI's subparsers."""
    admin = argparse.ArgumentParser(add_help=False, parents=[gateway_options(default_target)])
    admin.add_argument(
        "--admin-token",
        default=os.environ.get("CHATMESH_ADMIN_TOKEN"),
        help="the admin token (default: $CHATMESH_ADMIN_TOKEN; none is needed when the gateway runs with "
        "CHATMESH_AUTH=off and no token)",
    )

    tenants = commands.add_parser("tenants", help="create, show, list and change tenants (admin)")
    tenant_commands = tenants.add_subparsers(dest="action", required=True)
    create = tenant_commands.add_parser("create", parents=[admin], help="create a tenant, with optional limits")
    create.add_argument("name")
    update = tenant_commands.add_parser(
        "update", parents=[admin], help="change the limits named by the flags; the others stay as they are"
    )
    update.add_argument("name")
    update.add_argument(
        "--clear",
        action="append",
        default=[],
        choices=[field for _, field, _ in LIMIT_FLAGS],
        help="remove this limit (repeatable)",
    )
    for parser in (create, update):
        for flag, field, kind in LIMIT_FLAGS:
            parser.add_argument(flag, dest=field, type=kind, help=f"the tenant's {field} limit")
    get = tenant_commands.add_parser("get", parents=[admin], help="show a tenant")
    get.add_argument("name")
    tenant_commands.add_parser("list", parents=[admin], help="list the tenants")
    usage = tenant_commands.add_parser("usage", parents=[admin], help="a tenant's limits and what it has used")
    usage.add_argument("name")

    keys = commands.add_parser("keys", help="issue, list and revoke API keys (admin)")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create_key = key_commands.add_parser("create", parents=[admin], help="issue a key; it is printed only once")
    create_key.add_argument("--tenant", required=True)
    create_key.add_argument("--description", default="", help="a note, e.g. which service holds the key")
    list_keys = key_commands.add_parser("list", parents=[admin], help="list keys (never their secrets)")
    list_keys.add_argument("--tenant", default="", help="only this tenant's")
    revoke = key_commands.add_parser("revoke", parents=[admin], help="revoke a key for good")
    revoke.add_argument("key_id", help="the 16 hex digits after cmk_ in the key")

    own = commands.add_parser(
        "usage",
        parents=[gateway_options(default_target)],
        help="the calling tenant's limits and what it has used (GetUsage)",
    )
    own.add_argument("--api-key", default=os.environ.get("CHATMESH_API_KEY"), help="default: $CHATMESH_API_KEY")


async def run(args: argparse.Namespace) -> int:
    from chatmesh.v1 import admin_pb2_grpc, chat_pb2, chat_pb2_grpc

    async with open_gateway_channel(args) as channel:
        if args.command == "usage":
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            return await _call(stub.GetUsage, chat_pb2.GetUsageRequest(), bearer_metadata(args.api_key))
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        metadata = bearer_metadata(args.admin_token)
        method, request = _admin_request(admin, args)
        return await _call(method, request, metadata)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _admin_request(admin: admin_pb2_grpc.AdminServiceStub, args: argparse.Namespace) -> tuple[Any, Message]:
    from google.protobuf import field_mask_pb2

    from chatmesh.v1 import admin_pb2

    if args.command == "keys":
        if args.action == "create":
            return admin.CreateKey, admin_pb2.CreateKeyRequest(tenant=args.tenant, description=args.description)
        if args.action == "list":
            return admin.ListKeys, admin_pb2.ListKeysRequest(tenant=args.tenant)
        return admin.RevokeKey, admin_pb2.RevokeKeyRequest(key_id=args.key_id)
    if args.action == "create":
        return admin.CreateTenant, admin_pb2.CreateTenantRequest(name=args.name, limits=_limits(args))
    if args.action == "update":
        named = [field for _, field, _ in LIMIT_FLAGS if getattr(args, field) is not None]
        mask = field_mask_pb2.FieldMask(paths=[f"limits.{field}" for field in (*named, *args.clear)])
        return admin.UpdateTenant, admin_pb2.UpdateTenantRequest(name=args.name, limits=_limits(args), update_mask=mask)
    if args.action == "get":
        return admin.GetTenant, admin_pb2.GetTenantRequest(name=args.name)
    if args.action == "usage":
        return admin.GetTenantUsage, admin_pb2.GetTenantUsageRequest(tenant=args.name)
    return admin.ListTenants, admin_pb2.ListTenantsRequest()


def _limits(args: argparse.Namespace) -> chat_pb2.TenantLimits:
    from chatmesh.v1 import chat_pb2

    limits = chat_pb2.TenantLimits()
    for _, field, _ in LIMIT_FLAGS:
        value = getattr(args, field)
        if value is not None:
            setattr(limits, field, value)
    return limits


async def _call(
    method: Callable[..., Awaitable[Message]], request: Message, metadata: tuple[tuple[str, str], ...]
) -> int:
    import grpc
    from google.protobuf import json_format

    try:
        response = await method(request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    return 0
