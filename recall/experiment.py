"""A protocol run: every step of a task, with resumable checkpoints, evaluation and the output contract.

Run directory (docs/design.md, "Outputs"):
    steps/config.yaml        the resolved configuration (a resumed run must match it)
    steps/inputs.json        content ids of the code, data, the method's inputs and the step-0 model
    steps/mlflow_run.json    the MLflow parent run, so a resumed run logs into the same one
    steps/<t>/model.pt       checkpoint per step (atomic; a killed run resumes after the last finished step)
    steps/<t>/eval.json      confusion matrix + result of step t (written after the checkpoint)
    steps/<t>/plan.json      what training step t executed, as `recall run --dry-run` lists a step (images, batch,
                             iterations, lr, the method's extra data and training; eval_images once evaluated);
                             written before the checkpoint (and updated before eval.json), which mark the step done
    steps/...                what the method keeps (RECALL: helper decoders, evaluated replay labels)
    metrics.json, curve.csv  per-step results for people, DVC and the report
    figures/                 the run's figures

The method owns every data flow beyond the current step's images (`recall.methods.base.Method`'s run hooks):
this module calls them by name and knows nothing of replay.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from recall import distributed, timing
from recall.atomic import write_json, write_text
from recall.config import section, without_passwords
from recall.data.datasets import dataset_class_names
from recall.data.protocol import (
    Conventions,
    eval_label_map,
    get_convention,
    introduced_at,
    select_eval_images,
    select_train_images,
    steps,
    train_label_map,
)
from recall.data.transforms import eval_transform, train_transform
from recall.data.voc import VOCSegmentation, image_classes, read_split
from recall.errors import Diverged, UserError
from recall.locks import DirectoryLock
from recall.methods import Method, StepContext, build_method, for_source
from recall.metrics import CURVE_METRICS, ConfusionMatrix, forgetting, summarize
from recall.model import (
    REQUIRED,
    ModelConfig,
    SegmentationModel,
    backbone_weights_needed,
    load_checkpoint,
    save_checkpoint,
)
from recall.ownership import RUN_PLACE, Marker, claim, read_marker, write_marker
from recall.provenance import code_id, content_id, dvc_hash
from recall.run_figures import write_figures
from recall.step_plan import (drops_last, executed_facts, images_id, plan_steps, step0_meta, step0_mismatch,
                              step_work)
from recall.timing import phase
from recall.train import TrainConfig, evaluate, finite_weights, train_step

CURVE_FIELDS = ("step", *CURVE_METRICS)
RUN_ENTRY = "recall.stages.run"  # the module a run executes: its import closure is the run's code


def default_run_dir(cfg: DictConfig) -> Path:
    name = f"{cfg.protocol.name}_{cfg.setting.name}_{cfg.method.name}_{cfg.replay.name}_s{cfg.seed}"
    return Path("runs") / name


# ---------------------------------------------------------------------------------------------- the run directory
def run_marker(cfg: DictConfig) -> Marker:
    """A run directory's marker (recall.ownership), in steps/: what run made it."""
    return Marker("run", "recall run", {"protocol": str(cfg.protocol.name), "setting": str(cfg.setting.name),
                                        "method": str(cfg.method.name), "replay": str(cfg.replay.name),
                                        "seed": int(cfg.seed), "dataset": str(cfg.dataset.name)})


def legacy_run(directory: Path) -> dict | None:
    """A run directory from before markers existed: it holds steps/config.yaml."""
    return {"kind": "run", "made_by": "recall run"} if (directory / "steps" / "config.yaml").is_file() else None


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """`run_dir` is new, empty, or a run directory (any run's: the resume check compares configurations); nothing
    else, and never /, the home directory, a project root or a file. Read-only (the dry run checks it too)."""
    claim(run_dir, run_marker(cfg), "run_dir", where=RUN_PLACE, legacy=legacy_run)


