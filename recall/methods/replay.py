"""Replay of old classes from a pool of outside images, labelled by label evaluation: the policy every replay-based
method shares (RECALL, and any variant: another labeller, another target rewriting).

A `ReplayMethod` says what it replays and leaves the data flow to its replay stream (`stream`, a
`recall.replay.stream.ReplayStream`: pool -> checks -> labels -> loader -> statistics):

* which classes: every class learnt before the step (`recall.replay.stream.old_classes`);
* which labeller: `labeller(run, k)`, the model that labels the pool images of the classes learnt at step k
  (a subclass says which);
* which ratio: `replay_ratio` of every batch of an incremental step; and how labels are kept (`label_threshold`,
  `min_labelled`, `labels`, `label_space`).

A subclass says which model labels a class group (`labeller`) and may ask for a model of its own at a step
(`extra_model`: RECALL's helper decoders, trained and saved by the run). The method reads and writes no file
itself.
"""

from __future__ import annotations

from pathlib import Path

from recall.errors import UserError
from recall.methods.base import Method, RunServices, StepContext
from recall.replay.stream import LABEL_SOURCES, LABEL_SPACES, ReplayStream, old_classes, spread


class ReplayMethod(Method):
    """Replays old classes from `replay.pool` with evaluated labels; see the module docstring."""

    needs_previous_model = True

    def __init__(self, replay_ratio: float = 0.5, label_threshold: float = 0.0, min_labelled: float = 0.0,
                 labels: str = "evaluated", label_space: str = "all", freeze_encoder: bool = False,
                 classifier_init: str = "random"):
        super().__init__(freeze_encoder=freeze_encoder, classifier_init=classifier_init)
        if labels not in LABEL_SOURCES:
            raise UserError(f"method.labels={labels!r}: expected one of {', '.join(LABEL_SOURCES)}")
        if label_space not in LABEL_SPACES:
            raise UserError(f"method.label_space={label_space!r}: all (the argmax over every output of the "
                            "labelling model, as the authors' code) or class (restricted to background and the "
                            "image's class)")
        if not 0.0 <= replay_ratio < 1.0:
            raise UserError(f"method.replay_ratio={replay_ratio}: must be in [0, 1) (share of replay samples per "
                            "batch)")
        if not 0.0 <= min_labelled < 1.0:
            raise UserError(f"method.min_labelled={min_labelled}: must be in [0, 1) (share of an image's pixels)")
        self.replay_ratio = replay_ratio
        self.label_threshold = label_threshold  # replay pixels below this confidence become 255
        self.min_labelled = min_labelled  # drop replay images whose label gives their class less of the image
        self.labels = labels
        self.label_space = label_space
        self._stream: ReplayStream | None = None  # the stream of the run this method trains (one per run)

    # ------------------------------------------------------------------ what a subclass says
    def labeller(self, run: RunServices, k: int) -> tuple[Path, list[int]]:
        """The checkpoint that labels the pool images of the classes learnt at step `k`, and the class of each of
        its output channels (in the full label space)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the stream does the rest
    def stream(self, run: RunServices) -> ReplayStream:
        """The replay stream of `run`, made once per run (it keeps the dataset's hashes for its privacy check)."""
        if self._stream is None or self._stream.run is not run:
            self._stream = ReplayStream(run, self.replay_ratio, labeller=lambda k: self.labeller(run, k),
                                        rewrite=lambda *args: self.rewrite_targets(*args), labels=self.labels,
                                        label_threshold=self.label_threshold, label_space=self.label_space,
                                        min_labelled=self.min_labelled)
        return self._stream

    def replays(self, run: RunServices) -> bool:
        """Whether `run` replays at all (an incremental step and a replay ratio above 0)."""
        return self.stream(run).replays()


__all__ = ["ReplayMethod", "StepContext", "old_classes", "spread"]
