"""A method trained with `replay=memory`: the run's method, its replay stream the memory of stored exemplars
(`recall.replay.memory.MemoryStream`, SSUL-M; it breaks the rule that an incremental step never reads an earlier
step's image, on purpose). `recall.methods.for_source` wraps the run's method with it.

The wrapper is policy only: the loop's hooks are the wrapped method's; the stream is the memory's (`memory_size`
images, `replay_ratio` of every batch). With a replay method (`method=recall` and any ReplayMethod) the memory
replaces its pool, label evaluation and helper decoders (stored labels need none); with any other (MiB, PLOP, FT)
the memory's batches join the method's own losses (their "-M" variants).
"""

from __future__ import annotations

import torch
from torch import nn

from recall.errors import UserError
from recall.methods.base import ExtraModel, Method, Preparation, RunServices, StepContext
from recall.methods.replay import ReplayMethod
from recall.replay.memory import MemoryStream


class MemoryReplay(Method):
    """A method trained with replay of stored exemplars (see the module docstring)."""

    def __init__(self, method: Method, name: str = "memory", memory_size: int = 19, replay_ratio: float = 0.5):
        if method.data != "current":
            raise UserError(f"replay=memory with method={method.name}: that method trains on every image seen so far "
                            "already; the memory replays stored images to a method that sees only the current step")
        if int(memory_size) < 1:
            raise UserError(f"replay.memory_size={memory_size}: the number of stored images, at least 1")
        if not 0.0 < replay_ratio < 1.0:
            raise UserError(f"replay.replay_ratio={replay_ratio}: must be in (0, 1) (share of memory samples per "
                            "batch; SSUL replaces half of every batch: 0.5)")
        self.method = method
        self.source = name
        self.memory_size = int(memory_size)
        # a replay method keeps its own method.replay_ratio (e.g. tuned for RECALL); the others take the source's
        self.replay_ratio = method.replay_ratio if isinstance(method, ReplayMethod) else float(replay_ratio)
        self.replaces = isinstance(method, ReplayMethod)  # its pool, labels and helpers give way to the memory
        self.name, self.needs_previous_model, self.data = method.name, method.needs_previous_model, method.data
        self._stream: MemoryStream | None = None

    def options(self) -> dict:
        return self.method.options()

    def stream(self, run: RunServices) -> MemoryStream:
        """The memory's stream of `run` (once per run); it keeps the wrapped method's own stream unless it replaces
        it."""
        if self._stream is None or self._stream.run is not run:
            self._stream = MemoryStream(run, self.source, self.memory_size, self.replay_ratio,
                                        inner=None if self.replaces else self.method.stream(run))
        return self._stream

    # ------------------------------------------------------------------ the run
    def before_step(self, run: RunServices, step: int, ctx: StepContext, generator: torch.Generator) -> None:
        self.method.before_step(run, step, ctx, generator)  # e.g. PLOP's thresholds (a replay method has none)

    def extra_model(self, run: RunServices, step: int) -> ExtraModel | None:
        """The wrapped method's (not a replay method's helpers: stored labels need none)."""
        return None if self.replaces else self.method.extra_model(run, step)

    # ------------------------------------------------------------------ the loop: the wrapped method's
    def prepare(self, model: nn.Module, ctx: StepContext) -> Preparation:
        return self.method.prepare(model, ctx)

    def rewrite_targets(self, images: torch.Tensor, targets: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.method.rewrite_targets(images, targets, ctx)

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: torch.Tensor,
             ctx: StepContext) -> torch.Tensor:
        return self.method.loss(outputs, targets, images, ctx)

    def __getattr__(self, attribute: str):
        """Anything else (freeze_encoder, classifier_init, a method's own settings) is the wrapped method's."""
        if attribute == "method":  # not set yet (construction failed): no recursion
            raise AttributeError(attribute)
        return getattr(self.method, attribute)
