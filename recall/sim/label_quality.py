"""Label quality of a study's replay runs: the labels label evaluation wrote, against the toy generator's true masks.

    python -m recall.sim.label_quality --study study/spec.yaml --out docs/results_labels.json

For every run of the study that evaluated labels for toy_gan replay (not the oracle-label runs), per world,
protocol and variant: a table with a row per class, the label IoU with the true object and the share of images
labelled empty, mean ± std over seeds (`recall.sim.oracle.label_quality` per run); and one summary table, a row per
variant: the same two numbers averaged over the step-0 classes (labelled by the step-0 model) and over the classes
learnt later (labelled by the helper decoders). The study's `label_quality` stage writes it; docs/results.md
quotes it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from recall.atomic import write_json
from recall.data.classes import VOC_CLASSES
from recall.report import mean_std
from recall.sim.oracle import generator_of, label_quality
from recall.study import base_of, load


def study_label_quality(study_file: Path, root: Path = Path(".")) -> dict:
    """Label quality of every study run that evaluated labels for toy_gan replay: per world, protocol and variant, a
    table with a row per class (label IoU and share of empty labels, mean ± std over seeds)."""
    from recall.config import compose

    study = load(study_file)
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for key, item in study["runs"].items():
        overrides = item["overrides"].split()
        if "replay=toy_gan" not in overrides or "method.labels=oracle" in overrides:
            continue
        run_dir = root / "study" / "runs" / key
        cfg = compose([*overrides, f"run_dir={run_dir}"], params_file=root / "params.yaml")
        grouped[(item["world"], item["protocol"], item["variant"])].append(
            label_quality(root / str(cfg.replay.pool), run_dir / "steps" / "replay_labels", generator_of(cfg.replay)))
    tables, summary = {}, []
    for (world, protocol, variant), per_seed in grouped.items():
        rows = []
        names = {n for q in per_seed for n in q}
        for name in sorted(names, key=lambda n: VOC_CLASSES.index(n) if n in VOC_CLASSES else len(VOC_CLASSES)):
            ious = [q[name]["iou"] for q in per_seed if name in q]
            empty = [q[name]["empty"] for q in per_seed if name in q]
            rows.append([name, mean_std(ious)["text"], mean_std(empty)["text"], len(ious)])
        tables[f"{world}_{protocol}_{variant}"] = {"columns": ["class", "label IoU", "empty labels", "seeds"],
                                                   "rows": rows}
        summary.append([world, protocol, variant, *class_means(per_seed, int(base_of(protocol))), len(per_seed)])
    tables["summary"] = {"columns": ["world", "protocol", "variant", "label IoU, step-0 classes",
                                     "empty labels, step-0 classes", "label IoU, later classes",
                                     "empty labels, later classes", "seeds"], "rows": summary}
    return {"study": str(study_file), "tables": tables}


def class_means(per_seed: list[dict], base: int) -> list[str | None]:
    """Label IoU and empty share averaged over the step-0 classes (VOC index 1..base) and over the later ones, per
    seed, then mean ± std over the seeds: [iou old, empty old, iou later, empty later] (None: no such class)."""
    out = []
    for later in (False, True):
        for key in ("iou", "empty"):
            means = [float(np.mean(values)) for q in per_seed
                     if (values := [v[key] for n, v in q.items() if (VOC_CLASSES.index(n) > base) == later])]
            out.append(mean_std(means)["text"] if means else None)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recall.sim.label_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="the study spec (study/spec.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file of the label-quality tables")
    args = parser.parse_args(argv)
    write_json(args.out, study_label_quality(args.study))
    print(f"label quality of the study's toy_gan runs: {args.out}")


if __name__ == "__main__":
    main()
