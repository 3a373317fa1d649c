"""merge_cache_event: identical cache events are counted, not repeated, and only the latest 50 kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain.records import (
    MAX_CACHE_EVENTS,
    CacheEvent,
    CacheOutcome,
    ImagePullRecord,
    PodStartRecord,
    merge_cache_event,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(type_: str, message: str, count: int, first: int, last: int) -> CacheEvent:
    return CacheEvent(type=type_, message=message, count=count, first_timestamp=at(first), last_timestamp=at(last))


@pytest.mark.parametrize(
    ("events", "new", "expected"),
    [
        pytest.param((), ("Normal", "a"), (ev("Normal", "a", 1, 9, 9),), id="first event"),
        pytest.param(
            (ev("Normal", "a", 1, 0, 0),),
            ("Normal", "b"),
            (ev("Normal", "a", 1, 0, 0), ev("Normal", "b", 1, 9, 9)),
            id="different message appended",
        ),
        pytest.param(
            (ev("Normal", "a", 2, 0, 5),),
            ("Normal", "a"),
            (ev("Normal", "a", 3, 0, 9),),
            id="same event counted",
        ),
        pytest.param(
            (ev("Normal", "a", 1, 0, 0),),
            ("Warning", "a"),
            (ev("Normal", "a", 1, 0, 0), ev("Warning", "a", 1, 9, 9)),
            id="same message other type is another event",
        ),
        pytest.param(
            (ev("Normal", "a", 1, 0, 0), ev("Normal", "b", 1, 1, 1)),
            ("Normal", "a"),
            (ev("Normal", "b", 1, 1, 1), ev("Normal", "a", 2, 0, 9)),
            id="counted event moves to the end",
        ),
    ],
)
def test_merge_cache_event(
    events: tuple[CacheEvent, ...], new: tuple[str, str], expected: tuple[CacheEvent, ...]
) -> None:
    assert merge_cache_event(events, type=new[0], message=new[1], now=at(9)) == expected


def test_merge_cache_event_keeps_the_latest_fifty() -> None:
    events = tuple(ev("Normal", f"m{i}", 1, i, i) for i in range(MAX_CACHE_EVENTS))
    merged = merge_cache_event(events, type="Normal", message="new", now=at(100))
    assert len(merged) == MAX_CACHE_EVENTS
    assert merged[0].message == "m1"
    assert merged[-1].message == "new"


@given(st.lists(st.tuples(st.sampled_from(["Normal", "Warning"]), st.sampled_from("abcdef")), max_size=80))
def test_merge_cache_event_properties(occurrences: list[tuple[str, str]]) -> None:
    events: tuple[CacheEvent, ...] = ()
    for second, (type_, message) in enumerate(occurrences):
        events = merge_cache_event(events, type=type_, message=message, now=at(second), keep=5)
    keys = [(e.type, e.message) for e in events]
    assert len(keys) == len(set(keys)) <= 5
    assert sum(e.count for e in events) <= len(occurrences)
    assert [e.last_timestamp for e in events] == sorted(e.last_timestamp for e in events)
    if occurrences:
        assert (events[-1].type, events[-1].message) == occurrences[-1]
        assert 1 <= events[-1].count <= occurrences.count(occurrences[-1])
    if len(set(occurrences)) <= 5:  # nothing evicted: every occurrence is counted
        assert {(e.type, e.message): e.count for e in events} == {o: occurrences.count(o) for o in occurrences}


def test_pod_start_record_totals_its_images() -> None:
    record = PodStartRecord(
        pod_uid="u",
        namespace="ns",
        name="p",
        node="n",
        outcome=CacheOutcome.PARTIAL,
        imc_id="imc-1",
        reason="r",
        images=(
            ImagePullRecord("a", bytes_pulled=0, pull_seconds=0.5, from_cache=True),
            ImagePullRecord("b", bytes_pulled=100, pull_seconds=2.0),
        ),
        resolve_seconds=0.1,
        snapshot_attach_seconds=1.0,
        container_start_seconds=0.2,
        startup_seconds=4.0,
        created_at=T0,
        started_at=at(4),
    )
    assert (record.bytes_pulled, record.pull_seconds) == (100, 2.5)
