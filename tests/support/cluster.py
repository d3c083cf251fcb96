"""Real chatmesh processes on free loopback ports, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .certificates import TestPki
from .ports import free_port

STARTUP_SECONDS = 20.0
STOP_SECONDS = 15.0
# Every process a cluster can run, in the order they start (each only needs those before it).
START_ORDER = ("modelsim", "safety", "cache", "dialogue", "gateway")
# The processes that serve Prometheus metrics, each on its own port (CHATMESH_<NAME>_METRICS_PORT).
METRICS_PROCESSES = ("safety", "cache", "dialogue", "gateway")


def log_lines(log: str) -> list[dict[str, Any]]:
    """The JSON lines of a process's log, parsed; anything else it printed is skipped. Read a log through this
    rather than by searching its text: a line's spacing is the encoder's choice."""
    lines = []
    for text in log.splitlines():
        if text.startswith("{"):
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
    return lines


def logged_events(log: str) -> set[str]:
    """The `event` of every JSON line of a process's log."""
    return {line["event"] for line in log_lines(log) if "event" in line}


class ServiceProcess:
    """One chatmesh process (`python -m chatmesh COMMAND`), its output kept in a log file. `name` is the
    command, or for a further replica the command and its number (`gateway-2`)."""

    def __init__(self, name: str, port: int, env: dict[str, str], log_dir: Path, command: str | None = None) -> None:
        self.name = name
        self.command = command or name
        self.port = port
        self._env = env
        self.log_path = log_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        # Where the process serves /metrics (set by Cluster); None for modelsim.
        self.metrics_port: int | None = None
        # Its plaintext health port, which readiness is checked on when set (with TLS on).
        self.health_port: int | None = None
        # modelsim's ports when it serves several deployments (readiness is checked on each); None for `port`.
        self.sim_ports: list[int] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "chatmesh", self.command], env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_until_ready()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while started (bench/ reads its CPU time and memory from /proc)."""
        return None if self._process is None else self._process.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(sig)

    def wait(self, timeout: float = STOP_SECONDS) -> int:
        assert self._process is not None
        return self._process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL. Returns the exit status."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def kill(self) -> None:
        assert self._process is not None
        self._process.kill()
        self._process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode}:\n{self.log()}")
            if self._ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready in {STARTUP_SECONDS} s:\n{self.log()}")

    def _ready(self) -> bool:
        if self.command == "modelsim":
            try:
                for port in self.sim_ports or [self.port]:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=1):
                        pass
            except OSError:
                return False
            return True
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port or self.port}") as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return response.status == health_pb2.HealthCheckResponse.SERVING


class Cluster:
    """chatmesh processes (by default all of them), wired to each other on free ports.

    The simulator starts with no latency; tests change it through `sim_config`. `replicas` runs more than
    one gateway, dialogue or cache (e.g. {"gateway": 3, "dialogue": 2}): replica 2 and on are `gateway-2`, …,
    each on its own ports; every gateway spreads its calls over every dialogue, and every dialogue over every
    cache (round robin). With `pki`, every gRPC port uses TLS (mutual between the processes) and every process has
    a plaintext health port.

    `modelsim_deployments` runs modelsim as several independent simulated upstreams (CHATMESH_MODELSIM_DEPLOYMENTS):
    each entry holds any of a deployment's settings but its port (reply_tokens, error_429_rate, hang_rate,
    unauthorized_keys, …), and gets a free port, listed in `modelsim_ports` in the same order. Deployment 0 is on
    CHATMESH_MODELSIM_PORT, where OPENAI_BASE_URL points and where `sim`, `sim_stats`, … go; the `sim_*_at(index)`
    helpers address one deployment. Without it, modelsim is one deployment, `modelsim_ports[0]`.
    """

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        processes: Sequence[str] = START_ORDER,
        replicas: dict[str, int] | None = None,
        pki: TestPki | None = None,
        modelsim_deployments: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        self._log_dir = Path(tempfile.mkdtemp(prefix="chatmesh-cluster-"))
        ports = {name: free_port() for name in START_ORDER}
        # The port of each modelsim deployment (one, on CHATMESH_MODELSIM_PORT, without modelsim_deployments).
        self.modelsim_ports = [ports["modelsim"]] + [free_port() for _ in list(modelsim_deployments or ())[1:]]
        # Where each process serves /metrics: `metrics_ports[name]`, also `processes[name].metrics_port`.
        self.metrics_ports = {name: free_port() for name in METRICS_PROCESSES}
        self.env = {
            **os.environ,
            "GRPC_VERBOSITY": "ERROR",
            "CHATMESH_BIND_HOST": "127.0.0.1",
            "CHATMESH_MODELSIM_PORT": str(ports["modelsim"]),
            "CHATMESH_DIALOGUE_PORT": str(ports["dialogue"]),
            "CHATMESH_GATEWAY_PORT": str(ports["gateway"]),
            "CHATMESH_DIALOGUE_TARGET": f"127.0.0.1:{ports['dialogue']}",
            "CHATMESH_SAFETY_PORT": str(ports["safety"]),
            "CHATMESH_SAFETY_TARGET": f"127.0.0.1:{ports['safety']}",
            "CHATMESH_CACHE_PORT": str(ports["cache"]),
            "CHATMESH_CACHE_TARGET": f"127.0.0.1:{ports['cache']}",
            "CHATMESH_MODELSIM_FIRST_TOKEN_LATENCY_SECONDS": "0",
            "CHATMESH_MODELSIM_TOKEN_DELAY_SECONDS": "0",
            "CHATMESH_SHUTDOWN_GRACE_SECONDS": "10",
            "CHATMESH_MODEL_BACKOFF_INITIAL_SECONDS": "0.05",
            # Input moderation is on (auto, with this key); replies stream piece by piece unless a test moderates
            # them too (which holds them back a window at a time).
            "CHATMESH_SAFETY_MODERATE_OUTPUT": "false",
            "OPENAI_API_KEY": "test-key",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{ports['modelsim']}/v1",
            **{f"CHATMESH_{name.upper()}_METRICS_PORT": str(port) for name, port in self.metrics_ports.items()},
        }
        self.env.pop("CHATMESH_REDIS_URL", None)
        if redis_url is not None:
            self.env["CHATMESH_REDIS_URL"] = redis_url
        health_ports = {name: free_port() for name in METRICS_PROCESSES} if pki is not None else {}
        if pki is not None:
            self.env.update(pki.env())
            self.env.update({f"CHATMESH_{name.upper()}_HEALTH_PORT": str(port) for name, port in health_ports.items()})
        if modelsim_deployments:
            self.env["CHATMESH_MODELSIM_DEPLOYMENTS"] = json.dumps(
                [
                    {**deployment, "port": port}
                    for deployment, port in zip(modelsim_deployments, self.modelsim_ports, strict=True)
                ]
            )
        self.env.update(env or {})
        self.processes = {name: ServiceProcess(name, port, self.env, self._log_dir) for name, port in ports.items()}
        if modelsim_deployments:
            self.processes["modelsim"].sim_ports = list(self.modelsim_ports)
        for name, port in self.metrics_ports.items():
            self.processes[name].metrics_port = port
            self.processes[name].health_port = health_ports.get(name)
        extra = {
            f"{command}-{number}": command
            for command, count in (replicas or {}).items()
            for number in range(2, count + 1)
        }
        # Callers spread their calls over every replica of dialogue and of cache.
        balanced_ports = {}
        for balanced in ("dialogue", "cache"):
            if any(command == balanced for command in extra.values()):
                replica_ports = [ports[balanced]] + [free_port() for name in extra if extra[name] == balanced]
                self.env[f"CHATMESH_{balanced.upper()}_TARGET"] = "ipv4:" + ",".join(
                    f"127.0.0.1:{port}" for port in replica_ports
                )
                balanced_ports[balanced] = iter(replica_ports[1:])
        for name, command in extra.items():
            port = next(balanced_ports[command]) if command in balanced_ports else free_port()
            metrics_port = free_port()
            health_port = free_port() if pki is not None else None
            replica_env = {
                **self.env,
                f"CHATMESH_{command.upper()}_PORT": str(port),
                f"CHATMESH_{command.upper()}_METRICS_PORT": str(metrics_port),
                f"CHATMESH_{command.upper()}_HEALTH_PORT": str(health_port or 0),
            }
            self.processes[name] = ServiceProcess(name, port, replica_env, self._log_dir, command)
            self.processes[name].metrics_port = metrics_port
            self.processes[name].health_port = health_port
            self.metrics_ports[name] = metrics_port
        # Replicas start right after their first process.
        self._names = [
            replica
            for name in START_ORDER
            if name in processes
            for replica in (name, *(extra_name for extra_name, command in extra.items() if command == name))
        ]

    @property
    def gateway_target(self) -> str:
        return f"127.0.0.1:{self.processes['gateway'].port}"

    @property
    def gateway_targets(self) -> list[str]:
        """Every gateway replica's address."""
        return [f"127.0.0.1:{process.port}" for process in self.processes.values() if process.command == "gateway"]

    @property
    def safety_target(self) -> str:
        return f"127.0.0.1:{self.processes['safety'].port}"

    def start(self) -> Cluster:
        try:
            for name in self._names:
                self.processes[name].start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> dict[str, int | None]:
        return {name: self.processes[name].stop() for name in reversed(self._names)}

    def __enter__(self) -> Cluster:
        """`with Cluster(...) as running:` starts every process, and stops them all when the block ends."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # The simulator's control endpoints.

    def sim(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A call to the simulator's (deployment 0's) control endpoints."""
        return self.sim_at(0, method, path, body)

    def sim_at(self, index: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A call to the control endpoints of modelsim deployment `index`."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.modelsim_ports[index]}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def sim_stats(self) -> dict[str, int]:
        return self.sim("GET", "/sim/stats")

    def sim_requests(self, limit: int = 10) -> list[dict[str, Any]]:
        """The most recent chat requests the simulator received, newest last."""
        return self.sim("GET", f"/sim/requests?limit={limit}")["requests"]

    def sim_config(self, **fields: Any) -> None:
        self.sim("POST", "/sim/config", fields)

    def sim_faults(
        self, status: int | str, count: int, retry_after: float = 0.0, endpoint: str = "chat", key: str | None = None
    ) -> None:
        """Queues `count` faults for the chat endpoint, or for "moderations"; with `key`, for that API key only."""
        self.sim_faults_at(0, status, count, retry_after, endpoint, key)

    def sim_reset(self) -> None:
        self.sim("POST", "/sim/reset", {})

    # The same for one modelsim deployment (see modelsim_deployments).

    def sim_stats_at(self, index: int) -> dict[str, Any]:
        """Its counters, with `hangs` and `requests_by_key` (bearer key -> chat requests)."""
        return self.sim_at(index, "GET", "/sim/stats")

    def sim_requests_at(self, index: int, limit: int = 10) -> list[dict[str, Any]]:
        return self.sim_at(index, "GET", f"/sim/requests?limit={limit}")["requests"]

    def sim_config_at(self, index: int, **fields: Any) -> dict[str, Any]:
        """Changes its config (e.g. error_429_rate, hang_rate, unauthorized_keys); returns the whole config."""
        return self.sim_at(index, "POST", "/sim/config", fields)

    def sim_faults_at(
        self,
        index: int,
        status: int | str,
        count: int,
        retry_after: float = 0.0,
        endpoint: str = "chat",
        key: str | None = None,
    ) -> None:
        """Queues `count` faults (429, 500, 401, 404, or "hang" for chat); with `key`, for that API key only."""
        body: dict[str, Any] = {"status": status, "count": count, "retry_after": retry_after, "endpoint": endpoint}
        if key is not None:
            body["key"] = key
        self.sim_at(index, "POST", "/sim/faults", body)

    def sim_reset_at(self, index: int) -> None:
        self.sim_at(index, "POST", "/sim/reset", {})
