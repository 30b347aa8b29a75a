"""`recall run --dry-run`: what a run would do, from the configuration and the files on disk.

Nothing is trained, downloaded or written, not even the image-class cache a run keeps in its directory. The plan
lists the dataset (prepared or not, split sizes), every step (classes, training images, iterations, learning
rate, whether a finished checkpoint is reused), what the method reads (e.g. its replay pool), the checkpoints a run would
reuse, and an estimate of the compute from the throughput assumed in the config's `plan` section, so a researcher
can check a run against a paper before paying for it.

The steps are the run's own plan (`recall.step_plan.plan_steps`, the list `recall.experiment.run_steps` executes).
A run records what each step it trains executed, in the same fields (steps/<t>/plan.json, taken from its loaders,
optimizer and loop), and tests/test_plan_matches_run.py checks the two agree for every method. A step 0 adopted
from `step0=`, and a step already trained, show what their run executed.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from recall.config import section
from recall.data.datasets import known
from recall.data.protocol import get_convention
from recall.data.voc import DatasetError, image_classes, read_split, split_file
from recall.errors import UserError
from recall.experiment import ProtocolRun, check_run_dir, config_differences
from recall.step_plan import WORK, executed_facts, plan_steps, step0_meta, step0_mismatch


@dataclass
class PlanConfig:
    """The `plan` config section: what the compute estimate assumes."""

    device: str = "2 CPU cores"  # what the two rates are for
    train_images_per_second: float = 200.0  # training loop (forward + backward) for the model and crop
    eval_images_per_second: float = 600.0  # forward only: evaluation and label evaluation of replay images


STATE_TEXT = {"train": "train", "evaluate": "eval only", "done": "done", "adopt step0": "from step0="}
UNKNOWN_TEXT = {"iterations": "training (images unknown)", "extra_training": "the method's extra training (images unknown)",
                "eval_images": "evaluation (validation images unknown)"}
SHOW_CLASSES = 20  # a longer class list is shortened in the text (the JSON lists all)
# The step table: (title, format spec, cell of a step); the optional columns show only when a step has a value.
STEP_COLUMNS = [
    ("step", ">4", lambda s: str(s["step"])),
    ("  state", "<13", lambda s: "  " + STATE_TEXT[s["state"]]),
    ("images", ">8", lambda s: _count(s["images"])),
    ("batch", ">7", lambda s: "+".join(str(b) for b in s["batch"] if b)),
    ("iterations", ">12", lambda s: _count(s["iterations"])),
    ("extra it.", ">12", lambda s: _count(s["extra_training"]["iterations"]) if "extra_training" in s else ""),
    ("extra data", ">12", lambda s: s.get("extra_data", "")),
    ("lr", ">9", lambda s: f"{s['lr']:.0e}"),
    ("eval images", ">13", lambda s: _count(s["eval_images"])),
]
OPTIONAL_COLUMNS = ("extra it.", "extra data")  # the method's: e.g. RECALL's helper decoders, the classes it replays


# ------------------------------------------------------------------------------------------------- pieces

def dataset_status(cfg: DictConfig) -> dict:
    """Whether the dataset is on disk in VOC layout, its split sizes, and how to prepare it if not."""
    d = cfg.dataset
    root = Path(d.root)
    needed = [split_file(root, d.train_split), split_file(root, d.val_split), root / d.image_dir, root / d.mask_dir]
    status = {"name": str(d.name), "root": str(root), "prepared": False,
              "missing": [str(p) for p in needed if not p.exists()], "splits": {}}
    if not status["missing"]:
        try:
            status["splits"] = {split: len(read_split(root, split)) for split in (d.train_split, d.val_split)}
            status["prepared"] = True
        except DatasetError as error:
            status["missing"] = [str(error)]
    if not status["prepared"]:
        dataset = known(str(d.name))  # how to get it onto disk: a registered dataset's command
        status["prepare"] = (dataset.setup if dataset else "put it in VOC layout under {root}").format(root=root)
    return status


def image_index(run: ProtocolRun, split: str) -> dict[str, frozenset[int]]:
    """Classes per image of `split`: from the run's cache when it is valid, else from the masks (nothing written)."""
    cache = run.run_dir / f"image_classes_{split}.json"  # where ProtocolRun.classes_of keeps it
    return image_classes(run.root, read_split(run.root, split), num_classes=run.num_classes,
                         mask_dir=run.cfg.dataset.mask_dir, image_dir=run.cfg.dataset.image_dir, cache=cache,
                         write_cache=False, progress=True)


