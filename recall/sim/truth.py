"""The truth behind simulated replay: the true object mask of every toy-GAN sample, toy-diffusion image and Flickr
stand-in photo.

A replay source that is a simulation names these functions in its config (`replay.truth` in
conf/replay/toy_gan.yaml, toy_diffusion.yaml and web.yaml); the product resolves them by that name and never imports
them. Each takes the replay config section first:

- ``class_map`` (`gan_class_map_score`): a class map against the look-alike the toy ImageNet made of each toy class
  (`recall.sim.toy_imagenet.class_map_score`); the classmap stage records it.

- ``labels`` (`gan_label_quality`, `web_label_quality`, `diffusion_label_quality`): the labels label evaluation
  wrote, against the true masks, per class: the IoU of the label's pixels of the image's class with the true object,
  and the share of images labelled with no pixel of their class. A replay run logs them beside its mIoU
  (`ReplayStream.statistics`, recall/replay/stream.py).
- ``shows_class`` (`web_shows_class`): whether each web photo shows the class it was found for (tag noise does not);
  `recall select` scores its drops with it.
- ``oracle`` (`correct_own_class`, `diffusion_correct_own_class`): `method.labels=oracle`, perfect label evaluation
  *of the image's own class*: the labels label evaluation wrote (the authors' argmax over every output of the
  labelling model) keep every other class, and the image's class takes exactly the true mask (its pixels outside the
  mask become background). An upper bound for the labelling step, with the authors' label space.

`python -m recall.sim.truth POOL LABELS_DIR [--seed S]` prints a toy-GAN pool's label
quality.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from recall.errors import UserError
from recall.labeling import save_label_png
from recall.replay.pool import ReplayPool
from recall.sim.toy_gan import ToyGenerator

BACKGROUND = 0


def _source_options(replay) -> dict:
    return OmegaConf.to_container(replay.source, resolve=True) if replay.get("source") else {}


def true_mask(generator: ToyGenerator, record: dict) -> np.ndarray:
    source = int(record["source_class_index"])
    _, mask = generator.render_with_mask(source, generator.latent(source, int(record["source_index"])))
    return mask.astype(bool)


def generator_of(replay) -> ToyGenerator:
    """The toy generator that built a pool, from the run's `replay` config section (its source options). A pool record
    names the generator class and latent index of its image, so its true mask needs no class map: a run scores its
    labels even where the map file it was built with is gone."""
    if str(replay.name) != "toy_gan":
        raise UserError(f"the toy generator's true masks need replay=toy_gan; replay={replay.name} has none")
    return ToyGenerator(**_source_options(replay))


def web_photos_of(replay):
    """The Flickr stand-in's photos behind a web pool (`replay.source.standin`), and a function from a pool record to
    its (class, result index), None for a photo the stand-in did not render (a real Flickr photo, a planted one)."""
    from recall.sim.flickr_standin import parse_photo_id
    from recall.sim.toy_web import ToyWebPhotos

    source = _source_options(replay)
    if source.get("endpoint", "standin") != "standin":
        return None, lambda record: None
    photos = ToyWebPhotos(**source.get("standin", {}))
    return photos, lambda record: parse_photo_id(str(record.get("photo_id", "")), photos.seed,
                                                 photos.per_class_limit)


def _fitted(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A true mask at a label's size (nearest neighbour): a pool may keep a photo at another size than rendered."""
    if mask.shape == shape:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(shape[::-1], Image.NEAREST)).astype(bool)


def score_labels(records: list[dict], labels_dir: Path, mask_of: Callable[[dict], np.ndarray | None]
                 ) -> dict[int, dict[str, float]]:
    """Per target class: the mean IoU of the labels' pixels of each image's class with its true mask (1 when both
    are empty), the share of images labelled empty, and how many images were scored (with a label and a truth)."""
    stats: dict[int, list[tuple[float, bool]]] = defaultdict(list)
    for record in records:
        path = labels_dir / f"{record['id']}.png"
        truth = mask_of(record) if path.is_file() else None
        if truth is None:
            continue
        with Image.open(path) as label:
            predicted = np.asarray(label) == int(record["target_class"])
        truth = _fitted(truth, predicted.shape)
        union = (predicted | truth).sum()
        stats[int(record["target_class"])].append((float((predicted & truth).sum() / union) if union else 1.0,
                                                   not predicted.any()))
    return {c: {"iou": float(np.mean([v[0] for v in values])), "empty": float(np.mean([v[1] for v in values])),
                "images": len(values)} for c, values in sorted(stats.items())}


