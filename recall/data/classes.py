"""Pascal VOC class names and palette, shared by the toy world and the real-data readers."""

from __future__ import annotations

IGNORE_INDEX = 255
BACKGROUND = 0

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


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
