"""What a simulated container does, set per Pod by ``vk-provider.io/`` annotations (like kwok's stages).

PURE. Annotations (values in simulated seconds; ``.<container>`` suffix targets one container, the
plain key every main container; init containers default to exiting 0 right after start):

- ``vk-provider.io/run-seconds``: the container exits after running this long (absent: runs until
  the Pod is deleted).
- ``vk-provider.io/exit-code``: the exit code when it does (default 0).
- ``vk-provider.io/ready-after-seconds``: it turns ready this long after it starts (default 0).
- ``vk-provider.io/stop-seconds``: how long it takes to stop when the Pod is deleted (default 0;
  never longer than the grace period).

A malformed value is a problem (returned as a message, posted as a Warning Event) and the default
applies; it never stops the Pod.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

PREFIX = "vk-provider.io/"
RUN_SECONDS = PREFIX + "run-seconds"
EXIT_CODE = PREFIX + "exit-code"
READY_AFTER = PREFIX + "ready-after-seconds"
STOP_SECONDS = PREFIX + "stop-seconds"
_KEYS = (RUN_SECONDS, EXIT_CODE, READY_AFTER, STOP_SECONDS)
MAX_SECONDS = 10 * 365 * 86400.0
MAX_VALUE_LENGTH = 64
# ASCII digits only, no "_" separators: Python's int() and float() take both (full-width digits, "1_0").
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class ContainerBehaviour:
    run_seconds: float | None  # None: runs until stopped
    exit_code: int
    ready_after: float
    stop_seconds: float


@dataclass(frozen=True, slots=True)
class Workload:
    containers: Mapping[str, ContainerBehaviour]
    problems: tuple[str, ...]

    def of(self, name: str) -> ContainerBehaviour:
        return self.containers[name]


def parse_workload(
    annotations: Mapping[str, str], init_containers: Sequence[str], containers: Sequence[str]
) -> Workload:
    if not any(key.startswith(PREFIX) for key in annotations):
        # The common case: no workload annotations. One shared (immutable) Workload per shape of
        # Pod, not one per Pod: 10,000 tracked Pods must stay small.
        return _defaults(tuple(init_containers), tuple(containers))
    return _parse(annotations, init_containers, containers)


@lru_cache(maxsize=256)
def _defaults(init_containers: tuple[str, ...], containers: tuple[str, ...]) -> Workload:
    return _parse({}, init_containers, containers)


def _parse(annotations: Mapping[str, str], init_containers: Sequence[str], containers: Sequence[str]) -> Workload:
    problems: list[str] = []
    names = set(init_containers) | set(containers)
    for key in annotations:
        if key.startswith(PREFIX):
            base, target = _split(key)
            if base not in _KEYS:
                problems.append(f"annotation {_short(key)} is not a known vk-provider.io workload setting; ignored")
            elif target and target not in names:
                problems.append(f"annotation {_short(key)} names no container of this Pod; ignored")

    def seconds(key: str, name: str, default: float | None) -> float | None:
        raw = annotations.get(f"{key}.{name}", annotations.get(key) if name in containers else None)
        if raw is None:
            return default
        value = _number(raw)
        if value is None or not 0 <= value <= MAX_SECONDS:
            problems.append(
                f"annotation {key}={_short(raw)!r} for container {name} must be a number of seconds "
                f"between 0 and {MAX_SECONDS:.0f}; using the default"
            )
            return default
        return value

    def code(name: str) -> int:
        raw = annotations.get(f"{EXIT_CODE}.{name}", annotations.get(EXIT_CODE) if name in containers else None)
        if raw is None:
            return 0
        text = raw.strip()
        value = int(text) if len(raw) <= MAX_VALUE_LENGTH and _INTEGER.fullmatch(text) else -1
        if not 0 <= value <= 255:
            problems.append(f"annotation {EXIT_CODE}={_short(raw)!r} for container {name} must be 0-255; using 0")
            return 0
        return value

    behaviours: dict[str, ContainerBehaviour] = {}
    for name in [*init_containers, *containers]:
        is_init = name in init_containers and name not in containers
        behaviours[name] = ContainerBehaviour(
            run_seconds=seconds(RUN_SECONDS, name, 0.0 if is_init else None),
            exit_code=code(name),
            ready_after=seconds(READY_AFTER, name, 0.0) or 0.0,
            stop_seconds=seconds(STOP_SECONDS, name, 0.0) or 0.0,
        )
    return Workload(behaviours, tuple(dict.fromkeys(problems)))


def _split(key: str) -> tuple[str, str]:
    for base in _KEYS:
        if key == base:
            return base, ""
        if key.startswith(base + "."):
            return base, key[len(base) + 1 :]
    return key, ""


def _number(raw: str) -> float | None:
    if len(raw) > MAX_VALUE_LENGTH:
        return None
    text = raw.strip().removesuffix("s")
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
