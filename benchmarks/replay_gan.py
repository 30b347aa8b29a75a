"""Replay-pool building speed of ``BigGANSource`` by batch size, against batch size 1 in the same run.

    python benchmarks/replay_gan.py [--per-class 64] [--batch-sizes 1 8 32] [--repeats 2] [--threads 2]

A random-weight BigGAN-deep somewhat larger than the tests' tiny one (channel width 32, 64 px) is
made in a temp directory; each measurement builds a fresh pool of ``per_class`` images for two
classes with ``build_pool`` (generation + JPEG encoding + hashing + manifest writes), best of
``repeats``. ``per_class`` is a multiple of every batch size so no batch computes unused samples.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recall.replay.gan import BigGANSource  # noqa: E402
from recall.sim.standin_weights import make_tiny_biggan  # noqa: E402
from recall.replay.pool import build_pool  # noqa: E402

CLASSES = {1: "aeroplane", 2: "bicycle"}
MAPPING = {1: 404, 2: 671}
REFERENCE_BATCH = 1
CHANNEL_WIDTH = 32
OUTPUT_DIM = 64


def pool_images_per_second(weights: Path, batch_size: int, per_class: int, repeats: int, scratch: Path) -> float:
    """Best images/s of ``build_pool`` into fresh directories (the model is loaded before timing)."""
    source = BigGANSource(str(weights), batch_size=batch_size, mapping=MAPPING)
    source.model  # noqa: B018 - load outside the timed part
    source.params  # noqa: B018 - the weights hash is cached too
    best = 0.0
    for repeat in range(repeats):
        root = scratch / f"pool_b{batch_size}_{repeat}"
        start = time.perf_counter()
        summary = build_pool(source, CLASSES, per_class, root, progress=False)
        best = max(best, summary["total"] / (time.perf_counter() - start))
    return best


def run(per_class: int = 64, batch_sizes: Sequence[int] = (1, 8, 32), repeats: int = 2, threads: int = 2,
        channel_width: int = CHANNEL_WIDTH, output_dim: int = OUTPUT_DIM) -> list[dict]:
    """One row per batch size: ``batch_size``, ``images_per_s`` and ``ratio`` to batch size 1."""
    torch.set_num_threads(threads)
    if REFERENCE_BATCH not in batch_sizes:
        batch_sizes = (REFERENCE_BATCH, *batch_sizes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        weights = make_tiny_biggan(scratch / "biggan", seed=0, channel_width=channel_width, output_dim=output_dim)
        for batch_size in batch_sizes:
            rows.append({"batch_size": batch_size, "images": per_class * len(CLASSES),
                         "images_per_s": pool_images_per_second(weights, batch_size, per_class, repeats, scratch)})
        megabytes = (weights / "pytorch_model.bin").stat().st_size / 1e6
    reference = next(r["images_per_s"] for r in rows if r["batch_size"] == REFERENCE_BATCH)
    for row in rows:
        row.update(ratio=row["images_per_s"] / reference, weights_mb=round(megabytes, 2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = run(args.per_class, args.batch_sizes, args.repeats, args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, BigGAN-deep channel width {CHANNEL_WIDTH}, "
          f"{OUTPUT_DIM} px ({rows[0]['weights_mb']} MB), {rows[0]['images']} images per pool, "
          f"best of {args.repeats}")
    print(f"{'batch':>5}  {'img/s':>8}  {'ratio':>6}")
    for row in rows:
        print(f"{row['batch_size']:>5}  {row['images_per_s']:8.1f}  {row['ratio']:6.2f}")


if __name__ == "__main__":
    main()
