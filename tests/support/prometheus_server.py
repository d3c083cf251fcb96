"""A real, throwaway Prometheus server (Debian's `prometheus`) for tests, on a free loopback port."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .ports import free_port

T = TypeVar("T")


class PrometheusError(RuntimeError):
    """A query Prometheus answered with an error."""


class PrometheusServer:
    """A running Prometheus that scrapes `targets` (job name to host:port) every `interval` seconds,
    evaluates `rule_files` as often, and keeps its data in a temporary folder; `stop()` removes it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
        self._process = process
        self.port = port
        self._directory = directory

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        targets: Mapping[str, str],
        rule_files: Sequence[Path] = (),
        *,
        interval: str = "1s",
        startup_timeout: float = 20.0,
    ) -> PrometheusServer:
        executable = shutil.which("prometheus")
        if executable is None:
            raise RuntimeError("prometheus is not on PATH: run `make test`, which installs Debian's prometheus package")
        directory = Path(tempfile.mkdtemp(prefix="chatmesh-prometheus-"))
        # JSON is YAML: no YAML library needed to write the configuration.
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(json.dumps(config, indent=1))
        port = free_port()
        with (directory / "prometheus.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    executable,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = cls(process, port, directory)
        try:
            server._wait_until_ready(startup_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def log(self) -> str:
        return (self._directory / "prometheus.log").read_text(errors="replace")

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prometheus on port {self.port} was not ready within {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a GET to /api/v1/<path>; PrometheusError when Prometheus answers with an error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')} ({path} {params})")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: the result's samples (`metric` labels and `value` [time, text])."""
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query that returns at most one sample; None when it returns none."""
        samples = self.query(expr)
        assert len(samples) <= 1, f"{expr} returned {len(samples)} samples"
        return float(samples[0]["value"][1]) if samples else None

    def values(self, expr: str, label: str) -> dict[str, float]:
        """A query's values by the value of one of its labels."""
        return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in self.query(expr)}

    def wait_for(self, probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 20.0) -> T:
        """Calls `probe` every 0.25 s until `done(result)`, for at most `timeout` seconds; returns the last result."""
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if done(result) or time.monotonic() >= deadline:
                return result
            time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminates Prometheus (killing it if it lingers) and removes its folder. Safe to call twice."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)
