"""ADE20K (SceneParsing 150, ``ADEChallengeData2016.zip``): its class names and ``recall data prepare ade20k``.

``images/{training,validation}`` → ``JPEGImages``, ``annotations/...`` → ``SegmentationClass`` (``train`` 20,210,
``val`` 2,000). Masks are kept as they are: 0 = "other" (pixels of none of the 150 classes), 1..150 the classes.
That is how MiB reads them (``dataset/ade.py`` uses the PNG values directly and its ADE tasks list 0 with the step-0
classes): 0 is the background slot. MiB trains on 0 as background but *ignores* it at test (``inverted_order[0] =
255`` when ``train=False``); that is an evaluation convention, not a property of the files, so the files keep it.
Its protocols (100-50, 100-10, 50-50) are task strings of the protocol grammar (conf/protocol/).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

from recall.data.datasets import Dataset, KnownArchive, Preparation
from recall.data.voc import IMAGE_SUFFIX, MASK_SUFFIX, ArchiveError

# ADE20K (SceneParsing, ADEChallengeData2016): the 150 classes in annotation order, as listed by MiB's
# dataset/ade.py and mmsegmentation's ADE20KDataset (objectInfo150). Index 0 is ADE's "other" (pixels of none of
# the 150 classes, MiB's "void"), which takes the background slot.
ADE20K_CLASSES: tuple[str, ...] = (
    "background", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car",
    "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

ADE_PREFIX = "ADEChallengeData2016/"
ADE_SPLITS = {"training": "train", "validation": "val"}
MASK_DIR = "SegmentationClass"
ARCHIVE = KnownArchive(
    "ade20k", "ADEChallengeData2016.zip",
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    "7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29", 967_382_037,
    "tensorflow/datasets url_checksums/ade20k.txt")


def _ade_dest(x, rel: PurePosixPath) -> tuple[str, Path] | None:
    """(split, destination in ``x.root``) of a file of ADEChallengeData2016/, or None for the files not needed."""
    if len(rel.parts) != 3 or rel.parts[1] not in ADE_SPLITS:
        return None
    kind, folder, name = rel.parts
    if kind == "images" and rel.suffix == IMAGE_SUFFIX:
        return ADE_SPLITS[folder], x.root / x.image_dir / name
    if kind == "annotations" and rel.suffix == MASK_SUFFIX:
        return ADE_SPLITS[folder], x.root / MASK_DIR / name
    return None


def prepare_ade20k(x) -> dict:
    """ADE20K's images and masks of both splits, and the split files (``x``: a ``recall.data.prepare.Extraction``)."""
    counts = Counter()
    splits: dict[str, list[str]] = {split: [] for split in ADE_SPLITS.values()}
    with x.reading():
        for rel, member in x.files(ADE_PREFIX, "ADE20K"):
            target = _ade_dest(x, rel)
            if target is not None:
                split, dest = target
                x.place(member, dest, counts)
                if dest.suffix == IMAGE_SUFFIX:
                    splits[split].append(dest.stem)
    for split, ids in splits.items():
        if not ids:
            raise ArchiveError(f"{x.archive.path}: no {ADE_PREFIX}images/ files of the '{split}' split: the archive "
                               f"is truncated or not ADEChallengeData2016.zip")
        x.write_split(split, sorted(ids))
    return {"files_written": counts["written"], "files_skipped": counts["skipped"]}


ADE20K = Dataset(
    "ade20k", ADE20K_CLASSES, "recall data prepare ade20k --root {root} --archive ADEChallengeData2016.zip",
    (Preparation("ade20k", "ADE20K", ARCHIVE, ADE_PREFIX, MASK_DIR, {"train": 20210, "val": 2000}, prepare_ade20k,
                 family="ade20k", id_prefix="ADE_"),))
