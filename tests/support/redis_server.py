"""A real, throwaway redis-server for tests, on a free loopback port: without persistence, or with an
append-only file synced on every write (`appendonly=True`), which survives `kill()` and `restart()`."""

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

    def __init__(self, process: subprocess.Popen[bytes], port: int, directory: Path, appendonly: bool) -> None:
        self._process = process
        self.port = port
        self._directory = directory
        self._appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, startup_timeout: float = 10.0, *, appendonly: bool = False) -> RedisServer:
        """Starts redis-server and returns once it answers PING."""
        directory = Path(tempfile.mkdtemp(prefix="chatmesh-redis-"))
        port = free_port()
        server = cls(cls._spawn(port, directory, appendonly), port, directory, appendonly)
        try:
            server._wait_until_ready(startup_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    @staticmethod
    def _spawn(port: int, directory: Path, appendonly: bool) -> subprocess.Popen[bytes]:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH: run `make test`, which installs it")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
        with (directory / "redis.log").open("ab") as log:
            return subprocess.Popen(
                [
                    executable,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    *persistence,
                    "--dir",
                    str(directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL, as a crash: with `appendonly`, every acknowledged write is on disk."""
        self._process.kill()
        self._process.wait()

    def restart(self, startup_timeout: float = 10.0) -> None:
        """Starts it again on the same port and directory (and so the same append-only file)."""
        self._process = self._spawn(self.port, self._directory, self._appendonly)
        self._wait_until_ready(startup_timeout)

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
