"""Does MiB forget here as it does on Pascal VOC? Its retained share of the old classes at the toy budget and at the
papers' proportions, over seeds, each seed owning its pretraining and step-0 models.

    python benchmarks/regime.py [--seeds 0 1 2] [--methods mib plop] [--jobs 2] [--out docs/regime.json]
                                [--work DIR] [--data DIR] [--protocols P ...] [--pretrain-threads N]
                                [--update]

The papers' proportions, set by mechanism (never by which method wins): every incremental step trains as many
iterations per class learnt as step 0 did (RECALL's gin files give step 0 and every later step the same
`training_steps_per_class`; MiB's and PLOP's scripts train every step the same epochs), at the papers' ratio of the
incremental learning rate to step 0's: 1 in RECALL's gin files (`papers_proportions`), 1/10 in MiB's and PLOP's
scripts (0.01, then 0.001: `mib_proportions`). Here step 0 trains `train.epochs` epochs, so the per-class count is
step 0's iterations (the dry-run's plan) over its classes; the toy budget is the default `train.epochs_incremental`
at `train.lr_incremental`.

Per seed: `recall pretrain` (pretrain.seed), step 0 of 15 and of 10 classes, joint training (the bound the retained
share divides by, scored on each protocol's step-0 classes), and the RUNS below. The JSON holds every seed's
numbers and the mean ± sample std of the shares; docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recall.study_report import mean_std, paired_call

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"15-1x5": 15, "10-1x10": 10}  # protocol -> its step-0 classes
SCHEDULES = ("toy_budget", "papers_proportions", "mib_proportions")
LR_RATIO = {"papers_proportions": 1.0, "mib_proportions": 0.1}  # incremental lr / step 0's
# (method, protocol, schedule): MiB everywhere at the toy budget and at RECALL's proportions; MiB and PLOP at their
# own papers' proportions where the papers' gap is largest (10-1)
RUNS = [*(("mib", p, s) for p in PROTOCOLS for s in ("toy_budget", "papers_proportions")),
        ("mib", "10-1x10", "mib_proportions"), ("plop", "10-1x10", "mib_proportions"),
        *(("joint_frozen", p, "decoder_ceiling") for p in PROTOCOLS)]
# The decoder-only ceiling: from the protocol's step-0 model, the encoder frozen (as RECALL's incremental steps keep
# it), the decoder trained on every image with every label (joint's data) in one step holding all later classes, for
# as long and at the learning rate of step 0. Its mIoU over all classes against joint's is what a method that trains
# the decoder alone can reach at best.
CEILING_PROTOCOL = {"15-1x5": "15-5", "10-1x10": "10-10"}
ALL_RUNS = list(RUNS)  # RUNS: those this invocation trains (--methods)


def present_runs(records: list[dict]) -> list[tuple[str, str, str]]:
    """The RUNS every seed's record holds (after --update, those of earlier invocations too)."""
    return [r for r in ALL_RUNS if all(r[1] in rec["protocols"] and f"{r[0]}/{r[2]}" in rec["protocols"][r[1]]["runs"]
                                       for rec in records)]


def merged_records(old: list[dict], new: list[dict]) -> list[dict]:
    """`new`'s runs added to `old`'s records of the same seeds (--update). The chain must have repeated itself: a
    step-0 model or joint run that scores otherwise than the recorded one (another machine, another code) refuses."""
    by_seed = {r["seed"]: r for r in old}
    for record in new:
        if record["seed"] not in by_seed:
            raise SystemExit(f"--update: seed {record['seed']} is not in the existing results; run it in full")
        kept = by_seed[record["seed"]]
        for protocol, entry in record["protocols"].items():
            if protocol not in kept["protocols"]:  # a protocol the existing results did not run: added whole
                kept["protocols"][protocol] = entry
                continue
            before = kept["protocols"][protocol]
            for key in ("step0_old_no_bg", "joint_old_no_bg"):
                if before[key] != entry[key]:
                    raise SystemExit(f"--update: seed {record['seed']} {protocol} {key} is {entry[key]} here, "
                                     f"{before[key]} in the existing results: the chain did not repeat itself "
                                     "(another machine or code); run every method again without --update")
            before["joint_all"] = entry["joint_all"]
            before["runs"].update(entry["runs"])
    return [by_seed[s] for s in sorted(by_seed)]


