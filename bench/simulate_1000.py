"""Benchmark: wall-clock seconds of ``vk-provider simulate`` on the 1,000-Pod burst workload.

Run with ``.venv/bin/python bench/simulate_1000.py [--workload FILE] [--seed N]``. It runs the
simulation twice (to show that one seed gives identical numbers), writes one run into a fresh
SQLite file in a temporary directory, and prints the timings; the last line is the result, e.g.
``simulate 1000 Pods: 0.84 s simulating, 3.10 s writing the database, 3.94 s in all (goal < 10 s)``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from vk_provider.report import build_comparison, render_json, render_text
from vk_provider.simulate import load_workload, load_workload_catalog, simulate, store

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workload", default=str(ROOT / "config" / "workload-burst.yaml"))
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()

    started = time.perf_counter()
    workload = load_workload(args.workload)
    catalog = load_workload_catalog(workload)
    loaded = time.perf_counter()
    first = simulate(workload, catalog, seed=args.seed)
    simulated = time.perf_counter()
    second = simulate(workload, catalog, seed=args.seed)
    identical = render_json(build_comparison(first.records)) == render_json(build_comparison(second.records))
    with tempfile.TemporaryDirectory() as directory:
        before_store = time.perf_counter()
        asyncio.run(store(first, str(Path(directory) / "bench.db")))
        stored = time.perf_counter()

    print(render_text(build_comparison(first.records)), end="")
    print(f"identical numbers on a second run with the same seed: {identical}")
    simulating = simulated - loaded
    writing = stored - before_store
    total = (loaded - started) + simulating + writing
    pods = len(first.records) + len(first.failures)
    print(
        f"simulate {pods} Pods: {simulating:.2f} s simulating, {writing:.2f} s writing the database, "
        f"{total:.2f} s in all (goal < 10 s)"
    )


if __name__ == "__main__":
    main()
