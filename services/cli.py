"""`chatmesh`: start the cluster or one process, or chat with a running gateway from a terminal."""

import argparse
import asyncio
import contextlib
import getpass
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    from chatmesh.runtime.settings import GatewaySettings, ProcessSettings

# gRPC's C core logs to stderr in its own format; only errors from it belong among our JSON lines.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

PROCESSES = ("modelsim", "safety", "cache", "dialogue", "gateway")
DEFAULT_TARGET = "127.0.0.1:50051"


def main(argv: Sequence[str] | None = None) -> None:
    from chatmesh.admin_client import add_commands, gateway_options

    parser = argparse.ArgumentParser(prog="chatmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start every process, with the model simulator unless OPENAI_API_KEY is set")
    for name in PROCESSES:
        commands.add_parser(name, help=f"start the {name} process")
    chat = commands.add_parser(
        "chat",
        parents=[gateway_options(DEFAULT_TARGET)],
        help="chat with a running gateway, printing tokens as they arrive",
    )
    chat.add_argument(
        "--api-key",
        default=os.environ.get("CHATMESH_API_KEY"),
        help="the API key (default: $CHATMESH_API_KEY; none is needed when the gateway runs with CHATMESH_AUTH=off)",
    )
    chat.add_argument("--once", metavar="TEXT", help="send one message, print the reply, and exit")
    chat.add_argument("--conversation", metavar="ID", default="", help="continue this conversation")
    chat.add_argument("--user", default=_login_name(), help="the user id to chat as")
    chat.add_argument("--model", default="", help="the model (default: the server's)")
    chat.add_argument("--system", default="", help="a system prompt")
    chat.add_argument(
        "--kb",
        dest="knowledge_bases",
        action="append",
        default=[],
        metavar="NAME",
        help="a knowledge base to answer from, citing it (repeatable; default: the tenant's)",
    )
    add_commands(commands, DEFAULT_TARGET)
    args = parser.parse_args(argv)

    if args.command == "up":
        sys.exit(asyncio.run(_up()))
    if args.command == "chat":
        from chatmesh.chat_client import run_chat

        sys.exit(asyncio.run(run_chat(args)))
    if args.command in ("tenants", "keys", "users", "review", "kb", "usage"):
        from chatmesh.admin_client import run

        sys.exit(asyncio.run(run(args)))
    _run_process(args.command)


