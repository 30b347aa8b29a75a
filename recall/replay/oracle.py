"""Diagnostics for label evaluation on the toy generator, whose samples come with their true object masks.

`label_quality(pool, labels_dir, generator)` compares the labels that label evaluation wrote for a pool
with the generator's ground truth, per class; `write_oracle_labels` writes the true labels instead, so that
a RECALL run with perfect label evaluation (an upper bound for the labelling step) can be measured:

    python -m recall.replay.oracle POOL LABELS_DIR --mapping MAPPING.json [--write]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from recall.labeling import save_label_png
from recall.replay.classmap import load_mapping
from recall.replay.pool import ReplayPool
from recall.replay.toy_gan import ToyGenerator


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


def write_oracle_labels(pool: Path, labels_dir: Path, generator: ToyGenerator, num_steps_done: int) -> int:
    """True labels for every pool image + the `step<k>.done` markers, so a run skips label evaluation."""
    labels_dir.mkdir(parents=True, exist_ok=True)
    records = ReplayPool(pool).records()
    for record in records:
        labels = np.where(true_mask(generator, record), int(record["target_class"]), 0).astype(np.uint8)
        save_label_png(labels_dir / f"{record['id']}.png", labels)
    for k in range(num_steps_done):
        (labels_dir / f"step{k}.done").write_text("oracle\n")
    return len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path)
    parser.add_argument("labels_dir", type=Path)
    parser.add_argument("--mapping", type=Path, required=True)
    parser.add_argument("--write", type=int, metavar="STEPS", default=0,
                        help="write oracle labels and mark this many step groups as labelled")
    args = parser.parse_args(argv)
    generator = ToyGenerator()
    generator.set_mapping(load_mapping(args.mapping, source_names=generator.source_names))
    if args.write:
        print(f"wrote {write_oracle_labels(args.pool, args.labels_dir, generator, args.write)} oracle labels")
    else:
        print(json.dumps(label_quality(args.pool, args.labels_dir, generator), indent=1))


if __name__ == "__main__":
    main()