def mark_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Write the run directory's marker unless it has one (a new directory, a legacy one, a restarted run's)."""
    steps = Path(run_dir) / RUN_PLACE
    if read_marker(steps) is None:
        write_marker(steps, run_marker(cfg))


class ProtocolRun:
    """Everything one run needs, built once from the configuration (every config error surfaces here)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        self.root = Path(cfg.dataset.root)
        self.num_classes = int(cfg.dataset.num_classes)
        self.task = steps(str(cfg.protocol.name), self.num_classes)
        self.setting = str(cfg.setting.name)
        self.convention: Conventions = get_convention(cfg.eval.convention)
        self.model_cfg = section(cfg.model, ModelConfig)
        if self.model_cfg.pretrained_file == REQUIRED:  # a paper profile: ImageNet weights, or null on purpose
            raise UserError(backbone_weights_needed(self.model_cfg.backbone))
        self.train_cfg = section(cfg.train, TrainConfig)
        method_opts = OmegaConf.to_container(cfg.method, resolve=True)
        self.method: Method = for_source(build_method(method_opts.pop("name"), **method_opts),
                                         OmegaConf.to_container(cfg.replay, resolve=True))  # e.g. stored exemplars
        self.class_names = dataset_class_names(cfg.dataset)
        self.last_step = len(self.task) - 1 if cfg.last_step is None else int(cfg.last_step)
        self.executed: dict | None = None  # what the step being trained executed (steps/<t>/plan.json)
        self.evaluated_images = 0  # images of the last evaluation

    def device(self) -> torch.device:
        return distributed.device(self.train_cfg.device)

    # ------------------------------------------------------------------ data
    def _dataset_kwargs(self) -> dict:
        d = self.cfg.dataset
        return dict(num_classes=self.num_classes, mask_dir=d.mask_dir, image_dir=d.image_dir)

    def classes_of(self, split: str) -> dict[str, frozenset[int]]:
        ids = read_split(self.root, split)
        cache = self.run_dir / f"image_classes_{split}.json"
        return image_classes(self.root, ids, num_classes=self.num_classes, mask_dir=self.cfg.dataset.mask_dir,
                             image_dir=self.cfg.dataset.image_dir, cache=cache, progress=False)

    def record(self, key: str, value) -> None:
        """A fact of the step being trained, recorded in its steps/<t>/plan.json (e.g. the classes a replay stream
        replays); outside a step's training, nothing."""
        if self.executed is not None:
            self.executed[key] = value

    def train_loader(self, step: int, generator: torch.Generator, batch_size: int | None = None,
                     label_map: torch.Tensor | None = None) -> DataLoader:
        classes = self.classes_of(self.cfg.dataset.train_split)
        ids = self.train_ids(classes, step)
        if self.method.data == "cumulative":  # joint: all labels kept
            lut = eval_label_map(self.task, step, self.num_classes, future="background")
            if self.convention.border_to_background:
                lut[255] = 0
        else:
            self.check_no_earlier_images(classes, step, ids)
            lut = train_label_map(self.task, step, self.setting, self.num_classes, self.convention.border_to_background)
        if not ids:
            hint = (" (the partitioned setting gives each image to one step: on a small dataset a step may draw "
                    "none; try another seed)" if self.setting == "partitioned" else "")
            raise UserError(f"step {step} of {self.cfg.protocol.name} ({self.setting}) has no training image "
                            f"in {self.root}; check dataset.root and the protocol{hint}")
        if label_map is not None:  # e.g. a helper decoder's own label space, composed after the step's map
            lut = label_map[lut]
        t = self.train_cfg
        batch_size = distributed.per_process(batch_size or t.batch_size, "train.batch_size (current-step samples)")
        data = VOCSegmentation(self.root, self.cfg.dataset.train_split, ids=ids, transform=train_transform(t.crop, t.scale, t.scale_reference),
                               label_map=lut, cache_in_memory=t.cache_images, **self._dataset_kwargs())
        drop_last = drops_last(len(ids), batch_size * distributed.world_size())
        sampler = distributed.train_sampler(data, seed=int(self.cfg.seed) * 1000 + step, drop_last=drop_last)
        return DataLoader(data, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=drop_last,
                          generator=generator, **self.loader_options())

    def train_ids(self, classes: dict[str, frozenset[int]], step: int) -> list[str]:
        """The training images of `step`: the setting's selection, or (joint) every image with a class seen so far."""
        if self.method.data == "cumulative":
            return sorted({i for s in range(step + 1) for i in select_train_images(classes, self.task, s, "overlapped")})
        return select_train_images(classes, self.task, step, self.setting, seed=int(self.cfg.seed))

    def loader_options(self) -> dict:
        """Worker processes, and page-locked memory when batches go to a GPU."""
        t = self.train_cfg
        pin = t.pin_memory and distributed.device(t.device).type == "cuda"
        return dict(num_workers=t.num_workers, pin_memory=pin)

    def check_no_earlier_images(self, classes: dict, step: int, ids: list[str]) -> None:
        """Privacy: in the disjoint, sequential and partitioned settings a step never reads an image of an earlier
        step. (Overlapped admits, by its definition, an image again when it holds a current class.)"""
        if self.setting == "overlapped":
            return
        earlier = {i for s in range(step)
                   for i in select_train_images(classes, self.task, s, self.setting, seed=int(self.cfg.seed))}
        reused = sorted(earlier.intersection(ids))
        if reused:
            raise RuntimeError(f"privacy violation: step {step} would read {len(reused)} images of earlier steps "
                               f"(e.g. {reused[:3]})")

    def eval_ids(self, classes: dict[str, frozenset[int]], step: int) -> list[str]:
        """The validation images `step` is scored on (the convention's selection)."""
        return select_eval_images(classes, self.task, step, self.convention.name)

    def eval_loader(self, step: int) -> DataLoader:
        ids = self.eval_ids(self.classes_of(self.cfg.dataset.val_split), step)
        lut = eval_label_map(self.task, step, self.num_classes, future=self.convention.future_at_test)
        data = VOCSegmentation(self.root, self.cfg.dataset.val_split, ids=ids, transform=eval_transform(),
                               label_map=lut, **self._dataset_kwargs())
        return DataLoader(data, batch_size=self.train_cfg.eval_batch_size, sampler=distributed.eval_sampler(data),
                          **self.loader_options())

    # ------------------------------------------------------------------ steps
    def plan(self) -> list[dict]:
        """The plan of every step (recall.step_plan.plan_steps), from the classes of the dataset's images: what
        `run_steps` executes and `recall run --dry-run` prints."""
        d = self.cfg.dataset
        return plan_steps(self, self.classes_of(d.train_split), self.classes_of(d.val_split))

    def step_dir(self, step: int) -> Path:
        return self.run_dir / "steps" / str(step)

    def trained_model(self, step: int) -> SegmentationModel:
        """The model `step` trained: its saved checkpoint."""
        return load_checkpoint(self.step_dir(step) / "model.pt", self.model_cfg)[0]

    def meta(self, step: int) -> dict:
        return {"task": self.task[: step + 1], "classes_per_step": [len(c) for c in self.task[: step + 1]],
                "setting": self.setting, "step": step, "backbone": self.model_cfg.backbone,
                "protocol": str(self.cfg.protocol.name), "method": self.method.name, "seed": int(self.cfg.seed)}

    def context(self, step: int, prev_model: SegmentationModel | None) -> StepContext:
        old = [c for s in range(step) for c in self.task[s]]
        return StepContext(step=step, task=self.task, new_classes=list(self.task[step]), old_classes=old,
                           prev_model=prev_model if self.method.needs_previous_model else None, setting=self.setting)

    def model_for(self, step: int) -> tuple[SegmentationModel, SegmentationModel | None]:
        """The model to train at `step` (previous checkpoint + grown classifier) and the frozen previous model."""
        if step == 0:
            return SegmentationModel(self.model_cfg, [len(self.task[0])]), None
        prev, _ = load_checkpoint(self.step_dir(step - 1) / "model.pt", self.model_cfg)
        model = copy.deepcopy(prev)
        model.add_classes(len(self.task[step]), init=self.method.classifier_init)
        prev.eval().requires_grad_(False)
        return model, prev

    def check_step0(self, source: Path) -> None:
        """Refuse a shared step-0 run (DVC's `step0` stage) that does not fit this protocol: its task, setting,
        backbone and seed, and the images its step 0 trained on (`recall.step_plan.step0_mismatch`)."""
        meta = step0_meta(source)
        executed = executed_facts(source / "steps" / "0" / "plan.json")
        wrong = step0_mismatch(self, meta, self.classes_of(self.cfg.dataset.train_split), executed)
        if wrong:
            raise ValueError(f"step0={source} does not fit this run ({'; '.join(wrong)}); train a matching step-0 "
                             "model (recall run last_step=0 ... with this run's method and setting) or drop step0=")

    def adopt_step0(self, source: Path) -> None:
        """Start from a shared step-0 run after checking it fits this protocol (`check_step0`)."""
        src = source / "steps" / "0"
        self.check_step0(source)
        load_checkpoint(src / "model.pt", self.model_cfg)  # another model's weights: one line, before any copy
        dst = self.step_dir(0)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("model.pt", "eval.json"):
            shutil.copyfile(src / name, dst / (name + ".tmp"))
        executed = executed_facts(src / "plan.json")  # what the shared run executed
        if executed is not None:
            write_json(dst / "plan.json", {**executed, "state": "adopt step0"})
        os.replace(dst / "eval.json.tmp", dst / "eval.json")
        os.replace(dst / "model.pt.tmp", dst / "model.pt")  # model.pt last: it marks the step as done

    def train(self, step: int, plan: dict) -> None:
        """Train `step` with the current-step samples per batch its `plan` (recall.step_plan) says, then the method's
        extra model (`train_extra_model`); record what it executed (steps/<t>/plan.json), then save its checkpoint,
        which marks it done."""
        # one process: seed*1000+step. Under torchrun, rank r adds r*7919 to the seed of its augmentations and
        # replay draws (DDP copies rank 0's initial weights to all; the shard shuffle has its own shared seed).
        seed = int(self.cfg.seed) * 1000 + step + distributed.rank() * 7919
        torch.manual_seed(seed)
        model, prev = self.model_for(step)
        ctx = self.context(step, prev)
        generator = torch.Generator().manual_seed(seed)
        stream = self.method.stream(self)  # what the loop blends into every batch (e.g. RECALL's replay)
        executed = self.executed = {"step": step, "classes": [self.class_names[c] for c in self.task[step]],
                                    "state": "train"}
        with phase("method"):
            self.method.before_step(self, step, ctx, generator)  # e.g. PLOP's per-class thresholds
            extra = stream.batches(step, generator)  # lazy: read at the first batch
        extra_sizes: set[int] = set()
        with phase("train"):
            loader = self.train_loader(step, generator, batch_size=plan["batch"][0])
            losses = train_step(model, self.method, loader, ctx, self.train_cfg, measured(extra, extra_sizes),
                                record=executed)
        n_extra = extra_sizes.pop() if len(extra_sizes) == 1 else sorted(extra_sizes) or 0
        executed.update(images=len(loader.dataset), batch=[loader.batch_size * distributed.world_size(),
                                                           n_extra * distributed.world_size()])
        with phase("method"):
            self.train_extra_model(step, generator)  # e.g. RECALL's helper decoder
            stream.remember(step)  # e.g. the memory of stored exemplars
        self.executed = None
        if not finite_weights(model):  # e.g. the last update overflowed: never saved as a finished step
            raise Diverged(f"step {step}: the trained weights are not finite (training diverged); nothing of step "
                           f"{step} was saved: lower the learning rate (train.lr, train.lr_incremental), then run the "
                           "same command again")
        if distributed.is_main():
            write_json(self.step_dir(step) / "plan.json", executed)  # before the checkpoint that marks the step done
            meta = {**self.meta(step), "images_id": images_id(loader.dataset.ids), "losses": losses}
            save_checkpoint(model, self.step_dir(step) / "model.pt", meta)
        distributed.barrier()  # the others load this checkpoint next

    def train_extra_model(self, step: int, generator: torch.Generator) -> None:
        """The method's extra model of `step` (`Method.extra_model`), if any: trained with the run's loop on the
        step's images in its label space, drawing from the step's generator, recorded as the step's
        `extra_training` and saved in the step's directory."""
        extra = self.method.extra_model(self, step)
        if extra is None:
            return
        model = extra.build()
        loader = self.train_loader(step, generator, batch_size=extra.train_cfg.batch_size, label_map=extra.label_map)
        done: dict = {}
        train_step(model, extra.method, loader, extra.ctx, extra.train_cfg, record=done)
        self.record("extra_training", {"what": extra.what, "batch": loader.batch_size * distributed.world_size(),
                                       **done})
        if distributed.is_main():
            save_checkpoint(model, self.step_dir(step) / extra.file, extra.meta)

    def evaluate(self, step: int, history: list[np.ndarray]) -> dict:
        """Score the *saved* checkpoint of `step` (never the in-memory model) and build its result record."""
        model, _ = load_checkpoint(self.step_dir(step) / "model.pt", self.model_cfg)
        seen = [c for s in range(step + 1) for c in self.task[s]]
        loader = self.eval_loader(step)
        self.evaluated_images = len(loader.dataset)
        matrix = evaluate(model, loader, num_classes=len(seen) + 1, device=self.device(), amp=self.train_cfg.amp)
        return self.result(step, matrix, history)

    def result(self, step: int, matrix: ConfusionMatrix, history: list[np.ndarray]) -> dict:
        iou = matrix.iou(absent=self.convention.absent_class)
        history = history + [iou]
        old, new = self.task[0], [c for s in range(1, step + 1) for c in self.task[s]]
        intro = {0: 0, **introduced_at(self.task)}
        forgot = forgetting(history, intro)
        nan_to_none = lambda v: None if v is None or np.isnan(v) else float(v)
        return {"step": step, "new_classes": [self.class_names[c] for c in self.task[step]],
                "old_classes": [self.class_names[c] for c in old],
                "iou": {self.class_names[c]: nan_to_none(v) for c, v in enumerate(iou)},
                "miou": summarize(iou, old, new),
                "forgetting": {self.class_names[c]: nan_to_none(v) for c, v in forgot.items()},
                "confusion_matrix": matrix.to_dict()}


