"""The baselines a reviewer asks for beside MiB and RECALL: PLOP, and replay from a memory of stored exemplars
(SSUL-M's class-balanced memory) under MiB and under RECALL, over seeds, each seed owning its chain, paired.

    python benchmarks/baselines.py [--seeds 0 1 2] [--protocols 15-1x5 10-1x10] [--jobs 2]
                                   [--out docs/baselines.json] [--work DIR] [--data DIR] [--pretrain-threads N]

Per seed, in benchmarks/dose_response.py's layout (a shared --work reuses its pretraining, step-0 models and its
MiB, RECALL (toy GAN at the study's look-alike, render shift 1) and RECALL-web runs, all at the study's toy budget),
the runs added here from the same step-0 models and schedule:

* `plop`: PLOP with the authors' defaults (conf/method/plop.yaml);
* `mib_memory`: MiB with `replay=memory` (stored exemplars, `replay.memory_size` images in all, half of every batch:
  SSUL's memory, as the "-M" variants of the later papers);
* `recall_memory`: RECALL with the memory in place of its pool (real images with their stored masks: no label
  evaluation, no helpers): the real-image bound of generated replay.

The memory breaks "a step never reads an earlier step's image" on purpose (those runs are marked stored data). The
JSON holds every seed's numbers, mean ± sample std per cell and paired verdicts (the study's rule: every seed agrees
in sign and |mean difference| > the differences' sample std) of each against MiB and against RECALL; docs/results.md
quotes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import regime
from dose_response import METRICS, prepare, run, toy_gan, web
from regime import add_chain_options, paired, use_chain_options
from tqdm import tqdm

from recall.study_report import mean_std

PROTOCOLS = ("15-1x5", "10-1x10")
ADDED = {"plop": "PLOP", "mib_memory": "MiB + memory (stored data)", "recall_memory": "RECALL + memory (stored data)"}
# dose_response.py's runs of the same chains (their run-directory names): the references
REFERENCES = {"mib": "MiB", "recall_shift1.0": "RECALL, toy GAN", "web": "RECALL, web"}
COMPARED_WITH = ("mib", "recall_shift1.0")


def overrides(seed: int, name: str, work: Path) -> list[str]:
    return {"plop": ["method=plop"], "mib": ["method=mib"], "mib_memory": ["method=mib", "replay=memory"],
            "recall_memory": ["method=recall", "replay=memory"],
            "recall_shift1.0": ["method=recall", *toy_gan(seed, work, 1.0)],
            "web": ["method=recall", *web(seed, work)]}[name]


def summary(records: dict, seeds: list[int], protocols: list[str], added: dict = ADDED, references: dict = REFERENCES,
            compared_with: tuple = COMPARED_WITH) -> dict:
    """Mean ± sample std per cell of `added` and `references`, and paired verdicts of each added run against each of
    `compared_with`."""
    names = {**references, **added}
    cells, contrasts, rows = {}, {}, []
    for protocol in protocols:
        cell = {}
        for name, label in names.items():
            per_seed = [records[protocol][name][str(s)] for s in seeds]
            cell[name] = {k: mean_std([p[k] for p in per_seed]) for k in METRICS}
            rows.append([protocol, label, *(cell[name][k]["text"] for k in METRICS), len(seeds)])
        for name in added:
            for reference in compared_with:
                for metric in METRICS:
                    contrasts.setdefault(protocol, {}).setdefault(f"{name}_vs_{reference}", {})[metric] = paired(
                        name, reference, *([records[protocol][n][str(s)][metric] for s in seeds]
                                           for n in (name, reference)))
        cells[protocol] = cell
    calls = [[protocol, added[name], *(f"{c['verdict']} ({c['difference']['text']})" for c in
                                       (contrasts[protocol][f"{name}_vs_{r}"][m] for r in compared_with
                                        for m in ("old_no_bg", "new", "all")))]
             for protocol in protocols for name in added]
    return {"cells": cells, "contrasts": contrasts,
            "table": {"columns": ["protocol", "method", "old (no bg)", "new", "all", "seeds"], "rows": rows},
            "calls": {"columns": ["protocol", "method", *(f"- {references[r]}, {m}" for r in compared_with
                                                          for m in ("old (no bg)", "new", "all"))],
                      "rows": calls}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chain_options(parser, PROTOCOLS)
    args = parser.parse_args(argv)
    use_chain_options(parser, args)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as threads:
        work = (args.work or Path(tmp)).resolve()
        prepare(threads, args.seeds, args.protocols, work, (1.0, None))
        todo = [(s, p, n) for p in regime.longest_first(args.protocols)
                for s in args.seeds for n in (*ADDED, *REFERENCES)]
        results = list(tqdm(threads.map(lambda job: run(job[0], job[1], job[2], overrides(job[0], job[2], work),
                                                        work), todo),
                            total=len(todo), desc="baseline runs", unit="run"))
    records = regime.by_seed(todo, results)
    report = {"seeds": args.seeds, "protocols": args.protocols, "chain": regime.PRETRAIN, "records": records,
              **summary(records, args.seeds, args.protocols)}
    regime.publish(report, [report["table"], report["calls"]], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
