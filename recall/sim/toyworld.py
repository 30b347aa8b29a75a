"""A procedurally generated stand-in for Pascal VOC 2012, written in exact VOC layout.

Each of the 20 VOC classes is drawn as a distinct (shape, texture, hue) combination on a
textured background; masks are palette PNGs with 255 borders, like VOC. Everything is
deterministic from the seed: image ``i`` of split ``s`` uses ``default_rng([seed, s, i])``.
Pure numpy + PIL.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from recall.data.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette

FORMAT_VERSION = 1
NUM_CLASSES = len(VOC_CLASSES) - 1
SPLIT_CODES = {"train": 0, "val": 1}
JPEG_QUALITY = 95
MANIFEST_NAME = "toyworld.json"

# Object geometry, as fractions of the image size (at 64 px: diameters of ~16-40 px).
MIN_DIAMETER_FRAC = 0.25
MAX_DIAMETER_FRAC = 0.625
MAX_ROTATION_RAD = 0.3  # small rotation jitter (~17 degrees)
CENTER_MARGIN_FRAC = 0.6  # object centres stay >= 0.6 radius inside the image

# Per-object colour jitter.
HUE_JITTER_DEG = 8.0
VALUE_JITTER = 0.1
SATURATION_JITTER = 0.08

# Background appearance.
BG_GRID_CELLS = 4  # low-frequency noise: a random colour grid, bilinearly upsampled
BG_MAX_SATURATION = 0.3
BG_VALUE_RANGE = (0.3, 0.8)
BG_GRADIENT_AMPLITUDE = 0.15
BG_STRIPE_PROBABILITY = 0.5
BG_STRIPE_AMPLITUDE = 0.04
BG_STRIPE_MIN_PERIOD_FRAC = 0.25  # background stripes are much wider than object stripes
PIXEL_NOISE_STD = 0.015

# Texture constants (local object coordinates, in pixels).
DOT_RADIUS_FRAC = 0.3  # dot radius as a fraction of the texture period
NOISE_BLOCK_PX = 2.0


@dataclass(frozen=True)
class ClassStyle:
    """How a class looks: shape, texture and colour (HSV, hue in degrees)."""

    shape: str
    texture: str
    hue: float
    saturation: float = 0.85
    value: float = 0.9
    secondary_value: float = 0.3  # brightness of the texture's second colour
    texture_angle: float = 0.0  # degrees, for stripes
    texture_period: float = 6.0  # pixels, for stripes / dots / checker


def _style(shape: str, texture: str, hue: float, **kw: float) -> ClassStyle:
    return ClassStyle(shape=shape, texture=texture, hue=hue, **kw)


# Each shape is used by exactly two classes, which differ in texture and hue.
CLASS_STYLES: dict[int, ClassStyle] = {
    1: _style("triangle", "solid", 210),                        # aeroplane
    2: _style("ring", "solid", 120),                            # bicycle
    3: _style("crescent", "solid", 55),                         # bird
    4: _style("ellipse", "stripes", 0, texture_angle=0),        # boat
    5: _style("hexagon", "gradient", 150),                      # bottle
    6: _style("square", "stripes", 45, texture_angle=45),       # bus
    7: _style("diamond", "solid", 0),                           # car
    8: _style("circle", "dots", 30),                            # cat
    9: _style("cross", "checker", 270),                         # chair
    10: _style("star", "checker", 0, texture_period=5.0),       # cow
    11: _style("hexagon", "stripes", 330, texture_angle=90),    # diningtable
    12: _style("circle", "noise", 90),                          # dog
    13: _style("triangle", "checker", 300),                     # horse
    14: _style("ring", "stripes", 240, texture_angle=90),       # motorbike
    15: _style("cross", "solid", 180),                          # person
    16: _style("star", "solid", 120),                           # pottedplant
    17: _style("square", "dots", 195),                          # sheep
    18: _style("ellipse", "noise", 270),                        # sofa
    19: _style("diamond", "stripes", 80, texture_angle=135),    # train
    20: _style("crescent", "gradient", 330),                    # tvmonitor
}


# ----------------------------------------------------------------------------- shapes
# Shape functions take local coordinates (u, v), normalised so the object radius is 1,
# and return a boolean "inside" mask.

def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, phase: float) -> np.ndarray:
    apothem = np.cos(np.pi / sides)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        normal = phase + 2 * np.pi * k / sides
        inside &= u * np.cos(normal) + v * np.sin(normal) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    theta = np.arctan2(v, u) + np.pi / 2  # one point up
    outline = 0.45 + 0.55 * ((1 + np.cos(5 * theta)) / 2) ** 2
    return r <= outline


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u**2 + v**2 <= 1) & ((u - 0.5) ** 2 + v**2 > 0.8**2)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: _regular_polygon(u, v, 3, np.pi / 2),  # point up (v grows downwards)
    "star": _star,
    "ellipse": lambda u, v: u**2 + (v / 0.55) ** 2 <= 1,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1)),
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.55**2),
    "diamond": lambda u, v: np.abs(u) / 0.7 + np.abs(v) <= 1,
    "hexagon": lambda u, v: _regular_polygon(u, v, 6, 0.0),
    "crescent": _crescent,
}


# --------------------------------------------------------------------------- textures
# Texture functions take local pixel coordinates (x, y) and return t in [0, 1]:
# 0 = primary colour, 1 = secondary (dark) colour.

def _texture_weight(style: ClassStyle, x: np.ndarray, y: np.ndarray, radius: float,
                    rng: np.random.Generator) -> np.ndarray:
    period = style.texture_period
    if style.texture == "solid":
        return np.zeros(x.shape, dtype=np.float32)
    if style.texture == "stripes":
        a = np.deg2rad(style.texture_angle)
        phase = x * np.cos(a) + y * np.sin(a)
        return (np.sin(2 * np.pi * phase / period) > 0).astype(np.float32)
    if style.texture == "dots":
        dx = np.mod(x, period) - period / 2
        dy = np.mod(y, period) - period / 2
        return (dx**2 + dy**2 <= (DOT_RADIUS_FRAC * period) ** 2).astype(np.float32)
    if style.texture == "checker":
        parity = np.floor(x / period) + np.floor(y / period)
        return np.mod(parity, 2).astype(np.float32)
    if style.texture == "gradient":
        return np.clip((x / radius + 1) / 2, 0, 1).astype(np.float32)
    if style.texture == "noise":
        bx = np.floor(x / NOISE_BLOCK_PX).astype(np.int64)
        by = np.floor(y / NOISE_BLOCK_PX).astype(np.int64)
        bx -= bx.min()
        by -= by.min()
        blocks = rng.random((by.max() + 1, bx.max() + 1))
        return blocks[by, bx].astype(np.float32)
    raise ValueError(f"unknown texture {style.texture!r}")


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    s = float(np.clip(s, 0, 1))
    v = float(np.clip(v, 0, 1))
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360, s, v), dtype=np.float32)


# ---------------------------------------------------------------------------- drawing

def draw_object(image: np.ndarray, mask: np.ndarray, class_index: int, center: tuple[float, float],
                scale: float, rng: np.random.Generator, angle: float = 0.0,
                style: ClassStyle | None = None) -> None:
    """Paint one object of ``class_index`` into ``image`` (H,W,3 float32 in [0,1]) and ``mask`` (H,W uint8).

    ``center`` is (row, col) in pixels, ``scale`` the object radius in pixels, ``angle`` a rotation
    in radians. ``style`` overrides ``CLASS_STYLES[class_index]`` (e.g. a shifted style for a
    generator); hue/brightness are jittered with ``rng``. Later objects occlude earlier ones.
    """
    style = style or CLASS_STYLES[class_index]
    height, width = mask.shape
    cy, cx = center
    reach = scale * np.sqrt(2) + 1  # rotated bounding box
    r0, r1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, height)
    c0, c1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, width)
    if r0 >= r1 or c0 >= c1:
        return
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    dy, dx = rows - cy, cols - cx
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    x = dx * cos_a + dy * sin_a  # local pixel coordinates (rotate with the object)
    y = -dx * sin_a + dy * cos_a
    inside = SHAPES[style.shape](x / scale, y / scale)
    if not inside.any():
        return

    hue = style.hue + rng.uniform(-HUE_JITTER_DEG, HUE_JITTER_DEG)
    value_shift = rng.uniform(-VALUE_JITTER, VALUE_JITTER)
    saturation = style.saturation + rng.uniform(-SATURATION_JITTER, SATURATION_JITTER)
    primary = _hsv(hue, saturation, style.value + value_shift)
    secondary = _hsv(hue, saturation, style.secondary_value + value_shift)
    t = _texture_weight(style, x, y, scale, rng)[..., None]
    colour = (1 - t) * primary + t * secondary

    region = image[r0:r1, c0:c1]
    region[inside] = colour[inside]
    mask[r0:r1, c0:c1][inside] = class_index


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample a (g, g, C) grid to (size, size, C)."""
    g = grid.shape[0]
    coords = np.linspace(0, g - 1, size, dtype=np.float32)
    i0 = np.minimum(np.floor(coords).astype(np.int64), g - 2)
    f = (coords - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]  # (size, g, C)
    cols = rows[:, i0] * (1 - f[None, :, :]) + rows[:, i0 + 1] * f[None, :, :]
    return cols


