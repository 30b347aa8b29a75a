"""The authors' head beside the toy head, as a 2x2 inside one world: RECALL (toy GAN) and MiB, each with the toy
model's ASPP head and with DeepLab-v2's classifier (`model.head=deeplabv2`: four dilated 3x3 convolutions on the
encoder's features, summed, as the authors' model_resnet.py), over seeds, paired.

    python benchmarks/head_factorial.py [--seeds 0 1 2] [--protocols 15-1x5 10-1x10] [--jobs 2]
                                        [--out docs/head_factorial.json] [--work DIR] [--data DIR]
                                        [--pretrain-threads N]
    python benchmarks/head_factorial.py --summarise docs/head_factorial.json   # the tables again, no runs

Per seed, in benchmarks/dose_response.py's layout (a shared --work reuses its pretraining, toy-GAN pools, step-0
models and its MiB and RECALL runs: the ASPP cells), a step 0 with the DeepLab-v2 head (`step0_<protocol>_deeplabv2`,
the same pretrained encoder, schedule and seed) and MiB and RECALL from it. Each head's gain (DeepLab-v2 - ASPP, per
seed) for each method, on its old/new/all and on the share of its step 0's old classes it keeps (`retained`: the
head's effect on forgetting), the interaction (RECALL's gain - MiB's gain, per seed), and RECALL - MiB within each
head: mean ± sample std and the study's verdict (every seed agrees in sign and |mean| > the sample std). The step-0
models' own mIoU is reported too, as are RECALL's replay labels under each head (`labels`): a head that learns step
0 worse changes everything after it. docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import baselines
import regime
from dose_response import METRICS, prepare, run, scored
from regime import add_chain_options, paired, pretrained, recall_run, step0_model, use_chain_options
from tqdm import tqdm

from recall.study_report import mean_std

PROTOCOLS = ("15-1x5", "10-1x10")
HEADS = {"aspp": "ASPP (the toy head)", "deeplabv2": "DeepLab-v2 (the authors')"}
METHODS = {"mib": "MiB", "recall_shift1.0": "RECALL, toy GAN"}
HEAD = ["model.head=deeplabv2"]
LABELS = ("iou_step0_classes", "empty_step0_classes", "iou_later_classes", "empty_later_classes")


def head_step0(protocol: str, seed: int, work: Path) -> Path:
    """The seed's step-0 model of `protocol` with DeepLab-v2's head, made once."""
    return step0_model(protocol, seed, work, "deeplabv2", tuple(HEAD))


def head_run(seed: int, protocol: str, head: str, name: str, work: Path) -> dict:
    """A method's run with `head`: ASPP's is dose_response.py's run of the same name; DeepLab-v2's starts from
    the DeepLab-v2 step 0."""
    if head == "aspp":
        return run(seed, protocol, name, baselines.overrides(seed, name, work), work)
    run_dir = work / f"s{seed}" / f"{name}_{protocol}_deeplabv2_toy_budget"
    if not (run_dir / "metrics.json").is_file():
        recall_run(f"protocol={protocol}", f"step0={head_step0(protocol, seed, work)}", f"run_dir={run_dir}",
                   f"seed={seed}", f"model.pretrained_file={pretrained(seed, work) / 'encoder.pth'}", *HEAD,
                   *baselines.overrides(seed, name, work))
    return scored(run_dir)


def step0_miou(seed: int, protocol: str, head: str, work: Path) -> float:
    step0 = step0_model(protocol, seed, work) if head == "aspp" else head_step0(protocol, seed, work)
    return regime.final(step0)["miou"]["old_no_bg"]


def summary(records: dict, step0: dict, seeds: list[int], protocols: list[str]) -> dict:
    cells, gains, interactions, within, rows, calls = {}, {}, {}, {}, [], []
    for protocol in protocols:
        r = records[protocol]
        per_seed = lambda head, name, metric: [r[head][name][str(s)][metric] for s in seeds]  # noqa: E731
        cells[protocol] = {head: {name: {m: mean_std(per_seed(head, name, m)) for m in METRICS} for name in METHODS}
                           for head in HEADS}
        cells[protocol]["step0"] = {head: mean_std([step0[protocol][head][str(s)] for s in seeds]) for head in HEADS}
        # the share of its step 0's old-class mIoU a method keeps at the end (per seed: the same step 0)
        kept = lambda head, name: [o / step0[protocol][head][str(s)]  # noqa: E731
                                   for s, o in zip(seeds, per_seed(head, name, METRICS[0]))]
        cells[protocol]["retained"] = {head: {name: mean_std(kept(head, name)) for name in METHODS} for head in HEADS}
        # RECALL's replay labels under each head (the helpers are decoders of that head): their IoU against the toy
        # GAN's true masks and the share of images labelled empty, for the step-0 classes and the later ones
        cells[protocol]["labels"] = {head: {m: mean_std(per_seed(head, "recall_shift1.0", m)) for m in LABELS}
                                     for head in HEADS}
        for head in HEADS:
            rows += [[protocol, HEADS[head], METHODS[name], *(cells[protocol][head][name][m]["text"] for m in METRICS),
                      cells[protocol]["step0"][head]["text"], cells[protocol]["retained"][head][name]["text"],
                      len(seeds)] for name in METHODS]
        gains[protocol] = {name: {m: paired("deeplabv2", "aspp", per_seed("deeplabv2", name, m),
                                            per_seed("aspp", name, m)) for m in METRICS} for name in METHODS}
        for name in METHODS:  # the head's effect on forgetting: the kept share, paired per seed
            gains[protocol][name]["retained"] = paired("deeplabv2", "aspp", kept("deeplabv2", name), kept("aspp", name))
        gain = lambda name, m: [d - a for d, a in  # noqa: E731
                                zip(per_seed("deeplabv2", name, m), per_seed("aspp", name, m))]
        interactions[protocol] = {m: paired("recall", "mib", gain("recall_shift1.0", m), gain("mib", m))
                                  for m in METRICS}
        within[protocol] = {head: {m: paired("recall_shift1.0", "mib", per_seed(head, "recall_shift1.0", m),
                                             per_seed(head, "mib", m)) for m in METRICS} for head in HEADS}
        calls += [[protocol, f"RECALL, toy GAN - MiB, {HEADS[head]}",
                   *(f"{within[protocol][head][m]['verdict']} ({within[protocol][head][m]['difference']['text']})"
                     for m in METRICS)] for head in HEADS]
        calls += [[protocol, f"DeepLab-v2 - ASPP, {METHODS[name]}",
                   *(f"{gains[protocol][name][m]['verdict']} ({gains[protocol][name][m]['difference']['text']})"
                     for m in METRICS)] for name in METHODS]
        calls.append([protocol, "interaction: RECALL's gain - MiB's gain",
                      *(f"{interactions[protocol][m]['verdict']} ({interactions[protocol][m]['difference']['text']})"
                        for m in METRICS)])
    return {"cells": cells, "gains": gains, "interactions": interactions, "within": within,
            "table": {"columns": ["protocol", "head", "method", "old (no bg)", "new", "all", "step 0 (old, no bg)",
                                  "kept of step 0", "seeds"], "rows": rows},
            "calls": {"columns": ["protocol", "comparison", "old (no bg)", "new", "all"], "rows": calls}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chain_options(parser, PROTOCOLS)
    parser.add_argument("--summarise", type=Path, metavar="JSON",
                        help="no runs: derive the tables again from all the records of an earlier report (its seeds "
                             "and protocols; written back)")
    args = parser.parse_args(argv)
    if args.summarise:
        report = json.loads(args.summarise.read_text())
        report.update(summary(report["records"], report["step0"], report["seeds"], report["protocols"]))
        regime.publish(report, [report["table"], report["calls"]], args.summarise)
        return 0
    use_chain_options(parser, args)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as threads:
        work = (args.work or Path(tmp)).resolve()
        pairs = prepare(threads, args.seeds, args.protocols, work, (1.0,))
        list(threads.map(lambda job: head_step0(job[1], job[0], work), pairs))
        todo = [(s, p, h, n) for p in args.protocols for s in args.seeds for n in METHODS for h in HEADS]
        results = list(tqdm(threads.map(lambda job: head_run(*job, work), todo), total=len(todo),
                            desc="head factorial runs", unit="run"))
        step0 = {p: {h: {str(s): step0_miou(s, p, h, work) for s in args.seeds} for h in HEADS}
                 for p in args.protocols}
    records = regime.by_seed(todo, results)
    report = {"seeds": args.seeds, "protocols": args.protocols, "chain": regime.PRETRAIN, "records": records,
              "step0": step0, **summary(records, step0, args.seeds, args.protocols)}
    regime.publish(report, [report["table"], report["calls"]], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
