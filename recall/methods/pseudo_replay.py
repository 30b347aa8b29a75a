"""Pseudo-label replay: the plainest replay-based method, an ablation of RECALL.

Old classes are replayed from the pool (`recall.methods.replay.ReplayMethod`'s stream), each image labelled by the model
that finished the step which learnt its class (`steps/<k>/model.pt`).
There are no helper decoders, no background inpainting, and the encoder trains with the decoder: what remains is
"replay + cross-entropy". Against RECALL it measures what helpers, inpainting and the frozen encoder add.
"""

from __future__ import annotations

from pathlib import Path

from recall.methods.base import RunServices
from recall.methods.replay import ReplayMethod


class PseudoReplay(ReplayMethod):
    name = "pseudo_replay"

    def labeller(self, run: RunServices, k: int) -> tuple[Path, list[int]]:
        """Step k's classes are labelled by the checkpoint of step k (background and every class up to step k)."""
        return run.step_dir(k) / "model.pt", [0, *(c for s in range(k + 1) for c in run.task[s])]
