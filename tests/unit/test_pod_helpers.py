"""Quantities, Pod facts, Pod IPs and workload annotations."""

from __future__ import annotations

from fractions import Fraction

import pytest

from vk_provider.domain.ipam import IpPool, PoolExhausted
from vk_provider.domain.podspec import pod_facts
from vk_provider.domain.quantity import milli, parse_quantity, whole
from vk_provider.domain.workload import parse_workload


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1), ("500m", Fraction(1, 2)), ("1.5", Fraction(3, 2)), ("128Mi", 128 * 2**20), ("1k", 1000),
     ("2Gi", 2 * 2**30), ("1e3", 1000), ("100n", Fraction(1, 10**7))],
)  # fmt: skip
def test_parse_quantity(text: str, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.2.3", "5Xi", "1e999", "x" * 100])
def test_parse_quantity_rejects(text: str) -> None:
    assert parse_quantity(text) is None


def test_rounding_up() -> None:
    assert milli(Fraction(1, 3000)) == 1
    assert whole(Fraction(5, 2)) == 3


def test_pod_facts_requests_and_defaults() -> None:
    obj = {
        "metadata": {
            "uid": "u",
            "namespace": "ns",
            "name": "p",
            "annotations": {"other/x": "1", "vk-provider.io/a": "b"},
        },
        "spec": {
            "nodeName": "vk",
            "initContainers": [{"name": "i", "image": "busybox", "resources": {"requests": {"cpu": "2"}}}],
            "containers": [
                {"name": "a", "image": "nginx:1.7.9", "resources": {"limits": {"cpu": "300m", "memory": "200Mi"}}},
                {"name": "b", "image": "redis", "resources": {"requests": {"cpu": "200m", "memory": "100Mi"}}},
            ],
        },
    }
    facts = pod_facts(obj)
    assert facts.requests() == (2000, 300 * 2**20)  # init's 2 cores beat 500m of the main containers
    assert facts.grace_seconds == 30
    assert facts.restart_policy == "Always"
    assert [c.pull_policy for c in facts.containers] == ["Always", "IfNotPresent", "Always"]
    assert facts.annotations == (("vk-provider.io/a", "b"),)


@pytest.mark.parametrize(
    ("spec", "host_network", "deadline"),
    [
        ({}, False, None),
        ({"hostNetwork": True, "activeDeadlineSeconds": 30}, True, 30),
        ({"hostNetwork": "true", "activeDeadlineSeconds": "30"}, False, None),
        ({"hostNetwork": 1, "activeDeadlineSeconds": True}, False, None),
        ({"activeDeadlineSeconds": 0}, False, None),
        ({"activeDeadlineSeconds": -5}, False, None),
        ({"activeDeadlineSeconds": 1.5}, False, None),
    ],
)
def test_pod_facts_host_network_and_active_deadline(
    spec: dict[str, object], host_network: bool, deadline: int | None
) -> None:
    facts = pod_facts({"metadata": {"uid": "u"}, "spec": {"containers": [{"name": "c", "image": "x"}], **spec}})
    assert (facts.host_network, facts.active_deadline) == (host_network, deadline)


def test_pod_facts_survive_garbage() -> None:
    facts = pod_facts({"metadata": None, "spec": {"containers": [{"resources": {"requests": {"cpu": "lots"}}}]}})
    assert facts.containers[0].cpu_milli == 0


def test_ip_pool_unique_until_released() -> None:
    pool = IpPool("10.0.0.0/30")  # two usable addresses
    a, b = pool.allocate(), pool.allocate()
    assert {a, b} == {"10.0.0.1", "10.0.0.2"}
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release(a)
    assert pool.allocate() == a


def test_ip_pool_skips_reserved() -> None:
    pool = IpPool("10.1.0.0/24")
    pool.reserve("10.1.0.1")
    assert pool.allocate() == "10.1.0.2"


def test_workload_defaults_and_overrides() -> None:
    w = parse_workload(
        {
            "vk-provider.io/run-seconds": "5",
            "vk-provider.io/exit-code.b": "3",
            "vk-provider.io/ready-after-seconds": "2s",
        },
        ["init"],
        ["a", "b"],
    )
    assert w.problems == ()
    assert w.of("a").run_seconds == 5
    assert w.of("a").exit_code == 0
    assert w.of("b").exit_code == 3
    assert w.of("a").ready_after == 2
    assert w.of("init").run_seconds == 0  # init containers exit right away by default


def test_workload_runs_forever_without_annotation() -> None:
    assert parse_workload({}, [], ["a"]).of("a").run_seconds is None


@pytest.mark.parametrize(
    ("seconds", "code", "run", "exit_code"),
    [("0.5", "+3", 0.5, 3), (".5s", " 7 ", 0.5, 7), ("1e2", "0", 100.0, 0), ("3.", "255", 3.0, 255)],
)
def test_workload_numbers_as_written(seconds: str, code: str, run: float, exit_code: int) -> None:
    w = parse_workload({"vk-provider.io/run-seconds": seconds, "vk-provider.io/exit-code": code}, [], ["a"])
    assert w.problems == ()
    assert (w.of("a").run_seconds, w.of("a").exit_code) == (run, exit_code)


@pytest.mark.parametrize(
    ("annotations", "needle"),
    [
        ({"vk-provider.io/run-seconds": "soon"}, "run-seconds"),
        ({"vk-provider.io/run-seconds": "-1"}, "run-seconds"),
        ({"vk-provider.io/run-seconds": "nan"}, "run-seconds"),
        ({"vk-provider.io/exit-code": "256"}, "0-255"),
        ({"vk-provider.io/exit-code": "9" * 100_000}, "0-255"),
        ({"vk-provider.io/exit-code": "\uff11"}, "0-255"),  # a full-width 1: int() takes it, Go's Atoi not
        ({"vk-provider.io/exit-code": "1_0"}, "0-255"),
        ({"vk-provider.io/run-seconds": "\uff13\uff10"}, "run-seconds"),
        ({"vk-provider.io/run-seconds": "1_000"}, "run-seconds"),
        ({"vk-provider.io/run-seconds": "inf"}, "run-seconds"),
        ({"vk-provider.io/exit-code.nosuch": "1"}, "names no container"),
        ({"vk-provider.io/run-secs": "1"}, "not a known"),
    ],
)
def test_workload_problems_are_values(annotations: dict[str, str], needle: str) -> None:
    w = parse_workload(annotations, [], ["a"])
    assert any(needle in p for p in w.problems), w.problems
    assert all(len(p) < 400 for p in w.problems)
    assert w.of("a").exit_code == 0
