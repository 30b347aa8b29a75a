"""The hooks a continual-learning method plugs into the one training loop (recall/train.py).

A method is a small object. The loop calls, in order, per step: `on_step_start`, then per batch
`rewrite_targets` and `loss`; it trains `trainable_parameters` and puts modules in train/eval mode with
`set_train_mode`. Nothing else in the loop depends on which method runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from recall.data.classes import IGNORE_INDEX


@dataclass
class StepContext:
    """What a method may know about the current step."""

    step: int
    task: list[list[int]]
    new_classes: list[int]
    old_classes: list[int]  # non-background classes learnt at earlier steps
    prev_model: nn.Module | None = None  # frozen model of step t-1 (only if the method asks for it)
    extras: dict = field(default_factory=dict)


class Method:
    """Fine-tuning behaviour; subclasses override what they change."""

    name = "base"
    needs_previous_model = False
    uses_replay = False  # True: the loop mixes replay samples into each batch (`replay_ratio` of it)
    replay_ratio = 0.0
    label_threshold = 0.0  # replay methods: label-evaluation confidence below which a pixel becomes 255
    min_labelled = 0.0  # replay methods: drop replay images whose evaluated label covers less of the image
    data = "current"  # "current": only this step's images (privacy); "cumulative": all seen so far (joint)

    def __init__(self, freeze_encoder: bool = False, classifier_init: str = "random"):
        self.freeze_encoder = freeze_encoder
        self.classifier_init = classifier_init

    def options(self) -> dict:
        """The hyperparameters of this method, recorded with every run."""
        return dict(vars(self))

    def encoder_frozen(self, ctx: StepContext) -> bool:
        return self.freeze_encoder and ctx.step > 0

    def on_step_start(self, model: nn.Module, ctx: StepContext) -> None:
        """Called once the classifier has grown for the step's new classes."""

    def trainable_parameters(self, model: nn.Module, ctx: StepContext) -> list[nn.Parameter]:
        frozen = self.encoder_frozen(ctx)
        model.encoder.requires_grad_(not frozen)  # no gradient through a frozen encoder (half the backward)
        return list(model.decoder_parameters()) if frozen else list(model.parameters())

    def set_train_mode(self, model: nn.Module, ctx: StepContext) -> None:
        model.train()
        if self.encoder_frozen(ctx):
            model.encoder.eval()  # frozen encoder: batch-norm statistics stay as they were

    def rewrite_targets(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return targets

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: torch.Tensor,
             ctx: StepContext) -> torch.Tensor:
        return F.cross_entropy(outputs["out"], targets, ignore_index=IGNORE_INDEX)
