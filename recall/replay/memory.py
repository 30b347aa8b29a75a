"""`replay=memory`: replay of stored exemplars, real training images of earlier steps (SSUL-M, Cha et al., NeurIPS
2021; their code: clovaai/SSUL, utils/memory.py `memory_sampling_balanced`).

This source **breaks the rule that an incremental step never reads an earlier step's image, on purpose**: it is the
real-image bound that generated replay (GAN, web) is measured against. `recall.replay.leakage.STORED_DATA_SOURCES`
names it, the privacy check lets it (and only it) through, and its runs carry the MLflow tag `replay.stored_data`.

The memory (`replay.memory_size` images in all, as SSUL's `--mem_size`):

* after step k, the candidates are the memory of step k-1 and step k's training images; SSUL's class-balanced
  round robin (`select_balanced`) picks `memory_size` of them over the classes seen up to step k, in a random class
  order, one image per class per round, each image once;
* stored in `<run_dir>/steps/memory/step<k>/` as the dataset stores them (VOC layout: `JPEGImages/<id>.jpg`, the
  ground-truth `SegmentationClass/<id>.png`, copied byte for byte) with `memory.json` in SSUL's format
  (`{"step_k": {"memory_candidates": [[id, objs_num, objs_ratio, labels]], "memory_list": [ids]}}`); a step's
  directory is written whole, then renamed into place (atomic), and a resumed run keeps it;
* replayed at step t from the memory of step t-1, labelled as SSUL's memory loader labels it: the stored mask with
  every class seen up to step t kept, future classes as background, 255 kept as ignore.

`MemoryReplay` wraps the run's method (`recall.replay.run_sources.for_source`): its memory batches take
`replay_ratio` of every batch through the loop's blending, as every other source's. With a replay method
(`method=recall` and any ReplayMethod) the memory replaces the pool, label evaluation and helper decoders (stored labels
need none); with any other (MiB, PLOP, FT) it adds the replay stream to the method's own losses (their "-M" variants).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from recall import distributed
from recall.atomic import write_json
from recall.data.protocol import eval_label_map
from recall.data.transforms import train_transform
from recall.data.voc import IMAGE_SUFFIX, MASK_SUFFIX, VOCSegmentation, load_mask
from recall.errors import UserError
from recall.figures import plot_grid
from recall.methods.base import Method, RunServices, StepContext
from recall.methods.replay import ReplayMethod, endless, replay_split, spread
from recall.replay.leakage import check_replay_privacy

MEMORY_FILE = "memory.json"
MEMORY_SAMPLES = 8  # stored images in memory.png


# ---------------------------------------------------------------------------------------------- the selection
def select_balanced(candidates: Sequence[list], classes: Sequence[int], size: int,
                    rng: np.random.Generator) -> list[list]:
    """SSUL's `memory_sampling_balanced`: `size` candidates ([id, objs_num, objs_ratio, labels]) chosen round robin
    over `classes` in a random order: each round, every class takes the first remaining candidate (in a random
    order) whose labels hold it. Returns them grouped by class in ascending class order, as SSUL saves them.
    Where SSUL loops forever once no class finds a candidate, this stops with fewer than `size`."""
    pool = [list(candidates[i]) for i in rng.permutation(len(candidates))]
    order = [int(c) for c in rng.permutation(np.asarray(sorted(classes), dtype=np.int64))]
    chosen: dict[int, list[list]] = {c: [] for c in sorted(classes)}
    taken = 0
    while taken < size:
        before = taken
        for c in order:
            hit = next((i for i, candidate in enumerate(pool) if c in candidate[3]), None)
            if hit is not None:
                chosen[c].append(pool.pop(hit))
                taken += 1
            if taken >= size:
                break
        if taken == before:  # no class found a candidate: the memory is as full as the candidates allow
            break
    return [candidate for c in sorted(chosen) for candidate in chosen[c]]


def seen_classes(task: list[list[int]], step: int) -> list[int]:
    """The (non-background) classes learnt up to and including `step`."""
    return [c for s in range(step + 1) for c in task[s]]


def memory_dir(run: RunServices, step: int) -> Path:
    """The memory kept after `step` (under steps/, with the checkpoints: moved aside with them on a restart)."""
    return run.run_dir / "steps" / "memory" / f"step{step}"


def read_memory(directory: Path, step: int) -> dict | None:
    """The `step_<k>` entry of a stored memory's memory.json, or None when it is not (completely) there."""
    try:
        return json.loads((directory / MEMORY_FILE).read_text())[f"step_{step}"]
    except (OSError, ValueError, KeyError):
        return None