# ---------------------------------------------------------------------------------------------- inputs and resume
IGNORED_FOR_RESUME = ("tracking", "pipeline", "toyworld", "pretrain", "tune", "plan", "run_dir", "last_step",
                      "on_config_change", "launcher", "select")  # launcher: a run stopped by its time limit
# resumes with more; select: `recall select`'s options, read by no run
# how a run executes, not what it computes: a run may resume with other values
EXECUTION_ONLY = {"train": ("device", "num_workers", "threads", "pin_memory", "compile", "eval_batch_size")}
ON_CONFIG_CHANGE = ("error", "restart")


def run_inputs(run: ProtocolRun) -> dict[str, str]:
    """What a run's checkpoints depend on besides its configuration (DVC re-runs a stage when one changes): the
    code it executes (the import closure of `recall.stages.run`, the same rule as the DVC stages' deps), the
    dataset, the pretrained backbone, the method's inputs (e.g. the replay pool) and the step-0 model."""
    cfg = run.cfg
    inputs = {"code": code_id(RUN_ENTRY), "dataset": content_id(cfg.dataset.root)}
    if run.model_cfg.pretrained_file:  # the backbone every step starts from
        inputs["pretrained_backbone"] = content_id(run.model_cfg.pretrained_file)
    for name, path in run.method.inputs(run).items():
        inputs[name] = content_id(path)
    step0 = Path(str(cfg.step0)) / "steps" / "0" / "model.pt"
    if cfg.step0 and step0.is_file():
        with step0.open("rb") as f:
            inputs["step0"] = hashlib.file_digest(f, "sha256").hexdigest()
    return inputs


