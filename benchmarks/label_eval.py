"""Images/s of RECALL's label evaluation (`recall.labeling.label_pool`) vs a bare batched forward pass of the same
model over the same decoded images, in one run.

    python benchmarks/label_eval.py [--per-class 30] [--repeats 3]

label_pool reads the pool, runs the model, takes the argmax over all outputs and writes one PNG per image; the
bare loop only runs the model on tensors already in memory. The ratio (label_pool / bare) is what reading and
writing cost on top of the forward pass. Goal: >= 0.5 on the toy world (64 px images, where the forward pass is
cheap and the PNG writes are not).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from recall.data.transforms import eval_transform
from recall.labeling import label_pool
from recall.model import ModelConfig, SegmentationModel
from recall.replay.pool import PoolDataset, build_pool
from recall.sim.toy_gan import ToyGenerator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(), [16]).eval()  # the toy model: background + 15 classes
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        generator = ToyGenerator(mapping=ToyGenerator().lookalike_mapping())
        build_pool(generator, {c: f"c{c}" for c in range(1, 16)}, args.per_class, pool, progress=False)
        data = PoolDataset(pool, transform=eval_transform())
        images = torch.stack([data[i][0] for i in range(len(data))])
        channels = list(range(16))
        best = {"label_pool": 0.0, "bare forward": 0.0}
        for _ in range(args.repeats):
            start = time.perf_counter()
            label_pool(model, data, channels, Path(tmp) / "labels", batch_size=args.batch_size)
            best["label_pool"] = max(best["label_pool"], len(data) / (time.perf_counter() - start))
            start = time.perf_counter()
            with torch.no_grad():
                for first in range(0, len(images), args.batch_size):
                    model(images[first:first + args.batch_size])["out"].argmax(1)
            best["bare forward"] = max(best["bare forward"], len(data) / (time.perf_counter() - start))
    print(f"label evaluation of {len(data)} replay images (64 px, batch {args.batch_size}, best of {args.repeats}):")
    for name, rate in best.items():
        print(f"  {name:14s} {rate:8.0f} images/s")
    print(f"  ratio label_pool / bare forward: {best['label_pool'] / best['bare forward']:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
