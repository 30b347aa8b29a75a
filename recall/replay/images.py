"""Bounded decoding of a replay candidate's bytes, shared by every source that reads files it did not make (the
web crawl, a user's folder): the size in bytes and the pixel count (from the header, before any pixel is
decoded) are checked against limits, so a 17 KB PNG that decodes to 12000 x 12000 pixels costs nothing.
PIL's own decompression-bomb guard stays on below these limits."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from recall.data.voc import PIL_ERRORS

DEFAULT_MIN_SIZE = 32  # the 64-px toy world; for real Flickr photos use ~200
DEFAULT_MAX_PIXELS = 40_000_000  # below PIL's own guard (Image.MAX_IMAGE_PIXELS, ~89 M)
DEFAULT_MAX_BYTES = 20 * 2**20  # url_c JPEGs are ~100-300 KB


@dataclass(frozen=True)
class ImageLimits:
    min_size: int = DEFAULT_MIN_SIZE  # shorter side, pixels
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def size_problem(self, width: int, height: int) -> str | None:
        if width * height > self.max_pixels:
            return "too_large"
        if min(width, height) < self.min_size:
            return "too_small"
        return None


class Skip(Exception):
    """A candidate that will not become a replay image, and why (`reason`: a short key; `detail`: for people)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """The upright RGB image in `data`, or `Skip` (empty, too large in bytes or pixels, too small, not an image,
    corrupt). The header's size is checked before the pixels are decoded."""
    if not data:
        raise Skip("empty", "0 bytes")
    if len(data) > limits.max_bytes:
        raise Skip("too_large", f"{len(data)} bytes > max_bytes {limits.max_bytes}")
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise Skip("not_image", f"not an image ({error})") from None
    except Image.DecompressionBombError as error:
        raise Skip("too_large", str(error)) from None
    except PIL_ERRORS as error:
        raise Skip("corrupt", f"cannot read the image header ({error})") from None
    with opened:
        problem = limits.size_problem(*opened.size)
        if problem is not None:
            raise Skip(problem, f"{opened.size[0]}x{opened.size[1]} pixels")
        try:
            opened.load()
            return ImageOps.exif_transpose(opened).convert("RGB")  # phone photos: upright as shown
        except Image.DecompressionBombError as error:
            raise Skip("too_large", str(error)) from None
        except PIL_ERRORS as error:
            raise Skip("corrupt", f"truncated or corrupt ({error})") from None
