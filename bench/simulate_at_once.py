"""Benchmark: how ``vk-provider simulate`` scales with the number of Pods pulling at the same time.

Simulates N Pods arriving together (nginx + redis, no cache: every one pulls from a saturated
registry), for a small N and a large one, and prints the wall seconds per Pod of each. The figure is
their ratio: 1.0 means the cost per Pod does not grow with the crowd (linear); the bandwidth pool
once re-timed every download at every start and end, and 3,000 Pods took about 140 s (ratio ~20).
Last line, e.g. ``per-Pod cost at 3000 Pods at once / at 300: 1.3 (goal: near 1, linear)``.
Run: ``.venv/bin/python bench/simulate_at_once.py [--small 300] [--large 3000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vk_provider.simulate import load_workload, load_workload_catalog, simulate

WORKLOAD = """\
version: 1
name: at-once-{count}
seed: 1
start: "2026-01-01T12:00:00Z"
pods:
  - name: p
    namespace: bench
    count: {count}
    images: [nginx:1.27, redis:7.2]
"""


def seconds_per_pod(count: int, directory: Path) -> float:
    path = directory / f"at-once-{count}.yaml"
    path.write_text(WORKLOAD.format(count=count))
    workload = load_workload(str(path))
    catalog = load_workload_catalog(workload)
    started = time.perf_counter()
    result = simulate(workload, catalog)
    elapsed = time.perf_counter() - started
    slowest = max(record.startup_seconds for record in result.records)
    assert len(result.records) == count, f"{count - len(result.records)} of {count} Pods did not start"
    print(f"{count} Pods at once: {elapsed:.2f} s wall, {elapsed / count * 1e3:.2f} ms per Pod "
          f"(the last started after {slowest:.0f} simulated s)", flush=True)  # fmt: skip
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        seconds_per_pod(20, Path(directory))  # warm up: imports, catalog, first-call costs
        small = seconds_per_pod(args.small, Path(directory))
        large = seconds_per_pod(args.large, Path(directory))
    print(f"per-Pod cost at {args.large} Pods at once / at {args.small}: {large / small:.2f} (goal: near 1, linear)")


if __name__ == "__main__":
    main()
