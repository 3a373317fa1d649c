"""Virtual time for offline simulation: an asyncio loop whose clock jumps to the next timer.

Owns :class:`VirtualTimeLoop` (whenever the loop would block waiting for a timer, its clock moves
straight to that timer instead, so a simulated day of ``asyncio.sleep`` calls runs in seconds while
every timer still fires in order), :func:`run_virtual` (run a coroutine on a fresh one and check that
nothing was left running) and :class:`VirtualClock` (a controller ``Clock`` whose wall time is a
fixed start plus the loop's virtual time).

Must not: be used for real I/O. The loop polls sockets without blocking, so a thread or socket the
loop waits on would see virtual time leap ahead while it works; simulations therefore keep all
database writes outside the virtual run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import selectors
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar

_T = TypeVar("_T")


class DeadlockError(RuntimeError):
    """The virtual loop has nothing scheduled and nothing to poll: it would wait forever."""


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real I/O without blocking; a wait for a timer becomes a jump of the virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.next_timer: Callable[[], float | None] = lambda: None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise DeadlockError("virtual-time loop would wait forever: nothing is scheduled (deadlock)")
        if timeout > 0:
            # Straight to the next timer: asyncio caps a wait at a day, which would make a timer
            # years away cost a loop turn per simulated day.
            self.now = max(self.now + timeout, self.next_timer() or 0.0)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time, starting at 0.0; ``time()`` is that virtual time."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self._virtual.next_timer = self._next_timer

    def _next_timer(self) -> float | None:
        scheduled = self._scheduled  # type: ignore[attr-defined]  # asyncio's own timer heap
        return float(scheduled[0]._when) if scheduled else None

    def time(self) -> float:
        return self._virtual.now

    # asyncio runs the timers due before time() + _clock_resolution (the machine clock's, 1e-9 s).
    # Past 2**24 s of virtual time 1e-9 is lost in rounding, so a timer due exactly now would never
    # run and the loop would spin: the resolution grows with the clock's own step.
    @property
    def _clock_resolution(self) -> float:
        return max(1e-9, 4 * math.ulp(self._virtual.now))

    @_clock_resolution.setter
    def _clock_resolution(self, value: float) -> None:
        pass  # set by asyncio's __init__ from the machine clock; virtual time has its own


def run_virtual(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` on a fresh :class:`VirtualTimeLoop`; fail if it leaves a task running.

    Synchronous, like ``asyncio.run``: it cannot be called from a running event loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_virtual() cannot be called from a running event loop")
    loop = VirtualTimeLoop()
    try:

        async def wrapper() -> _T:
            return await main()

        try:
            result = loop.run_until_complete(wrapper())
        except BaseException:  # e.g. Ctrl-C: stop every task, or each one left complains when collected
            with contextlib.suppress(Exception):  # a task that will not stop must not hide the cause
                _stop_running(loop)
            raise
        # Cancelled timers finish on the next iteration; anything still pending after that leaked.
        loop.run_until_complete(asyncio.sleep(0))
        leaked = _stop_running(loop)
        if leaked:
            raise RuntimeError(f"tasks left running after the virtual run: {[t.get_name() for t in leaked]}")
        return result
    finally:
        loop.close()


def _stop_running(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[object]]:
    """Cancel the loop's unfinished tasks and let them end; returns them."""
    running = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in running:
        task.cancel()
    if running:
        loop.run_until_complete(asyncio.gather(*running, return_exceptions=True))
    return running


class VirtualClock:
    """A :class:`~vk_provider.controllers.clock.Clock` on the running loop's (virtual) time.

    ``now()`` is ``start`` plus the loop's time, so timestamps follow simulated time rather than the
    machine's wall clock.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("VirtualClock needs a timezone-aware start")
        self._start = start

    @property
    def start(self) -> datetime:
        return self._start

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self.monotonic())

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
