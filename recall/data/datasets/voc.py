"""Pascal VOC 2012 and SBD's ``train_aug`` (``recall data prepare voc``, then ``sbd`` in the same root), and the
toy world, which has VOC's class names (`recall toyworld`, a simulation in recall/sim/, makes it).

* **voc** (``VOCtrainval_11-May-2012.tar``): ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
  ImageSets/Segmentation}`` as they are (palette PNGs with 255 borders; ``train`` 1,464, ``val`` 1,449).
* **sbd** (``benchmark.tgz``, on top of voc in the same root): ``SegmentationClassAug/`` and ``train_aug.txt``
  (see ``recall.data.prepare``).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np

from recall.atomic import write_bytes
from recall.data.classes import VOC_CLASSES, voc_palette
from recall.data.datasets import Dataset, KnownArchive, Preparation
from recall.data.voc import IMAGE_SUFFIX, MASK_SUFFIX, ArchiveError, read_split

VOC_PREFIX = "VOCdevkit/VOC2012/"
SBD_PREFIX = "benchmark_RELEASE/dataset/"
VOC_MASK_DIR = "SegmentationClass"
SBD_MASK_DIR = "SegmentationClassAug"
SBD_NUM_CLASSES = 20

# SHA-256 digests as published by projects that check them on download. The MD5s torchvision checks
# (datasets/voc.py: VOC 6cd6e144f989b92b3379bac3b3de84fd, SBD 82b4d87ceb2ed10f6038a1cba92111cb) name the same files.
VOC_ARCHIVE = KnownArchive(
    "voc", "VOCtrainval_11-May-2012.tar",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb", 1_999_639_040,
    "tensorflow/datasets url_checksums/voc.txt; torchvision prototype datasets/_builtin/voc.py")
SBD_ARCHIVE = KnownArchive(
    "sbd", "benchmark.tgz",
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    "6a5a2918d5c73ce032fdeba876574d150d9d04113ab87540a1304cbcc715be53", None,
    "torchvision prototype datasets/_builtin/sbd.py")


# --------------------------------------------------------------------------- VOC 2012


def _voc_dest(root: Path, rel: PurePosixPath) -> Path | None:
    """Where a file of VOCdevkit/VOC2012/ goes: the images, the class masks and the segmentation splits only."""
    wanted = {("JPEGImages",): IMAGE_SUFFIX, ("SegmentationClass",): MASK_SUFFIX,
              ("ImageSets", "Segmentation"): ".txt"}
    suffix = wanted.get(rel.parts[:-1])
    return root.joinpath(*rel.parts) if suffix and rel.suffix == suffix else None


def prepare_voc(x) -> dict:
    """VOC 2012's images, class masks and segmentation splits as they are (``x``: recall.data.prepare.Extraction)."""
    counts = Counter()
    with x.reading():
        for rel, member in x.files(VOC_PREFIX, "VOC 2012"):
            dest = _voc_dest(x.root, rel)
            if dest is not None:
                x.place(member, dest, counts)
    return {"files_written": counts["written"], "files_skipped": counts["skipped"]}


# --------------------------------------------------------------------------- SBD


