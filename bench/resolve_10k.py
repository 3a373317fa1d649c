"""Benchmark: p99 time of ``resolve`` for one Pod against 10,000 synthetic image caches.

Run with ``.venv/bin/python bench/resolve_10k.py``. The caches are built from a fixed seed
(``random.Random(1)``) so runs are comparable; the last line is the result, e.g.
``resolve p99: 1.23 ms (10000 caches; goal < 5 ms)``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime, timedelta

from vk_provider.domain.model import CachedImage, CachePhase, ImageCache
from vk_provider.domain.resolver import PodCacheFacts, resolve

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def synthetic_caches(count: int, rng: random.Random) -> list[ImageCache]:
    # A realistic pool: a few hundred repositories with a few tags each, so many caches share
    # images with the Pod (the expensive case) and most do not.
    repositories = [f"docker.io/library/app{number}" for number in range(200)] + [
        f"registry.example.com/team{number % 7}/svc{number}" for number in range(100)
    ]
    pool = [
        CachedImage(
            reference=f"{repository}:{tag}",
            size=rng.randrange(5_000_000, 900_000_000),
            digest="sha256:" + "".join(rng.choice("0123456789abcdef") for _ in range(64)),
        )
        for repository in repositories
        for tag in ("1.0", "1.1", "2.0", "latest")
    ]
    phases = [CachePhase.READY] * 8 + [CachePhase.CREATING, CachePhase.FAILED]
    caches = []
    for number in range(count):
        images = tuple(rng.sample(pool, rng.randint(1, 6)))
        expires = NOW + timedelta(days=rng.randint(-5, 60)) if rng.random() < 0.3 else None
        caches.append(
            ImageCache(
                imc_id="imc-" + "".join(rng.choice(_ALPHABET) for _ in range(20)),
                name=f"cache-{number}",
                phase=rng.choice(phases),
                size_gib=rng.choice((20, 30, 50, 100)),
                images=images,
                automatic=rng.random() < 0.5,
                created_at=NOW - timedelta(minutes=rng.randint(1, 500_000)),
                expires_at=expires,
            )
        )
    return caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--caches", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    rng = random.Random(1)
    caches = synthetic_caches(args.caches, rng)
    pod = PodCacheFacts(
        uid="7f1c2a9e-0000-4000-8000-000000000001",
        namespace="default",
        name="bench",
        annotations={"k8s.aliyun.com/eci-auto-imc": "true"},
        images=("app1:1.0", "docker.io/library/app2:latest", "registry.example.com/team3/svc10:2.0"),
    )
    resolution = resolve(pod, caches, NOW, default_auto=False)
    timings = []
    for _ in range(args.runs):
        started = time.perf_counter()
        resolve(pod, caches, NOW, default_auto=False)
        timings.append(time.perf_counter() - started)
    p99 = statistics.quantiles(timings, n=100)[98] * 1000
    print(f"outcome: {resolution.outcome}; {resolution.explanation}")
    print(f"median: {statistics.median(timings) * 1000:.2f} ms")
    print(f"resolve p99: {p99:.2f} ms ({args.caches} caches; goal < 5 ms)")


if __name__ == "__main__":
    main()
