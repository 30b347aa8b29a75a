"""A run as a list of step plans: what `recall.experiment.run_steps` does with each step, and what
`recall run --dry-run` prints (recall/plan.py), from one function, `plan_steps`.

A step's plan is plain data, the fields a trained step records of itself in steps/<t>/plan.json:

    step, classes    the step and the names of the classes it learns
    state            what the run does with it (`WORK`): train, evaluate (trained), done, adopt step0 (`step0=`)
    images           its training images (the setting's selection; None when the dataset is not on disk)
    batch            [current-step samples, the method's extra samples (replay)] per batch
    iterations, lr   the optimizer steps and the learning rate the step starts from
    eval_images      the validation images it is scored on
    extra_data       the classes the method's stream replays (its `facts`), when it replays
    extra_training   a model the method trains besides the step's own (`Method.extra_model`: RECALL's helper
                     decoders): {what, batch, iterations, lr}

`run` is always the run a plan is for (a `recall.experiment.ProtocolRun`, which imports this module). The runner
executes the plan (its state, its current-step samples per batch) and records what it executed from its loaders,
optimizer and loop (the loader's batch is the plan's, and its rule for a last partial batch is `drops_last` here; the
rest is measured); tests/test_plan_matches_run.py compares the two for every method. A step the run has already
trained (or adopted) is planned as it was: its recorded facts.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import torch

from recall.errors import UserError
from recall.train import step_iterations, step_lr

# What `run_steps` does with a step, told by the files of the run directory: (trains it, evaluates it).
WORK = {"train": (True, True), "evaluate": (False, True), "done": (False, False), "adopt step0": (False, False)}
STEP0_KEYS = ("task", "setting", "backbone", "seed")  # what a shared step-0 model must share with a run adopting it


def drops_last(images: int, batch: int) -> bool:
    """Whether a step's loader drops its last partial batch: when there is more than one batch."""
    return images > batch


def batches_per_epoch(images: int, batch: int) -> int:
    """len() of a step's training loader over `images` images in batches of `batch`."""
    return images // batch if drops_last(images, batch) else math.ceil(images / batch)


def executed_facts(path: Path) -> dict | None:
    """A step's steps/<t>/plan.json (what it executed), or None when absent (a run from before it was recorded) or
    unreadable."""
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) else None


def step_work(run, step: int, restarts: bool = False) -> str:
    """What `run_steps` does with `step` (a key of WORK), told by the files of the run directory: "done" (trained
    and evaluated), "evaluate" (trained), "adopt step0" (copied from the shared step-0 run, `step0=`) or "train".
    `restarts`: the run directory is moved aside first (nothing in it counts)."""
    d = run.step_dir(step)
    if not restarts and (d / "model.pt").exists():
        return "done" if (d / "eval.json").exists() else "evaluate"
    return "adopt step0" if step == 0 and run.cfg.step0 else "train"


