"""Diffusion replay on the toy world: RECALL replaying the diffusion stand-in (prompted by the class names, no class
map) beside RECALL with the toy GAN (through its class map) and with the web, and MiB, over seeds, paired.

    python benchmarks/diffusion_replay.py [--seeds 0 1 2] [--protocols 15-1x5 10-1x10] [--jobs 2]
                                          [--out docs/diffusion_replay.json] [--work DIR] [--data DIR]
                                          [--pretrain-threads N]

Per seed, in benchmarks/dose_response.py's layout (a shared --work reuses its pretraining, step-0 models, toy-GAN
and web pools and their RECALL and MiB runs, all at the study's toy budget), the seed's diffusion stand-in pool
(conf/replay/toy_diffusion.yaml, `replay.source.seed=<seed>`) and RECALL replaying it from the same step-0 models
and schedule. Next to each run's mIoU, its replay labels against the generator's true masks (the simulation's
truth): the IoU of label evaluation on the step-0 classes' images and the share it leaves empty. The JSON holds
every seed's numbers, mean ± sample std per cell, and paired verdicts (the study's rule: every seed agrees in sign
and |mean difference| > the differences' sample std) of diffusion against the toy GAN, the web and MiB;
docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import baselines
import regime
from dose_response import prepare, run, stage
from regime import add_chain_options, use_chain_options
from tqdm import tqdm

from recall.study_report import mean_std

PROTOCOLS = ("15-1x5", "10-1x10")
ADDED = {"toy_diffusion": "RECALL, diffusion stand-in"}
REFERENCES = {"recall_shift1.0": "RECALL, toy GAN", "web": "RECALL, web", "mib": "MiB"}
COMPARED_WITH = ("recall_shift1.0", "web", "mib")
LABELS = ("iou_step0_classes", "empty_step0_classes")
REPLAYED = ("toy_diffusion", "recall_shift1.0", "web")


def toy_diffusion(seed: int, work: Path) -> list[str]:
    """The overrides of the seed's diffusion stand-in: its own generator seed, its own pool."""
    return ["replay=toy_diffusion", f"replay.source.seed={seed}",
            f"replay.pool={work / f's{seed}' / 'pools' / 'toy_diffusion'}"]


def diffusion_pool(seed: int, work: Path) -> None:
    if not (work / f"s{seed}" / "pools" / "toy_diffusion").is_dir():
        stage("recall.stages.pool", *toy_diffusion(seed, work))


def overrides(seed: int, name: str, work: Path) -> list[str]:
    if name == "toy_diffusion":
        return ["method=recall", *toy_diffusion(seed, work)]
    return baselines.overrides(seed, name, work)


def labels(records: dict, seeds: list[int], protocols: list[str]) -> dict:
    """Per protocol and replayed source, the replay labels' quality (mean ± sample std over seeds), and its table."""
    cells = {protocol: {name: {k: mean_std([records[protocol][name][str(s)][k] for s in seeds]) for k in LABELS}
                        for name in REPLAYED} for protocol in protocols}
    names = {**ADDED, **REFERENCES}
    rows = [[protocol, names[name], *(cells[protocol][name][k]["text"] for k in LABELS)]
            for protocol in protocols for name in REPLAYED]
    return {"cells": cells, "table": {"columns": ["protocol", "replay", "label IoU (step-0 classes)",
                                                  "labelled empty"], "rows": rows}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chain_options(parser, PROTOCOLS)
    args = parser.parse_args(argv)
    use_chain_options(parser, args)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as threads:
        work = (args.work or Path(tmp)).resolve()
        prepare(threads, args.seeds, args.protocols, work, (1.0, None), lambda seed: diffusion_pool(seed, work))
        todo = [(s, p, n) for p in regime.longest_first(args.protocols)
                for s in args.seeds for n in (*ADDED, *REFERENCES)]
        results = list(tqdm(threads.map(lambda job: run(job[0], job[1], job[2], overrides(job[0], job[2], work),
                                                        work), todo),
                            total=len(todo), desc="diffusion runs", unit="run"))
    records = regime.by_seed(todo, results)
    report = {"seeds": args.seeds, "protocols": args.protocols, "chain": regime.PRETRAIN, "records": records,
              **baselines.summary(records, args.seeds, args.protocols, ADDED, REFERENCES, COMPARED_WITH),
              "labels": labels(records, args.seeds, args.protocols)}
    regime.publish(report, [report["table"], report["calls"], report["labels"]["table"]], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
