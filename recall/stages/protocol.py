"""`recall protocol NAME`: each step's classes and training images, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recall.commands import compose, script, with_overrides


def add_arguments(parser) -> None:
    parser.add_argument("name", help="task string, e.g. 15-1x5")
    with_overrides(parser)
    parser.add_argument("--pretty", action="store_true")


def main(args) -> int:
    from recall.data.protocol import select_train_images, steps
    from recall.data.voc import image_classes, read_split

    args.overrides = [f"protocol={args.name}", *args.overrides]
    cfg = compose(args)
    task = steps(str(cfg.protocol.name), int(cfg.dataset.num_classes))
    root = Path(cfg.dataset.root)
    ids = read_split(root, cfg.dataset.train_split)
    classes = image_classes(root, ids, num_classes=int(cfg.dataset.num_classes), mask_dir=cfg.dataset.mask_dir,
                            progress=False)
    out = {"protocol": str(cfg.protocol.name), "setting": str(cfg.setting.name), "dataset": str(root), "steps": []}
    for t, new in enumerate(task):
        chosen = select_train_images(classes, task, t, str(cfg.setting.name), seed=int(cfg.seed))
        out["steps"].append({"step": t, "classes": new, "num_images": len(chosen), "images": chosen})
    json.dump(out, sys.stdout, indent=1 if args.pretty else None)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
