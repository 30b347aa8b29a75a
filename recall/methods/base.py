"""The hooks a continual-learning method plugs into a protocol run (recall/experiment.py) and the one training
loop (recall/train.py): eight, `HOOKS`, which the runner, the loop and the dry-run call by name.

**The loop** calls, per step, `prepare` (which parameters train, and how the model is put in training mode: a frozen
encoder stays in eval mode), then per batch `rewrite_targets` and `loss`.

**The run** calls:

* `describe` (the method's options, and what MLflow records with the run: params, tags) and `inputs` (what the
  run reads besides the dataset, for provenance and the resume check; with `check=True`, before anything is
  trained: a doomed run fails in seconds);
* `stream`: the method's replay stream (`recall.replay.stream.Stream`), what it blends into every batch of a step
  beyond the step's own images: its split of a batch, its batches, its statistics and figure, its facts in the
  dry-run. A method of the current step's images alone has the empty stream; a replay method says its policy
  (which classes, which labeller, which ratio) and its stream owns the data flow (pool -> checks -> labels ->
  loader -> statistics);
* `before_step` (work before a step's training: PLOP's thresholds) and `extra_model` (a model the method trains
  at a step besides the step's own: RECALL's helper decoders). `extra_model` says what to train, as data
  (`ExtraModel`): the run plans it (`recall run --dry-run` counts its iterations from it), trains it with its loop
  after the step's model and saves it in the step's directory; the method does no I/O and imports no loop.

Each gets the run (`RunServices`): the runner has no branch on which method runs. What a step executed beyond the
loop's own facts a method notes through the run (`run.record`, e.g. the classes its replay stream replays), in
steps/<t>/plan.json, which the suite compares with the dry-run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from recall.data.classes import IGNORE_INDEX
from recall.replay.stream import Stream

# the hooks the runner, the loop and the dry-run call (tests/test_architecture.py checks that they call no other)
HOOKS = ("describe", "inputs", "stream", "prepare", "before_step", "extra_model", "rewrite_targets", "loss")


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
    def trained_model(self, step: int) -> nn.Module:
        """The model `step` trained (its saved checkpoint), e.g. the step-0 encoder a helper decoder keeps."""
    def context(self, step: int, prev_model: nn.Module | None) -> StepContext: ...
    def device(self) -> torch.device: ...
    def classes_of(self, split: str) -> dict[str, frozenset[int]]: ...
    def train_ids(self, classes: dict[str, frozenset[int]], step: int) -> list[str]:
        """The training images of `step` as the run selects them (its setting; partitioned: its seed)."""
    def train_loader(self, step: int, generator: torch.Generator, batch_size: int | None = None,
                     label_map: torch.Tensor | None = None) -> torch.utils.data.DataLoader: ...
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
        """The hyperparameters of this method, recorded with every run (`describe`)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    # ------------------------------------------------------------------ the run
    def describe(self, run: RunServices) -> dict:
        """{"options": the method's hyperparameters, "params": extra MLflow params of the run (e.g. how its replay
        pool was built), "tags": extra MLflow tags (e.g. `replay.stored_data` when it replays stored images)}."""
        stream = self.stream(run)
        return {"options": self.options(), "params": stream.params(), "tags": stream.tags()}

    def inputs(self, run: RunServices, check: bool = False) -> dict[str, Path]:
        """What the run reads besides the dataset and its config, by name -> path (its content id is recorded with
        the run, and a resumed run must read the same content). `check`: before step 0, first raise a UserError
        naming what a later step will need and is missing."""
        stream = self.stream(run)
        if check:
            stream.check()
        return stream.inputs()

    def stream(self, run: RunServices) -> Stream:
        """The run's replay stream: what the loop blends into the batches of a step besides its own images (its
        `split`, `batches`, `statistics`, `figures`, what it keeps of a trained step (`remember`), `facts`), and its
        pool and labels; none by default."""
        return Stream()

    def before_step(self, run: RunServices, step: int, ctx: StepContext, generator: torch.Generator) -> None:
        """Work before training `step`, once its model has grown (e.g. PLOP's per-class entropy thresholds: one
        pass of the previous model, `ctx.prev_model`, over the step's training images). `generator` is the step's:
        a method that draws from it, or from the global RNG, changes the step's shuffles and augmentations; PLOP
        draws from copies."""

    def extra_model(self, run: RunServices, step: int) -> ExtraModel | None:
        """A model to train at `step` besides the step's own (`ExtraModel`), or None. Cheap: the dry-run asks it
        of every step (its `build` is called only when the run trains it)."""
        return None

    # ------------------------------------------------------------------ the loop
    def prepare(self, model: nn.Module, ctx: StepContext) -> Preparation:
        """Once the classifier has grown for the step's new classes: the parameters to train (a frozen encoder gets
        no gradient: half the backward) and how the loop puts the model in training mode."""
        frozen = self.freeze_encoder and ctx.step > 0
        model.encoder.requires_grad_(not frozen)
        return Preparation(list(model.decoder_parameters()) if frozen else list(model.parameters()), frozen)

    def rewrite_targets(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return targets

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: torch.Tensor,
             ctx: StepContext) -> torch.Tensor:
        return F.cross_entropy(outputs["out"], targets, ignore_index=IGNORE_INDEX)


@dataclass
class ExtraModel:
    """A model a method trains at a step besides the step's own, e.g. RECALL's helper decoder. After the step's
    model has trained, the run builds it (`build()`), trains it with the run's loop (`recall.train.train_step`:
    `method`'s hooks, `ctx`, `train_cfg`) on the step's training images read through `label_map` (composed after
    the step's own label map: its label space), drawing from the step's generator, and saves it as
    steps/<t>/`file` with `meta`. The step records it as its `extra_training` (`what`, batch, iterations, lr), as
    the dry-run lists it from the same object."""

    what: str  # in the dry-run's table and the step's plan.json, e.g. "helper decoder"
    file: str  # its checkpoint in the step's directory, e.g. "helper.pt"
    build: Callable[[], nn.Module]  # the untrained model (called by the run only)
    method: Method  # its hooks in the loop: which parameters train, its loss
    ctx: StepContext
    train_cfg: Any  # recall.train.TrainConfig: its learning rate and budget
    label_map: torch.Tensor  # (256,) long: the step's labels -> the model's outputs (255: void)
    meta: dict = field(default_factory=dict)  # saved with its checkpoint


@dataclass
class Preparation:
    """What `Method.prepare` gives the loop: the parameters to train, and whether the encoder is frozen (then it
    stays in eval mode: its batch-norm statistics stay as they were)."""

    parameters: list[nn.Parameter]
    frozen_encoder: bool = False

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.frozen_encoder:
            model.encoder.eval()
