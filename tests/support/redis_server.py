"""A real, throwaway redis-server for tests, on a free loopback port and with no persistence."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .ports import free_port


class RedisServer:
    """A running redis-server process; `start()` it, use `url`, and `stop()` it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
        self._process = process
        self.port = port
        self._directory = directory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, startup_timeout: float = 10.0) -> RedisServer:
        """Starts redis-server and returns once it answers PING."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH: run `make test`, which installs it")
        directory = Path(tempfile.mkdtemp(prefix="chatmesh-redis-"))
        port = free_port()
        with (directory / "redis.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    executable,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(directory),
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

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            while True:
                if self._process.poll() is not None:
                    log = (self._directory / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}:\n{log}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminates the server (killing it if it lingers) and removes its directory. Safe to call twice."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)