def sbd_mask(data: bytes, name: str) -> np.ndarray:
    """The class indices of an SBD ``cls/<id>.mat``: MATLAB struct ``GTcls``, field ``Segmentation`` (uint8 0-20)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mask = np.asarray(loadmat(io.BytesIO(data), struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation)
    except (MatReadError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ArchiveError(f"{name}: not an SBD class annotation (a MATLAB struct GTcls with a Segmentation "
                           f"field): {type(error).__name__}: {error}") from error
    if mask.ndim != 2 or mask.size == 0 or mask.min() < 0 or mask.max() > SBD_NUM_CLASSES:
        raise ArchiveError(f"{name}: Segmentation must be a 2-D array of class indices 0..{SBD_NUM_CLASSES}, got "
                           f"shape {mask.shape} with values {mask.min() if mask.size else None}.."
                           f"{mask.max() if mask.size else None}")
    return mask.astype(np.uint8)


def mask_png(mask: np.ndarray) -> bytes:
    """A palette PNG (the VOC colours) of a class-index mask, like VOC's own SegmentationClass files."""
    from PIL import Image

    image = Image.fromarray(mask, mode="L")
    image.putpalette(voc_palette())  # makes it a "P" image holding the same indices
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sbd_member(x, rel: PurePosixPath, member, voc_masks: set[str], lists: dict, counts: Counter) -> None:
    """Handle one file of benchmark_RELEASE/dataset/: a split list, a class .mat or an image."""
    root = x.root
    folder = rel.parts[0] if len(rel.parts) == 2 else None
    if len(rel.parts) == 1 and rel.name in ("train.txt", "val.txt"):
        lists[rel.stem] = member.read().decode().split()
    elif folder == "cls" and rel.suffix == ".mat" and rel.stem not in voc_masks:  # VOC's own masks win
        dest = root / SBD_MASK_DIR / f"{rel.stem}{MASK_SUFFIX}"
        if x.is_whole_png(dest):  # the size of a conversion is not known in advance: a whole PNG is the check
            counts["masks_skipped"] += 1
        else:
            write_bytes(dest, mask_png(sbd_mask(member.read(), member.name)), durable=False)
            counts["masks_converted"] += 1
    elif folder == "img" and rel.suffix == IMAGE_SUFFIX and not (root / x.image_dir / rel.name).is_file():
        # VOC 2012 has them all; only a stray one is taken. Its presence alone means "done" (a file of another size
        # may be VOC's own), so it is flushed to disk at once: a power loss cannot leave it cut short. Strays are
        # rare (VOC 2012's JPEGImages holds SBD's images), so this costs little.
        x.place(member, root / x.image_dir / rel.name, counts, durable=True)


def train_aug_ids(sbd_train: list[str], sbd_val: list[str], voc_train: list[str], voc_val: list[str]) -> list[str]:
    """(SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted: the usual 10,582-image ``train_aug``."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def prepare_sbd(x) -> dict:
    """SBD's masks and ``train_aug`` split added to VOC 2012 (prepared in ``x.root`` first: ``Preparation.after``)."""
    root = x.root
    voc_train, voc_val = read_split(root, "train"), read_split(root, "val")
    voc_masks = set(voc_train) | set(voc_val)
    lists: dict[str, list[str]] = {}
    counts = Counter()
    with x.reading():
        for rel, member in x.files(SBD_PREFIX, "SBD"):
            _sbd_member(x, rel, member, voc_masks, lists, counts)
    if set(lists) != {"train", "val"}:
        raise ArchiveError(f"{x.archive.path}: no {SBD_PREFIX}train.txt and val.txt in the archive (found "
                           f"{sorted(lists)}): it is truncated or not SBD's benchmark.tgz")
    mask_dir = root / SBD_MASK_DIR
    for image_id in sorted(voc_masks):
        source = root / VOC_MASK_DIR / f"{image_id}{MASK_SUFFIX}"
        dest = mask_dir / f"{image_id}{MASK_SUFFIX}"
        if not (dest.is_file() and dest.stat().st_size == source.stat().st_size):  # a link, or a whole copy
            x.link_or_copy(source, dest)
            counts["voc_masks_linked"] += 1
    x.write_split("train_aug", train_aug_ids(lists["train"], lists["val"], voc_train, voc_val))
    return {"masks_converted": counts["masks_converted"], "masks_skipped": counts["masks_skipped"],
            "voc_masks_linked": counts["voc_masks_linked"], "images_added": counts["written"],
            "sbd_train": len(lists["train"]), "sbd_val": len(lists["val"])}


VOC = Dataset(
    "voc", VOC_CLASSES,
    "recall data prepare voc --root {root} --archive VOCtrainval_11-May-2012.tar, then "
    "recall data prepare sbd --root {root} --archive benchmark.tgz (train_aug)",
    (Preparation("voc", "VOC 2012", VOC_ARCHIVE, VOC_PREFIX, VOC_MASK_DIR, {"train": 1464, "val": 1449},
                 prepare_voc, family="voc"),
     Preparation("sbd", "SBD", SBD_ARCHIVE, SBD_PREFIX, SBD_MASK_DIR, {"train_aug": 10582, "val": 1449},
                 prepare_sbd, family="voc", after="voc")))

TOY = Dataset("toy", VOC_CLASSES, "recall toyworld {root}")
