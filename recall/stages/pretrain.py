"""`recall pretrain OUT`: pretrain the backbone of `model.backbone` as a classifier on `pretrain.dataset` (the
toy world's: the toy "ImageNet"), writing OUT/encoder.pth (what `model.pretrained_file` loads), OUT/classifier.pth
(the class mapping's classifier), OUT/classes.json and OUT/metrics.json (held-out top-1). DVC's `pretrain` stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recall.commands import compose, script, with_overrides


def add_arguments(parser) -> None:
    parser.add_argument("out", help="output directory, e.g. models/pretrain")
    with_overrides(parser)


def main(args) -> int:
    from recall.config import section
    from recall.pretrain import PretrainConfig, pretrain

    cfg = compose(args)
    settings = section(cfg.pretrain, PretrainConfig)
    tracker = None
    if cfg.tracking.uri:
        from recall.tracking import StageTracker
        tracker = StageTracker(cfg.tracking.uri, cfg.tracking.experiment or str(cfg.dataset.name))
    metrics = pretrain(settings, str(cfg.model.backbone), Path(args.out), tracker)
    print(f"pretrained {cfg.model.backbone} on {settings.dataset} ({metrics['classes']} classes, "
          f"{metrics['train_images']} images, {settings.epochs} epochs) in {metrics['seconds']:.0f} s: held-out "
          f"top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}; weights in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
