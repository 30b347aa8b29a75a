"""Class names (Pascal VOC, ADE20K) and the VOC palette, shared by the toy world and the real-data readers."""

from __future__ import annotations

IGNORE_INDEX = 255
BACKGROUND = 0
# The label of crop padding in a training target, until the loop ignores it (labeling.ignore_padding): a value no
# dataset uses, so a method can tell padding (never trained on) from the image's own 255 (void) pixels.
PADDING = 254

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

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


# The text a web search (Flickr) uses for a class: its name, with VOC's joined names spelled out.
QUERY_SPELLING = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def web_query(class_name: str) -> str:
    """The search text for a class: its name, with VOC's joined names spelled out."""
    return QUERY_SPELLING.get(class_name, class_name)


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map as a flat [r, g, b, r, g, b, ...] list (PIL `putpalette` format)."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.extend((r, g, b))
    return palette


def class_names(dataset_name: str, num_classes: int) -> list[str]:
    """Names of classes 0..num_classes (background first): VOC's for voc and the toy world, ADE20K's for ade20k,
    numbers for any other dataset. A known dataset with another class count is a configuration error."""
    known = {"voc": VOC_CLASSES, "toy": VOC_CLASSES, "ade20k": ADE20K_CLASSES}.get(dataset_name)
    if known is None:
        return [str(c) for c in range(num_classes + 1)]
    if num_classes != len(known) - 1:
        raise ValueError(f"dataset {dataset_name!r} has {len(known) - 1} classes, not num_classes={num_classes}")
    return list(known)


def dataset_class_names(dataset) -> list[str]:
    """Names of classes 0..num_classes of a `dataset` config section: its `classes` list (background first), or,
    when that is null, the known names of its `name` (`class_names`). A new VOC-layout dataset is one config file in
    conf/dataset/ with its root, splits, directories and class names."""
    from recall.errors import UserError

    n = int(dataset.num_classes)
    given = dataset.get("classes")
    if given is None:
        try:
            return class_names(str(dataset.name), n)
        except ValueError as error:
            raise UserError(f"dataset.num_classes={n}: {error}") from None
    if isinstance(given, str) or not all(isinstance(c, (str, int)) for c in given):
        raise UserError(f"dataset.classes={given!r}: a list of class names, background first (e.g. [background, "
                        "cat, dog]), or null")
    names = [str(c) for c in given]
    if len(names) != n + 1:
        raise UserError(f"dataset.classes has {len(names)} names; dataset.num_classes={n} needs {n + 1} "
                        "(background first, then classes 1..num_classes)")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise UserError(f"dataset.classes names {', '.join(repeated)} more than once: every class needs its own name")
    return names
