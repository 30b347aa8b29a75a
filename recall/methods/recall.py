"""RECALL (Maracani et al., ICCV 2021): replay of old classes from outside the training set, labelled by label
evaluation, + background inpainting of the current ground truth, + blending at a replay ratio.

What is RECALL's own, on top of the replay policy (`recall.methods.replay.ReplayMethod`, whose stream does the data
flow):

* **label evaluation by helper decoders**: the pool images of step-0 classes are labelled by the step-0 model; a
  class added at step k by a *helper decoder* trained at step k on the frozen step-0 encoder for background +
  step k's classes (`extra_model`: the run trains it and writes `steps/<k>/helper.pt`);
* **background inpainting** (`rewrite_targets`): background (and, as the original, 255) in the current ground
  truth takes the previous model's prediction where its confidence is at least tau;
* incremental steps train the decoder only (`freeze_encoder`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from recall.labeling import inpaint_background
from recall.methods.base import ExtraModel, RunServices, StepContext
from recall.methods.finetune import FineTuning
from recall.methods.replay import ReplayMethod
from recall.data.classes import IGNORE_INDEX, PADDING
from recall.errors import UserError
from recall.model import SegmentationModel

HELPER_INITS = ("random", "step0")
HELPER_FILE = "helper.pt"  # a helper decoder's checkpoint in its step's directory


class Recall(ReplayMethod):
    name = "recall"

    def __init__(self, replay_ratio: float = 0.5, inpaint_threshold: float = 0.0, inpaint_ignore: bool = True,
                 inpaint_sequential: bool = False, inpaint_padding: bool = False, label_threshold: float = 0.0,
                 min_labelled: float = 0.0,
                 labels: str = "evaluated", label_space: str = "all", helper_lr_factor: float = 0.4,
                 helper_init: str = "random", helper_iters_per_class: int | None = None,
                 freeze_encoder: bool = True, classifier_init: str = "random"):
        super().__init__(replay_ratio=replay_ratio, label_threshold=label_threshold, min_labelled=min_labelled,
                         labels=labels, label_space=label_space, freeze_encoder=freeze_encoder,
                         classifier_init=classifier_init)
        if helper_init not in HELPER_INITS:
            raise UserError(f"method.helper_init={helper_init!r}: random (the authors') or step0 (the step-0 head)")
        if helper_lr_factor <= 0:
            raise UserError(f"method.helper_lr_factor={helper_lr_factor}: must be > 0")
        self.inpaint_threshold = inpaint_threshold
        self.inpaint_ignore = inpaint_ignore  # also the image's own 255 (void) pixels; crop padding never
        self.inpaint_sequential = inpaint_sequential  # the authors' SEQUENTIAL.gin: mix_labels = False
        self.inpaint_padding = inpaint_padding  # crop padding inpainted too: this project's behaviour before the fix
        self.helper_lr_factor = helper_lr_factor  # the authors: 2e-4 for helpers against 5e-4 for the main decoder
        self.helper_init = helper_init
        self.helper_iters_per_class = helper_iters_per_class  # with train.iters_per_class (the authors: 1000)

    # ------------------------------------------------------------------ label evaluation
    def labeller(self, run: RunServices, k: int) -> tuple[Path, list[int]]:
        """Step-0 classes: the step-0 model (background and the step-0 classes); step k's classes: its helper
        decoder (background, then step k's classes in order)."""
        if k == 0:
            return run.step_dir(0) / "model.pt", [0, *run.task[0]]
        return run.step_dir(k) / HELPER_FILE, [0, *run.task[k]]

    def inputs(self, run: RunServices, check: bool = False) -> dict[str, Path]:
        if check and self.helper_init == "step0" and run.model_cfg.head != "aspp":
            raise UserError(f"method.helper_init=step0 starts a helper from the step-0 head, but model.head="
                            f"{run.model_cfg.head} has no layers before its per-step classifiers: use "
                            "method.helper_init=random (the authors') or model.head=aspp")
        return super().inputs(run, check)

    def needs_helper(self, run: RunServices, step: int) -> bool:
        """A helper labels step `step`'s classes for the steps after it: every incremental step but the last (and
        none when nothing is replayed)."""
        return self.replays(run) and 0 < step < len(run.task) - 1

    def helper_model(self, run: RunServices, step: int) -> SegmentationModel:
        """The untrained helper of `step`: the step-0 encoder (frozen in training) and a decoder for background and
        the step's classes, random (the authors': a fresh decoder) or the step-0 head (`helper_init=step0`)."""
        step0 = run.trained_model(0)
        helper = SegmentationModel(run.model_cfg, [len(run.task[step])])
        helper.encoder.load_state_dict(step0.encoder.state_dict())
        if self.helper_init == "step0":
            helper.head.load_state_dict(step0.head.state_dict())
        return helper

    def helper_train_config(self, t):
        """The training settings of a helper: the incremental learning rate (and its floor) times
        `helper_lr_factor`; `helper_iters_per_class` iterations per class when the budget is in iterations."""
        budget = {} if self.helper_iters_per_class is None or t.iters_per_class is None else \
            {"iters_per_class": self.helper_iters_per_class}
        return replace(t, lr_incremental=t.lr_incremental * self.helper_lr_factor,
                       lr_end=t.lr_end * self.helper_lr_factor, **budget)

    def extra_model(self, run: RunServices, step: int) -> ExtraModel | None:
        """The helper decoder of step `step`: the frozen step-0 encoder + a decoder for background and the step's
        classes (outputs 0, 1, 2, ... in the step's order; every other class void), trained on the step's data as a
        step of its own classes, saved as steps/<step>/helper.pt. It labels the replay images of those classes
        later."""
        if not self.needs_helper(run, step):
            return None
        remap = torch.full((256,), 255, dtype=torch.long)
        remap[0] = 0
        for i, c in enumerate(run.task[step]):
            remap[c] = 1 + i
        ctx = StepContext(step=step, task=run.task, new_classes=list(run.task[step]), old_classes=[],
                          setting=run.setting)
        return ExtraModel("helper decoder", HELPER_FILE, lambda: self.helper_model(run, step),
                          FineTuning(freeze_encoder=True), ctx, self.helper_train_config(run.train_cfg), remap,
                          {"classes_per_step": [len(run.task[step])], "helper_for": run.task[step]})

    # ------------------------------------------------------------------ the loop
    def rewrite_targets(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.prev_model is None or (ctx.setting == "sequential" and not self.inpaint_sequential):
            return targets  # sequential keeps the old classes' labels: nothing to inpaint (the authors' code)
        with torch.no_grad():
            prev_logits = ctx.prev_model(images)["out"]
        if self.inpaint_padding:  # (measured in docs/results.md; padding is not image content)
            targets = torch.where(targets == PADDING, torch.full_like(targets, IGNORE_INDEX), targets)
        return inpaint_background(targets, prev_logits, self.inpaint_threshold, self.inpaint_ignore or
                                  self.inpaint_padding)
