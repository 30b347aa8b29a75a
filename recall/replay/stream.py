"""The replay stream of a run: what a method blends into the batches of its incremental steps, read top to bottom.

A method says *what* it replays (its policy: which classes, which labeller, which ratio); its stream does the rest,
in the order a run needs it:

    pool -> checks -> labels -> loader -> statistics

* **pool** (`replay.pool` in the run's config) and its **checks**: built, of the configured source, holding every
  class the run replays (`check`, before step 0); its content id (`inputs`) and build report (`params`) recorded;
  at the first batch, the privacy check that its images are not the dataset's (the exact-hash check, again);
* **labels**: label evaluation of the pool images of the classes learnt at step k by the model the method's
  `labeller(k)` names, once per run, in `<run_dir>/steps/replay_labels/` (a group's marker is written after its
  labels and names the pool it labelled: another pool is labelled again);
* **loader**: the labelled pool images of every class learnt before the step, endlessly, `split(step, batch)[1]`
  samples a batch (`batches`), drawn with the step's generator after the step's own loader's first draw;
* **statistics**: per step, the pool images replayed, their labelled share, what the method's target rewriting
  changes, and with a simulated source the labels' quality against the truth it knows (`statistics`); the replay
  figure (`figures`); its facts in the dry-run plan (`facts`, `plan_inputs`).

`Stream` is the stream of a method that replays nothing (its batches: the current step's images alone). The memory
of stored exemplars is another stream (`recall.replay.memory.MemoryStream`). This module never imports a method:
the method hands its stream its labeller and its target rewriting as functions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from recall import distributed
from recall.atomic import write_json
from recall.data.transforms import eval_transform, train_transform
from recall.errors import UserError
from recall.figures import plot_grid
from recall.labeling import LABEL_SPACES, label_pool, labelled_share, same_size_batches
from recall.model import load_checkpoint
from recall.ownership import partial_of
from recall.provenance import content_id
from recall.registry import resolve
from recall.replay.leakage import dataset_hashes
from recall.replay.pool import PoolDataset, ReplayPool, describe_problems, pool_owner
from recall.replay.sources import SOURCES

# method.labels: where replay labels come from. "evaluated" is label evaluation (the method's `labeller` models);
# "oracle" corrects its labels of the image's own class to the true mask, which only a simulated source knows
# (`replay.truth.oracle`: an upper bound for the labelling step).
LABEL_SOURCES = ("evaluated", "oracle")
REPLAY_SAMPLES = 8  # replay images in replay_labels.png (spread over the old classes)
INPAINT_SAMPLE = 256  # replay images the rewritten share is measured on, per step (evenly spaced)
TARGET_BATCH = 64


def old_classes(task: list[list[int]], step: int) -> list[int]:
    """The classes learnt before `step` (what a replay at `step` replays)."""
    return [c for s in range(step) for c in task[s]]


def replay_split(step: int, batch_size: int, replay_ratio: float) -> tuple[int, int]:
    """(current-step samples, replay samples) of a batch: step 0 replays nothing; later steps put
    round(replay_ratio x batch) replay samples into each batch. Every replay stream splits its batches so."""
    n_replay = round(batch_size * replay_ratio) if step > 0 else 0
    return batch_size - n_replay, n_replay


def endless(loader) -> Iterator:
    """A loader's batches, epoch after epoch, for ever (a replay stream: the loop draws what it needs)."""
    while True:
        yield from loader


