"""The hooks a continual-learning method plugs into a protocol run (recall/experiment.py) and the one training
loop (recall/train.py).

A method is a small object with two kinds of hooks.

**The loop** calls, per step: `on_step_start`, then per batch `rewrite_targets` and `loss`; it trains
`trainable_parameters` and sets train/eval modes with `set_train_mode`.

**The run** calls the data-flow hooks of a method that needs more than the current step's data, in this order:
`check_inputs` (before anything is trained: a doomed run fails in seconds), `inputs` (what the run reads besides the
dataset, for provenance and the resume check), `run_params` and `run_tags` (what MLflow records with the run),
`before_step` (work before a step's training: PLOP's thresholds), `batch_split` (current + extra samples per batch),
`extra_batches` (e.g. RECALL's replay stream, blended into every batch by the loop), `after_step` (work after a
step's training, before its checkpoint: RECALL's helper decoders), `step_statistics` (numbers recorded with the
step's evaluation), `figures`, and `plan_step` / `plan_inputs` (its part of `recall run --dry-run`). Each gets the
run (`RunServices`): the runner has no branch on which method runs. What a step executed beyond the loop's own
facts a method notes through the run (`run.record`, e.g. the classes its replay stream replays; `run.fit(what=)`
for extra training), in steps/<t>/plan.json, which the suite compares with its `plan_step`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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
    setting: str = "overlapped"  # overlapped | disjoint | partitioned | sequential
    extras: dict = field(default_factory=dict)


class RunServices(Protocol):
    """What a protocol run offers a method's data-flow hooks (implemented by recall.experiment.ProtocolRun)."""

    cfg: object  # the resolved configuration (DictConfig): e.g. cfg.replay for a replay method
    run_dir: Path
    task: list[list[int]]
    setting: str
    class_names: list[str]
    last_step: int
    model_cfg: object  # recall.model.ModelConfig
    train_cfg: object  # recall.train.TrainConfig

    def step_dir(self, step: int) -> Path: ...
    def context(self, step: int, prev_model: nn.Module | None) -> StepContext: ...
    def device(self) -> torch.device: ...
    def classes_of(self, split: str) -> dict[str, frozenset[int]]: ...
    def train_ids(self, classes: dict[str, frozenset[int]], step: int) -> list[str]:
        """The training images of `step` as the run selects them (its setting; partitioned: its seed)."""
    def train_loader(self, step: int, generator: torch.Generator, batch_size: int | None = None,
                     label_map: torch.Tensor | None = None) -> torch.utils.data.DataLoader: ...
    def fit(self, model: nn.Module, method: Method, loader: torch.utils.data.DataLoader, ctx: StepContext,
            train_cfg: object, what: str = "extra training") -> list[float]:
        """Train `model` with the run's loop (recall.train.train_step), e.g. a method's helper model; recorded with
        the step as its `extra_training` (`what`, batch, iterations, lr)."""
    def record(self, key: str, value) -> None:
        """A fact of the step being trained, recorded in its steps/<t>/plan.json as the dry-run lists it (e.g.
        `extra_data`: the classes a replay stream replays)."""


class Method:
    """Fine-tuning behaviour; subclasses override what they change."""

    name = "base"
    needs_previous_model = False
    data = "current"  # "current": only this step's images (privacy); "cumulative": all seen so far (joint)

    def __init__(self, freeze_encoder: bool = False, classifier_init: str = "random"):
        self.freeze_encoder = freeze_encoder
        self.classifier_init = classifier_init

    def options(self) -> dict:
        """The hyperparameters of this method, recorded with every run."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    # ------------------------------------------------------------------ the run: data flow beyond the current step
    def check_inputs(self, run: RunServices) -> None:
        """Before step 0: raise a UserError naming what a later step will need and is missing."""

    def inputs(self, run: RunServices) -> dict[str, Path]:
        """What the run reads besides the dataset and its config, by name -> path (its content id is recorded with
        the run, and a resumed run must read the same content)."""
        return {}

    def run_params(self, run: RunServices) -> dict:
        """Extra parameters recorded with the run (MLflow params), e.g. how its replay pool was built."""
        return {}

    def run_tags(self, run: RunServices) -> dict[str, str]:
        """Extra MLflow tags of the run, e.g. `replay.stored_data` when it replays stored training images."""
        return {}

    def before_step(self, run: RunServices, step: int, ctx: StepContext, generator: torch.Generator) -> None:
        """Work before training `step`, once its model has grown and `on_step_start` has run (e.g. PLOP's per-class
        entropy thresholds: one pass of the previous model, `ctx.prev_model`, over the step's training images).
        `generator` is the step's: a method that draws from it, or from the global RNG, changes the step's shuffles
        and augmentations; PLOP draws from copies."""

    def batch_split(self, step: int, batch_size: int) -> tuple[int, int]:
        """(current-step samples, extra samples) per batch of `step`."""
        return batch_size, 0

    def extra_batches(self, run: RunServices, step: int, generator: torch.Generator) -> Iterator | None:
        """An endless iterator of labelled (images, targets) batches the loop appends to every batch of `step`
        (`batch_split(...)[1]` samples each), or None."""
        return None

    def after_step(self, run: RunServices, step: int, generator: torch.Generator) -> None:
        """Work after training `step`, before its checkpoint is written (which marks the step done)."""

    def step_statistics(self, run: RunServices, step: int) -> dict[str, float]:
        """Numbers of this method at `step` (MLflow metrics, eval.json `statistics`), from the saved checkpoints."""
        return {}

    def figures(self, run: RunServices, step: int, title: str, out: Path) -> list[Path]:
        """Figures of this method, written under `out`; returns their paths."""
        return []

    def plan_step(self, run: RunServices, step: int, images: int | None, iterations) -> dict:
        """This method's part of a step in `recall run --dry-run`: {"extra_training": {"what", "iterations",
        "batch"}} for training besides the step's own, {"extra_data": text} for what it blends in. `iterations(n,
        batch, train_cfg=None)` counts the step's iterations over n images (under other training settings)."""
        return {}

    def plan_inputs(self, run: RunServices, last_step: int, to_train: list[int]) -> dict | None:
        """This method's inputs in `recall run --dry-run`, for a run up to `last_step` that still trains the steps
        `to_train`: {"lines": [(label, text)], "eval_images": n} (images to run forward besides evaluation, e.g.
        label evaluation), or None."""
        return None

    # ------------------------------------------------------------------ the loop
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
