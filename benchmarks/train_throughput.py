"""Images/s of recall's training loop vs a bare PyTorch loop on the same model and data, in one run.

    python benchmarks/train_throughput.py [--images 600] [--repeats 3]

Both loops see the same toy-world images through the same DataLoader (same transforms), so the ratio
measures what the loop itself costs: method hooks, the scheduler, progress bars. Goal: ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from recall.data.protocol import steps, train_label_map
from recall.sim.toyworld import generate
from recall.data.transforms import train_transform
from recall.data.voc import VOCSegmentation
from recall.labeling import ignore_padding
from recall.methods import StepContext, build_method
from recall.model import ModelConfig, SegmentationModel
from recall.train import TrainConfig, make_optimizer, train_one_epoch


def bare_epoch(model, loader, optimizer) -> None:
    model.train()
    for images, targets in loader:
        targets = ignore_padding(targets)  # crop padding is ignored by the loss, as in the real loop
        loss = F.cross_entropy(model(images)["out"], targets, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), n_train=args.images, n_val=1, progress=False)
        task = steps("joint")
        data = VOCSegmentation(tmp, "train", transform=train_transform(cfg.crop, cfg.scale),
                               label_map=train_label_map(task, 0, "overlapped"), cache_in_memory=True)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
        for _ in loader:  # fill the decoded-image cache once, for both loops
            pass
        method = build_method("ft")
        ctx = StepContext(step=0, task=task, new_classes=task[0], old_classes=[])
        results = {"recall": [], "bare": []}
        for _ in range(args.repeats):
            for name in ("recall", "bare"):
                torch.manual_seed(0)
                model = SegmentationModel(ModelConfig(), [20])
                optimizer, scheduler = make_optimizer(list(model.parameters()), cfg.lr, cfg, len(loader))
                start = time.perf_counter()
                if name == "recall":
                    train_one_epoch(model, method, loader, optimizer, scheduler, ctx, desc="recall loop")
                else:
                    bare_epoch(model, loader, optimizer)
                results[name].append(len(loader) * cfg.batch_size / (time.perf_counter() - start))
    best = {k: max(v) for k, v in results.items()}
    print(f"torch {torch.__version__}, 2 threads, {args.images} images 64x64, batch {cfg.batch_size}, "
          f"best of {args.repeats}")
    print(f"recall loop: {best['recall']:7.1f} img/s")
    print(f"bare loop:   {best['bare']:7.1f} img/s")
    print(f"ratio recall/bare: {best['recall'] / best['bare']:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
