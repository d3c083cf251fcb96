"""A real, throwaway redis-server for tests, on a free loopback port: without persistence, or with an
append-only file synced on every write (`appendonly=True`), which survives `kill()` and `restart()`.

With `tls`, it serves TLS only (Debian's redis-server is built with TLS) and accepts only the ACL user
`chatmesh` with `PASSWORD`: the way a managed Redis is reached, over rediss:// with a username and password."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from .certificates import CertificateFiles
from .ports import free_port


class RedisServer:
    """A running redis-server process; `start()` it, use `url`, and `stop()` it."""

    USERNAME = "chatmesh"
    PASSWORD = "redis-test-password"

    def __init__(self, port: int, directory: Path, appendonly: bool, tls: CertificateFiles | None) -> None:
        self.port = port
        self._directory = directory
        self._appendonly = appendonly
        self.tls = tls
        self._process = self._spawn()

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @classmethod
    def start(
        cls, startup_timeout: float = 10.0, *, appendonly: bool = False, tls: CertificateFiles | None = None
    ) -> RedisServer:
        """Starts redis-server and returns once it answers PING."""
        directory = Path(tempfile.mkdtemp(prefix="chatmesh-redis-"))
        server = cls(free_port(), directory, appendonly, tls)
        try:
            server._wait_until_ready(startup_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def client_options(self) -> dict[str, Any]:
        """What a redis-py client needs besides the URL."""
        if self.tls is None:
            return {}
        return {"username": self.USERNAME, "password": self.PASSWORD, "ssl_ca_certs": self.tls.ca}

    def _spawn(self) -> subprocess.Popen[bytes]:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH: run `make test`, which installs it")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self._appendonly else ["--appendonly", "no"]
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = [
                *("--port", "0", "--tls-port", str(self.port)),
                *("--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key, "--tls-ca-cert-file", self.tls.ca),
                *("--tls-auth-clients", "no"),
                *("--user", "default", "off"),
                *("--user", self.USERNAME, "on", f">{self.PASSWORD}", "~*", "&*", "+@all"),
            ]
        with (self._directory / "redis.log").open("ab") as log:
            return subprocess.Popen(
                [executable, *listen, "--bind", "127.0.0.1", "--save", "", *persistence, "--dir", str(self._directory)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL, as a crash: with `appendonly`, every acknowledged write is on disk."""
        self._process.kill()
        self._process.wait()

    def restart(self, startup_timeout: float = 10.0) -> None:
        """Starts it again on the same port and directory (and so the same append-only file)."""
        self._process = self._spawn()
        self._wait_until_ready(startup_timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1, **self.client_options())
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
