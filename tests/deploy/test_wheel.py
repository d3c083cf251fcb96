"""The wheel the image installs, proven without a container engine: it is built from exactly the paths that
deploy/Dockerfile copies, installed into a fresh virtual environment the way the Dockerfile installs it (binary
wheels, the lock's versions, runtime dependencies only), and its processes are started as the image starts
them (`chatmesh <process>`, outside the source tree, as a numeric user with no passwd entry and no write access
to the installation when the tests run as root). A Chat call through gateway, dialogue, safety and cache, with
the simulator from the same environment as the model, shows the packaging is complete: the generated protos,
the default keyword list, and the price table."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.ports import free_port

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
# The image's user (deploy/Dockerfile's USER), used when the tests run as root.
IMAGE_UID = 10001
STARTUP_SECONDS = 30.0
START_ORDER = ("modelsim", "safety", "cache", "dialogue", "gateway")
# Drops to the image's user in a fresh interpreter, then execs the command. Popen's own user= and group=
# make it fork() this test process, which has gRPC loaded: gRPC's fork handlers then start a poller in
# the child whose descriptor Popen closes before exec, and the child can crash (SIGSEGV) before it runs.
DROP_TO_IMAGE_USER = (
    "import os, sys; uid = int(sys.argv[1]); os.setgroups([]); os.setgid(uid); os.setuid(uid); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _build_context_paths() -> list[str]:
    """The sources of the build stage's COPY instructions: what the wheel is built from."""
    parser = DockerfileParser(str(ROOT / "deploy" / "Dockerfile"))
    paths = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM" and paths:
            break
        if instruction["instruction"] == "COPY" and not instruction["value"].startswith("--from"):
            paths.extend(shlex.split(instruction["value"])[:-1])
    return paths


def _usable_by_others(path: Path) -> bool:
    """Whether a user other than its owner can run this file (every folder on its way lets them through)."""
    real = path.resolve()
    return real.is_file() and all(part.stat().st_mode & stat.S_IXOTH for part in (real, *real.parents))


def _base_interpreter() -> tuple[str, bool]:
    """The Python 3.11 to build the venv on, and whether the processes run as the image's user: as root, one
    that user can run (a pyenv Python under /root is not; Debian's /usr/bin/python3.11, like the image's
    /usr/local/bin/python3.11, is); otherwise, or when there is none, this one, as the current user."""
    ours = Path(getattr(sys, "_base_executable", sys.executable))
    if os.geteuid() != 0:
        return str(ours), False
    for candidate in (ours, Path("/usr/local/bin/python3.11"), Path("/usr/bin/python3.11")):
        if _usable_by_others(candidate):
            return str(candidate), True
    return str(ours), False


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stdout}\n{done.stderr}"


@dataclass
class Installation:
    work: Path
    wheel: Path
    venv: Path
    as_image_user: bool

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


