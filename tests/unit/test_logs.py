"""A container's simulated log, split into runs as the kubelet keeps one log per container instance."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from vk_provider.controllers.logs import LogRun, SimLog

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def texts(run: LogRun) -> list[str]:
    return [line.text for line in run.lines]


def crash_twice(log: SimLog) -> None:
    for n in range(2):
        log.write(T0, f"pulling {n}")
        log.write(T0, f"started {n}")
        log.started()
        log.write(T0, f"exited {n}")
        log.stopped()
    log.write(T0, "pulling 2")  # the next run's steps, before it starts


def test_runs_hold_their_pull_start_and_exit_and_the_next_steps_wait_for_their_run() -> None:
    log = SimLog()
    crash_twice(log)
    assert texts(log.run(0)) == ["pulling 1", "started 1", "exited 1"]
    assert texts(log.run(1)) == ["pulling 0", "started 0", "exited 0"]
    assert log.run(0).finished
    log.write(T0, "started 2")
    log.started()
    current = log.run(0)
    assert texts(current) == ["pulling 2", "started 2"]
    assert not current.finished
    log.write(T0, "ready 2")
    assert texts(current) == ["pulling 2", "started 2", "ready 2"]  # a running run grows
    assert texts(log.run(1)) == ["pulling 1", "started 1", "exited 1"]


def test_a_run_the_log_no_longer_has_is_empty_and_finished() -> None:
    log = SimLog()
    log.write(T0, "pulling")
    gone = log.run(0)
    assert texts(gone) == []
    assert gone.finished


def test_runs_keep_their_lines_when_the_oldest_are_dropped() -> None:
    log = SimLog(max_lines=20)
    crash_twice(log)
    log.started()
    for n in range(25):
        log.write(T0, f"line {n}")
    assert texts(log.run(0))[-1] == "line 24"
    assert len(log.lines) <= 20
    assert texts(log.run(1)) == []  # dropped with the oldest lines
    log.stopped()
    assert texts(log.run(0))[-1] == "line 24"


def test_a_follower_of_a_run_wakes_for_new_lines_and_when_the_run_ends() -> None:
    async def main() -> list[str]:
        log = SimLog()
        log.started()
        run = log.run(0)
        seen: list[str] = []

        async def follow() -> None:
            while True:
                lines = run.lines
                seen.extend(line.text for line in lines[len(seen) :])
                if run.finished:
                    return
                await run.wait_for_more(len(seen))

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        log.write(T0, "one")
        await asyncio.sleep(0)
        log.write(T0, "exited")
        log.stopped()
        await asyncio.wait_for(follower, 1.0)
        return seen

    assert asyncio.run(main()) == ["one", "exited"]


def test_following_a_run_gets_its_last_line_written_while_a_line_was_being_sent() -> None:
    from vk_provider.http.server import _follow

    async def main() -> list[str]:
        log = SimLog()
        for text in ("pulled", "started"):
            log.write(T0, text)
        log.started()
        log.write(T0, "line a")
        seen = []
        async for line in _follow(log.run(0), 0, follow=True):
            seen.append(line.text)
            if line.text == "line a":  # the container exits while this line goes to the client
                log.write(T0, "exited with code 1")
                log.stopped()
        return seen

    assert asyncio.run(main()) == ["pulled", "started", "line a", "exited with code 1"]
