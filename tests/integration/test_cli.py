"""`chatmesh up` and `chatmesh chat`, as a person at a terminal uses them."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port

from chatmesh.cli import PROCESSES

STARTUP_SECONDS = 30


def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    gateway, dialogue, safety, cache, modelsim = (free_port() for _ in range(5))
    env = {
        **os.environ,
        "CHATMESH_GATEWAY_PORT": str(gateway),
        "CHATMESH_DIALOGUE_PORT": str(dialogue),
        "CHATMESH_MODELSIM_PORT": str(modelsim),
        "CHATMESH_SAFETY_PORT": str(safety),
        "CHATMESH_CACHE_PORT": str(cache),
        **{f"CHATMESH_{name}_METRICS_PORT": str(free_port()) for name in ("GATEWAY", "DIALOGUE", "SAFETY", "CACHE")},
        "CHATMESH_MODELSIM_TOKEN_DELAY_SECONDS": "0",
        "CHATMESH_SHUTDOWN_GRACE_SECONDS": "5",
    }
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "CHATMESH_REDIS_URL",
        "CHATMESH_DIALOGUE_TARGET",
        "CHATMESH_SAFETY_TARGET",
        "CHATMESH_CACHE_TARGET",
    ):
        env.pop(name, None)
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "chatmesh", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # `up` says it is ready once every process serves: a call made right after must succeed.
        deadline = time.monotonic() + STARTUP_SECONDS
        while b"chatmesh up: ready" not in (tmp_path / "up.log").read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.05)
        yield process, env
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def test_up_starts_the_cluster_with_the_simulator_and_chat_once_prints_the_reply(up):
    process, env = up
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatmesh",
            "chat",
            "--target",
            f"127.0.0.1:{env['CHATMESH_GATEWAY_PORT']}",
            "--once",
            "hello",
            "--user",
            "cli-user",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 50  # the simulator's default reply length
    assert "stop;" in result.stderr and "conversation " in result.stderr

    children = child_pids(process.pid)
    assert len(children) == len(PROCESSES)
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_up_stops_everything_and_fails_when_one_process_dies(up):
    process, _ = up
    children = child_pids(process.pid)
    os.kill(children[0], signal.SIGKILL)

    assert process.wait(30) == 1
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists() and _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