def _login_name() -> str:
    """The login name, the default of `chat --user`. A container's numeric user often has no passwd
    entry, and then getpass fails; every command parses this default, so it must not."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"


def _run_process(name: str) -> None:
    from pydantic import ValidationError

    from chatmesh.runtime.logs import configure_logging, get_logger
    from chatmesh.runtime.settings import ConfigurationError

    configure_logging(name, "INFO")
    try:
        _serve_process(name)
    except (ValidationError, ConfigurationError) as error:
        # A bad setting or file: one line that says which and why, and exit status 2, never a stack trace.
        get_logger(__name__).error("configuration_invalid", extra={"detail": str(error)})
        sys.exit(2)


def _serve_process(name: str) -> None:
    # numpy's BLAS would start a thread per core for each vector search, which a request path on an event loop
    # loses to under load (10,000 questions: 8.6 ms under contention against 0.6 ms with one thread). Set before
    # numpy is first imported; an operator's own value wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import uvloop

    from chatmesh.runtime.logs import configure_logging
    from chatmesh.runtime.settings import PROCESS_SETTINGS

    # Each process parses its own settings only: another process's bad setting does not stop it.
    settings = PROCESS_SETTINGS[name]()
    configure_logging(name, settings.log_level)
    if name == "modelsim":
        from chatmesh.modelsim.server import serve

        uvloop.run(serve(settings))
        return
    from chatmesh.runtime.metrics import serve_metrics
    from chatmesh.runtime.tracing import setup_tracing

    setup_tracing(name)
    serve_metrics(settings, name)
    # Each gRPC process's package has a main.py with `async def main(settings)`.
    service_main = importlib.import_module(f"chatmesh.{name}.main").main
    uvloop.run(service_main(settings))


async def _up() -> int:
    """Runs every process as a child, each log line prefixed with its name. Ctrl-C or SIGTERM stops
    them all; if one exits on its own, the others are stopped and the exit status is 1."""
    from chatmesh.runtime.settings import MODELSIM_API_KEY, GatewaySettings, ModelSettings

    # What `up` itself reads: the model provider (or modelsim), and the gateway's address and auth, which it
    # announces; each child parses and checks its own settings.
    model = ModelSettings()
    settings = GatewaySettings()
    env = dict(os.environ)
    names = list(PROCESSES)
    if model.openai_api_key is None:
        base_url, _ = model.model_endpoint()
        env.update(OPENAI_API_KEY=MODELSIM_API_KEY, OPENAI_BASE_URL=base_url)
    else:
        names.remove("modelsim")

    children: dict[str, asyncio.subprocess.Process] = {}
    for name in names:
        children[name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatmesh",
            name,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    print(_auth_banner(settings), file=sys.stderr, flush=True)
    width = max(map(len, names))
    relays = [asyncio.create_task(_relay_output(name.ljust(width), child)) for name, child in children.items()]

    announce = asyncio.create_task(_announce_ready(settings, [name for name in names if name != "modelsim"]))
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    exits = {asyncio.create_task(child.wait()): name for name, child in children.items()}
    stop_wait = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait([stop_wait, *exits], return_when=asyncio.FIRST_COMPLETED)
    died = [exits[task] for task in done if task in exits]
    for name in died:
        print(f"chatmesh up: {name} exited with status {children[name].returncode}", file=sys.stderr)

    for child in reversed(list(children.values())):
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    grace = settings.shutdown_delay_seconds + settings.shutdown_grace_seconds + 5
    for child in children.values():
        try:
            await asyncio.wait_for(child.wait(), grace)
        except TimeoutError:
            child.kill()
            await child.wait()
    stop_wait.cancel()
    announce.cancel()
    await asyncio.gather(*relays, announce, return_exceptions=True)
    return 1 if died else 0


# How long `up` waits for every process to be SERVING before it says that one is not.
READY_SECONDS = 60.0


async def _announce_ready(settings: "ProcessSettings", names: list[str]) -> None:
    """Prints one line once every gRPC process answers its health check with SERVING: a call made after it
    succeeds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_SECONDS
    host = "127.0.0.1" if settings.bind_host in ("0.0.0.0", "::") else settings.bind_host
    for name in names:
        async with _health_channel(settings, host, name) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if loop.time() > deadline:
                    print(f"chatmesh up: {name} is not serving after {READY_SECONDS:.0f} s", file=sys.stderr)
                    return
                await asyncio.sleep(0.05)
    print(
        f"chatmesh up: ready: chatmesh.v1.ChatService on {settings.bind_host}:{settings.gateway_port}",
        file=sys.stderr,
        flush=True,
    )


def _health_channel(settings: "ProcessSettings", host: str, name: str) -> "grpc.aio.Channel":
    """Where `up` asks a process whether it serves: its plaintext health port if it has one, else its gRPC
    port (with the certificate its peers present, when TLS is on)."""
    import grpc

    from chatmesh.runtime import tls

    health_port = getattr(settings, f"{name}_health_port")
    if health_port:
        return grpc.aio.insecure_channel(f"{host}:{health_port}")
    target = f"{host}:{getattr(settings, f'{name}_port')}"
    pair = tls.client_pair(settings)
    if pair is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.channel_credentials(pair))


def _auth_banner(settings: "GatewaySettings") -> str:
    """How callers are identified, said once at start."""
    if settings.auth == "off":
        return (
            "chatmesh up: authentication is off (CHATMESH_AUTH=off; the gateway listens on loopback only): a call "
            "without an API key acts as tenant 'default'. Try tenants and keys with `chatmesh tenants create NAME` "
            "and `chatmesh keys create --tenant NAME`; a call that sends a key is checked."
        )
    admin = "CHATMESH_ADMIN_TOKEN" if settings.admin_token is not None else "no admin token: the admin API is off"
    return f"chatmesh up: callers need an API key (CHATMESH_AUTH=required); admin calls use {admin}."


async def _relay_output(prefix: str, child: asyncio.subprocess.Process) -> None:
    assert child.stdout is not None
    with contextlib.suppress(asyncio.CancelledError):
        async for line in child.stdout:
            sys.stdout.write(f"{prefix} | {line.decode(errors='replace')}")
            sys.stdout.flush()
