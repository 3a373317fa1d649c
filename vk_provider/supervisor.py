"""Owns every long-running task of the agent: started in one place, named, watched, stopped.

A task that ends with an exception is logged and (unless it is marked ``critical``) left ended;
a critical task's failure asks the whole agent to stop. :meth:`Supervisor.stop` cancels the tasks
in reverse start order and waits for each with a time limit, so shutdown is staged and bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self) -> None:
        self._tasks: list[tuple[asyncio.Task[Any], bool]] = []
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, Any], *, critical: bool = True) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append((task, critical))
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        critical = next((c for t, c in self._tasks if t is task), False)
        if exc is not None:
            log.error("task %s failed: %s", task.get_name(), exc, exc_info=exc)
            if critical and self.failure is None:
                self.failure = exc
                self.failed.set()
        elif critical:
            log.error("task %s ended unexpectedly", task.get_name())
            if self.failure is None:
                self.failure = RuntimeError(f"task {task.get_name()} ended")
                self.failed.set()

    async def stop(self, timeout_each: float = 5.0) -> None:
        """Cancel every task, newest first, waiting at most ``timeout_each`` seconds for each."""
        for task, _ in reversed(self._tasks):
            if not task.done():
                task.cancel()
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout_each)
                except (asyncio.CancelledError, TimeoutError):
                    pass
                except Exception:  # already reported by _on_done
                    pass
                if not task.done():
                    log.warning("task %s did not stop within %.0fs", task.get_name(), timeout_each)
        self._tasks.clear()
