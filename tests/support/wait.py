"""Wait on a condition with a deadline (tests never sleep a fixed time to wait for something)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

T = TypeVar("T")


class ConditionTimeout(AssertionError):
    pass


def wait_for(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Call ``condition`` until it returns something truthy; return that. Fail after ``timeout``.

    Typed as returning the truthy part: ``None`` and ``False`` are never returned.
    """
    deadline = time.monotonic() + timeout
    last = condition()
    while not last:
        if time.monotonic() > deadline:
            raise ConditionTimeout(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = condition()
    return last


async def await_for(
    condition: Callable[[], Awaitable[T]],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = await condition()
    while not last:
        if loop.time() > deadline:
            raise ConditionTimeout(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)
        last = await condition()
    return last
