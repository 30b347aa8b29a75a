"""RECALL (Maracani et al., ICCV 2021): replay of old classes from outside the training set, labelled by label
evaluation, + background inpainting of the current ground truth, + blending at a replay ratio.

What is RECALL's own, on top of the replay data flow (`recall.methods.replay.ReplayMethod`):

* **label evaluation by helper decoders**: the pool images of step-0 classes are labelled by the step-0 model; a
  class added at step k by a *helper decoder* trained at step k on the frozen step-0 encoder for background +
  step k's classes (`after_step`, written to `steps/<k>/helper.pt`);
* **background inpainting** (`rewrite_targets`): background (and, as the original, 255) in the current ground
  truth takes the previous model's prediction where its confidence is at least tau;
* incremental steps train the decoder only (`freeze_encoder`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from recall import distributed
from recall.labeling import inpaint_background
from recall.methods.base import RunServices, StepContext
from recall.methods.finetune import FineTuning
from recall.methods.replay import ReplayMethod
from recall.model import load_checkpoint, save_checkpoint


class Recall(ReplayMethod):
    name = "recall"

    def __init__(self, replay_ratio: float = 0.5, inpaint_threshold: float = 0.0, inpaint_ignore: bool = True,
                 label_threshold: float = 0.0, min_labelled: float = 0.0, labels: str = "evaluated",
                 freeze_encoder: bool = True, classifier_init: str = "random"):
        super().__init__(replay_ratio=replay_ratio, label_threshold=label_threshold, min_labelled=min_labelled,
                         labels=labels, freeze_encoder=freeze_encoder, classifier_init=classifier_init)
        self.inpaint_threshold = inpaint_threshold
        self.inpaint_ignore = inpaint_ignore

    # ------------------------------------------------------------------ label evaluation
    def labeller(self, run: RunServices, k: int) -> tuple[Path, dict[int, int]]:
        """Step-0 classes: the step-0 model (channel = class); step k's classes: its helper decoder (background,
        then step k's classes in order)."""
        if k == 0:
            return run.step_dir(0) / "model.pt", {c: c for c in run.task[0]}
        return run.step_dir(k) / "helper.pt", {c: 1 + i for i, c in enumerate(run.task[k])}

    def needs_helper(self, run: RunServices, step: int) -> bool:
        """A helper labels step `step`'s classes for the steps after it: every incremental step but the last (and
        none when nothing is replayed)."""
        return self.replays(run) and 0 < step < len(run.task) - 1

    def after_step(self, run: RunServices, step: int, generator: torch.Generator) -> None:
        """The helper decoder of step `step`: the frozen step-0 encoder + a decoder for background and the step's
        classes, trained on the step's data. It labels the replay images of those classes later."""
        from recall.train import train_step  # the loop imports the methods: import it when called

        if not self.needs_helper(run, step):
            return
        helper, _ = load_checkpoint(run.step_dir(0) / "model.pt", run.model_cfg)
        helper.classifiers = torch.nn.ModuleList()
        helper.add_classes(1 + len(run.task[step]))
        remap = torch.full((256,), 255, dtype=torch.long)
        remap[0] = 0
        for i, c in enumerate(run.task[step]):
            remap[c] = 1 + i
        ctx = StepContext(step=step, task=run.task, new_classes=list(run.task[step]), old_classes=[])
        train_step(helper, FineTuning(freeze_encoder=True), run.train_loader(step, generator, label_map=remap), ctx,
                   run.train_cfg)
        if distributed.is_main():
            save_checkpoint(helper, run.step_dir(step) / "helper.pt",
                            {"classes_per_step": [len(run.task[step])], "helper_for": run.task[step]})

    # ------------------------------------------------------------------ the loop
    def rewrite_targets(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.prev_model is None:
            return targets
        with torch.no_grad():
            prev_logits = ctx.prev_model(images)["out"]
        return inpaint_background(targets, prev_logits, self.inpaint_threshold, self.inpaint_ignore)

    # ------------------------------------------------------------------ recall run --dry-run
    def plan_step(self, run: RunServices, step: int, images: int | None, iterations) -> dict:
        plan = super().plan_step(run, step, images, iterations)
        if self.needs_helper(run, step):  # full batches of the step's own images
            batch = run.train_cfg.batch_size
            plan["extra_training"] = {"what": "helper decoder", "iterations": iterations(images, batch),
                                      "batch": batch}
        return plan
