"""Label quality of a study's replay runs: the labels label evaluation wrote, against the toy generator's true masks.

    python -m recall.sim.label_quality --study study/spec.yaml --out docs/results_labels.json

For every run of the study that evaluated labels for toy_gan replay (not the oracle-label runs), per world,
protocol and variant: a table with a row per class, the label IoU with the true object and the share of images
labelled empty, mean ± std over seeds (`recall.sim.oracle.label_quality` per run). The study's `label_quality`
stage writes it; docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from recall.atomic import write_json
from recall.data.classes import VOC_CLASSES
from recall.sim.oracle import generator_of, label_quality


def study_label_quality(study_file: Path, root: Path = Path(".")) -> dict:
    """Label quality of every study run that evaluated labels for toy_gan replay: per world, protocol and variant, a
    table with a row per class (label IoU and share of empty labels, mean ± std over seeds)."""
    from recall.config import compose
    from recall.study import load

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
    tables = {}
    for (world, protocol, variant), per_seed in grouped.items():
        rows = []
        names = {n for q in per_seed for n in q}
        for name in sorted(names, key=lambda n: VOC_CLASSES.index(n) if n in VOC_CLASSES else len(VOC_CLASSES)):
            ious = [q[name]["iou"] for q in per_seed if name in q]
            empty = [q[name]["empty"] for q in per_seed if name in q]
            rows.append([name, _text(ious), _text(empty), len(ious)])
        tables[f"{world}_{protocol}_{variant}"] = {"columns": ["class", "label IoU", "empty labels", "seeds"],
                                                   "rows": rows}
    return {"study": str(study_file), "tables": tables}


def _text(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recall.sim.label_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="the study spec (study/spec.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file of the label-quality tables")
    args = parser.parse_args(argv)
    write_json(args.out, study_label_quality(args.study))
    print(f"label quality of the study's toy_gan runs: {args.out}")


if __name__ == "__main__":
    main()
