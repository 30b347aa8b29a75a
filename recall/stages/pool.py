"""`recall pool`: build (or resume) the replay pool of `replay.name`; copies of dataset images are dropped.

    recall pool --params params.yaml replay=web             -> replay.pool (images + manifest.jsonl)

A new pool is built beside its place (`.<name>.partial`, resumed after a kill) and renamed into place when
complete; a pool of the same source is grown or resumed in place; any other directory is refused
(recall.ownership).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from recall.commands import compose, script, with_overrides
from recall.data.datasets import dataset_class_names
from recall.replay.classmap import SHARED_KEY, load_mapping, shared_on_purpose
from recall.replay.leakage import DEFAULT_MAX_DISTANCE, LeakageGuard
from recall.ownership import staged
from recall.replay.pool import build_pool, claim_pool, pool_marker, same_source
from recall.replay.sources import build_source


def _options(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if section is not None else {}


def warn_shared(mapping: dict[int, int], path, source_names=None) -> None:
    """A warning for target classes that share a source class (their images would be the same images, which the
    pool keeps once), unless the map file says so on purpose."""
    serves: dict[int, list[int]] = {}
    for target, source in mapping.items():
        serves.setdefault(source, []).append(target)
    for source, targets in serves.items():
        if len(targets) > 1 and not shared_on_purpose(path):
            name = source_names[source] if source_names else source
            print(f"warning: {path}: source class {name} replays classes {targets}: their images would be the same, "
                  f"and the pool keeps each once; choose another source class for all but one, or add "
                  f'"{SHARED_KEY}": true to the file if that is on purpose', file=sys.stderr)


def replay_pool(cfg: DictConfig) -> dict:
    """Build (or resume) the pool of `replay.per_class` images for every class; copies of dataset images are dropped."""
    source = build_source(cfg.replay.name, **_options(cfg.replay.get("source")))  # (replay=memory: no pool, said)
    with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext():
        if cfg.replay.get("mapping"):
            mapping = load_mapping(cfg.replay.mapping, source_names=getattr(source, "source_names", None))
            source.set_mapping(mapping)
            warn_shared(mapping, cfg.replay.mapping, getattr(source, "source_names", None))
        names = dataset_class_names(cfg.dataset)
        classes = dict(enumerate(names))
        del classes[0]  # background is never replayed
        target, marker = Path(cfg.replay.pool), pool_marker(source)
        ours = claim_pool(target, marker) is not None  # before the dataset is hashed: a refusal comes first
        d = cfg.dataset
        guard = LeakageGuard.from_dataset(d.root, splits=(d.train_split, d.val_split), image_dir=d.image_dir,
                                          max_distance=int(cfg.replay.get("leakage_max_distance",
                                                                          DEFAULT_MAX_DISTANCE)),
                                          progress=True)
        if ours:  # grow or resume our own pool in place
            return build_pool(source, classes, int(cfg.replay.per_class), target, guard=guard)
        with staged(target, marker, "replay.pool", fresh=False, what="a `recall pool` build",
                    accepts=same_source(marker)) as partial:
            return build_pool(source, classes, int(cfg.replay.per_class), partial, guard=guard, lock=False)


def add_arguments(parser) -> None:
    with_overrides(parser)


def main(args) -> int:
    replay_pool(compose(args))
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