def step0_status(run: ProtocolRun, train_classes: dict | None) -> dict | None:
    """The shared step-0 run a run would start from (`step0=`), checked as ProtocolRun.adopt_step0 checks it."""
    if not run.cfg.step0:
        return None
    ckpt = Path(run.cfg.step0) / "steps" / "0" / "model.pt"
    status = {"dir": str(run.cfg.step0), "exists": ckpt.is_file(), "mismatch": []}
    if status["exists"]:
        try:
            meta = step0_meta(Path(run.cfg.step0))
        except UserError as error:
            status["mismatch"] = [str(error)]
            return status
        executed = executed_facts(ckpt.with_name("plan.json"))
        status["mismatch"] = step0_mismatch(run, meta, train_classes, executed)
    return status


def run_dir_status(run: ProtocolRun, cfg: DictConfig, last: int) -> dict:
    """An existing run directory: its finished steps, and whether it resumes with this configuration."""
    status = {"path": str(run.run_dir), "exists": run.run_dir.exists(),
              "finished": [t for t in range(last + 1) if (run.step_dir(t) / "model.pt").exists()], "resume": None}
    config = run.run_dir / "steps" / "config.yaml"
    status["restarts"] = False
    if config.is_file():  # read-only: config_differences never moves or writes anything
        policy = cfg.get("on_config_change") or "error"
        try:
            changed = config_differences(config, run, policy)
        except ValueError as error:
            changed, status["resume"] = None, f"REFUSED: {error}"
        if changed == []:
            status["resume"] = "same configuration: it resumes after the last finished step"
        elif changed and policy == "restart":
            status["restarts"] = True
            status["resume"] = (f"RESTARTS: differs in {', '.join(changed)}; on_config_change=restart would move its "
                                f"steps/ to {run.run_dir.parent / '.stale'}/ and train every step afresh")
        elif changed:
            status["resume"] = (f"REFUSED: differs in {', '.join(changed)} (on_config_change=error); resume it with "
                                "the same settings, or pass another run_dir= or on_config_change=restart")
    return status


def hours(train_images: int, eval_images: int, assume: PlanConfig) -> float:
    """Compute time: images trained (forward + backward) and evaluated (forward), at the assumed rates."""
    return (train_images / assume.train_images_per_second + eval_images / assume.eval_images_per_second) / 3600


# ------------------------------------------------------------------------------------------------- the plan

def build_plan(cfg: DictConfig) -> dict:
    """The whole plan as plain data (what `--json` prints)."""
    run = ProtocolRun(cfg)
    check_run_dir(run.run_dir, cfg)  # a run_dir the run would refuse (not a run's, /, a file...) is refused here
    assume = section(cfg.plan, PlanConfig)
    t = run.train_cfg
    last = run.last_step
    data = dataset_status(cfg)
    train_classes = image_index(run, cfg.dataset.train_split) if data["prepared"] else None
    convention = get_convention(cfg.eval.convention)
    val_count = data["splits"].get(cfg.dataset.val_split)
    val_classes = (image_index(run, cfg.dataset.val_split)
                   if data["prepared"] and convention.eval_images != "all" else None)
    run_dir = run_dir_status(run, cfg, last)
    stream = run.method.stream(run)
    steps = plan_steps(run, train_classes, val_classes, val_count, restarts=run_dir["restarts"])
    to_train = [s["step"] for s in steps if s["state"] == "train" and s["step"] >= 1]
    inputs = stream.plan_inputs(last, to_train)
    plan = {
        "run": {"protocol": str(cfg.protocol.name), "setting": run.setting, "method": run.method.name,
                "replay": str(cfg.replay.name), "seed": int(cfg.seed), "convention": convention.name,
                "last_step": last, "steps_in_protocol": len(run.task)},
        "dataset": data,
        "model": {"backbone": run.model_cfg.backbone, "head": run.model_cfg.head,
                  "output_stride": run.model_cfg.output_stride,
                  "frozen_bn": run.model_cfg.frozen_bn, "head_channels": run.model_cfg.head_channels,
                  "aspp_rates": list(run.model_cfg.aspp_rates), "pretrained_file": run.model_cfg.pretrained_file},
        "train": {"batch_size": t.batch_size, "current_per_batch": stream.split(1, t.batch_size)[0],
                  "extra_per_batch": stream.split(1, t.batch_size)[1],
                  "crop": t.crop, "scale": list(t.scale), "momentum": t.momentum, "weight_decay": t.weight_decay,
                  "poly_power": t.poly_power, "lr": t.lr, "lr_incremental": t.lr_incremental, "lr_end": t.lr_end,
                  "iters_per_class": t.iters_per_class, "epochs": t.epochs, "epochs_incremental": t.epochs_incremental,
                  "eval_batch_size": t.eval_batch_size},
        "steps": steps,
        "method_inputs": inputs,
        "checkpoints": {"step0": step0_status(run, train_classes), "run_dir": run_dir},
    }
    plan["estimate"] = estimate(plan, (inputs or {}).get("eval_images", 0), assume)
    return plan