def _comparable(config: dict) -> dict:
    """A configuration without what resuming ignores; train options a run saved before they existed count as
    their defaults (an older run directory resumes)."""
    config = {k: v for k, v in config.items() if k not in IGNORED_FOR_RESUME}
    if isinstance(config.get("train"), dict):
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        config["train"] = {**defaults, **config["train"]}
    for name, keys in EXECUTION_ONLY.items():
        if isinstance(config.get(name), dict):
            config[name] = {k: v for k, v in config[name].items() if k not in keys}
    return config


def config_differences(path: Path, run: ProtocolRun, policy: str, inputs: dict[str, str] | None = None) -> list[str]:
    """Read-only: what differs between the run saved at `path` (steps/config.yaml) and `run` — configuration
    sections, and inputs (steps/inputs.json). `error` (interactive runs) ignores code edits; `restart` (DVC
    stages, whose checkpoints must reflect their deps) counts them, and counts unknown inputs as changed.
    `inputs`: run_inputs(run) when the caller has them already."""
    if policy not in ON_CONFIG_CHANGE:
        raise ValueError(f"on_config_change={policy!r}: expected one of {', '.join(ON_CONFIG_CHANGE)}")
    if not path.is_file():
        return []
    saved = _comparable(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    current = _comparable(without_passwords(OmegaConf.to_container(run.cfg, resolve=True)))  # as config.yaml has it
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    inputs_file = path.with_name("inputs.json")
    old = json.loads(inputs_file.read_text()) if inputs_file.is_file() else None
    if old is None and policy == "error":  # a run from before inputs were recorded: nothing to compare
        return changed
    new = run_inputs(run) if inputs is None else inputs
    keys = sorted(set(old or {}) | set(new)) if policy == "restart" else sorted(set(old) & set(new) - {"code"})
    return changed + [f"inputs.{k}" for k in keys if (old or {}).get(k) != new.get(k)]


def check_same_config(path: Path, run: ProtocolRun) -> None:
    """Resume only a run with the same configuration and inputs; write them on a fresh start.
    on_config_change=restart (DVC stages: DVC re-runs a stage after its params or deps changed, leaving its
    persisted steps/ in place) moves the steps/ of a changed run aside and starts afresh, instead of refusing it."""
    policy = run.cfg.get("on_config_change") or "error"
    inputs = run_inputs(run)  # compared, and written on a (re)start
    changed = config_differences(path, run, policy, inputs)
    if path.is_file() and not changed:
        return
    if changed and policy == "error":
        raise ValueError(f"{path.parent.parent} holds a run with a different configuration or inputs (differ: "
                         f"{', '.join(changed)}); resume it with the same settings, delete that directory, "
                         "pass another run_dir=, or pass on_config_change=restart to move it aside")
    if changed:
        move_aside(path.parent, changed)
    mark_run_dir(path.parent.parent, run.cfg)  # a restarted run's steps/ is new
    write_json(path.with_name("inputs.json"), inputs)
    saved = OmegaConf.create(without_passwords(OmegaConf.to_container(run.cfg, resolve=True)))  # tune.storage: ***
    write_text(path, OmegaConf.to_yaml(saved))  # last: config.yaml marks a started run


def move_aside(steps: Path, changed: list[str]) -> Path:
    """Move a stale run's steps/ (checkpoints, eval.json, MLflow run id) to <run_dir>/../.stale/<run>-<UTC time>/:
    outside DVC's outputs, so nothing finished is lost (it is a run directory: with its old settings,
    `recall run run_dir=<it>` resumes it)."""
    run_dir = steps.parent
    stale = run_dir.parent / ".stale" / f"{run_dir.name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    dest, n = stale, 1
    while dest.exists():
        n += 1
        dest = stale.with_name(f"{stale.name}-{n}")
    dest.mkdir(parents=True)
    os.replace(steps, dest / "steps")
    print(f"{run_dir}: its run had another configuration or other inputs (differs: {', '.join(changed)}); "
          f"on_config_change=restart moved its steps/ (checkpoints, MLflow run id) to {dest} and starts afresh",
          flush=True)
    return dest


# ---------------------------------------------------------------------------------------------- the run
def measured(batches: Iterator | None, sizes: set[int]) -> Iterator | None:
    """`batches` as they are, noting the size of every batch drawn (a method's extra batches, e.g. replay)."""
    if batches is None:
        return None

    def drawn():
        for batch in batches:
            sizes.add(len(batch[0]))
            yield batch
    return drawn()


def _iou_array(result: dict) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in result["iou"].values()], dtype=np.float64)


