"""Images/s of the web replay crawl (FlickrSource + build_pool) with 1, 4 and 8 download workers, in one run.

    python benchmarks/replay_web.py [--per-class 40] [--latency 0.02] [--workers 1 4 8]

The crawl talks to the local Flickr stand-in, which waits ``latency`` seconds before each photo (network
latency); the search, decoding and pool writes are the real code. The reference is ``workers=1`` (one
download at a time); prints each setting's images/s and its ratio to the reference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recall.sim.flickr_standin import FlickrStandIn
from recall.replay.pool import build_pool
from recall.replay.web import FlickrSource

CLASSES = {12: "dog", 3: "bird"}
REFERENCE_WORKERS = 1


def crawl_seconds(standin: FlickrStandIn, workers: int, per_class: int, per_page: int) -> tuple[float, int]:
    """Wall time of one fresh crawl of ``per_class`` images per class, and the images written."""
    with tempfile.TemporaryDirectory() as root, \
            FlickrSource(endpoint="standin", rest_url=standin.rest_url, workers=workers, per_page=per_page) as source:
        start = time.perf_counter()
        summary = build_pool(source, CLASSES, per_class, root, progress=False)
        return time.perf_counter() - start, summary["total"]


def run(per_class: int = 40, latency: float = 0.02, workers: tuple[int, ...] = (1, 4, 8),
        per_page: int = 100, size: int = 64) -> list[dict]:
    """One row per worker count: images, seconds, images/s and the ratio to ``workers=1`` measured in this run."""
    settings = sorted(set(workers) | {REFERENCE_WORKERS})
    rows = []
    with FlickrStandIn(size=size, latency_seconds=latency) as standin:
        crawl_seconds(standin, max(settings), 4, per_page)  # warm-up: imports, connections, the render cache
        for n in settings:
            seconds, images = crawl_seconds(standin, n, per_class, per_page)
            rows.append({"workers": n, "images": images, "seconds": seconds, "images_per_s": images / seconds})
    reference = next(r["images_per_s"] for r in rows if r["workers"] == REFERENCE_WORKERS)
    for row in rows:
        row["ratio"] = row["images_per_s"] / reference
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the stand-in waits per photo")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    rows = run(args.per_class, args.latency, tuple(args.workers))
    print(f"web replay crawl, {len(CLASSES)} classes x {args.per_class} images, stand-in latency "
          f"{args.latency * 1000:.0f} ms per photo")
    print(f"{'workers':>8} {'images':>7} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    for row in rows:
        print(f"{row['workers']:>8} {row['images']:>7} {row['seconds']:>8.2f} {row['images_per_s']:>9.1f} "
              f"{row['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