def gan_class_map_score(replay, mapping: dict[int, int]) -> dict:
    """`replay.truth.class_map` of replay=toy_gan: the map against the toy ImageNet's truth."""
    from recall.sim.toy_imagenet import class_map_score

    return class_map_score(mapping, num_classes=ToyGenerator(**_source_options(replay)).num_source_classes)


def gan_label_quality(replay, records: list[dict], labels_dir: Path) -> dict[int, dict[str, float]]:
    """`replay.truth.labels` of replay=toy_gan: label quality against the generator's true masks."""
    generator = generator_of(replay)
    return score_labels(records, labels_dir, lambda record: true_mask(generator, record))


def web_label_quality(replay, records: list[dict], labels_dir: Path) -> dict[int, dict[str, float]]:
    """`replay.truth.labels` of replay=web on the Flickr stand-in: label quality against the true masks of the
    photos (empty for a tag-noise photo, which then scores 1 only when its label is empty too)."""
    photos, which = web_photos_of(replay)
    if photos is None:
        return {}

    def mask_of(record: dict) -> np.ndarray | None:
        found = which(record)
        return None if found is None else photos.render_with_mask(*found)[1]

    return score_labels(records, labels_dir, mask_of)


def web_shows_class(replay, records: list[dict]) -> list[bool | None]:
    """`replay.truth.shows_class` of replay=web on the Flickr stand-in: for each pool record, whether the photo shows
    the class it was found for (False: tag noise), None for a photo the stand-in did not render."""
    photos, which = web_photos_of(replay)
    if photos is None:
        return [None] * len(records)
    return [None if (found := which(record)) is None else photos.facts(*found).shows_class for record in records]


def correct_own_class(replay, records: list[dict], labels_dir: Path) -> int:
    """`method.labels=oracle`: in every evaluated label of `records`, the image's class takes exactly its true mask
    (pixels of the class outside it become background); every other pixel keeps what label evaluation wrote.
    Returns the number of labels corrected."""
    generator = generator_of(replay)
    return _correct(records, labels_dir, lambda record: true_mask(generator, record))


def diffusion_label_quality(replay, records: list[dict], labels_dir: Path) -> dict[int, dict[str, float]]:
    """`replay.truth.labels` of replay=toy_diffusion: label quality against the prompted generator's true masks
    (empty for an image where it drew another class, or none)."""
    return score_labels(records, labels_dir, diffusion_mask_of(replay))


def diffusion_correct_own_class(replay, records: list[dict], labels_dir: Path) -> int:
    """`method.labels=oracle` of replay=toy_diffusion (as `correct_own_class`)."""
    return _correct(records, labels_dir, diffusion_mask_of(replay))


def diffusion_mask_of(replay) -> Callable[[dict], np.ndarray]:
    """A pool record of replay=toy_diffusion -> the true mask of its class (the record names class, index and the
    class name its prompt was made from; the generator is rebuilt from the run's `replay.source`)."""
    from recall.sim.toy_diffusion import ToyDiffusion

    if str(replay.name) != "toy_diffusion":
        raise UserError(f"the prompted toy generator's true masks need replay=toy_diffusion; replay={replay.name}")
    generator = ToyDiffusion(**_source_options(replay))
    return lambda record: generator.render_with_mask(int(record["target_class"]), str(record["target_name"]),
                                                     int(record["source_index"]))[1]


def _correct(records: list[dict], labels_dir: Path, mask_of: Callable[[dict], np.ndarray]) -> int:
    for record in records:
        path = labels_dir / f"{record['id']}.png"
        with Image.open(path) as label:
            labels = np.array(label)
        own = int(record["target_class"])
        truth = _fitted(mask_of(record), labels.shape)
        labels = np.where(truth, own, np.where(labels == own, BACKGROUND, labels)).astype(np.uint8)
        save_label_png(path, labels)
    return len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path)
    parser.add_argument("labels_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (replay.source.seed)")
    args = parser.parse_args(argv)
    generator = ToyGenerator(seed=args.seed)
    print(json.dumps(score_labels(ReplayPool(args.pool).records(), args.labels_dir,
                                  lambda record: true_mask(generator, record)), indent=1))


if __name__ == "__main__":
    main()