def run_protocol(cfg: DictConfig, tracker=None, figures: bool = True,
                 on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) every step of the configured protocol; returns the metrics.json payload.

    `tracker` (recall.tracking.Tracker) records the run in MLflow; `on_step(result)` is called after every step's
    evaluation, once the tracker logged it (`recall tune` reports to Optuna there, and may stop the run by
    raising). figures=False skips the run's figures (seconds per run; tune trials do without them)."""
    run = ProtocolRun(cfg)
    torch.set_num_threads(run.train_cfg.threads)
    read_split(run.root, cfg.dataset.train_split)  # a wrong dataset.root fails here, naming the file
    run.method.inputs(run, check=True)  # e.g. the replay pool: a doomed run fails before step 0, not after it
    lock = None
    if distributed.is_main():
        check_run_dir(run.run_dir, cfg)  # ours, or new: never a directory of someone else's files
        lock = DirectoryLock(run.run_dir).acquire()  # one writer per run dir (its lock file inside it)
        mark_run_dir(run.run_dir, cfg)
    try:
        return _run_locked(run, cfg, tracker, figures, on_step)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(run: ProtocolRun, cfg: DictConfig, tracker, figures: bool, on_step) -> dict:
    timing.SECONDS.clear()  # this run's seconds only (a tuner runs many in one process)
    with distributed.main_first():  # rank 0 checks the data and (on a fresh start) writes the configuration first
        with phase("pre-flight"):
            for split in (cfg.dataset.train_split, cfg.dataset.val_split):
                run.classes_of(split)  # the pre-flight: every image and mask of the split readable, sizes matching
            if distributed.is_main():
                if step_work(run, 0) == "adopt step0":  # a step 0 that does not fit: refused before anything is written
                    run.check_step0(Path(cfg.step0))
                check_same_config(run.run_dir / "steps" / "config.yaml", run)
    if tracker is not None:
        tags = {"protocol": str(cfg.protocol.name), "setting": run.setting, "method": run.method.name,
                "replay": str(cfg.replay.name), "seed": str(cfg.seed), "convention": run.convention.name,
                "dataset": str(cfg.dataset.name), "run_dir": str(run.run_dir),
                "dvc.dataset": dvc_hash(cfg.dataset.root),
                "role": ("protocol" if run.last_step == len(run.task) - 1 else "step0" if run.last_step == 0
                         else "partial")}  # step0: the shared step-0 run (DVC's step0 stage)
        if cfg.step0:
            tags["step0"] = str(cfg.step0)
        for name, path in run.method.inputs(run).items():
            tags[f"dvc.{name}"] = dvc_hash(path)
        described = run.method.describe(run)
        tags.update(described["tags"])  # e.g. replay.stored_data: the run replays stored training images
        params = {**OmegaConf.to_container(cfg, resolve=True), **described["params"]}
        with phase("tracking"):
            tracker.start(run.run_dir / "steps", run_name(cfg), tags, params)
    try:
        results = run_steps(run, tracker, on_step)
    except BaseException as error:  # the MLflow run says what happened; a restart resumes it (RUNNING again)
        if tracker is not None:
            tracker.finish([], status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    if not distributed.is_main():  # rank 0 writes the outputs and figures
        return outputs(run, results)
    payload = write_outputs(run, results)
    with distributed.alone(), phase("figures"):
        figure_files = write_figures(run, results, run_name(cfg)) if figures else []
    if tracker is not None:
        with phase("tracking"):
            tracker.finish([run.run_dir / "metrics.json", run.run_dir / "curve.csv",
                            run.run_dir / "steps" / "config.yaml"], figures=figure_files)
    timing.write(run.run_dir / "timing.json")  # where the seconds went (benchmarks/demo_profile.py)
    return payload


def run_name(cfg: DictConfig) -> str:
    """A name a person can read in `mlflow ui`, e.g. "15-1x5 · recall · toy_gan · seed 0"; the shared step-0 run
    (last_step=0) "step 0 · 15 classes · overlapped · seed 0"; a setting other than overlapped and a run stopped
    early (last_step) are named too, so runs that differ do not share a name."""
    task = steps(str(cfg.protocol.name), int(cfg.dataset.num_classes))
    last = len(task) - 1 if cfg.get("last_step") is None else int(cfg.last_step)
    setting, method = str(cfg.setting.name), str(cfg.method.name)
    if last == 0 < len(task) - 1:
        parts = ["step 0", f"{len(task[0])} classes", setting, *([method] if method != "ft" else [])]
        return " · ".join([*parts, f"seed {cfg.seed}"])
    parts = [str(cfg.protocol.name) + ("" if setting == "overlapped" else f" {setting}"), method]
    if str(cfg.replay.name) != "none":
        parts.append(str(cfg.replay.name))
    if last < len(task) - 1:
        parts.append(f"steps 0-{last}")
    return " · ".join([*parts, f"seed {cfg.seed}"])


def run_steps(run: ProtocolRun, tracker=None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Execute the run's plan (recall.step_plan.plan_steps): train (or resume) and evaluate every step; returns the
    per-step result records."""
    results: list[dict] = []
    plans = run.plan()
    distributed.barrier()  # every process decides from the files as they were before any of them changes one
    for plan in plans:
        step = plan["step"]
        if plan["state"] == "adopt step0":
            with distributed.main_first():
                if step_work(run, step) == "adopt step0":  # the other processes find it adopted
                    run.adopt_step0(Path(run.cfg.step0))
        elif plan["state"] == "train":
            run.train(step, plan)  # its phases: "train", "method" (e.g. replay labels, helper decoders)
        eval_file = run.step_dir(step) / "eval.json"
        if eval_file.exists():
            result = json.loads(eval_file.read_text())
        else:  # every process scores its shard; rank 0 writes (no file changes before all have decided)
            with phase("evaluate"):
                result = run.evaluate(step, [_iou_array(r) for r in results])
            if distributed.is_main():
                with distributed.alone(), phase("method"):
                    statistics = run.method.stream(run).statistics(step)  # e.g. how the replay was labelled
                if statistics:
                    result["statistics"] = statistics
                executed = executed_facts(run.step_dir(step) / "plan.json")
                if executed is not None:  # before eval.json, which marks the evaluation done
                    write_json(run.step_dir(step) / "plan.json", {**executed, "eval_images": run.evaluated_images})
                write_json(eval_file, result)
        results.append(result)
        if distributed.is_main():
            print(f"step {step} ({', '.join(result['new_classes'])}): " +
                  ", ".join(f"{k}={v:.3f}" for k, v in result["miou"].items() if v is not None), flush=True)
        if tracker is not None:
            with phase("tracking"):
                tracker.log_step(result)
        if on_step is not None:
            on_step(result)
    return results


def outputs(run: ProtocolRun, results: list[dict]) -> dict:
    """The metrics.json payload of a run's per-step results."""
    strip = lambda r: {k: v for k, v in r.items() if k != "confusion_matrix"}
    return {"protocol": str(run.cfg.protocol.name), "setting": run.setting, "method": run.method.name,
            "replay": str(run.cfg.replay.name), "seed": int(run.cfg.seed), "convention": run.convention.name,
            "method_options": run.method.describe(run)["options"],
            "classes": run.class_names, "steps": [strip(r) for r in results], "final": strip(results[-1])}


def write_outputs(run: ProtocolRun, results: list[dict]) -> dict:
    payload = outputs(run, results)
    write_json(run.run_dir / "metrics.json", payload)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CURVE_FIELDS)
    writer.writeheader()
    for r in results:
        writer.writerow({"step": r["step"], **{k: ("" if r["miou"][k] is None else round(r["miou"][k], 5))
                                               for k in CURVE_FIELDS[1:]}})
    write_text(run.run_dir / "curve.csv", buffer.getvalue())
    return payload
