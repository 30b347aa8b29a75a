"""RECALL+'s selection of replay images (Liu et al., arXiv 2309.10479, the authors' extension of RECALL): before
replay, drop the pool images that do not look like the training data, or in which the step-0 model does not find
their class. Pure functions over features and predictions; `recall select` (recall.stages.select) runs them on a
pool and writes the selected pool.

Two scores per pool image, both from the frozen step-0 model (the model RECALL's label evaluation uses):

* **domain**: a discriminator, a small MLP on the step-0 encoder's globally pooled features, trained to tell the
  step-0 training images (label 1) from the pool images (label 0). Every image is scored by a discriminator that did
  not train on it (`folds`-fold cross-fitting), so the score is P(training data) out of sample.
* **content**: the share of the image's pixels the step-0 model labels with the image's class (the argmax over all
  its outputs, RECALL's label evaluation). Only the step-0 classes have one: a class learnt later is unknown to the
  step-0 model, and its images pass this test (their reason says so).

Thresholds, adaptive as RECALL+'s are, and set from the training data's own statistics:

* domain: the `domain_quantile` quantile of the training images' own out-of-fold scores (a pool image is kept when
  the discriminator finds it at least as training-like as that share of the real training images);
* content, per class c: the `content_quantile` quantile of the share of c in the step-0 training images that hold c,
  predicted by the same model.

A class keeps at least `min_keep` of its images (its most training-like ones, reason `floor`), so a strong
discriminator cannot empty a class and stop the run.

The RECALL+ text that sets its thresholds was not reachable as text here and the authors have not released its code:
the rules above are our reading of its description (an adversarial domain score and per-class content thresholds),
documented in docs/replay.md as such, with every knob an option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

REASONS = ("kept", "floor", "domain", "content", "domain+content")


@dataclass(frozen=True)
class SelectConfig:
    """The knobs of `recall select` (`select.*` in conf/config.yaml)."""

    domain_test: bool = True
    content_test: bool = True
    domain_quantile: float = 0.05
    content_quantile: float = 0.1
    min_keep: float = 0.25
    folds: int = 5
    hidden: int = 64
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    max_train_images: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("domain_quantile", "content_quantile", "min_keep"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"select.{name} is a share and must be in [0, 1], got {value}")
        if self.folds < 2:
            raise ValueError(f"select.folds must be >= 2 (cross-fitting), got {self.folds}")
        for name in ("hidden", "epochs", "max_train_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"select.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"select.lr must be > 0 and select.weight_decay >= 0, got {self.lr}, {self.weight_decay}")


def pooled(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] encoder features -> [B, C], their global average (the discriminator's input)."""
    return features.float().mean(dim=(2, 3))


def class_share(logits: torch.Tensor, channel_classes: Sequence[int], classes: Sequence[int]) -> torch.Tensor:
    """[B]: the share of each image's pixels whose argmax over every output (`channel_classes[k]`: the class of
    channel k) is the image's class `classes[i]` (0 where the model has no channel for it)."""
    winner = torch.as_tensor(list(channel_classes))[logits.argmax(dim=1).cpu()]  # [B, H, W] in the full label space
    wanted = torch.as_tensor(list(classes))[:, None, None]
    return (winner == wanted).float().mean(dim=(1, 2))