def estimate(plan: dict, extra_eval: int, assume: PlanConfig) -> dict:
    """Images to train and to evaluate in the steps still to run, and the hours they take at the assumed rates.
    `extra_eval`: images the method runs forward besides evaluation (e.g. RECALL's label evaluation)."""
    train_images, eval_images, unknown = 0, extra_eval, {}
    for s in plan["steps"]:
        trains, evaluates = WORK[s["state"]]
        counts = {}  # key -> (number, images per unit)
        if trains:
            counts["iterations"] = (s["iterations"], sum(s["batch"]))
            if "extra_training" in s:
                counts["extra_training"] = (s["extra_training"]["iterations"], s["extra_training"]["batch"])
        if evaluates:
            counts["eval_images"] = (s["eval_images"], 1)
        for key, (value, per_unit) in counts.items():
            if value is None:
                unknown.setdefault(key, []).append(s["step"])
            elif key == "eval_images":
                eval_images += value
            else:
                train_images += value * per_unit
    not_counted = [f"{UNKNOWN_TEXT[key]} of steps {', '.join(map(str, steps))}" for key, steps in unknown.items()]
    return {"train_images": train_images, "eval_images": eval_images, "method_eval_images": extra_eval,
            "hours": hours(train_images, eval_images, assume), "not_counted": not_counted, "assumptions": asdict(assume)}


# ------------------------------------------------------------------------------------------------- text

def _classes_text(classes: list[str], first_index: int) -> str:
    if len(classes) <= SHOW_CLASSES:
        return f"{len(classes)}: {', '.join(classes)}"
    shown = ", ".join(classes[:4]) + ", ..., " + ", ".join(classes[-2:])
    return f"{len(classes)} (classes {first_index}-{first_index + len(classes) - 1}): {shown}"


def _count(value) -> str:
    return "?" if value is None else f"{value:,}"


