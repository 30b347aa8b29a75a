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

`MemoryStream` is the replay stream of this source (`recall.replay.stream.Stream`): it builds, stores and reads the
memory, and its batches take `replay_ratio` of every batch through the loop's blending, as every other stream's.
`recall.methods.memory.MemoryReplay` wraps the run's method with it (`recall.methods.for_source`): with a replay
method (`method=recall` and any ReplayMethod) the memory replaces the pool, label evaluation and helper decoders
(stored labels need none); with any other (MiB, PLOP, FT) it adds the stream to the method's own losses (their "-M"
variants).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from recall import distributed
from recall.atomic import write_json
from recall.data.protocol import eval_label_map
from recall.data.transforms import train_transform
from recall.data.voc import IMAGE_SUFFIX, MASK_SUFFIX, VOCSegmentation, load_mask
from recall.errors import UserError
from recall.figures import plot_grid
from recall.replay.leakage import check_replay_privacy
from recall.replay.stream import Stream, endless, replay_split, spread

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


def memory_dir(run, step: int) -> Path:
    """The memory kept after `step` (under steps/, with the checkpoints: moved aside with them on a restart)."""
    return run.run_dir / "steps" / "memory" / f"step{step}"


def read_memory(directory: Path, step: int) -> dict | None:
    """The `step_<k>` entry of a stored memory's memory.json, or None when it is not (completely) there."""
    try:
        return json.loads((directory / MEMORY_FILE).read_text())[f"step_{step}"]
    except (OSError, ValueError, KeyError):
        return None


def build_memory(run, step: int, size: int, seed: int) -> Path:
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


# ---------------------------------------------------------------------------------------------- the stream
class MemoryStream(Stream):
    """The memory's replay stream of a run (see the module docstring): `memory_size` stored images, `ratio` of every
    batch of an incremental step. `inner`: the wrapped method's own stream, whose run facts, statistics and figures
    it keeps (None when the memory replaces it: a replay method's pool and labels)."""

    def __init__(self, run, source: str, memory_size: int, ratio: float, inner: Stream | None = None):
        self.run = run
        self.source = source
        self.memory_size = memory_size
        self.ratio = ratio
        self.inner = inner

    # ------------------------------------------------------------------ the memory
    def memory(self, step: int) -> Path:
        """The stored memory replayed at `step` (kept after step-1), built first where missing (a step-0 model adopted
        from a shared run, a run that stored no memory yet): reading an earlier step's images is this source's
        purpose, which the privacy check knows."""
        run = self.run
        with distributed.main_first():
            if read_memory(memory_dir(run, step - 1), step - 1) is None:
                image_classes = run.classes_of(run.cfg.dataset.train_split)
                earlier = {i for s in range(step) for i in run.train_ids(image_classes, s)}
                check_replay_privacy(self.source, step, sorted(earlier), earlier)
            build_memory(run, step - 1, self.memory_size, int(run.cfg.seed))
        return memory_dir(run, step - 1)

    def data(self, step: int, transform, at_least: int = 1) -> VOCSegmentation:
        """The memory replayed at `step`, labelled with every class seen up to `step` (future classes background,
        255 ignored: SSUL's memory loader); its list repeated until it fills `at_least` samples, as SSUL's."""
        run = self.run
        directory = self.memory(step)
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

    def remember(self, step: int) -> None:
        """After `step`: the memory of this step when a later step replays it (from the step's own images and the
        memory before it)."""
        run = self.run
        if step < len(run.task) - 1 and distributed.is_main():
            build_memory(run, step, self.memory_size, int(run.cfg.seed))
        distributed.barrier()

    # ------------------------------------------------------------------ the run
    def check(self) -> None:
        if self.inner is not None:
            self.inner.check()

    def inputs(self) -> dict[str, Path]:
        return self.inner.inputs() if self.inner is not None else {}  # the memory is made by the run: not an input

    def params(self) -> dict:
        return self.inner.params() if self.inner is not None else {}

    def tags(self) -> dict[str, str]:
        return {**(self.inner.tags() if self.inner is not None else {}), "replay.stored_data": "true"}

    # ------------------------------------------------------------------ a step
    def split(self, step: int, batch_size: int) -> tuple[int, int]:
        return replay_split(step, batch_size, self.ratio)

    def batches(self, step: int, generator: torch.Generator) -> Iterator | None:
        n_replay = self.split(step, self.run.train_cfg.batch_size)[1]
        return self._batches(step, generator, n_replay) if n_replay else None

    def _batches(self, step: int, generator: torch.Generator, n_replay: int) -> Iterator:
        """An endless iterator of memory batches; lazy, like every replay stream (built at the first batch)."""
        run = self.run
        t = run.train_cfg
        batch_size = distributed.per_process(n_replay, "the replay samples per batch")
        data = self.data(step, train_transform(t.crop, t.scale, t.scale_reference), at_least=batch_size)
        kept = read_memory(memory_dir(run, step - 1), step - 1)["memory_candidates"]
        run.record("extra_data", f"memory: {len({c for *_, labels in kept for c in labels})} old")  # classes replayed
        yield from endless(DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator))

    def statistics(self, step: int) -> dict[str, float]:
        stats = self.inner.statistics(step) if self.inner is not None else {}
        if step < 1:
            return stats
        entry = read_memory(memory_dir(self.run, step - 1), step - 1) or {"memory_candidates": []}
        kept = entry["memory_candidates"]
        per_class = [sum(c in labels for *_, labels in kept) for c in seen_classes(self.run.task, step - 1)]
        return {**stats, "replay/memory_images": float(len(kept)),
                "replay/memory_classes": float(sum(n > 0 for n in per_class)),
                "replay/memory_min_per_class": float(min(per_class, default=0))}

    def figures(self, step: int, title: str, out: Path) -> list[Path]:
        """The wrapped method's, and memory.png: stored images replayed at `step` with their labels there."""
        paths = self.inner.figures(step, title, out) if self.inner is not None else []
        if step < 1:
            return paths
        data = self.data(step, transform=None)
        rows = [[np.array(data.load_raw(i)[0]), data[i][1].numpy()] for i in spread(len(data), MEMORY_SAMPLES)]
        names = [str(data.ids[i]) for i in spread(len(data), MEMORY_SAMPLES)]
        path = out / "memory.png"
        plot_grid(rows, ["stored image", f"its label at step {step}"], names,
                  f"{title}: memory replayed at step {step} (stored data)", path)
        return [*paths, path]

    # ------------------------------------------------------------------ recall run --dry-run
    def facts(self, step: int) -> dict:
        facts = self.inner.facts(step) if self.inner is not None else {}
        if self.split(step, self.run.train_cfg.batch_size)[1]:
            facts["extra_data"] = f"memory: {len(seen_classes(self.run.task, step - 1))} old"
        return facts

    def plan_inputs(self, last_step: int, to_train: list[int]) -> dict | None:
        run = self.run
        own = (self.inner.plan_inputs(last_step, to_train) if self.inner is not None else None) or \
            {"lines": [], "eval_images": 0}
        stored = sorted(k for k in range(last_step) if read_memory(memory_dir(run, k), k) is not None)
        line = (f"memory (stored data, SSUL-M): {self.memory_size} training images of earlier steps, class-balanced, "
                f"kept after each step in {memory_dir(run, 0).parent}" +
                (f"; stored after steps {', '.join(map(str, stored))}" if stored else "; none stored yet"))
        return {**own, "lines": [*own["lines"], ("replay", line)],
                "replay": {"source": self.source, "stored_data": True, "memory_size": self.memory_size,
                           "stored_after_steps": stored}}