DATA = ROOT / "data" / "toy"  # the toy world (`dvc repro toyworld`); --data another copy of it
# the head of every run here and in the benchmarks built on these chains, as the study's (its spec pins it too): the
# toy ASPP, which these measurements were made with; a run's own model.head= comes after it and wins
# (head_factorial.py's DeepLab-v2 cells)
STUDY_HEAD = "model.head=aspp"


def recall_run(*overrides: str, capture: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", "recall.stages.run", "--params", "params.yaml", STUDY_HEAD, *overrides,
                           f"dataset.root={DATA}", "tracking.uri=", "train.threads=1"], cwd=ROOT, check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return done.stdout


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["final"]


def per_class_iterations(protocol: str, encoder: Path) -> int:
    """Step 0's iterations over its classes, as the dry-run plans them (what a step-0 run trains)."""
    plan = json.loads(recall_run("--dry-run", "--json", f"protocol={protocol}", "method=mib",
                                 f"model.pretrained_file={encoder}", capture=True))
    step0 = plan["steps"][0]
    return round(step0["iterations"] / len(step0["classes"]))


PRETRAIN: list[str] = []  # overrides of every seed's pretraining (none: the study's main chain)


def pretrained(seed: int, work: Path) -> Path:
    """The seed's pretraining (`recall pretrain`, pretrain.seed, PRETRAIN) in `work/s<seed>/pretrain`, made once:
    without PRETRAIN, as the study's main chain of that seed (its default thread count)."""
    out = work / f"s{seed}" / "pretrain"
    if not (out / "encoder.pth").is_file():
        subprocess.run([sys.executable, "-m", "recall.stages.pretrain", str(out), "--params", "params.yaml",
                        f"pretrain.seed={seed}", *PRETRAIN, "tracking.uri="], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def step0_model(protocol: str, seed: int, work: Path, variant: str = "", overrides: tuple[str, ...] = ()) -> Path:
    """The seed's step-0 model of `protocol` in `work/s<seed>/step0_<protocol>`, made once; a `variant` (its
    `overrides` of the run, e.g. another head) in `step0_<protocol>_<variant>`."""
    step0 = work / f"s{seed}" / "_".join(filter(None, ("step0", protocol, variant)))
    if not (step0 / "metrics.json").is_file():
        recall_run(f"protocol={protocol}", "method=ft", "last_step=0", f"run_dir={step0}", f"seed={seed}",
                   f"model.pretrained_file={pretrained(seed, work) / 'encoder.pth'}", *overrides)
    return step0


def one_seed(seed: int, work: Path) -> dict:
    out = work / f"s{seed}"
    encoder = pretrained(seed, work) / "encoder.pth"
    common = [f"seed={seed}", f"model.pretrained_file={encoder}"]
    joint_dir = out / "joint"
    if not (joint_dir / "metrics.json").is_file():
        recall_run("protocol=joint", "method=joint", f"run_dir={joint_dir}", *common)
    joint_iou = final(joint_dir)["iou"]
    train = json.loads(recall_run("--dry-run", "--json", "protocol=15-5", *common, capture=True))["train"]
    lr = float(train["lr"])
    record = {"seed": seed, "lr": lr, "protocols": {}}
    for protocol in PROTOCOLS:
        step0 = step0_model(protocol, seed, work)
        per_class = per_class_iterations(protocol, encoder)
        old_classes = final(step0)["old_classes"]
        joint_old = statistics.fmean(joint_iou[c] for c in old_classes)
        entry = {"iters_per_class": per_class, "step0_old_no_bg": final(step0)["miou"]["old_no_bg"],
                 "joint_old_no_bg": joint_old, "joint_all": final(joint_dir)["miou"]["all"], "runs": {}}
        for method, _, schedule in (r for r in RUNS if r[1] == protocol):
            run_protocol, run_method = protocol, [f"method={method}"]
            if schedule == "toy_budget":
                extra = []
            elif schedule == "decoder_ceiling":
                run_protocol, run_method = CEILING_PROTOCOL[protocol], ["method=joint", "method.freeze_encoder=true"]
                extra = [f"train.epochs_incremental={train['epochs']}", f"train.lr_incremental={lr}"]
            else:
                extra = [f"train.iters_per_class={per_class}", f"train.lr_incremental={lr * LR_RATIO[schedule]}"]
            name = f"{method}_{protocol}_{schedule}"
            run_dir = out / name
            if not (run_dir / "metrics.json").is_file():
                recall_run(f"protocol={run_protocol}", *run_method, f"step0={step0}", f"run_dir={run_dir}",
                           *common, *extra)
            miou = final(run_dir)["miou"]
            entry["runs"][f"{method}/{schedule}"] = {
                "old_no_bg": miou["old_no_bg"], "new": miou["new"], "all": miou["all"],
                "share_of_joint": miou["old_no_bg"] / joint_old,
                "share_of_step0": miou["old_no_bg"] / entry["step0_old_no_bg"],
                "all_share_of_joint": miou["all"] / entry["joint_all"]}
        record["protocols"][protocol] = entry
    print(f"seed {seed}: " + "; ".join(f"{p} {run}: {r['share_of_step0']:.3f} of step 0" for p, e in
                                        record["protocols"].items() for run, r in e["runs"].items()), flush=True)
    return record


def summary(records: list[dict]) -> dict:
    """Mean ± sample std over seeds of each protocol × method × schedule, and a table for the docs."""
    out: dict = {}
    rows = []
    for protocol in PROTOCOLS:
        entries = [r["protocols"][protocol] for r in records]
        counts = [e["iters_per_class"] for e in entries]  # the same for every seed (its images and epochs)
        cell = {"iters_per_class": counts[0] if len(set(counts)) == 1 else counts,
                "step0_old_no_bg": mean_std([e["step0_old_no_bg"] for e in entries]),
                "joint_old_no_bg": mean_std([e["joint_old_no_bg"] for e in entries])}
        for method, _, schedule in (r for r in present_runs(records) if r[1] == protocol):
            key = f"{method}/{schedule}"
            values = {k: mean_std([e["runs"][key][k] for e in entries])
                      for k in ("old_no_bg", "new", "all", "share_of_joint", "share_of_step0", "all_share_of_joint")
                      if all(k in e["runs"][key] for e in entries)}
            cell.setdefault(method, {})[schedule] = values
            rows.append([protocol, method, schedule, values["old_no_bg"]["text"], values["new"]["text"],
                         values["share_of_step0"]["text"], values["share_of_joint"]["text"],
                         values["all_share_of_joint"]["text"] if "all_share_of_joint" in values else "–",
                         len(entries)])
        out[protocol] = cell
    return {"cells": out, "contrasts": contrasts(records),
            "table": {"columns": ["protocol", "method", "schedule", "old (no bg)", "new", "kept of step 0",
                                  "kept of joint", "all of joint's all", "seeds"], "rows": rows}}


def contrasts(records: list[dict]) -> dict:
    """PLOP against MiB where both ran at PLOP's paper's proportions, paired by seed, with the study's rule
    (recall.study_report.verdict: every seed agrees in sign and the mean difference exceeds its sample std)."""
    out = {}
    present = present_runs(records)
    for method, protocol, schedule in present:
        if method == "mib" or ("mib", protocol, schedule) not in present:
            continue
        pair = f"{method}_vs_mib"
        for metric in ("old_no_bg", "new", "all"):
            runs = [r["protocols"][protocol]["runs"] for r in records]
            out.setdefault(protocol, {}).setdefault(pair, {})[metric] = paired(
                method, "mib", [r[f"{method}/{schedule}"][metric] for r in runs],
                [r[f"mib/{schedule}"][metric] for r in runs])
    return out


paired = paired_call  # the study's call on paired per-seed differences; every benchmark here compares runs so


def longest_first(protocols) -> list[str]:
    """The protocols with the most steps first (their runs are the longest: started first, none is left alone)."""
    return sorted(protocols, key=lambda p: -int(p.split("x")[-1]) if "x" in p else 0)


def by_seed(jobs: list[tuple], results: list) -> dict:
    """Each job's result, the job being (seed, *keys), at records[key][...][str(seed)]."""
    records: dict = {}
    for (seed, *keys), result in zip(jobs, results, strict=True):
        node = records
        for key in keys:
            node = node.setdefault(key, {})
        node[str(seed)] = result
    return records


def publish(report: dict, tables: list[dict], out: Path | None) -> None:
    """Print the rows of `tables` (each {"columns", "rows"}), and write `report` as JSON to `out` if given."""
    for table in tables:
        for row in table["rows"]:
            print(" | ".join(str(v) for v in row))
    if out:
        out.write_text(json.dumps(report, indent=1) + "\n")


def add_chain_options(parser: argparse.ArgumentParser, protocols) -> None:
    """The options every benchmark of the seeds' chains takes: seeds, protocols, parallel jobs, the JSON out, where
    the runs live, the toy world and the pretraining's threads (which chain)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--protocols", nargs="+", default=list(protocols))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--data", type=Path, default=DATA, help="the toy world (default: data/toy)")
    parser.add_argument("--pretrain-threads", type=int, help="each seed's pretraining on this many threads (default: "
                        "params.yaml's, the study's main chain; 1: its float_order chain, which two seeds can share "
                        "two cores with)")


def use_chain_options(parser: argparse.ArgumentParser, args, paired_seeds: bool = True) -> None:
    """Check `add_chain_options`' values and point the runs at them (the toy world, the pretraining's chain);
    `paired_seeds`: the benchmark calls verdicts, which need two seeds at least."""
    global DATA
    if paired_seeds and len(args.seeds) < 2:
        parser.error("--seeds: the verdicts need at least two seeds")
    DATA = args.data.resolve()
    PRETRAIN[:] = [f"pretrain.threads={args.pretrain_threads}"] if args.pretrain_threads else []
    if not (DATA / "JPEGImages").is_dir():
        parser.error(f"--data {DATA}: no toy world there; make it with `dvc repro toyworld`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chain_options(parser, PROTOCOLS)
    parser.add_argument("--methods", nargs="+", default=sorted({m for m, _, _ in RUNS}), help="RUNS of these only")
    parser.add_argument("--update", action="store_true",
                        help="add these methods' runs to the results already in --out (same seeds, same chain)")
    args = parser.parse_args(argv)
    if args.update and not (args.out and args.out.is_file()):
        parser.error("--update needs --out naming existing results")
    if args.update and args.protocols != list(PROTOCOLS):
        parser.error("--update: run every protocol (--protocols narrows a first measurement only)")
    if set(args.protocols) - set(PROTOCOLS):
        parser.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    RUNS[:] = [r for r in RUNS if r[0] in args.methods and r[1] in args.protocols]
    for protocol in set(PROTOCOLS) - set(args.protocols):
        del PROTOCOLS[protocol]
    use_chain_options(parser, args, paired_seeds=False)
    old = json.loads(args.out.read_text()) if args.update else None
    if old is not None and old.get("chain", []) != PRETRAIN:
        parser.error(f"--update: {args.out} was measured on another chain (pretraining overrides "
                     f"{old.get('chain', [])}, here {PRETRAIN})")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        work = (args.work or Path(tmp)).resolve()
        records = list(pool.map(lambda seed: one_seed(seed, work), args.seeds))
    methods = args.methods
    if old is not None:
        records = merged_records(old["records"], records)
        methods = sorted(set(old["methods"]) | set(methods))
    report = {"seeds": [r["seed"] for r in records], "methods": methods, "chain": PRETRAIN, "records": records,
              **summary(records)}
    publish(report, [report["table"]], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