def format_plan(plan: dict) -> str:
    r, d, m, t, e = plan["run"], plan["dataset"], plan["model"], plan["train"], plan["estimate"]
    lines = ["recall run --dry-run: the plan of this run; nothing is trained or written.", ""]

    def row(label: str, text: str) -> None:
        wrapped = textwrap.wrap(text, 104, subsequent_indent=" " * 2, break_on_hyphens=False) or [""]
        lines.extend(f"{label if i == 0 else '':<12}{w}" for i, w in enumerate(wrapped))

    row("run", f"{r['protocol']} · {r['setting']} · method {r['method']} · replay {r['replay']} · seed {r['seed']} "
               f"· eval convention {r['convention']}; steps 0..{r['last_step']} of {r['steps_in_protocol']}")
    if d["prepared"]:
        row("dataset", f"{d['name']} at {d['root']}: prepared; " +
            ", ".join(f"{split} {n:,} images" for split, n in d["splits"].items()))
    else:
        row("dataset", f"{d['name']} at {d['root']}: NOT PREPARED (missing: {'; '.join(d['missing'])}); training "
                       "images per step are unknown")
        row("", f"prepare it with: {d['prepare']}")
    head = (f"ASPP head, rates {m['aspp_rates']} x {m['head_channels']} channels, 1x1 classifiers"
            if m["head"] == "aspp" else f"DeepLab-v2 classifiers, rates {m['aspp_rates']}")
    row("model", f"{m['backbone']}, output stride {m['output_stride']}, "
                 f"{'frozen' if m['frozen_bn'] else 'trained'} batch norm, {head}, backbone weights "
                 f"{m['pretrained_file'] or 'none (random init)'}")
    split = (f" ({t['current_per_batch']} current + {t['extra_per_batch']} from the method in incremental steps)"
             if t["extra_per_batch"] else "")
    length = (f"{t['iters_per_class']} iterations per class learnt" if t["iters_per_class"] is not None else
              f"{t['epochs']} epochs at step 0, {t['epochs_incremental']} per incremental step")
    row("training", f"batch {t['batch_size']}{split}, crop {t['crop']}, scale {t['scale'][0]}-{t['scale'][1]} + flip, "
                    f"SGD momentum {t['momentum']}, weight decay {t['weight_decay']:g}, poly {t['poly_power']}, "
                    f"lr {t['lr']:g} at step 0 and {t['lr_incremental']:g} later (each decays to {t['lr_end']:g} within its step); "
                    f"{length}")
    row("evaluation", f"full images, batch {t['eval_batch_size']}")
    columns = [c for c in STEP_COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(c[2](s) for s in plan["steps"])]
    head = "".join(f"{title:{spec}}" for title, spec, _ in columns) + "  classes learnt"
    lines += ["", head]
    first = 1
    for s in plan["steps"]:
        cells = "".join(f"{value(s):{spec}}" for _, spec, value in columns) + "  "
        for i, w in enumerate(textwrap.wrap(_classes_text(s["classes"], first), 118 - len(cells),
                                            break_on_hyphens=False)):
            lines.append((cells if i == 0 else " " * len(cells)) + w)
        first += len(s["classes"])
    lines.append("")
    inputs = plan["method_inputs"]
    if inputs is None:
        row("method", f"{r['method']}: reads nothing besides the dataset")
    for label, text in (inputs or {}).get("lines", []):
        row(label, text)
    _checkpoint_lines(plan["checkpoints"], row)
    a = e["assumptions"]
    if e["not_counted"] and not e["train_images"]:
        row("estimate", f"unknown until the dataset is prepared (rates assumed: {a['train_images_per_second']:g} "
                        f"training and {a['eval_images_per_second']:g} evaluated images/s on {a['device']})")
        return "\n".join(lines)
    bound = "at least " if e["not_counted"] else ""
    duration = f"{e['hours']:.1f} h" if e["hours"] >= 0.1 else f"{e['hours'] * 60:.1f} min"
    labelled = (f" (incl. {e['method_eval_images']:,} images the method runs forward, e.g. replay images to label)"
                if e["method_eval_images"] else "")
    row("estimate", f"{bound}{duration} on {a['device']}: {e['train_images']:,} training images (iterations x "
                    f"batch) at {a['train_images_per_second']:g} images/s + {e['eval_images']:,} evaluated images"
                    f"{labelled} at {a['eval_images_per_second']:g} images/s. The rates are plan.* in the config: "
                    "measure yours with `python benchmarks/gpu_throughput.py`.")
    if e["not_counted"]:
        row("", "not counted: " + "; ".join(e["not_counted"]))
    return "\n".join(lines)


def _checkpoint_lines(checkpoints: dict, row) -> None:
    s0 = checkpoints["step0"]
    if s0 is None:
        row("checkpoints", "step0: none given (step 0 is trained by this run unless its run_dir has it)")
    elif not s0["exists"]:
        row("checkpoints", f"step0={s0['dir']}: MISSING {s0['dir']}/steps/0/model.pt (train it first: "
                           "recall run last_step=0 run_dir=... with the same protocol, setting and seed)")
    elif s0["mismatch"]:
        row("checkpoints", f"step0={s0['dir']}: DOES NOT FIT this run ({'; '.join(s0['mismatch'])})")
    else:
        row("checkpoints", f"step0={s0['dir']}: found and fits; step 0 is copied, not trained")
    rd = checkpoints["run_dir"]
    if not rd["exists"]:
        row("", f"run_dir {rd['path']}: new (a fresh run)")
    else:
        done = ", ".join(map(str, rd["finished"])) or "none"
        row("", f"run_dir {rd['path']}: exists; finished steps: {done}" + (f"; {rd['resume']}" if rd["resume"] else ""))


def print_plan(cfg: DictConfig, as_json: bool = False) -> int:
    """`recall run --dry-run [--json]`."""
    plan = build_plan(cfg)
    print(json.dumps(plan, indent=1) if as_json else format_plan(plan))
    return 0
