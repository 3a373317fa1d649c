"""Benchmark: time of ``Registry.list_match_candidates`` with 10,000 caches in a SQLite file.

Run with ``.venv/bin/python bench/registry_candidates.py [--caches N] [--db PATH]``. The caches
come from a fixed seed so runs are comparable; the last line is the result, e.g.
``list_match_candidates: median 85.0 ms, max 95.1 ms (8000 of 10000 caches; 5 runs)``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vk_provider.domain.model import CachedImage, CachePhase, ImageCache
from vk_provider.registry import open_registry
from vk_provider.registry.migrate import upgrade

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def synthetic_caches(count: int, rng: random.Random) -> list[ImageCache]:
    pool = [
        CachedImage(f"docker.io/library/app{n}:{tag}", size=rng.randrange(5_000_000, 900_000_000))
        for n in range(300)
        for tag in ("1.0", "2.0", "latest")
    ]
    phases = [CachePhase.READY] * 8 + [CachePhase.CREATING, CachePhase.FAILED]
    return [
        ImageCache(
            imc_id=f"imc-{number:020d}",
            name=f"cache-{number}",
            phase=rng.choice(phases),
            size_gib=rng.choice((20, 40, 80)),
            images=tuple(rng.sample(pool, rng.randint(1, 6))),
            automatic=rng.random() < 0.5,
            created_at=NOW - timedelta(minutes=rng.randrange(100_000)),
        )
        for number in range(count)
    ]


async def run(db: Path, count: int, runs: int) -> None:
    registry = await open_registry(str(db))
    try:
        await upgrade(registry.engine)
        await registry.upsert_caches(synthetic_caches(count, random.Random(1)), now=NOW)
        timings = []
        found = 0
        for _ in range(runs):
            start = time.perf_counter()
            found = len(await registry.list_match_candidates(NOW))
            timings.append((time.perf_counter() - start) * 1000)
    finally:
        await registry.close()
    print(
        f"list_match_candidates: median {statistics.median(timings):.1f} ms, max {max(timings):.1f} ms "
        f"({found} of {count} caches; {runs} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--caches", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", type=Path, help="SQLite file to use (default: a temporary one)")
    args = parser.parse_args()
    if args.db is not None:
        asyncio.run(run(args.db, args.caches, args.runs))
        return
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(Path(directory) / "registry.db", args.caches, args.runs))


if __name__ == "__main__":
    main()
