"""The one training loop and `evaluate()`. Methods change behaviour only through their hooks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from recall.methods import Method, StepContext
from recall.metrics import ConfusionMatrix


@dataclass
class TrainConfig:
    batch_size: int = 16
    epochs: int = 8  # step 0
    epochs_incremental: int = 10  # every later step
    lr: float = 0.05
    lr_incremental: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    crop: int = 64
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    eval_batch_size: int = 50
    num_workers: int = 0
    threads: int = 2
    cache_images: bool = True  # keep decoded images in memory (toy world; off for real VOC)


def make_optimizer(params: list[nn.Parameter], lr: float, cfg: TrainConfig, total_iters: int):
    """SGD with momentum and the poly learning-rate schedule of DeepLab."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    poly = lambda it: (1 - min(it, total_iters) / max(total_iters, 1)) ** cfg.poly_power  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly)


def blend(current: tuple[torch.Tensor, torch.Tensor], replay: tuple[torch.Tensor, torch.Tensor] | None):
    """One batch of current-step samples followed by replay samples (already labelled)."""
    if replay is None:
        return current
    return torch.cat([current[0], replay[0]]), torch.cat([current[1], replay[1]])


def train_one_epoch(model: nn.Module, method: Method, loader: DataLoader, optimizer, scheduler,
                    ctx: StepContext, desc: str = "train", replay: Iterator | None = None) -> float:
    method.set_train_mode(model, ctx)
    total, seen = 0.0, 0
    for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        targets = method.rewrite_targets(images, targets, ctx)  # e.g. RECALL's background inpainting
        images, targets = blend((images, targets), next(replay) if replay is not None else None)
        outputs = model(images)
        loss = method.loss(outputs, targets, images, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, seen = total + loss.item() * len(images), seen + len(images)
    return total / max(seen, 1)


def train_step(model: nn.Module, method: Method, loader: DataLoader, ctx: StepContext,
               cfg: TrainConfig, replay: Iterator | None = None) -> list[float]:
    """Train one protocol step; returns the mean loss of every epoch. `replay` yields labelled replay batches."""
    epochs, lr = (cfg.epochs, cfg.lr) if ctx.step == 0 else (cfg.epochs_incremental, cfg.lr_incremental)
    params = method.trainable_parameters(model, ctx)
    optimizer, scheduler = make_optimizer(params, lr, cfg, epochs * len(loader))
    return [train_one_epoch(model, method, loader, optimizer, scheduler, ctx, f"step {ctx.step} epoch {e + 1}/{epochs}",
                            replay) for e in range(epochs)]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int) -> ConfusionMatrix:
    """Accumulate a confusion matrix (rows: ground truth) over the whole loader; 255 is ignored."""
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    for images, targets in tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True):
        matrix.update(model(images)["out"].argmax(1), targets)
    return matrix
