"""Does RECALL+'s selection of web images help RECALL-web? `recall select` on each seed's web pool, scored against the
Flickr stand-in's truth (which photos are tag noise), and RECALL replaying the selected pool against the whole one,
over seeds, paired.

    python benchmarks/web_selection.py [--seeds 0 1 2] [--protocols 15-1x5 10-1x10] [--jobs 2]
                                       [--out docs/web_selection.json] [--work DIR] [--data DIR]
                                       [--pretrain-threads N]

Per seed, in benchmarks/dose_response.py's layout (a shared --work reuses its pretraining, step-0 models, web pools,
RECALL-web and MiB runs): for each protocol, two selections of the seed's web pool by that protocol's step-0 model,
set before any run was looked at and never tuned on the mIoU:

* `selected`: RECALL+'s two tests, the defaults of `select.*` (conf/config.yaml): the domain discriminator and the
  per-class content thresholds;
* `content_only`: the content test alone (`select.domain_test=false`).

Each selection's drops are scored against the truth (precision and recall at removing the tag-noise photos, the share
of good photos dropped), and RECALL replays it (`replay.pool=` the selection; everything else as the seed's
RECALL-web run). The JSON holds every seed's numbers, mean ± sample std per cell, and paired verdicts (the study's
rule) of each selection against RECALL-web on the whole pool and against MiB; docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import regime
from dose_response import METRICS, prepare, run, web
from regime import add_chain_options, paired, pretrained, step0_model, use_chain_options
from tqdm import tqdm

from recall.study_report import mean_std

PROTOCOLS = ("15-1x5", "10-1x10")
SELECTIONS = {"selected": [], "content_only": ["select.domain_test=false"]}
LABELS = {"selected": "RECALL+ selection (domain + content)", "content_only": "content test only",
          "web": "whole pool (RECALL-web)", "mib": "MiB"}
TRUTH = ("precision", "recall", "good_dropped")
LABEL_METRICS = ("iou_step0_classes", "empty_step0_classes", "empty_later_classes")


def selected_pool(seed: int, protocol: str, name: str, work: Path) -> Path:
    return work / f"s{seed}" / "pools" / f"web_{name}_{protocol}"


def select(seed: int, protocol: str, name: str, work: Path) -> dict:
    """The seed's web pool selected by the protocol's step-0 model (made once); returns its summary."""
    target = selected_pool(seed, protocol, name, work)
    metrics = target.with_suffix(".json")
    made_with = target.with_suffix(".overrides.json")  # what made the selection: another variant makes it again
    if metrics.is_file() and (not made_with.is_file() or json.loads(made_with.read_text()) != SELECTIONS[name]):
        shutil.rmtree(target, ignore_errors=True)
        metrics.unlink()
        shutil.rmtree(work / f"s{seed}" / f"{name}_{protocol}_toy_budget", ignore_errors=True)  # its run too
    if not metrics.is_file():
        subprocess.run([sys.executable, "-m", "recall.stages.select", "--params", "params.yaml", regime.STUDY_HEAD,
                        *web(seed, work),
                        f"step0={step0_model(protocol, seed, work)}", f"protocol={protocol}", f"seed={seed}",
                        f"model.pretrained_file={pretrained(seed, work) / 'encoder.pth'}", f"select.pool={target}",
                        f"select.metrics={metrics}", *SELECTIONS[name], f"dataset.root={regime.DATA}",
                        "tracking.uri="], cwd=regime.ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        made_with.write_text(json.dumps(SELECTIONS[name]))
    return json.loads(metrics.read_text())


def overrides(seed: int, protocol: str, name: str, work: Path) -> list[str]:
    """RECALL-web's overrides, with the selection as its pool."""
    if name == "mib":
        return ["method=mib"]
    base = ["method=recall", *web(seed, work)]
    if name == "web":
        return base
    return [o for o in base if not o.startswith("replay.pool=")] + \
        [f"replay.pool={selected_pool(seed, protocol, name, work)}"]


