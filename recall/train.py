"""The one training loop and `evaluate()`. Methods change behaviour only through their hooks.

A loss or a gradient that is not finite stops the step (`recall.errors.Diverged`) before the optimizer applies it:
the step saves nothing, the run writes no results. The checks read values the loop computes anyway; they change no
number and draw no random number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from recall import distributed, interrupts
from recall.errors import Diverged
from recall.labeling import ignore_padding
from recall.methods import Method, StepContext
from recall.methods.base import Preparation
from recall.metrics import ConfusionMatrix


@dataclass
class TrainConfig:
    batch_size: int = 16
    epochs: int = 24  # step 0 (and joint)
    epochs_incremental: int = 10  # every later step
    lr: float = 0.05
    lr_incremental: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    lr_end: float = 0.0  # the poly schedule ends here (RECALL's code: 5e-6)
    crop: int = 64
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    scale_reference: str = "image"  # scale the original image (the authors'), or the image fitted to the crop
    eval_batch_size: int = 50
    num_workers: int = 0
    threads: int = 2
    cache_images: bool = True  # keep decoded images in memory (toy world; off for real VOC)
    # set: a step trains len(new classes) x this many iterations (epochs ignored); a mapping gives one per setting,
    # e.g. {overlapped: 1500, disjoint: 1000, sequential: 1000} as the authors' gin files (+ partitioned: 1000)
    iters_per_class: Any = None  # int | {setting: int} | None (OmegaConf's structured configs have no such Union)
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu
    amp: str | None = None  # mixed precision: null (fp32), bf16 or fp16 (fp16 adds a gradient scaler)
    compile: bool = False  # torch.compile the model for training
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies (ignored on CPU)

    def __post_init__(self) -> None:
        """Values no run can train with are configuration errors, refused before anything is created."""
        from recall.errors import UserError

        bounds = {"batch_size": 1, "eval_batch_size": 1, "crop": 1, "threads": 1, "epochs": 0,
                  "epochs_incremental": 0, "num_workers": 0}
        for key, low in bounds.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"train.{key}={value!r}: must be an integer >= {low}")
        for key in ("lr", "lr_incremental", "momentum", "weight_decay", "lr_end"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key}={getattr(self, key)}: must be >= 0")
        per_setting = self.iters_per_class if isinstance(self.iters_per_class, Mapping) else {"": self.iters_per_class}
        if self.iters_per_class is not None and not all(isinstance(v, int) and v >= 1 for v in per_setting.values()):
            raise UserError(f"train.iters_per_class={self.iters_per_class}: null (use epochs), an integer >= 1, or "
                            "one per setting ({overlapped: 1500, disjoint: 1000, ...})")
        if self.scale_reference not in ("image", "crop"):
            raise UserError(f"train.scale_reference={self.scale_reference!r}: image (scale the original image, as "
                            "the authors) or crop (scale the image fitted to the crop)")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise UserError(f"train.scale={list(self.scale)}: [low, high] with 0 < low <= high")


def make_optimizer(params: list[nn.Parameter], lr: float, cfg: TrainConfig, total_iters: int):
    """SGD with momentum and the poly learning-rate schedule of DeepLab, from `lr` down to `cfg.lr_end`:
    lr(it) = (lr - lr_end) (1 - it/T)^power + lr_end."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    decay = lambda it: (1 - min(it, total_iters) / max(total_iters, 1)) ** cfg.poly_power  # noqa: E731
    if not 0 <= cfg.lr_end <= lr:
        raise ValueError(f"train.lr_end={cfg.lr_end} must lie in [0, lr={lr}] (the poly schedule decays to it)")
    floor = cfg.lr_end / lr if lr > 0 else 0.0
    poly = decay if floor == 0 else lambda it: (1 - floor) * decay(it) + floor  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly)


def blend(current: tuple[torch.Tensor, torch.Tensor], replay: tuple[torch.Tensor, torch.Tensor] | None):
    """One batch of current-step samples followed by replay samples (already labelled)."""
    if replay is None:
        return current
    return torch.cat([current[0], replay[0]]), torch.cat([current[1], replay[1]])


AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Mixed precision as one object: the autocast context of forward passes and the gradient scaler fp16
    needs (bf16 and fp32 need none: their scaler is a pass-through, so fp32 training is unchanged)."""

    def __init__(self, amp: str | None, device: torch.device):
        if amp not in AMP_DTYPES:
            raise ValueError(f"train.amp={amp!r}: expected null, bf16 or fp16")
        self.device, self.dtype = device, AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward_and_step(self, loss: torch.Tensor, optimizer) -> bool:
        """Backward pass and optimizer step. Returns False, without stepping, when a gradient is not finite (fp32,
        bf16; fp16's scaler skips such a step itself and lowers its scale, as it should)."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if not self.scaler.is_enabled() and not finite_gradients(optimizer):
            return False
        self.scaler.step(optimizer)
        self.scaler.update()
        return True


def finite_gradients(optimizer) -> bool:
    """Whether every gradient of the optimizer's parameters is finite (reads them: changes nothing)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))


def finite_weights(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of `model` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point())


def diverged(what: str, where: str, ctx: StepContext) -> Diverged:
    """The error of a step whose training stopped on a value that is not finite: nothing of it is saved."""
    return Diverged(f"{where}: {what} is not finite (training diverged); nothing of step {ctx.step} was saved (the "
                    "checkpoints of the steps before it are kept): lower the learning rate (train.lr, "
                    "train.lr_incremental) or check the data, then run the same command again")


def train_one_epoch(model: nn.Module, method: Method, loader: DataLoader, optimizer, scheduler,
                    ctx: StepContext, desc: str = "train", replay: Iterator | None = None, *,
                    net: nn.Module | None = None, precision: Precision | None = None,
                    iterations: int | None = None, prepared: Preparation | None = None) -> float:
    """One pass over `loader` (at most `iterations` batches). `net` is what runs the forward pass (the model,
    or its DistributedDataParallel / compiled wrapper); the method's hooks always see the model itself. `prepared`:
    what `method.prepare` gave for the step (asked for when not given)."""
    net = model if net is None else net
    precision = Precision(None, torch.device("cpu")) if precision is None else precision
    device = precision.device
    (prepared or method.prepare(model, ctx)).train_mode(model)
    total, seen = 0.0, 0
    n = len(loader) if iterations is None else min(iterations, len(loader))
    # a full pass iterates the loader to its end (an abandoned iterator would skip the sampler's last draw from
    # the generator, and change every later shuffle); a partial one (iters_per_class) stops after n batches
    batches = loader if n == len(loader) else itertools.islice(loader, n)
    bar = tqdm(batches, total=n, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main())
    for batch, (images, targets) in enumerate(bar, 1):
        interrupts.check()  # a Ctrl-C that library code swallowed (recall/interrupts.py)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        extra = next(replay) if replay is not None else None  # (the first one labels the pool: not under autocast)
        if extra is not None:
            extra = (extra[0].to(device, non_blocking=True), extra[1].to(device, non_blocking=True))
        with precision.autocast():
            targets = method.rewrite_targets(images, targets, ctx)  # e.g. RECALL's background inpainting
            images, targets = blend((images, targets), extra)
            targets = ignore_padding(targets)  # crop padding is never trained on
            outputs = net(images)
            loss = method.loss(outputs, targets, images, ctx)
        value = loss.item()
        if not math.isfinite(value) and distributed.world_size() == 1:  # several processes: all stop at the gradient
            raise diverged(f"the loss ({value})", f"{desc}, batch {batch}", ctx)
        if not precision.backward_and_step(loss, optimizer):
            raise diverged("a gradient", f"{desc}, batch {batch}", ctx)
        scheduler.step()
        total, seen = total + value * len(images), seen + len(images)
    return total / max(seen, 1)


def iters_per_class(cfg: TrainConfig, setting: str) -> int | None:
    """train.iters_per_class for `setting` (None: the budget is in epochs)."""
    value = cfg.iters_per_class
    if isinstance(value, Mapping):
        if setting not in value:
            from recall.errors import UserError
            raise UserError(f"train.iters_per_class={value}: no budget for setting {setting!r}")
        return int(value[setting])
    return None if value is None else int(value)


def step_iterations(cfg: TrainConfig, ctx: StepContext, batches_per_epoch: int) -> int:
    """Iterations of a step: len(new classes) x iters_per_class when set (the paper's 1000-1500 per class),
    else epochs x batches per epoch."""
    per_class = iters_per_class(cfg, ctx.setting)
    if per_class is not None:
        return len(ctx.new_classes) * per_class
    return (cfg.epochs if ctx.step == 0 else cfg.epochs_incremental) * batches_per_epoch


def step_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate a step starts from (the dry-run lists it)."""
    return cfg.lr if step == 0 else cfg.lr_incremental


def train_step(model: nn.Module, method: Method, loader: DataLoader, ctx: StepContext,
               cfg: TrainConfig, replay: Iterator | None = None, record: dict | None = None) -> list[float]:
    """Train one protocol step; returns the mean loss of every pass over the data. `replay` yields labelled
    replay batches. Runs on `cfg.device`, with DDP when started by torchrun, AMP and torch.compile if asked.
    `record` receives what was executed: the optimizer steps taken (`iterations`) and the learning rate the
    optimizer started from (`lr`)."""
    device = distributed.device(cfg.device)
    model.to(device)
    if ctx.prev_model is not None:
        ctx.prev_model.to(device)
    lr = step_lr(cfg, ctx.step)
    prepared = method.prepare(model, ctx)
    params = prepared.parameters
    total = step_iterations(cfg, ctx, len(loader))
    optimizer, scheduler = make_optimizer(params, lr, cfg, total)
    net = distributed.wrap(model, device)
    if cfg.compile:
        net = torch.compile(net)
    precision = Precision(cfg.amp, device)
    passes = math.ceil(total / max(len(loader), 1))
    unit = "epoch" if cfg.iters_per_class is None else "pass"
    losses = []
    for p in range(passes):
        if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler: a new shuffle every pass
            loader.sampler.set_epoch(p)
        losses.append(train_one_epoch(model, method, loader, optimizer, scheduler, ctx,
                                      f"step {ctx.step} {unit} {p + 1}/{passes}", replay, net=net, precision=precision,
                                      iterations=total - p * len(loader), prepared=prepared))
    if record is not None:  # read from the optimizer and its schedule, not from the configuration
        record.update(iterations=scheduler.last_epoch, lr=optimizer.param_groups[0]["initial_lr"])
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: str | torch.device = "cpu",
             amp: str | None = None) -> ConfusionMatrix:
    """Accumulate a confusion matrix (rows: ground truth) over the whole loader; 255 is ignored. In a
    multi-process run each process scores its shard of the loader and the matrices are summed."""
    device = torch.device(device)
    model.to(device).eval()
    precision = Precision(amp, device)
    matrix = ConfusionMatrix(num_classes, device=device)
    bar = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, disable=not distributed.is_main())
    for images, targets in bar:
        with precision.autocast():
            logits = model(images.to(device, non_blocking=True))["out"]
        matrix.update(logits.argmax(1), targets.to(device, non_blocking=True))
    distributed.sum_(matrix.mat)
    return matrix
