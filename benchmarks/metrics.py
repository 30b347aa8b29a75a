"""Benchmark ``recall.metrics.ConfusionMatrix.update`` against torchmetrics.

Run: ``python benchmarks/metrics.py``. Times both on the same random batches (21 classes,
5% ignore pixels) with 2 threads, warm-up and best-of-N repeats, prints images/s, the ratio
ours / torchmetrics, and checks that both give the same per-class IoU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recall.metrics import ConfusionMatrix  # noqa: E402

NUM_CLASSES = 21
IGNORE = 255
N_BATCHES = 50
REPEATS = 5
SHAPES = [(8, 64, 64), (2, 321, 321)]


def make_batches(shape: tuple[int, ...], n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (pred, target) int64 pairs; 5% of target pixels set to the ignore label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        target = torch.randint(0, NUM_CLASSES, shape, generator=g)
        target[torch.rand(shape, generator=g) < 0.05] = IGNORE
        pred = torch.randint(0, NUM_CLASSES, shape, generator=g)
        out.append((pred, target))
    return out


def best_time(run: Callable[[], None], repeats: int = REPEATS) -> float:
    """Warm up once, then return the best wall time over ``repeats`` runs."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(shape: tuple[int, ...]) -> None:
    batches = make_batches(shape, N_BATCHES)
    n_images = shape[0] * N_BATCHES
    ours = ConfusionMatrix(NUM_CLASSES, IGNORE)
    tm = MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=IGNORE, average=None)

    def run_ours() -> None:
        ours.reset()
        for p, t in batches:
            ours.update(p, t)

    def run_tm() -> None:
        tm.reset()
        for p, t in batches:
            tm.update(p, t)

    t_ours = best_time(run_ours)
    t_tm = best_time(run_tm)
    ips_ours, ips_tm = n_images / t_ours, n_images / t_tm

    iou_ours = ours.iou("recall")
    iou_tm = tm.compute().double().numpy()
    same = np.allclose(iou_ours, iou_tm, atol=1e-6, equal_nan=True)
    same_mat = torch.equal(ours.mat, tm.confmat.to(torch.int64))
    print(
        f"batch {'x'.join(map(str, shape)):>9}  x{N_BATCHES}: "
        f"ours {ips_ours:9.1f} img/s  torchmetrics {ips_tm:9.1f} img/s  "
        f"ratio {ips_ours / ips_tm:5.2f}  same IoU: {same}  same matrix: {same_mat}"
    )
    if not (same and same_mat):
        raise SystemExit("MISMATCH between recall.metrics and torchmetrics")


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"{NUM_CLASSES} classes, 5% ignore, best of {REPEATS}")
    for shape in SHAPES:
        bench(shape)


if __name__ == "__main__":
    main()