def build_memory(run: RunServices, step: int, size: int, seed: int) -> Path:
    """The memory after `step`: `size` images of the memory after step-1 and of step `step`'s training images,
    class-balanced (`select_balanced`), stored with their ground-truth masks. Kept when already stored."""
    out = memory_dir(run, step)
    if read_memory(out, step) is not None:
        return out
    d = run.cfg.dataset
    previous: list[list] = []
    if step > 0:
        previous = read_memory(build_memory(run, step - 1, size, seed), step - 1)["memory_candidates"]
    seen = set(seen_classes(run.task, step))
    image_classes = run.classes_of(d.train_split)
    stored = {c[0] for c in previous}  # an image kept already is no second candidate (overlapped: it may come back)
    new = [[i, 0, 0, sorted(int(c) for c in image_classes[i] if c in seen)]
           for i in run.train_ids(image_classes, step) if i not in stored]
    for candidate in new:
        candidate[1] = len(candidate[3])
    rng = np.random.default_rng([int(seed), step])
    chosen = select_balanced(previous + new, sorted(seen), size, rng)
    origin = {c[0]: memory_dir(run, step - 1) for c in previous}  # earlier images: read from the memory only
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for candidate in chosen:
        image_id = candidate[0]
        root = origin.get(image_id, Path(d.root))
        image_dir, mask_dir = (("JPEGImages", "SegmentationClass") if image_id in origin else
                               (str(d.image_dir), str(d.mask_dir)))
        for sub, stored, suffix in ((image_dir, "JPEGImages", IMAGE_SUFFIX), (mask_dir, "SegmentationClass",
                                                                              MASK_SUFFIX)):
            target = tmp / stored / f"{image_id}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / sub / f"{image_id}{suffix}", target)
        mask = load_mask(tmp / "SegmentationClass" / f"{image_id}{MASK_SUFFIX}")
        candidate[2] = int(np.isin(mask, sorted(seen)).sum())  # SSUL's objs_ratio: pixels of (seen) objects
    write_json(tmp / MEMORY_FILE, {f"step_{step}": {"memory_candidates": chosen,
                                                    "memory_list": sorted(c[0] for c in chosen)},
                                   "size": size, "classes": sorted(seen), "seed": int(seed)})
    shutil.rmtree(out, ignore_errors=True)  # a half-renamed leftover cannot exist; an unreadable one is redone
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- the wrapper
class MemoryReplay(Method):
    """A method trained with replay of stored exemplars (see the module docstring). The loop's hooks are the
    wrapped method's; the replay data flow is the memory's."""

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

    def options(self) -> dict:
        return self.method.options()

    # ------------------------------------------------------------------ the memory
    def memory(self, run: RunServices, step: int) -> Path:
        """The stored memory replayed at `step` (kept after step-1), built first where missing (a step-0 model adopted
        from a shared run, a run that stored no memory yet): reading an earlier step's images is this source's
        purpose, which the privacy check knows."""
        with distributed.main_first():
            if read_memory(memory_dir(run, step - 1), step - 1) is None:
                image_classes = run.classes_of(run.cfg.dataset.train_split)
                earlier = {i for s in range(step) for i in run.train_ids(image_classes, s)}
                check_replay_privacy(self.source, step, sorted(earlier), earlier)
            build_memory(run, step - 1, self.memory_size, int(run.cfg.seed))
        return memory_dir(run, step - 1)

    def memory_data(self, run: RunServices, step: int, transform, at_least: int = 1) -> VOCSegmentation:
        """The memory replayed at `step`, labelled with every class seen up to `step` (future classes background,
        255 ignored: SSUL's memory loader); its list repeated until it fills `at_least` samples, as SSUL's."""
        directory = self.memory(run, step)
        ids = read_memory(directory, step - 1)["memory_list"]
        if not ids:
            raise UserError(f"replay=memory: the memory {directory} holds no image (no training image of steps "
                            f"0-{step - 1} shows a class)")
        while len(ids) < at_least:
            ids = ids * 2
        return VOCSegmentation(directory, ids=ids, num_classes=int(run.cfg.dataset.num_classes), transform=transform,
                               label_map=eval_label_map(run.task, step, int(run.cfg.dataset.num_classes),
                                                        future="background"),
                               cache_in_memory=run.train_cfg.cache_images)

    # ------------------------------------------------------------------ the run
    def _own(self, hook: str, *args, default=None):
        """The wrapped method's run hook `hook`, unless the memory replaces it (a replay method's data flow)."""
        return default if self.replaces else getattr(self.method, hook)(*args)

    def check_inputs(self, run: RunServices) -> None:
        self._own("check_inputs", run)

    def inputs(self, run: RunServices) -> dict[str, Path]:
        return self._own("inputs", run, default={})  # the memory is made by the run itself: not an input

    def run_params(self, run: RunServices) -> dict:
        return self._own("run_params", run, default={})

    def run_tags(self, run: RunServices) -> dict[str, str]:
        return {**self._own("run_tags", run, default={}), "replay.stored_data": "true"}

    def before_step(self, run: RunServices, step: int, ctx: StepContext, generator: torch.Generator) -> None:
        self.method.before_step(run, step, ctx, generator)  # e.g. PLOP's thresholds (a replay method has none)

    def batch_split(self, step: int, batch_size: int) -> tuple[int, int]:
        return replay_split(step, batch_size, self.replay_ratio)

    def extra_batches(self, run: RunServices, step: int, generator: torch.Generator) -> Iterator | None:
        n_replay = self.batch_split(step, run.train_cfg.batch_size)[1]
        return self._memory_batches(run, step, generator, n_replay) if n_replay else None

    def _memory_batches(self, run: RunServices, step: int, generator: torch.Generator, n_replay: int) -> Iterator:
        """An endless iterator of memory batches; lazy, like every replay stream (built at the first batch)."""
        t = run.train_cfg
        batch_size = distributed.per_process(n_replay, "the replay samples per batch")
        data = self.memory_data(run, step, train_transform(t.crop, t.scale, t.scale_reference), at_least=batch_size)
        kept = read_memory(memory_dir(run, step - 1), step - 1)["memory_candidates"]
        run.record("extra_data", f"memory: {len({c for *_, labels in kept for c in labels})} old")  # classes replayed
        yield from endless(DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator))

    def after_step(self, run: RunServices, step: int, generator: torch.Generator) -> None:
        """The wrapped method's work (not a replay method's helpers: stored labels need none), then the memory of
        this step when a later step replays it (from the step's own images and the memory before it)."""
        self._own("after_step", run, step, generator)
        if step < len(run.task) - 1 and distributed.is_main():
            build_memory(run, step, self.memory_size, int(run.cfg.seed))
        distributed.barrier()

    def step_statistics(self, run: RunServices, step: int) -> dict[str, float]:
        stats = self._own("step_statistics", run, step, default={})
        if step < 1:
            return stats
        entry = read_memory(memory_dir(run, step - 1), step - 1) or {"memory_candidates": []}
        kept = entry["memory_candidates"]
        per_class = [sum(c in labels for *_, labels in kept) for c in seen_classes(run.task, step - 1)]
        return {**stats, "replay/memory_images": float(len(kept)),
                "replay/memory_classes": float(sum(n > 0 for n in per_class)),
                "replay/memory_min_per_class": float(min(per_class, default=0))}

    def figures(self, run: RunServices, step: int, title: str, out: Path) -> list[Path]:
        """The wrapped method's, and memory.png: stored images replayed at `step` with their labels there."""
        paths = self._own("figures", run, step, title, out, default=[])
        if step < 1:
            return paths
        data = self.memory_data(run, step, transform=None)
        rows = [[np.array(data.load_raw(i)[0]), data[i][1].numpy()] for i in spread(len(data), MEMORY_SAMPLES)]
        names = [str(data.ids[i]) for i in spread(len(data), MEMORY_SAMPLES)]
        path = out / "memory.png"
        plot_grid(rows, ["stored image", f"its label at step {step}"], names,
                  f"{title}: memory replayed at step {step} (stored data)", path)
        return [*paths, path]

    def plan_step(self, run: RunServices, step: int, images: int | None, iterations) -> dict:
        plan = self._own("plan_step", run, step, images, iterations, default={})
        if self.batch_split(step, run.train_cfg.batch_size)[1]:
            plan["extra_data"] = f"memory: {len(seen_classes(run.task, step - 1))} old"
        return plan

    def plan_inputs(self, run: RunServices, last_step: int, to_train: list[int]) -> dict | None:
        own = self._own("plan_inputs", run, last_step, to_train) or {"lines": [], "eval_images": 0}
        stored = sorted(k for k in range(last_step) if read_memory(memory_dir(run, k), k) is not None)
        line = (f"memory (stored data, SSUL-M): {self.memory_size} training images of earlier steps, class-balanced, "
                f"kept after each step in {memory_dir(run, 0).parent}" +
                (f"; stored after steps {', '.join(map(str, stored))}" if stored else "; none stored yet"))
        return {**own, "lines": [*own["lines"], ("replay", line)],
                "replay": {"source": self.source, "stored_data": True, "memory_size": self.memory_size,
                           "stored_after_steps": stored}}

    # ------------------------------------------------------------------ the loop: the wrapped method's
    def encoder_frozen(self, ctx: StepContext) -> bool:
        return self.method.encoder_frozen(ctx)

    def on_step_start(self, model: nn.Module, ctx: StepContext) -> None:
        self.method.on_step_start(model, ctx)

    def trainable_parameters(self, model: nn.Module, ctx: StepContext) -> list[nn.Parameter]:
        return self.method.trainable_parameters(model, ctx)

    def set_train_mode(self, model: nn.Module, ctx: StepContext) -> None:
        self.method.set_train_mode(model, ctx)

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
