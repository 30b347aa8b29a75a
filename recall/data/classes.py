"""Pascal VOC's class names (shared by the toy world and the real-data readers) and the VOC palette. The class names
of a configured dataset: `recall.data.datasets.dataset_class_names`."""

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
