"""Replay stages: the class mapping of a generator source, the replay pool of any source, stand-in weights.

    recall classmap --params params.yaml replay=toy_gan     → replay.mapping (JSON, reviewable by hand)
    recall pool --params params.yaml replay=web             → replay.pool (images + manifest.jsonl)
    recall standin-weights models/standin                   → a tiny BigGAN + ImageNet classifier (demo only)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recall.data.classes import class_names
from recall.replay import build_pool, build_source
from recall.replay.classmap import (imagenet_classifier, load_mapping, make_standin_classifier, map_classes,
                                    save_mapping, train_source_classifier)
from recall.replay.leakage import DEFAULT_MAX_DISTANCE, LeakageGuard
from recall.replay.pool import ReplayError


def _options(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if section is not None else {}


def _trained_on_source(cfg: DictConfig, options: dict):
    """The toy world's stand-in for an ImageNet classifier: trained on the generator's own samples."""
    generator = build_source(cfg.replay.name, **_options(cfg.replay.source))
    return train_source_classifier(generator, **options, progress=True), None


def _pretrained(cfg: DictConfig, options: dict):
    """A timm ImageNet classifier with weights from a local file (EfficientNet-B2 in the paper)."""
    classifier = imagenet_classifier(options["model"], weights=options["weights"],
                                     input_size=options.get("input_size"))
    return classifier, classifier.input_size


# classifier.kind -> how the mapping's classifier is made; a new kind is one more entry
CLASSIFIERS = {"trained_on_source": _trained_on_source, "pretrained": _pretrained}


def class_mapping(cfg: DictConfig) -> dict:
    """The paper's mapping procedure (mean softmax over the training images of each class); written to `replay.mapping`."""
    options = _options(cfg.replay.get("classifier"))
    kind = options.pop("kind", "trained_on_source")
    if kind not in CLASSIFIERS:
        raise ReplayError(f"replay.classifier.kind={kind!r} is unknown; choose one of {sorted(CLASSIFIERS)}")
    classifier, input_size = CLASSIFIERS[kind](cfg, options)
    d = cfg.dataset
    mapping = map_classes(classifier, d.root, split=d.train_split, num_classes=int(d.num_classes),
                          source_names=classifier.source_names, image_dir=d.image_dir, mask_dir=d.mask_dir,
                          input_size=input_size, progress=True)
    save_mapping(mapping, cfg.replay.mapping)
    return mapping


def replay_pool(cfg: DictConfig) -> dict:
    """Build (or resume) the pool of `replay.per_class` images for every class; copies of dataset images are dropped."""
    source = build_source(cfg.replay.name, **_options(cfg.replay.source))
    with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext():
        if cfg.replay.get("mapping"):
            source.set_mapping(load_mapping(cfg.replay.mapping, source_names=getattr(source, "source_names", None)))
        names = class_names(str(cfg.dataset.name), int(cfg.dataset.num_classes))
        classes = dict(enumerate(names))
        del classes[0]  # background is never replayed
        d = cfg.dataset
        guard = LeakageGuard.from_dataset(d.root, splits=(d.train_split, d.val_split), image_dir=d.image_dir,
                                          max_distance=int(cfg.replay.get("leakage_max_distance",
                                                                          DEFAULT_MAX_DISTANCE)),
                                          progress=True)
        return build_pool(source, classes, int(cfg.replay.per_class), Path(cfg.replay.pool), guard=guard)


def standin_weights(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """The demo's stand-ins for downloaded weights: a tiny random BigGAN and a random timm ImageNet classifier."""
    from recall.replay.gan import make_tiny_biggan

    out = Path(out)
    return {"biggan": make_tiny_biggan(out / "biggan", seed=seed),
            "classifier": make_standin_classifier(out / "imagenet_classifier.pth", seed=seed)}
