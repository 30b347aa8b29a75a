"""Replay stages: the class mapping of a generator source and the replay pool of any source.

    recall classmap --params params.yaml replay=toy_gan     → replay.mapping (JSON, reviewable by hand)
    recall pool --params params.yaml replay=toy_gan         → replay.pool (images + manifest.jsonl)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recall.data.classes import VOC_CLASSES
from recall.replay import build_pool, build_source, dataset_hashes
from recall.replay.classmap import load_mapping, map_classes, save_mapping, train_source_classifier


def class_mapping(cfg: DictConfig) -> dict:
    """The paper's mapping procedure with the generator's own classifier; written to `replay.mapping`."""
    generator = build_source(cfg.replay.name, **OmegaConf.to_container(cfg.replay.source, resolve=True))
    classifier = train_source_classifier(generator, **OmegaConf.to_container(cfg.replay.classifier, resolve=True),
                                         progress=True)
    d = cfg.dataset
    mapping = map_classes(classifier, d.root, split=d.train_split, num_classes=int(d.num_classes),
                          source_names=generator.source_names, image_dir=d.image_dir, mask_dir=d.mask_dir,
                          progress=True)
    save_mapping(mapping, cfg.replay.mapping)
    return mapping


def replay_pool(cfg: DictConfig) -> dict:
    """Build (or resume) the pool of `replay.per_class` images for every class; dataset copies are dropped."""
    options = OmegaConf.to_container(cfg.replay.source, resolve=True)
    source = build_source(cfg.replay.name, **options)
    if cfg.replay.get("mapping"):
        source.set_mapping(load_mapping(cfg.replay.mapping, source_names=getattr(source, "source_names", None)))
    n = int(cfg.dataset.num_classes)
    classes = {c: VOC_CLASSES[c] if n == 20 else str(c) for c in range(1, n + 1)}
    d = cfg.dataset
    forbidden = dataset_hashes(d.root, splits=(d.train_split, d.val_split), image_dir=d.image_dir)
    return build_pool(source, classes, int(cfg.replay.per_class), Path(cfg.replay.pool), forbidden_sha256=forbidden)