def spread(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)`` (all when ``n <= k``)."""
    return list(range(n)) if n <= k else sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


class Stream:
    """The stream of a method that replays nothing: every batch is the current step's images. The interface the
    run, the loop, the dry-run and the figures read a replay stream through (a stream is lazy: making one reads
    nothing)."""

    # ------------------------------------------------------------------ the run, before step 0
    def check(self) -> None:
        """Raise a UserError naming what a later step will need and is missing."""

    def inputs(self) -> dict[str, Path]:
        """What the run reads besides the dataset and its config, by name -> path (content ids recorded)."""
        return {}

    def params(self) -> dict:
        """Extra parameters recorded with the run (MLflow params)."""
        return {}

    def tags(self) -> dict[str, str]:
        """Extra MLflow tags of the run."""
        return {}

    # ------------------------------------------------------------------ a step
    def split(self, step: int, batch_size: int) -> tuple[int, int]:
        """(current-step samples, replay samples) per batch of `step`."""
        return batch_size, 0

    def batches(self, step: int, generator: torch.Generator) -> Iterator | None:
        """An endless iterator of labelled (images, targets) batches the loop appends to every batch of `step`
        (`split(...)[1]` samples each), or None. Lazy: nothing is read before the first batch is drawn."""
        return None

    def statistics(self, step: int) -> dict[str, float]:
        """Numbers of the replay at `step` (MLflow metrics, eval.json `statistics`)."""
        return {}

    def figures(self, step: int, title: str, out: Path) -> list[Path]:
        """Figures of the replay at `step`, written under `out`; returns their paths."""
        return []

    def remember(self, step: int) -> None:
        """What the stream keeps of `step` once it has trained, before its checkpoint marks it done (stored
        exemplars: `recall.replay.memory.MemoryStream`)."""

    # ------------------------------------------------------------------ recall run --dry-run
    def facts(self, step: int) -> dict:
        """The replay's facts of `step` in the dry-run plan ({"extra_data": text}), as a trained step records them
        (`run.record`)."""
        return {}

    def plan_inputs(self, last_step: int, to_train: list[int]) -> dict | None:
        """The replay's inputs in the dry-run of a run up to `last_step` that still trains `to_train`: {"lines":
        [(label, text)], "eval_images": n} (images to run forward besides evaluation, e.g. label evaluation), or
        None."""
        return None


class ReplayStream(Stream):
    """Old classes replayed from the pool `replay.pool` with evaluated labels; see the module docstring.

    `labeller(k)`: the checkpoint that labels the pool images of the classes learnt at step k and the class of each
    of its output channels; `rewrite(images, targets, ctx)`: the method's target rewriting (statistics and figure
    show its effect). `labels`, `label_threshold`, `label_space`, `min_labelled`: how labels are evaluated and kept
    (the method's options of those names)."""

    def __init__(self, run, ratio: float, labeller: Callable[[int], tuple[Path, list[int]]], rewrite: Callable,
                 labels: str = "evaluated", label_threshold: float = 0.0, label_space: str = "all",
                 min_labelled: float = 0.0):
        self.run = run
        self.ratio = ratio
        self.labeller = labeller
        self.rewrite = rewrite
        self.labels = labels
        self.label_threshold = label_threshold
        self.label_space = label_space
        self.min_labelled = min_labelled
        self._forbidden: set[str] | None = None  # the dataset's hashes, once per run

    # ------------------------------------------------------------------ the pool
    @property
    def pool_dir(self) -> Path:
        run = self.run
        pool = run.cfg.replay.get("pool") if "replay" in run.cfg else None
        if not pool:
            raise UserError(f"method={run.cfg.method.name} replays old classes: choose a replay source with a pool, "
                            "e.g. replay=toy_gan after `recall classmap replay=toy_gan` and `recall pool "
                            "replay=toy_gan`, or replay=folder with replay.pool=DIR")
        return Path(pool)

    @property
    def labels_dir(self) -> Path:
        return self.run.run_dir / "steps" / "replay_labels"  # with the checkpoints: a DVC output, removed with them

    def replays(self) -> bool:
        """Whether this run replays at all: it has an incremental step and a replay ratio above 0 (at 0, RECALL is
        inpainting alone: no pool, no labels)."""
        return self.run.last_step >= 1 and self.ratio > 0

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """The pool exists and holds images of every class this run will replay (and, for oracle labels, its source
        knows the true masks)."""
        if not self.replays():
            return
        run = self.run
        if self.labels == "oracle":
            truth_of(run, "oracle", "method.labels=oracle")
        pool = ReplayPool(self.pool_dir)
        if not pool.manifest_path.is_file():
            interrupted = (f"; a build was interrupted ({partial_of(pool.root)}): re-run it to finish"
                           if partial_of(pool.root).is_dir() else "")
            raise UserError(f"replay pool {pool.root} is not built (no {pool.manifest_path.name}): build it first "
                            f"with `recall pool replay={run.cfg.replay.name}` (same overrides){interrupted}")
        check_pool_source(run, pool)
        counts = Counter(int(r["target_class"]) for r in pool.records())
        missing = [run.class_names[c] for c in old_classes(run.task, run.last_step) if not counts[c]]
        if missing:
            raise UserError(f"replay pool {pool.root} has no image of {', '.join(missing)}, which this run replays; "
                            f"rebuild it with `recall pool replay={run.cfg.replay.name}`")

    def inputs(self) -> dict[str, Path]:
        return {"replay_pool": self.pool_dir} if self.replays() else {}

    def params(self) -> dict:
        """What the pool's build reported (images, copies of dataset images dropped, ...)."""
        summary = ReplayPool(self.pool_dir).summary() if self.replays() else None
        if not summary:
            return {}
        keys = ("total", "dropped_dataset_copies", "dropped_near_copies", "dropped_duplicates")
        stats = {k: summary.get(k, 0) for k in keys}
        stats["source_skipped"] = sum((summary.get("source_skipped") or {}).values())
        stats["shortfall"] = sum(v["missing"] for v in (summary.get("shortfall") or {}).values())
        return {"pool_built": stats}

    def check_not_the_dataset(self, data: PoolDataset) -> None:
        """Privacy: replay images come from outside the dataset (the exact-hash check, again at training time)."""
        if self._forbidden is None:  # sha256 of the bytes and pixels of every train and val image: once per run
            d = self.run.cfg.dataset
            self._forbidden = dataset_hashes(d.root, splits=(d.train_split, d.val_split), image_dir=d.image_dir)
        leaked = [r["id"] for r in data.records
                  if r["sha256"] in self._forbidden or r.get("pixel_sha256") in self._forbidden]
        if leaked:
            raise RuntimeError(f"privacy violation: replay pool {data.pool.root} holds {len(leaked)} images of the "
                               f"dataset itself (e.g. {leaked[:3]}); rebuild it with `recall pool`, which drops them")

    # ------------------------------------------------------------------ labels
    def ensure_labels(self, step: int) -> Path:
        """Label evaluation of the classes learnt before `step`, once per class group and pool: uint8 PNGs in the
        full label space. A group's marker (step<k>.done) is written after its labels and names the pool."""
        run = self.run
        labels_dir = self.labels_dir
        pool = ReplayPool(self.pool_dir)
        with distributed.main_first():  # rank 0 labels, the others find the labels written
            pool_id = content_id(pool.root)
            for k in range(step):
                done = labels_dir / f"step{k}.done"
                if _marker(done).get("pool") == pool_id:
                    continue
                data = PoolDataset(pool.root, classes=run.task[k], transform=eval_transform())
                if len(data) == 0:
                    raise UserError(f"replay pool {pool.root} has no usable image of the classes of step {k} "
                                    f"({', '.join(run.class_names[c] for c in run.task[k])}); rebuild it")
                checkpoint, channel_classes = self.labeller(k)
                model, _ = load_checkpoint(checkpoint, run.model_cfg)
                n = label_pool(model, data, channel_classes, out=labels_dir, threshold=self.label_threshold,
                               space=self.label_space, device=run.device())
                labeller = str(checkpoint.relative_to(run.run_dir))
                if self.labels == "oracle":
                    resolve(truth_of(run, "oracle", "method.labels=oracle"))(run.cfg.replay, data.records, labels_dir)
                    labeller += " + the true masks of each image's class"
                write_json(done, {"pool": pool_id, "classes": run.task[k], "images": n, "labeller": labeller})
        return labels_dir

    def data(self, step: int, transform) -> PoolDataset:
        """The labelled pool images of the classes learnt before `step`."""
        labels_dir = self.ensure_labels(step)
        return PoolDataset(self.pool_dir, classes=old_classes(self.run.task, step), labels_dir=labels_dir,
                           transform=transform, cache_in_memory=self.run.train_cfg.cache_images)

    # ------------------------------------------------------------------ loader
    def split(self, step: int, batch_size: int) -> tuple[int, int]:
        return replay_split(step, batch_size, self.ratio)

    def batches(self, step: int, generator: torch.Generator) -> Iterator | None:
        n_replay = self.split(step, self.run.train_cfg.batch_size)[1]
        return self._batches(step, generator, n_replay) if n_replay else None

    def _batches(self, step: int, generator: torch.Generator, n_replay: int) -> Iterator:
        """An endless iterator of labelled replay batches. Lazy: the pool is labelled and checked at the first
        batch drawn (the loop draws it before autocast, after the step's loader made its first draw from
        `generator`: the replay loader's shuffle comes second, as it always did)."""
        run = self.run
        t = run.train_cfg
        data = self.data(step, train_transform(t.crop, t.scale, t.scale_reference))
        if data.problems:
            print(f"replay: {describe_problems(data.problems, len(data) + len(data.problems))}", flush=True)
        if self.min_labelled > 0:  # images label evaluation found (almost) nothing in would teach "class = background"
            total = len(data)
            dropped = data.keep([share >= self.min_labelled for share in labelled_share(data.labels_dir, data.records)])
            print(f"replay: dropped {dropped} of {total} images whose evaluated label covers < {self.min_labelled:.0%} "
                  "of the image", flush=True)
        if len(data) == 0:
            raise UserError(f"replay pool {data.pool.root} has no usable image of classes "
                            f"{old_classes(run.task, step)}; rebuild it")
        self.check_not_the_dataset(data)
        run.record("extra_data", f"{len(set(data.target_classes))} old")  # the classes replayed (dry-run: extra data)
        batch_size = distributed.per_process(n_replay, "the replay samples per batch")
        yield from endless(DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator))

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def targets(self, step: int, data: PoolDataset, indices: list[int]) -> list[tuple]:
        """(evaluated label, training target after the method's target rewriting) of replay items `indices`."""
        run = self.run
        device = run.device()
        prev, _ = load_checkpoint(run.step_dir(step - 1) / "model.pt", run.model_cfg)
        prev.to(device).eval()
        ctx = run.context(step, prev)
        pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        records = [data.records[i] for i in indices]
        for batch in same_size_batches(records, TARGET_BATCH):  # positions in `indices`, images of one size each
            items = [data[indices[k]] for k in batch]
            images, labels = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
            targets = self.rewrite(images.to(device), labels.clone().to(device), ctx).cpu()
            for k, label, target in zip(batch, labels, targets):
                pairs[k] = (label.numpy(), target.numpy())
        return [pairs[k] for k in range(len(indices))]

    def statistics(self, step: int) -> dict[str, float]:
        """Pool images of old classes, the mean share of their pixels labelled with their class, and the share of
        pixels the method's target rewriting (RECALL: inpainting) changed, on a sample; with a simulated source,
        the labels' quality against its truth (`label_quality`)."""
        if step < 1 or not self.replays():
            return {}
        data = self.data(step, eval_transform())
        if len(data) == 0:
            return {"replay/pool_images": 0.0}
        shares = labelled_share(data.labels_dir, data.records)
        pairs = self.targets(step, data, spread(len(data), INPAINT_SAMPLE))
        changed = sum(int((label != target).sum()) for label, target in pairs)
        pixels = sum(label.size for label, _ in pairs)
        return {"replay/pool_images": float(len(data)), "replay/labelled_share": float(np.mean(shares)),
                "replay/inpainted_share": changed / pixels, **self.label_quality(data)}

    def label_quality(self, data: PoolDataset) -> dict[str, float]:
        """Where the replay source is a simulation that knows the true masks (`replay.truth.labels`): per replayed
        class, the IoU of its evaluated labels with the true objects and the share of its images labelled empty,
        and both averaged over the step-0 classes and over the classes learnt later (`replay_labels/...`)."""
        run = self.run
        scorer = (run.cfg.replay.get("truth") or {}).get("labels")
        if not scorer:
            return {}
        per_class = resolve(str(scorer))(run.cfg.replay, data.records, data.labels_dir)
        out = {}
        for c, q in per_class.items():
            name = run.class_names[c]
            out[f"replay_labels/iou/{name}"], out[f"replay_labels/empty/{name}"] = q["iou"], q["empty"]
        for group, classes in (("step0_classes", [c for c in per_class if c in run.task[0]]),
                               ("later_classes", [c for c in per_class if c not in run.task[0]])):
            for key in ("iou", "empty"):
                if classes:
                    out[f"replay_labels/{key}_{group}"] = float(np.mean([per_class[c][key] for c in classes]))
        return out

    def figures(self, step: int, title: str, out: Path) -> list[Path]:
        """replay_labels.png: replay images of `step` with their evaluated labels and training targets."""
        if step < 1 or not self.replays():
            return []
        run = self.run
        data = self.data(step, eval_transform())
        by_class: dict[int, list[int]] = {}
        for i, c in enumerate(data.target_classes):
            by_class.setdefault(c, []).append(i)
        classes = sorted(by_class)
        chosen = [by_class[classes[k]][0] for k in spread(len(classes), REPLAY_SAMPLES)]
        rows, names = [], []
        for i, (label, target) in zip(chosen, self.targets(step, data, chosen)):
            rows.append([data.load_raw(i)[0], label, target])
            names.append(run.class_names[data.target_classes[i]])
        path = out / "replay_labels.png"
        plot_grid(rows, ["replay image", "evaluated label", f"training target (step {step})"], names,
                  f"{title}: replay at step {step}", path)
        return [path]

    # ------------------------------------------------------------------ recall run --dry-run
    def facts(self, step: int) -> dict:
        if not self.split(step, self.run.train_cfg.batch_size)[1]:
            return {}
        return {"extra_data": f"{len(old_classes(self.run.task, step))} old"}

    def plan_inputs(self, last_step: int, to_train: list[int]) -> dict | None:
        """The pool: per_class x old classes needed, what is on disk; and the images label evaluation still has to
        label for the steps `to_train` (once per class group, before the first step that replays it)."""
        if not self.replays():
            return None
        run = self.run
        cfg, names = run.cfg, run.class_names
        old = old_classes(run.task, last_step)
        source, pool, per_class = str(cfg.replay.name), cfg.replay.get("pool"), cfg.replay.get("per_class")
        if not pool:
            return {"lines": [("replay", f"MISSING: the method replays old classes but replay={source} has no pool; "
                                         f"choose replay={', '.join(sorted(SOURCES))}")],
                    "eval_images": 0, "replay": {"source": source, "pool": None}}
        status = {"source": source, "pool": pool, "per_class": per_class, "old_classes": len(old),
                  "needed": per_class * len(old) if per_class else None, "exists": Path(pool).is_dir(),
                  "images": 0, "short": [], "mapping": cfg.replay.get("mapping"), "per_class_on_disk": {}}
        if status["exists"]:
            counts = Counter(int(r["target_class"]) for r in ReplayPool(pool).records())
            status["per_class_on_disk"] = {names[c]: counts[c] for c in old}
            status["images"] = sum(counts[c] for c in old)
            status["short"] = [names[c] for c in old if counts[c] < (per_class or 1)]
        need = (f"{per_class} per class x {len(old)} old classes = {status['needed']:,} images"
                if status["needed"] is not None else f"{len(old)} old classes")
        if not status["exists"]:
            have = "not built yet: build it with `recall classmap` (GAN sources) and `recall pool`, same overrides"
        elif status["short"]:
            short = status["short"]
            have = (f"{status['images']:,} images on disk; fewer than {per_class} for {len(short)} classes "
                    f"({', '.join(short[:5])}{', ...' if len(short) > 5 else ''})")
        else:
            have = f"{status['images']:,} images on disk, every class complete"
        lines = [("replay", f"{source} pool {pool}: needs {need}; {have}")]
        if status["mapping"]:
            status["mapping_exists"] = Path(status["mapping"]).is_file()
            lines.append(("", f"class mapping {status['mapping']}: "
                              f"{'found' if status['mapping_exists'] else 'missing'}"))
        labels_dir = self.labels_dir
        todo = [k for k in range(max(to_train, default=0)) if not (labels_dir / f"step{k}.done").exists()]
        on_disk = status["per_class_on_disk"]
        label_images = sum(on_disk.get(names[c], per_class or 0) for k in todo for c in run.task[k])
        return {"lines": lines, "eval_images": label_images, "replay": status}


