"""Oracle labels: the toy generator's samples come with their true object masks.

`label_quality(pool, labels_dir, generator)` compares the labels that label evaluation wrote for a pool with the
generator's ground truth, per class (`python -m recall.sim.oracle POOL LABELS_DIR --mapping MAPPING.json`).
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path)
    parser.add_argument("labels_dir", type=Path)
    parser.add_argument("--mapping", type=Path, required=True)
    args = parser.parse_args(argv)
    generator = ToyGenerator()
    generator.set_mapping(load_mapping(args.mapping, source_names=generator.source_names))
    print(json.dumps(label_quality(args.pool, args.labels_dir, generator), indent=1))


if __name__ == "__main__":
    main()