def images_id(ids: list[str]) -> str:
    """A short content id of a list of training images (which images a step trained on), kept with its model."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def step0_meta(source: Path) -> dict:
    """The meta of the shared step-0 checkpoint of `step0=source`; a missing or unreadable one (truncated, not a
    checkpoint) is a UserError naming it."""
    path = Path(source) / "steps" / "0" / "model.pt"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"step0={source}: no step-0 checkpoint {path}; train it first (recall run last_step=0 "
                        "run_dir=... with this run's protocol, setting and seed) or drop step0=") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as error:
        raise UserError(f"step0={source}: {path} is not a readable checkpoint ({type(error).__name__}); train the "
                        "step-0 run again (recall run last_step=0 ...) or drop step0=") from None
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict):
        raise UserError(f"step0={source}: {path} has no meta (not a checkpoint of recall run); train the step-0 run "
                        "again (recall run last_step=0 ...) or drop step0=")
    return meta


def step0_mismatch(run, meta: dict, train_classes: dict | None, executed: dict | None = None) -> list[str]:
    """How a shared step-0 model (its checkpoint's `meta`) does not fit `run`: "<key>: <its> (needs <ours>)" for each
    of STEP0_KEYS, and its training images when this run would select others for step 0 (e.g. joint, which sees
    every image of its classes, against a step 0 of the disjoint setting). A model saved before its images were
    recorded is compared by the number of images its run recorded (`executed`: its steps/0/plan.json), if any."""
    mine = run.meta(0)
    wrong = [f"{k}: {meta.get(k)!r} (needs {mine[k]!r})" for k in STEP0_KEYS if meta.get(k) != mine[k]]
    if train_classes is None:
        return wrong
    ours = run.train_ids(train_classes, 0)
    theirs = (executed or {}).get("images")
    if meta.get("images_id") is not None:
        if meta["images_id"] != images_id(ours):
            count = f"{theirs} images, " if isinstance(theirs, int) else ""
            wrong.append(f"training images: {count}id {meta['images_id']} (needs {len(ours)} images, id "
                         f"{images_id(ours)}: this run's method and setting select other step-0 images)")
    elif isinstance(theirs, int) and theirs != len(ours):
        wrong.append(f"training images: {theirs} (needs {len(ours)}: this run's method and setting select other "
                     "step-0 images)")
    return wrong


def iterations(run, step: int, images: int | None, batch: int, train_cfg=None) -> int | None:
    """Iterations of `step` (train.step_iterations) under the run's training settings (or `train_cfg`): None when
    they depend on an unknown number of images."""
    train_cfg = run.train_cfg if train_cfg is None else train_cfg
    if train_cfg.iters_per_class is None and images is None:
        return None
    batches = 0 if images is None else batches_per_epoch(images, batch)
    return step_iterations(train_cfg, run.context(step, None), batches)


def plan_steps(run, train_classes: dict | None, val_classes: dict | None,
               val_count: int | None = None, restarts: bool = False) -> list[dict]:
    """The plan of every step up to the run's last (see the module docstring). `train_classes`, `val_classes`:
    the classes of every image of the splits (None: not known; then `val_count`, the validation split's size, is
    a step's eval_images). `restarts`: the run directory will be moved aside (every step trains afresh)."""
    stream = run.method.stream(run)
    return [step_plan(run, stream, step, train_classes, val_classes, val_count, restarts)
            for step in range(run.last_step + 1)]


def step_plan(run, stream, step: int, train_classes: dict | None, val_classes: dict | None,
              val_count: int | None, restarts: bool) -> dict:
    """One step's plan; a step already trained (or to be adopted) shows the facts its run recorded."""
    t = run.train_cfg
    state = step_work(run, step, restarts)
    n_current, n_extra = stream.split(step, t.batch_size)
    images = None if train_classes is None else len(run.train_ids(train_classes, step))
    plan = {"step": step, "classes": [run.class_names[c] for c in run.task[step]], "state": state, "images": images,
            "batch": [n_current, n_extra], "iterations": iterations(run, step, images, n_current),
            "lr": step_lr(t, step),
            "eval_images": len(run.eval_ids(val_classes, step)) if val_classes is not None else val_count}
    plan.update(stream.facts(step))
    extra = run.method.extra_model(run, step)
    if extra is not None:
        batch = extra.train_cfg.batch_size  # over the step's own images
        plan["extra_training"] = {"what": extra.what, "batch": batch, "lr": step_lr(extra.train_cfg, step),
                                  "iterations": iterations(run, step, images, batch, extra.train_cfg)}
    recorded = None
    if state == "adopt step0":  # what the shared run executed, not what this run's method would train
        recorded = executed_facts(Path(str(run.cfg.step0)) / "steps" / "0" / "plan.json")
    elif not WORK[state][0]:  # trained already: what it executed
        recorded = executed_facts(run.step_dir(step) / "plan.json")
    return plan if recorded is None else {**plan, **recorded, "state": state}