def check_pool_source(run, pool: ReplayPool) -> None:
    """The pool holds images of the configured source (its marker says which, recall.ownership) and its build has
    finished; `+replay.any_source=true` replays a pool of another source on purpose. A pool without a marker (one
    assembled with ReplayPool.add) has no known source and is taken as it is."""
    owner = pool_owner(pool.root)
    if owner is None:
        return
    made_by, wanted = (owner.get("params") or {}).get("source"), str(run.cfg.replay.name)
    if made_by != wanted and not run.cfg.replay.get("any_source"):
        raise UserError(f"replay pool {pool.root} holds images of source {made_by}, not {wanted}: pass "
                        f"replay={made_by}, or replay.pool= a pool of {wanted} (`recall pool replay={wanted}`), or "
                        "+replay.any_source=true to replay it as it is")
    if pool.summary() is None:
        raise UserError(f"replay pool {pool.root} is not complete (no {pool.summary_path.name}: its build is running "
                        f"or was interrupted); finish it with `recall pool replay={made_by}` (same overrides)")


def truth_of(run, what: str, wanted_by: str) -> str:
    """The reference of `replay.truth.<what>`: what a simulated replay source knows (its config names it); a clear
    error when the source is not a simulation."""
    reference = (run.cfg.replay.get("truth") or {}).get(what)
    if not reference:
        raise UserError(f"{wanted_by} needs a simulated replay source that knows its images' true masks "
                        f"(replay=toy_gan or toy_diffusion); replay={run.cfg.replay.name} has no replay.truth.{what}")
    return str(reference)


def _marker(path: Path) -> dict:
    """A label group's marker (JSON), or {} when absent or unreadable (then the group is labelled again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


__all__ = ["LABEL_SOURCES", "LABEL_SPACES", "ReplayStream", "Stream", "endless", "old_classes", "replay_split",
           "spread"]
