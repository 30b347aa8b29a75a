"""Distillation baselines: LwF, ILT and MiB, with their losses as pure functions.

The loss definitions follow MiB's reference code (fcdl94/MiB, `utils/loss.py` and `train.py`):
- output distillation averages the soft cross-entropy over the old model's channels (background
  included) and then over all pixels, as MiB's `KnowledgeDistillationLoss` does; the weights
  `kd_weight` / `de_weight` are calibrated to that normalisation;
- `temperature` T plays the role of MiB's `alpha = 1 / T`: it divides the *old* model's logits only
  (MiB sharpens or softens the targets, not the student's logits). T = 1 is MiB's default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recall.data.classes import IGNORE_INDEX
from recall.methods.base import Method, StepContext


def knowledge_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """LwF/ILT output distillation: soft cross-entropy between the old model's softmax and the new model's
    softmax restricted to the old channels (background + old classes), averaged over channels and pixels."""
    n_old = old_logits.shape[1]
    log_p_new = torch.log_softmax(new_logits[:, :n_old], dim=1)
    p_old = torch.softmax(old_logits / temperature, dim=1)
    return -(log_p_new * p_old).mean(dim=1).mean()


def unbiased_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_old: int,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MiB's unbiased cross-entropy: the probability of background is the total probability of background and
    the `num_old` old classes (channels 0..num_old); labels of old classes count as background."""
    n_bg = 1 + num_old  # background + old classes
    den = torch.logsumexp(logits, dim=1, keepdim=True)
    log_bg = torch.logsumexp(logits[:, :n_bg], dim=1, keepdim=True) - den
    log_rest = logits[:, n_bg:] - den
    # channels 1..num_old are never a label any more; MiB fills them with zeros
    log_probs = torch.cat([log_bg, torch.zeros_like(logits[:, 1:n_bg]), log_rest], dim=1)
    labels = torch.where(targets < n_bg, torch.zeros_like(targets), targets)
    return F.nll_loss(log_probs, labels, ignore_index=ignore_index)


def unbiased_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """MiB's unbiased knowledge distillation: the new model's background is the total probability of
    background and the new classes; it is compared with the old model's softmax (background + old classes),
    averaged over the old channels and the pixels."""
    n_old = old_logits.shape[1]
    den = torch.logsumexp(new_logits, dim=1)
    bg_and_new = torch.cat([new_logits[:, :1], new_logits[:, n_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - den  # B, H, W
    log_old = new_logits[:, 1:n_old] - den.unsqueeze(1)  # B, n_old - 1, H, W
    p_old = torch.softmax(old_logits / temperature, dim=1)
    per_pixel = (p_old[:, 0] * log_bg + (p_old[:, 1:] * log_old).sum(dim=1)) / n_old
    return -per_pixel.mean()


def feature_distillation(new_features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """ILT's feature distillation: mean squared error between the new and the old model's features."""
    return F.mse_loss(new_features, old_features)


class _Distillation(Method):
    """Shared plumbing: the frozen step t-1 model's outputs, computed without gradients."""

    needs_previous_model = True

    @staticmethod
    def previous_outputs(images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return ctx.prev_model(images)

    def cross_entropy(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs["out"], targets, ignore_index=IGNORE_INDEX)


class ILT(_Distillation):
    """Incremental Learning Techniques (Michieli & Zanuttigh): LwF's output distillation plus an L2
    distillation of the encoder's features (MiB's `features['body']`)."""

    name = "ilt"

    def __init__(self, kd_weight: float = 100.0, de_weight: float = 100.0, temperature: float = 1.0,
                 freeze_encoder: bool = False, classifier_init: str = "random"):
        super().__init__(freeze_encoder=freeze_encoder, classifier_init=classifier_init)
        self.kd_weight = kd_weight
        self.de_weight = de_weight
        self.temperature = temperature

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: torch.Tensor,
             ctx: StepContext) -> torch.Tensor:
        loss = self.cross_entropy(outputs, targets)
        if ctx.prev_model is None:
            return loss
        old = self.previous_outputs(images, ctx)
        if self.kd_weight > 0:
            loss = loss + self.kd_weight * knowledge_distillation(outputs["out"], old["out"], self.temperature)
        if self.de_weight > 0:
            loss = loss + self.de_weight * feature_distillation(outputs["encoder"], old["encoder"])
        return loss


class LwF(ILT):
    """Learning without Forgetting: cross-entropy + kd_weight * distillation of the old model's outputs
    (ILT without its feature term)."""

    name = "lwf"

    def __init__(self, kd_weight: float = 100.0, temperature: float = 1.0, freeze_encoder: bool = False,
                 classifier_init: str = "random"):
        super().__init__(kd_weight=kd_weight, de_weight=0.0, temperature=temperature,
                         freeze_encoder=freeze_encoder, classifier_init=classifier_init)


class MiB(_Distillation):
    """Modeling the Background (Cermelli et al.): unbiased cross-entropy + kd_weight * unbiased distillation,
    with the new classifiers initialised from the background's."""

    name = "mib"

    def __init__(self, kd_weight: float = 10.0, temperature: float = 1.0, freeze_encoder: bool = False,
                 classifier_init: str = "background"):
        super().__init__(freeze_encoder=freeze_encoder, classifier_init=classifier_init)
        self.kd_weight = kd_weight
        self.temperature = temperature

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: torch.Tensor,
             ctx: StepContext) -> torch.Tensor:
        if ctx.prev_model is None:
            return self.cross_entropy(outputs, targets)
        loss = unbiased_cross_entropy(outputs["out"], targets, num_old=len(ctx.old_classes))
        if self.kd_weight > 0:
            old = self.previous_outputs(images, ctx)
            loss = loss + self.kd_weight * unbiased_distillation(outputs["out"], old["out"], self.temperature)
        return loss


__all__ = ["ILT", "LwF", "MiB", "feature_distillation", "knowledge_distillation", "unbiased_cross_entropy",
           "unbiased_distillation"]
