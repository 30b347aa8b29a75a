"""Oracle labels: the toy generator's samples come with their true object masks.

`label_quality(pool, labels_dir, generator)` compares the labels that label evaluation wrote for a pool with the
generator's ground truth, per class (`python -m recall.sim.oracle POOL LABELS_DIR --mapping MAPPING.json`);
`python -m recall.sim.oracle --study study/spec.yaml --out docs/results_labels.json` does it for every toy_gan run of
the study (the label-quality tables of docs/results.md).
`write_true_labels` is the labeller of a replay method run with `method.labels=oracle` (perfect label evaluation:
an upper bound for the labelling step); the product names it by reference, never imports it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from recall.data.classes import VOC_CLASSES
from recall.errors import UserError
from recall.labeling import save_label_png
from recall.replay.classmap import load_mapping
from recall.replay.pool import ReplayPool
from recall.sim.toy_gan import ToyGenerator


def true_mask(generator: ToyGenerator, record: dict) -> np.ndarray:
    source = int(record["source_class_index"])
    _, mask = generator.render_with_mask(source, generator.latent(source, int(record["source_index"])))
    return mask.astype(bool)


def label_quality(pool: Path, labels_dir: Path, generator: ToyGenerator) -> dict[str, dict[str, float]]:
    """Per class: IoU of the written labels with the true object, and the share of images labelled empty."""
    stats: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for record in ReplayPool(pool).records():
        path = labels_dir / f"{record['id']}.png"
        if not path.is_file():
            continue
        predicted = np.array(Image.open(path)) == int(record["target_class"])
        truth = true_mask(generator, record)
        union = (predicted | truth).sum()
        stats[record["target_name"]].append((float((predicted & truth).sum() / union) if union else 1.0,
                                             not predicted.any()))
    return {name: {"iou": float(np.mean([v[0] for v in values])), "empty": float(np.mean([v[1] for v in values])),
                   "images": len(values)} for name, values in stats.items()}


def generator_of(replay) -> ToyGenerator:
    """The toy generator that built a pool, from the run's `replay` config section (source options, mapping)."""
    if str(replay.name) != "toy_gan":
        raise UserError(f"method.labels=oracle needs replay=toy_gan (the toy generator knows its objects' true "
                        f"masks); replay={replay.name} has none")
    options = OmegaConf.to_container(replay.source, resolve=True) if replay.get("source") else {}
    generator = ToyGenerator(**options)
    if replay.get("mapping"):
        generator.set_mapping(load_mapping(replay.mapping, source_names=generator.source_names))
    return generator


def write_true_labels(replay, records: list[dict], labels_dir: Path) -> int:
    """The true label of every pool record of `records` (uint8 PNGs in the full label space, like label
    evaluation's); `replay` is the run's replay config section. Returns the number of labels written."""
    generator = generator_of(replay)
    labels_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        labels = np.where(true_mask(generator, record), int(record["target_class"]), 0).astype(np.uint8)
        save_label_png(labels_dir / f"{record['id']}.png", labels)
    return len(records)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path, nargs="?")
    parser.add_argument("labels_dir", type=Path, nargs="?")
    parser.add_argument("--mapping", type=Path)
    parser.add_argument("--study", type=Path, help="every toy_gan run of this study spec (with --out)")
    parser.add_argument("--out", type=Path, help="with --study: the JSON file of the label-quality tables")
    args = parser.parse_args(argv)
    if args.study:
        from recall.atomic import write_json
        if not args.out:
            parser.error("--study needs --out")
        write_json(args.out, study_label_quality(args.study))
        print(f"label quality of the study's toy_gan runs: {args.out}")
        return
    if not (args.pool and args.labels_dir and args.mapping):
        parser.error("give POOL LABELS_DIR --mapping MAPPING.json, or --study SPEC --out FILE")
    generator = ToyGenerator()
    generator.set_mapping(load_mapping(args.mapping, source_names=generator.source_names))
    print(json.dumps(label_quality(args.pool, args.labels_dir, generator), indent=1))


if __name__ == "__main__":
    main()
