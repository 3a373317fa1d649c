"""Virtual time for offline simulation: an asyncio loop whose clock jumps to the next timer.

Owns :class:`VirtualTimeLoop` (whenever the loop would block waiting for a timer, its clock moves
straight to that timer instead, so a simulated day of ``asyncio.sleep`` calls runs in seconds while
every timer still fires in order), :func:`run_virtual` (run a coroutine on a fresh one and check that
nothing was left running; Ctrl-C cancels that coroutine, as ``asyncio.run`` does) and
:class:`VirtualClock` (a controller ``Clock`` whose wall time is a fixed start plus the loop's
virtual time). Virtual time never goes to infinity, nor past the run's ``limit``: the jump that
would is refused with :class:`VirtualTimeOverflow` (at infinity the loop would spin forever).

Must not: be used for real I/O. The loop polls sockets without blocking, so a thread or socket the
loop waits on would see virtual time leap ahead while it works; simulations therefore keep all
database writes outside the virtual run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import selectors
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from types import FrameType
from typing import Any, TypeVar, TypeVarTuple, Unpack

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class DeadlockError(RuntimeError):
    """The virtual loop has nothing scheduled and nothing to poll: it would wait forever."""


class VirtualTimeOverflow(OverflowError):
    """Virtual time would go to infinity (a timer set that far) or past the loop's limit. At infinity
    every timer is "due" yet none ever runs, so the loop would spin forever."""


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real I/O without blocking; a wait for a timer becomes a jump of the virtual clock."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.now = 0.0
        self.limit = limit
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
            target = max(self.now + timeout, self.next_timer() or 0.0)
            if not (math.isfinite(target) and target <= self.limit):
                raise VirtualTimeOverflow(
                    f"virtual time would jump to {target:g} s, past its limit of {self.limit:g} s"
                )
            self.now = target
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time, starting at 0.0; ``time()`` is that virtual time. It never
    goes to infinity, nor past ``limit`` seconds: a run whose next timer is there stops with
    :class:`VirtualTimeOverflow` (a ``Clock`` would have no date for it)."""

    def __init__(self, limit: float = math.inf) -> None:
        self._virtual = _VirtualSelector(limit)
        super().__init__(self._virtual)
        self._virtual.next_timer = self._next_timer

    def _next_timer(self) -> float | None:
        scheduled = self._scheduled  # type: ignore[attr-defined]  # asyncio's own timer heap
        return float(scheduled[0]._when) if scheduled else None

    def time(self) -> float:
        return self._virtual.now

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        # A NaN time would break the timer heap's order: like infinity, it is a time never reached.
        return super().call_at(when if when <= math.inf else math.inf, callback, *args, context=context)

    # asyncio runs the timers due before time() + _clock_resolution (the machine clock's, 1e-9 s).
    # Past 2**24 s of virtual time 1e-9 is lost in rounding, so a timer due exactly now would never
    # run and the loop would spin: the resolution grows with the clock's own step.
    @property
    def _clock_resolution(self) -> float:
        return max(1e-9, 4 * math.ulp(self._virtual.now))

    @_clock_resolution.setter
    def _clock_resolution(self, value: float) -> None:
        pass  # set by asyncio's __init__ from the machine clock; virtual time has its own


def run_virtual(main: Callable[[], Awaitable[_T]], *, limit: float = math.inf) -> _T:
    """Run ``main()`` on a fresh :class:`VirtualTimeLoop` (whose time stops at ``limit``); fail if it
    leaves a task running. Ctrl-C cancels it and raises KeyboardInterrupt, as ``asyncio.run`` does.

    Synchronous, like ``asyncio.run``: it cannot be called from a running event loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_virtual() cannot be called from a running event loop")
    loop = VirtualTimeLoop(limit)
    try:

        async def wrapper() -> _T:
            return await main()

        try:
            result = _run_interruptible(loop, wrapper())
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


def _run_interruptible(loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work`` to its end on ``loop``; a first Ctrl-C cancels it and raises KeyboardInterrupt.

    As ``asyncio.Runner`` does: Python's own SIGINT handler raises KeyboardInterrupt in whatever
    frame runs, often inside some other task, which then dies with it and logs "Task exception was
    never retrieved" when collected. A second Ctrl-C still raises at once.
    """
    main = loop.create_task(work)
    interrupts = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and not main.done():
            main.cancel()
            loop.call_soon_threadsafe(lambda: None)
            return
        raise KeyboardInterrupt

    handler: Callable[[int, FrameType | None], None] | None = None
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        handler = on_sigint
        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # an interpreter without signals
            handler = None
    try:
        return loop.run_until_complete(main)
    except asyncio.CancelledError:
        if interrupts and main.cancelled():
            raise KeyboardInterrupt from None
        raise
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_running(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[object]]:
    """Cancel the loop's unfinished tasks and let them end; returns them. Rounds, as a task may start
    another while it stops (a bandwidth pool re-times the downloads left when one leaves)."""
    stopped: list[asyncio.Task[object]] = []
    for _ in range(100):
        running = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not running:
            break
        for task in running:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*running, return_exceptions=True))
        stopped.extend(running)
    return stopped


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
