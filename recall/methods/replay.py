"""Replay of old classes from a pool of outside images, labelled by label evaluation: the data flow every
replay-based method shares (RECALL, and any variant: another labeller, another target rewriting).

A `ReplayMethod` owns, through the run hooks of `recall.methods.base.Method`:

* the pool (`replay.pool` in the run's config): checked before step 0 (`check_inputs`), its content id recorded
  (`inputs`), its build statistics logged (`run_params`);
* label evaluation: pool images of the classes learnt at step k get pixel labels from the model `labeller(run, k)`
  names, once per run, in `<run_dir>/steps/replay_labels/` (a group's marker is written after its labels and
  names the pool it labelled: another pool is labelled again);
* the replay stream (`extra_batches`): labelled pool images of every class learnt before the step, `replay_ratio`
  of each batch (`batch_split`);
* what the run records: replay statistics per step (with a simulated source, the labels' quality against the
  truth it knows: `replay.truth.labels`), the replay figure, its part of the `--dry-run` plan.

A subclass says which model labels a class group (`labeller`) and may add work after a step (`after_step`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
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
from recall.methods.base import Method, RunServices, StepContext
from recall.model import load_checkpoint
from recall.ownership import partial_of
from recall.provenance import content_id
from recall.registry import resolve
from recall.replay.pool import PoolDataset, ReplayPool, describe_problems, pool_owner
from recall.replay.leakage import dataset_hashes
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
        self._forbidden: set[str] | None = None

    # ------------------------------------------------------------------ what a subclass says
    def labeller(self, run: RunServices, k: int) -> tuple[Path, list[int]]:
        """The checkpoint that labels the pool images of the classes learnt at step `k`, and the class of each of
        its output channels (in the full label space)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the pool
    @staticmethod
    def pool_dir(run: RunServices) -> Path:
        pool = run.cfg.replay.get("pool") if "replay" in run.cfg else None
        if not pool:
            raise UserError(f"method={run.cfg.method.name} replays old classes: choose a replay source with a pool, "
                            "e.g. replay=toy_gan after `recall classmap replay=toy_gan` and `recall pool "
                            "replay=toy_gan`, or replay=folder with replay.pool=DIR")
        return Path(pool)

    @staticmethod
    def labels_dir(run: RunServices) -> Path:
        return run.run_dir / "steps" / "replay_labels"  # with the checkpoints: a DVC output, removed with them

    def replays(self, run: RunServices) -> bool:
        """Whether this run replays at all: it has an incremental step and a replay ratio above 0 (at 0, RECALL is
        inpainting alone: no pool, no labels)."""
        return run.last_step >= 1 and self.replay_ratio > 0

    def check_inputs(self, run: RunServices) -> None:
        """The pool exists and holds images of every class this run will replay (and, for oracle labels, its source
        knows the true masks)."""
        if not self.replays(run):
            return
        if self.labels == "oracle":
            truth_of(run, "oracle", "method.labels=oracle")
        pool = ReplayPool(self.pool_dir(run))
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

    def inputs(self, run: RunServices) -> dict[str, Path]:
        return {"replay_pool": self.pool_dir(run)} if self.replays(run) else {}

    def run_params(self, run: RunServices) -> dict:
        """What the pool's build reported (images, copies of dataset images dropped, ...)."""
        summary = ReplayPool(self.pool_dir(run)).summary() if self.replays(run) else None
        if not summary:
            return {}
        keys = ("total", "dropped_dataset_copies", "dropped_near_copies", "dropped_duplicates")
        stats = {k: summary.get(k, 0) for k in keys}
        stats["source_skipped"] = sum((summary.get("source_skipped") or {}).values())
        stats["shortfall"] = sum(v["missing"] for v in (summary.get("shortfall") or {}).values())
        return {"pool_built": stats}

    def check_pool_is_not_the_dataset(self, run: RunServices, data: PoolDataset) -> None:
        """Privacy: replay images come from outside the dataset (the exact-hash check, again at training time)."""
        if self._forbidden is None:  # sha256 of the bytes and pixels of every train and val image: once per run
            d = run.cfg.dataset
            self._forbidden = dataset_hashes(d.root, splits=(d.train_split, d.val_split), image_dir=d.image_dir)
        leaked = [r["id"] for r in data.records
                  if r["sha256"] in self._forbidden or r.get("pixel_sha256") in self._forbidden]
        if leaked:
            raise RuntimeError(f"privacy violation: replay pool {data.pool.root} holds {len(leaked)} images of the "
                               f"dataset itself (e.g. {leaked[:3]}); rebuild it with `recall pool`, which drops them")

    # ------------------------------------------------------------------ label evaluation
    def ensure_labels(self, run: RunServices, step: int) -> Path:
        """Label evaluation of the classes learnt before `step`, once per class group and pool: uint8 PNGs in the
        full label space. A group's marker (step<k>.done) is written after its labels and names the pool."""
        labels_dir = self.labels_dir(run)
        pool = ReplayPool(self.pool_dir(run))
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
                checkpoint, channel_classes = self.labeller(run, k)
                model, _ = load_checkpoint(checkpoint, run.model_cfg)
                n = label_pool(model, data, channel_classes, out=labels_dir, threshold=self.label_threshold,
                               space=self.label_space, device=run.device())
                labeller = str(checkpoint.relative_to(run.run_dir))
                if self.labels == "oracle":
                    resolve(truth_of(run, "oracle", "method.labels=oracle"))(run.cfg.replay, data.records, labels_dir)
                    labeller += " + the true masks of each image's class"
                write_json(done, {"pool": pool_id, "classes": run.task[k], "images": n, "labeller": labeller})
        return labels_dir

    def replay_data(self, run: RunServices, step: int, transform) -> PoolDataset:
        """The labelled pool images of the classes learnt before `step`."""
        labels_dir = self.ensure_labels(run, step)
        return PoolDataset(self.pool_dir(run), classes=old_classes(run.task, step), labels_dir=labels_dir,
                           transform=transform, cache_in_memory=run.train_cfg.cache_images)

    # ------------------------------------------------------------------ the replay stream
    def batch_split(self, step: int, batch_size: int) -> tuple[int, int]:
        return replay_split(step, batch_size, self.replay_ratio)

    def extra_batches(self, run: RunServices, step: int, generator: torch.Generator) -> Iterator | None:
        n_replay = self.batch_split(step, run.train_cfg.batch_size)[1]
        return self._replay_batches(run, step, generator, n_replay) if n_replay else None

    def _replay_batches(self, run: RunServices, step: int, generator: torch.Generator, n_replay: int) -> Iterator:
        """An endless iterator of labelled replay batches. Lazy: the pool is labelled and checked at the first
        batch drawn (the loop draws it before autocast, after the step's loader made its first draw from
        `generator`: the replay loader's shuffle comes second, as it always did)."""
        t = run.train_cfg
        data = self.replay_data(run, step, train_transform(t.crop, t.scale, t.scale_reference))
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
        self.check_pool_is_not_the_dataset(run, data)
        run.record("extra_data", f"{len(set(data.target_classes))} old")  # the classes replayed (dry-run: extra data)
        batch_size = distributed.per_process(n_replay, "the replay samples per batch")
        yield from endless(DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator))

    # ------------------------------------------------------------------ what the run records
    @torch.no_grad()
    def _targets(self, run: RunServices, step: int, data: PoolDataset, indices: list[int]) -> list[tuple]:
        """(evaluated label, training target after this method's target rewriting) of replay items `indices`."""
        device = run.device()
        prev, _ = load_checkpoint(run.step_dir(step - 1) / "model.pt", run.model_cfg)
        prev.to(device).eval()
        ctx = run.context(step, prev)
        pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        records = [data.records[i] for i in indices]
        for batch in same_size_batches(records, TARGET_BATCH):  # positions in `indices`, images of one size each
            items = [data[indices[k]] for k in batch]
            images, labels = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
            targets = self.rewrite_targets(images.to(device), labels.clone().to(device), ctx).cpu()
            for k, label, target in zip(batch, labels, targets):
                pairs[k] = (label.numpy(), target.numpy())
        return [pairs[k] for k in range(len(indices))]

    def step_statistics(self, run: RunServices, step: int) -> dict[str, float]:
        """Pool images of old classes, the mean share of their pixels labelled with their class, and the share of
        pixels this method's target rewriting (RECALL: inpainting) changed, on a sample; with a simulated source,
        the labels' quality against its truth (`label_quality`)."""
        if step < 1 or not self.replays(run):
            return {}
        data = self.replay_data(run, step, eval_transform())
        if len(data) == 0:
            return {"replay/pool_images": 0.0}
        shares = labelled_share(data.labels_dir, data.records)
        pairs = self._targets(run, step, data, spread(len(data), INPAINT_SAMPLE))
        changed = sum(int((label != target).sum()) for label, target in pairs)
        pixels = sum(label.size for label, _ in pairs)
        return {"replay/pool_images": float(len(data)), "replay/labelled_share": float(np.mean(shares)),
                "replay/inpainted_share": changed / pixels, **self.label_quality(run, data)}

    def label_quality(self, run: RunServices, data: PoolDataset) -> dict[str, float]:
        """Where the replay source is a simulation that knows the true masks (`replay.truth.labels`): per replayed
        class, the IoU of its evaluated labels with the true objects and the share of its images labelled empty,
        and both averaged over the step-0 classes and over the classes learnt later (`replay_labels/...`)."""
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

    def figures(self, run: RunServices, step: int, title: str, out: Path) -> list[Path]:
        """replay_labels.png: replay images of `step` with their evaluated labels and training targets."""
        if step < 1 or not self.replays(run):
            return []
        data = self.replay_data(run, step, eval_transform())
        by_class: dict[int, list[int]] = {}
        for i, c in enumerate(data.target_classes):
            by_class.setdefault(c, []).append(i)
        classes = sorted(by_class)
        chosen = [by_class[classes[k]][0] for k in spread(len(classes), REPLAY_SAMPLES)]
        rows, names = [], []
        for i, (label, target) in zip(chosen, self._targets(run, step, data, chosen)):
            rows.append([data.load_raw(i)[0], label, target])
            names.append(run.class_names[data.target_classes[i]])
        path = out / "replay_labels.png"
        plot_grid(rows, ["replay image", "evaluated label", f"training target (step {step})"], names,
                  f"{title}: replay at step {step}", path)
        return [path]

    # ------------------------------------------------------------------ recall run --dry-run
    def plan_step(self, run: RunServices, step: int, images: int | None, iterations) -> dict:
        if not self.batch_split(step, run.train_cfg.batch_size)[1]:
            return {}
        return {"extra_data": f"{len(old_classes(run.task, step))} old"}

    def plan_inputs(self, run: RunServices, last_step: int, to_train: list[int]) -> dict | None:
        """The pool: per_class x old classes needed, what is on disk; and the images label evaluation still has to
        label for the steps `to_train` (once per class group, before the first step that replays it)."""
        if not self.replays(run):
            return None
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
        labels_dir = self.labels_dir(run)
        todo = [k for k in range(max(to_train, default=0)) if not (labels_dir / f"step{k}.done").exists()]
        on_disk = status["per_class_on_disk"]
        label_images = sum(on_disk.get(names[c], per_class or 0) for k in todo for c in run.task[k])
        return {"lines": lines, "eval_images": label_images, "replay": status}


def check_pool_source(run: RunServices, pool: ReplayPool) -> None:
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


def truth_of(run: RunServices, what: str, wanted_by: str) -> str:
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


__all__ = ["ReplayMethod", "StepContext", "old_classes", "spread"]