@pytest.fixture(scope="module")
def installation() -> Iterator[Installation]:
    # Readable by the image's user (pytest's own tmp_path is private to root).
    work = Path(tempfile.mkdtemp(prefix="chatmesh-wheel-"))
    try:
        work.chmod(0o755)
        source = work / "src"
        for path in _build_context_paths():
            origin = ROOT / path
            if origin.is_dir():
                shutil.copytree(origin, source / path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                (source / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, source / path)
        # `make dist`, on the build context alone.
        _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "dist"), str(source)])
        (wheel,) = (work / "dist").glob("chatmesh-*.whl")
        venv = work / "venv"
        interpreter, as_image_user = _base_interpreter()
        _run([interpreter, "-m", "venv", "--without-pip", str(venv)])
        # As deploy/Dockerfile installs it.
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(venv / "bin" / "python"),
                "install",
                "--quiet",
                "--only-binary=:all:",
                "--constraint",
                str(ROOT / "requirements.lock"),
                str(wheel),
            ]
        )
        yield Installation(work, wheel, venv, as_image_user)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_wheel_holds_the_protos_the_word_lists_and_the_command(installation: Installation) -> None:
    with zipfile.ZipFile(installation.wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for service in ("chat", "dialogue", "safety", "cache"):
        assert f"chatmesh/v1/{service}_pb2.py" in names and f"chatmesh/v1/{service}_pb2_grpc.py" in names
    assert "chatmesh/safety/default_keywords.txt" in names
    assert {"chatmesh/cache/data/cjk_proper_nouns.txt", "chatmesh/cache/data/en_proper_nouns.txt"} <= names
    assert "chatmesh = chatmesh.cli:main" in entry_points
    assert not any(name.startswith(("tests/", "bench/", "support/")) for name in names)


def test_only_the_locked_runtime_dependencies_are_installed(installation: Installation) -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(installation.python), "freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    # Lines are `name==version`, some with an environment marker after a `;`.
    pins = [line.split(";")[0].strip() for line in (ROOT / "requirements.lock").read_text().splitlines()]
    locked = {
        name.lower().replace("_", "-"): version for name, _, version in (pin.partition("==") for pin in pins if pin)
    }
    installed = {}
    for line in frozen:
        if line.startswith("chatmesh"):
            continue
        name, _, version = line.partition("==")
        installed[name.lower().replace("_", "-")] = version
    assert {name: locked.get(name) for name in installed} == installed
    for tool in ("pytest", "ruff", "grpcio-tools", "helm-python-sdk", "matplotlib", "build"):
        assert tool not in installed
    assert {"grpcio", "openai", "pydantic-settings", "uvloop", "pyahocorasick"} <= set(installed)


class Process:
    def __init__(self, installation: Installation, name: str, env: dict[str, str], port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = installation.work / f"{name}.log"
        self.as_image_user = installation.as_image_user
        command = [str(installation.venv / "bin" / "chatmesh"), name]
        if installation.as_image_user:
            command = [sys.executable, "-c", DROP_TO_IMAGE_USER, str(IMAGE_UID), *command]
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(command, env=env, cwd=installation.work, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()}")
            if self._ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} was not ready in {STARTUP_SECONDS} s:\n{self.log()}")

    def _ready(self) -> bool:
        if self.name == "modelsim":
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/sim/stats", timeout=1):
                    return True
            except OSError:
                return False
        return health_status(self.port) == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def health_status(port: int) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


@pytest.fixture(scope="module")
def processes(installation: Installation) -> Iterator[dict[str, Process]]:
    ports = {name: free_port() for name in START_ORDER}
    metrics_ports = {name: free_port() for name in START_ORDER if name != "modelsim"}
    # What the chart's ConfigMap sets, on loopback; nothing of this test's own environment leaks in.
    env = {
        "PATH": f"{installation.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "CHATMESH_BIND_HOST": "127.0.0.1",
        **{f"CHATMESH_{name.upper()}_PORT": str(port) for name, port in ports.items()},
        **{f"CHATMESH_{name.upper()}_METRICS_PORT": str(port) for name, port in metrics_ports.items()},
        # Internal targets as in Kubernetes: the dns resolver, with round_robin over what it returns.
        **{
            f"CHATMESH_{name.upper()}_TARGET": f"dns:///127.0.0.1:{ports[name]}"
            for name in ("dialogue", "safety", "cache")
        },
        "CHATMESH_SHUTDOWN_DELAY_SECONDS": "0.2",
        "CHATMESH_SHUTDOWN_GRACE_SECONDS": "5",
        "CHATMESH_MODELSIM_FIRST_TOKEN_LATENCY_SECONDS": "0",
        "CHATMESH_MODELSIM_TOKEN_DELAY_SECONDS": "0",
        "CHATMESH_MODELSIM_REPLY_TOKENS": "8",
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{ports['modelsim']}/v1",
        "GRPC_VERBOSITY": "ERROR",
    }
    started: dict[str, Process] = {}
    try:
        for name in START_ORDER:
            started[name] = Process(installation, name, env, ports[name])
            started[name].wait_until_ready()
        yield started
    finally:
        for process in reversed(list(started.values())):
            process.stop()


def test_processes_import_chatmesh_from_the_installation(installation: Installation) -> None:
    located = subprocess.run(
        [str(installation.python), "-c", "import chatmesh.cli, chatmesh.safety; print(chatmesh.__file__)"],
        cwd=installation.work,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(located).is_relative_to(installation.venv), located


def test_gateway_and_dialogue_from_the_wheel_serve_a_chat(processes: dict[str, Process]) -> None:
    for name in ("gateway", "dialogue", "safety", "cache"):
        assert health_status(processes[name].port) == health_pb2.HealthCheckResponse.SERVING, name
    if processes["gateway"].as_image_user:
        status = Path(f"/proc/{processes['gateway'].popen.pid}/status").read_text()
        assert f"Uid:\t{IMAGE_UID}\t" in status
    with grpc.insecure_channel(f"127.0.0.1:{processes['gateway'].port}") as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        reply = chat.Chat(chat_pb2.ChatRequest(user_id="wheel-test", message="hello"), timeout=20)
        assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP, reply
        assert reply.text and reply.usage.output_tokens > 0
        # The price table (a default setting) prices the default model.
        assert reply.model == "gpt-4o-mini" and reply.cost_usd > 0
        # The keyword list that ships in the wheel blocks its demo term.
        refused = chat.Chat(chat_pb2.ChatRequest(user_id="wheel-test", message="a forbidden-demo-term"), timeout=20)
        assert refused.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
        assert list(refused.content_filter.categories) == ["demo"]
    for name in ("gateway", "dialogue"):
        assert processes[name].stop() == 0, processes[name].log()