def _fit_discriminator(x: torch.Tensor, y: torch.Tensor, cfg: SelectConfig, seed: int) -> nn.Module:
    """A 2-layer MLP trained full batch (Adam, `cfg.epochs` steps) to predict y (1 = training image) from x, the
    two sides weighted equally whatever their sizes."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    positives = float(y.sum())
    weight = torch.where(y > 0, 0.5 / max(positives, 1.0), 0.5 / max(len(y) - positives, 1.0))
    for _ in range(cfg.epochs):
        optimizer.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), y, reduction="none") * weight).sum()
        loss.backward()
        optimizer.step()
    return net.eval()


def domain_scores(train: torch.Tensor, pool: torch.Tensor, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(training data) of every training image [Nt, C] and every pool image [Np, C]: fold f of each
    side is scored by a discriminator trained on the other folds of both. Features are standardised with the
    training folds' statistics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only wait on each other (30x slower on a busy machine)
    try:
        return _cross_fitted(train, pool, cfg)
    finally:
        torch.set_num_threads(threads)


def _cross_fitted(train: torch.Tensor, pool: torch.Tensor, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(cfg.seed)
    fold_t = generator.permutation(len(train)) % cfg.folds
    fold_p = generator.permutation(len(pool)) % cfg.folds
    scores_t, scores_p = np.zeros(len(train)), np.zeros(len(pool))
    for f in range(cfg.folds):
        fit_t, fit_p = torch.as_tensor(fold_t != f), torch.as_tensor(fold_p != f)
        x = torch.cat([train[fit_t], pool[fit_p]])
        y = torch.cat([torch.ones(int(fit_t.sum())), torch.zeros(int(fit_p.sum()))])
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
        net = _fit_discriminator((x - mean) / std, y, cfg, seed=cfg.seed * 1000 + f)
        with torch.no_grad():
            for side, folds, out in ((train, fold_t, scores_t), (pool, fold_p, scores_p)):
                held = torch.as_tensor(folds == f)
                if held.any():
                    out[held.numpy()] = torch.sigmoid(net((side[held] - mean) / std).squeeze(1)).numpy()
    return scores_t, scores_p


def quantile(values: Sequence[float], q: float) -> float:
    """The q quantile of `values` (linear interpolation); 0 when there are none (nothing to compare with)."""
    return float(np.quantile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str  # one of REASONS
    failed: str  # the tests it failed ("domain", "content", "domain+content"; "" for none), also when kept by the floor


def decide(classes: Sequence[int], domain: Sequence[float], content: Sequence[float | None],
           domain_threshold: float, content_threshold: dict[int, float], min_keep: float) -> list[Decision]:
    """Keep or drop each pool image (class, domain score, content share or None when unscored): dropped when its
    domain score is below `domain_threshold` or its content share below its class's threshold; then, per class,
    the most training-like dropped images come back (reason "floor") until the class keeps ceil(min_keep x its
    images). `failed` keeps the tests an image failed, also when the floor kept it."""
    failed = ["+".join(name for name, bad in (("domain", d < domain_threshold),
                                              ("content", s is not None and s < content_threshold.get(c, 0.0)))
                       if bad) for c, d, s in zip(classes, domain, content)]
    reasons = [f or "kept" for f in failed]
    for c in sorted(set(classes)):
        members = [i for i, k in enumerate(classes) if k == c]
        short = math.ceil(min_keep * len(members)) - sum(reasons[i] == "kept" for i in members)
        for i in sorted((i for i in members if reasons[i] != "kept"), key=lambda i: -domain[i])[:max(short, 0)]:
            reasons[i] = "floor"
    return [Decision(r in ("kept", "floor"), r, f) for r, f in zip(reasons, failed)]


def selection_score(dropped: Sequence[bool], noise: Sequence[bool]) -> dict[str, float | int]:
    """How well the drops find the noise (simulation only: `noise[i]` is the truth that image i does not show its
    class): precision (the share of drops that are noise), recall (the share of noise dropped) and the share of
    good images dropped."""
    dropped, noise = np.asarray(dropped, bool), np.asarray(noise, bool)
    hits = int((dropped & noise).sum())
    return {"images": int(len(noise)), "noise": int(noise.sum()), "dropped": int(dropped.sum()),
            "dropped_noise": hits,
            "precision": hits / int(dropped.sum()) if dropped.any() else float("nan"),
            "recall": hits / int(noise.sum()) if noise.any() else float("nan"),
            "good_dropped": float((dropped & ~noise).sum() / max(int((~noise).sum()), 1))}