def summary(records: dict, selections: dict, seeds: list[int], protocols: list[str]) -> dict:
    names = [*SELECTIONS, "web", "mib"]
    cells, contrasts, rows, truth_rows = {}, {}, [], []
    for protocol in protocols:
        cell = {}
        for name in names:
            per_seed = [records[protocol][name][str(s)] for s in seeds]
            cell[name] = {k: mean_std([p[k] for p in per_seed]) for k in (*METRICS, *LABEL_METRICS)
                          if all(k in p for p in per_seed)}
            c = cell[name]
            rows.append([protocol, LABELS[name], c["old_no_bg"]["text"], c["new"]["text"], c["all"]["text"],
                         c["iou_step0_classes"]["text"] if "iou_step0_classes" in c else "–", len(seeds)])
        for name in SELECTIONS:
            per_seed = [selections[protocol][name][str(s)] for s in seeds]
            truth = {k: mean_std([p["truth"]["all"][k] for p in per_seed]) for k in TRUTH}
            kept = mean_std([p["kept"] / p["images"] for p in per_seed])
            cell[name]["selection"] = {**truth, "kept_share": kept,
                                       "noise_share": mean_std([p["truth"]["all"]["noise"] / p["images"]
                                                                for p in per_seed])}
            truth_rows.append([protocol, LABELS[name], kept["text"], truth["precision"]["text"],
                               truth["recall"]["text"], truth["good_dropped"]["text"], len(seeds)])
            for reference in ("web", "mib"):
                for metric in METRICS:
                    contrasts.setdefault(protocol, {}).setdefault(f"{name}_vs_{reference}", {})[metric] = paired(
                        name, reference, *([records[protocol][n][str(s)][metric] for s in seeds]
                                           for n in (name, reference)))
        cells[protocol] = cell
    calls = [[protocol, LABELS[name], *(f"{c['verdict']} ({c['difference']['text']})" for c in
                                        (contrasts[protocol][f"{name}_vs_{r}"][m] for r in ("web", "mib")
                                         for m in METRICS))]
             for protocol in protocols for name in SELECTIONS]
    return {"cells": cells, "contrasts": contrasts,
            "table": {"columns": ["protocol", "RECALL's web replay", "old (no bg)", "new", "all",
                                  "label IoU, step-0 classes", "seeds"], "rows": rows},
            "truth_table": {"columns": ["protocol", "selection", "images kept", "precision of the drops (tag noise)",
                                        "recall of the tag noise", "good photos dropped", "seeds"],
                            "rows": truth_rows},
            "calls": {"columns": ["protocol", "selection", *(f"- {LABELS[r]}, {m.replace('_no_bg', ' (no bg)')}"
                                                              for r in ("web", "mib") for m in METRICS)],
                      "rows": calls}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chain_options(parser, PROTOCOLS)
    args = parser.parse_args(argv)
    use_chain_options(parser, args)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as threads:
        work = (args.work or Path(tmp)).resolve()
        pairs = prepare(threads, args.seeds, args.protocols, work, (None,))  # each seed's web pool
        picks = [(s, p, n) for s, p in pairs for n in SELECTIONS]
        chosen = list(threads.map(lambda job: select(*job, work), picks))
        todo = [(s, p, n) for p in regime.longest_first(args.protocols)
                for s in args.seeds for n in (*SELECTIONS, "web", "mib")]
        results = list(tqdm(threads.map(lambda job: run(job[0], job[1], job[2], overrides(*job, work), work), todo),
                            total=len(todo), desc="web selection runs", unit="run"))
    records = regime.by_seed(todo, results)
    selections = regime.by_seed(picks, [{k: chosen_summary[k] for k in ("images", "kept", "reasons", "truth",
                                                                         "domain_threshold")}
                                        for chosen_summary in chosen])
    report = {"seeds": args.seeds, "protocols": args.protocols, "chain": regime.PRETRAIN,
              "select_defaults": {n: o for n, o in SELECTIONS.items()}, "records": records,
              "selections": selections, **summary(records, selections, args.seeds, args.protocols)}
    regime.publish(report, [report["truth_table"], report["table"], report["calls"]], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
