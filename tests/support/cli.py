"""`chatmesh` commands as a person at a terminal runs them: a child process, its output captured."""

from __future__ import annotations

import os
import subprocess
import sys


def chatmesh_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `chatmesh ARGS…` (bounded to 60 s) with the test's environment and `env` on top."""
    return subprocess.run(
        [sys.executable, "-m", "chatmesh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