def render_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float32 background: low-saturation smooth noise + gradient + faint stripes."""
    base_hue = rng.uniform(0, 360)
    cells = BG_GRID_CELLS
    hues = base_hue + rng.uniform(-40, 40, (cells, cells))
    sats = rng.uniform(0, BG_MAX_SATURATION, (cells, cells))
    vals = rng.uniform(*BG_VALUE_RANGE, (cells, cells))
    grid = np.stack([_hsv(h, s, v) for h, s, v in zip(hues.ravel(), sats.ravel(), vals.ravel())])
    image = _upsample_bilinear(grid.reshape(cells, cells, 3), size)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (xx - 0.5) * np.cos(direction) + (yy - 0.5) * np.sin(direction)
    image = image + BG_GRADIENT_AMPLITUDE * ramp[..., None]
    if rng.random() < BG_STRIPE_PROBABILITY:
        period = rng.uniform(BG_STRIPE_MIN_PERIOD_FRAC, 2 * BG_STRIPE_MIN_PERIOD_FRAC)
        a = rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
        image = image + BG_STRIPE_AMPLITUDE * stripes[..., None]
    return np.clip(image, 0, 1).astype(np.float32)


def add_borders(mask: np.ndarray, border: int) -> np.ndarray:
    """Return a copy of ``mask`` where pixels within ``border`` px of a label change are 255."""
    out = mask.copy()
    if border <= 0:
        return out
    height, width = mask.shape
    padded = np.pad(mask, border, mode="edge")
    is_border = np.zeros(mask.shape, dtype=bool)
    for dy in range(-border, border + 1):
        for dx in range(-border, border + 1):
            shifted = padded[border + dy:border + dy + height, border + dx:border + dx + width]
            is_border |= shifted != mask
    out[is_border] = IGNORE_INDEX
    return out


def render_sample(size: int, rng: np.random.Generator, max_objects: int = 3,
                  border: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One toy image: (H,W,3 uint8 image, H,W uint8 mask with 255 borders)."""
    image = render_background(size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        class_index = int(rng.integers(1, NUM_CLASSES + 1))
        radius = rng.uniform(MIN_DIAMETER_FRAC, MAX_DIAMETER_FRAC) * size / 2
        margin = CENTER_MARGIN_FRAC * radius
        center = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
        angle = rng.uniform(-MAX_ROTATION_RAD, MAX_ROTATION_RAD)
        draw_object(image, mask, class_index, center, radius, rng, angle=angle)
    image = image + rng.normal(0, PIXEL_NOISE_STD, image.shape).astype(np.float32)
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return pixels, add_borders(mask, border)


# ---------------------------------------------------------------------------- writing

def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _save_image_atomic(image: Image.Image, path: Path, **save_kw) -> None:
    tmp = _atomic_path(path)
    image.save(tmp, **save_kw)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def sample_id(split: str, index: int) -> str:
    """The VOC-style id of image ``index`` in ``split``, e.g. ``toy_train_000123``."""
    return f"toy_{split}_{index:06d}"


def generate(out: str | Path, n_train: int = 3000, n_val: int = 500, size: int = 64, seed: int = 0,
             max_objects: int = 3, border: int = 1, progress: bool = True) -> dict:
    """Write a toy world in VOC layout under ``out`` and return its summary (also in toyworld.json)."""
    out = Path(out)
    image_dir, mask_dir = out / "JPEGImages", out / "SegmentationClass"
    sets_dir = out / "ImageSets" / "Segmentation"
    for d in (image_dir, mask_dir, sets_dir):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()

    params = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed,
              "max_objects": max_objects, "border": border, "format_version": FORMAT_VERSION}
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        per_class = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
        ids = [sample_id(split, i) for i in range(n)]
        for index in _progress(range(n), progress, f"toyworld {split}"):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
            pixels, mask = render_sample(size, rng, max_objects, border)
            _save_image_atomic(Image.fromarray(pixels), image_dir / f"{ids[index]}.jpg",
                               format="JPEG", quality=JPEG_QUALITY)
            png = Image.frombytes("P", (size, size), mask.tobytes())
            png.putpalette(palette)
            _save_image_atomic(png, mask_dir / f"{ids[index]}.png", format="PNG")
            present = np.bincount(mask.ravel(), minlength=256)[1:NUM_CLASSES + 1] > 0
            per_class[1:] += present
        _write_text_atomic(sets_dir / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        counts[split] = {VOC_CLASSES[c]: int(per_class[c]) for c in range(1, NUM_CLASSES + 1)}

    summary = {"params": params, "class_image_counts": counts,
               "class_styles": {VOC_CLASSES[c]: asdict(s) for c, s in CLASS_STYLES.items()}}
    _write_text_atomic(out / MANIFEST_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="img")


def shifted_style(class_index: int, hue_shift: float = 0.0, **changes) -> ClassStyle:
    """``CLASS_STYLES[class_index]`` with its hue rotated by ``hue_shift`` degrees and other fields replaced."""
    base = CLASS_STYLES[class_index]
    return replace(base, hue=(base.hue + hue_shift) % 360, **changes)


# ------------------------------------------------------------------------------ `recall toyworld OUT`
def add_arguments(parser) -> None:
    from recall.commands import with_overrides

    parser.add_argument("out")
    with_overrides(parser)


def _legacy_world(directory: Path) -> dict | None:
    """A toy world from before markers existed: it holds toyworld.json."""
    return {"kind": "toyworld", "made_by": "recall toyworld"} if (directory / MANIFEST_NAME).is_file() else None


def main(args) -> int:
    """Generate the toy world from the config's `toyworld` section: beside OUT (`.<name>.partial`), renamed into place
    when complete, so a killed generation never leaves a world that looks whole. OUT must be new, empty, or a toy
    world (replaced); any other directory is refused (recall.ownership)."""
    from omegaconf import OmegaConf

    from recall.commands import compose
    from recall.ownership import Marker, claim, staged

    cfg = compose(args).toyworld
    out = Path(args.out)
    marker = Marker("toyworld", "recall toyworld", OmegaConf.to_container(cfg, resolve=True))
    claim(out, marker, "out", legacy=_legacy_world)
    with staged(out, marker, "out", fresh=True, what="a `recall toyworld`") as partial:
        summary = generate(partial, n_train=cfg.n_train, n_val=cfg.n_val, size=cfg.size, seed=cfg.seed,
                           max_objects=cfg.max_objects)
    counts = summary["class_image_counts"]["train"]
    print(f"toy world in {args.out}: {cfg.n_train} train + {cfg.n_val} val images of {cfg.size}x{cfg.size}; "
          f"train images per class: min {min(counts.values())}, max {max(counts.values())}")
    return 0


if __name__ == "__main__":
    import sys

    from recall.commands import script

    sys.exit(script(__name__))
