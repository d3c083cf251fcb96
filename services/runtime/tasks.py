"""Work that runs after a call has its answer: kept so that shutdown can wait for it, and every failure
retrieved and logged once (never asyncio's "Task exception was never retrieved")."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from chatmesh.runtime.logs import get_logger

log = get_logger(__name__)


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Runs `work`; `name` names it in the log line of an unexpected failure."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("background_task_failed", extra={"task": task.get_name(), "error": type(error).__name__})

    async def wait(self) -> None:
        """Lets every task started so far finish (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
