"""RECALL (Maracani et al., ICCV 2021): replay of old classes from outside the training set, labelled by
label evaluation, + background inpainting of the current ground truth, + blending at a replay ratio.

The data flow stays in the loop (recall/train.py): this object inpaints the current targets
(`rewrite_targets`), and says how many replay samples a batch holds (`replay_ratio`); experiment.py builds
the replay loader from the pool and the labels.
"""

from __future__ import annotations

import torch

from recall.labeling import inpaint_background
from recall.methods.base import Method, StepContext


class Recall(Method):
    name = "recall"
    needs_previous_model = True
    uses_replay = True

    def __init__(self, replay_ratio: float = 0.5, inpaint_threshold: float = 0.0, inpaint_ignore: bool = True,
                 label_threshold: float = 0.0, min_labelled: float = 0.0, freeze_encoder: bool = True,
                 classifier_init: str = "random"):
        super().__init__(freeze_encoder=freeze_encoder, classifier_init=classifier_init)
        if not 0.0 <= replay_ratio < 1.0:
            raise ValueError(f"method.replay_ratio={replay_ratio}: must be in [0, 1) (share of replay samples per batch)")
        self.replay_ratio = replay_ratio
        self.inpaint_threshold = inpaint_threshold
        self.inpaint_ignore = inpaint_ignore
        if not 0.0 <= min_labelled < 1.0:
            raise ValueError(f"method.min_labelled={min_labelled}: must be in [0, 1) (share of an image's pixels)")
        self.label_threshold = label_threshold
        self.min_labelled = min_labelled

    def rewrite_targets(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.prev_model is None:
            return targets
        with torch.no_grad():
            prev_logits = ctx.prev_model(images)["out"]
        return inpaint_background(targets, prev_logits, self.inpaint_threshold, self.inpaint_ignore)
