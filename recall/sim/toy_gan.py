"""The BigGAN stand-in: a procedural class-conditional generator with its own class space.

Like BigGAN's ImageNet classes, the generator's source classes are not the target classes:

- one *look-alike* per toy class: the class style with a small domain shift (hue rotated by
  10-20 degrees, a different texture period and brightness);
- *variants*: a second, more shifted version of some toy classes (near-duplicates, like the
  many dog breeds of ImageNet);
- *distractors*: shape/texture combinations that no toy class uses.

Their order is shuffled (fixed, independent of ``seed``), so source index != target index and
the mapping has to be found (``recall.replay.classmap``). A sample is driven by a latent
``z ~ N(0, I)`` of ``LATENT_DIM`` entries, truncated BigGAN-style (entries beyond
``2 * truncation`` are resampled); z sets the object's position, scale, rotation, colour
jitter, the background and an optional small distractor object. Images are object-centric
(one large object, like ImageNet photos) and deterministic per (seed, source class, index).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from recall.replay.classmap import checked_mapping
from recall.replay.pool import ReplayError
from recall.sim.toyworld import (
    CLASS_STYLES,
    PIXEL_NOISE_STD,
    SHAPES,
    ClassStyle,
    draw_object,
    render_background,
    shifted_style,
)

LATENT_DIM = 8
TRUNCATION_SIGMAS = 2.0  # |z| <= 2 * truncation
MAX_RESAMPLE_ROUNDS = 100  # then clip (only reached for tiny truncations)
CLASS_SPACE_SEED = 20210  # the source class space is fixed, like a GAN's training classes
NUM_TARGET_CLASSES = len(CLASS_STYLES)
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient", "noise")

# Domain shift of the source classes (degrees of hue, factors of texture period / brightness).
LOOKALIKE_HUE_SHIFT = (10.0, 20.0)
LOOKALIKE_PERIOD_FACTOR = (0.75, 1.3)
LOOKALIKE_VALUE_DROP = (0.03, 0.12)
VARIANT_HUE_SHIFT = (30.0, 45.0)
VARIANT_PERIOD_FACTOR = (1.4, 1.8)
VARIANT_VALUE_DROP = (0.15, 0.25)

# How z drives a sample (fractions of the image size unless noted).
POSITION_STD_FRAC = 0.07
DISTRACTOR_LABEL = 2  # in the scratch mask; the main object is 1
RADIUS_FRAC = 0.34  # mean object radius: an object-centric image
RADIUS_STD_FRAC = 0.045
ROTATION_STD_RAD = 0.15
HUE_JITTER_STD_DEG = 4.0
VALUE_JITTER_STD = 0.04
DISTRACTOR_Z_THRESHOLD = 1.0  # z[6] above this adds a small distractor object (~16% at truncation 1)
DISTRACTOR_RADIUS_FRAC = 0.12
DISTRACTOR_OFFSET_FRAC = 0.36


@dataclass(frozen=True)
class SourceClass:
    """One class of the generator: how it looks and, for inspection only, what it imitates."""

    name: str
    style: ClassStyle
    kind: str  # "lookalike" | "variant" | "distractor"
    target: int | None  # the toy class it was made from (None for distractors)


def _signed(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(*bounds))


def _derived(rng: np.random.Generator, c: int, hue: tuple[float, float], period: tuple[float, float],
             value_drop: tuple[float, float]) -> ClassStyle:
    base = CLASS_STYLES[c]
    return shifted_style(c, hue_shift=_signed(rng, hue),
                         texture_period=base.texture_period * rng.uniform(*period),
                         value=base.value - rng.uniform(*value_drop),
                         secondary_value=float(np.clip(base.secondary_value + rng.uniform(-0.05, 0.05), 0.1, 0.5)))


def source_class_space(num_source_classes: int) -> list[SourceClass]:
    """The generator's classes: 20 look-alikes, then variants and distractors, in a fixed shuffled order."""
    used = {(s.shape, s.texture) for s in CLASS_STYLES.values()}
    free = [(shape, texture) for shape in SHAPES for texture in TEXTURES if (shape, texture) not in used]
    n_extra = num_source_classes - NUM_TARGET_CLASSES
    n_variants = min(n_extra // 2, NUM_TARGET_CLASSES)
    n_distractors = n_extra - n_variants
    if n_extra < 0 or n_distractors > len(free):
        raise ReplayError(f"num_source_classes must be in {NUM_TARGET_CLASSES}.."
                          f"{2 * NUM_TARGET_CLASSES + len(free)}, got {num_source_classes}")
    rng = np.random.default_rng(CLASS_SPACE_SEED)
    targets = sorted(CLASS_STYLES)
    made: list[tuple[ClassStyle, str, int | None]] = []
    for c in targets:
        made.append((_derived(rng, c, LOOKALIKE_HUE_SHIFT, LOOKALIKE_PERIOD_FACTOR, LOOKALIKE_VALUE_DROP),
                     "lookalike", c))
    for c in rng.permutation(targets)[:n_variants]:
        made.append((_derived(rng, int(c), VARIANT_HUE_SHIFT, VARIANT_PERIOD_FACTOR, VARIANT_VALUE_DROP),
                     "variant", int(c)))
    for k in rng.permutation(len(free))[:n_distractors]:
        shape, texture = free[int(k)]
        style = ClassStyle(shape=shape, texture=texture, hue=float(rng.uniform(0, 360)),
                           texture_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
                           texture_period=float(rng.uniform(4.0, 8.0)))
        made.append((style, "distractor", None))
    order = rng.permutation(len(made))
    return [SourceClass(name=f"src{i:02d}_{made[j][0].shape}_{made[j][0].texture}", style=made[j][0],
                        kind=made[j][1], target=made[j][2]) for i, j in enumerate(order)]


class ToyGenerator:
    """A class-conditional toy "GAN" (see the module docstring) that is also a replay source.

    ``mapping`` (target class -> source class index, from ``classmap.map_classes`` or a hand-written
    file) says which source class replays which target class; ``images`` needs it.
    """

    name = "toy_gan"

    def __init__(self, num_source_classes: int = 40, truncation: float = 1.0, size: int = 64, seed: int = 0,
                 mapping: Mapping[int | str, int] | None = None) -> None:
        if truncation < 0:
            raise ReplayError(f"truncation must be >= 0, got {truncation}")
        self.num_source_classes = num_source_classes
        self.truncation = float(truncation)
        self.size = size
        self.seed = seed
        self.classes = source_class_space(num_source_classes)
        self.source_names = [c.name for c in self.classes]
        self._distractors = [c.style for c in self.classes if c.kind == "distractor"]
        self.mapping: dict[int, int] = {}
        if mapping is not None:
            self.set_mapping(mapping)

    def __repr__(self) -> str:
        return (f"ToyGenerator(num_source_classes={self.num_source_classes}, truncation={self.truncation}, "
                f"size={self.size}, seed={self.seed})")

    @property
    def params(self) -> dict:
        return {"num_source_classes": self.num_source_classes, "truncation": self.truncation, "size": self.size,
                "seed": self.seed, "mapping": {str(k): v for k, v in sorted(self.mapping.items())}}

    def set_mapping(self, mapping: Mapping[int | str, int]) -> None:
        """Set target class -> source class index (keys may be strings, e.g. from a config)."""
        self.mapping = checked_mapping(mapping, self.num_source_classes)

    def lookalike_mapping(self) -> dict[int, int]:
        """The ground truth: each toy class -> the source class made to look like it (for evaluation)."""
        return {c.target: i for i, c in enumerate(self.classes) if c.kind == "lookalike"}

    # ------------------------------------------------------------------ sampling
    def latent(self, source_class: int, index: int) -> np.ndarray:
        """The truncated latent z of sample ``index`` of ``source_class``."""
        rng = np.random.default_rng([self.seed, source_class, index])
        z = rng.standard_normal(LATENT_DIM)
        bound = TRUNCATION_SIGMAS * self.truncation
        for _ in range(MAX_RESAMPLE_ROUNDS):
            outside = np.abs(z) > bound
            if not outside.any():
                break
            z[outside] = rng.standard_normal(int(outside.sum()))
        return np.clip(z, -bound, bound)

    def render(self, source_class: int, z: np.ndarray) -> Image.Image:
        """The image of ``source_class`` at latent ``z`` (a deterministic function of both)."""
        return self.render_with_mask(source_class, z)[0]

    def render_with_mask(self, source_class: int, z: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        """The image and a mask of its main object (1; 0 elsewhere): ground truth that a real GAN never
        gives, used only to measure label evaluation (`recall.sim.oracle`)."""
        if not 0 <= source_class < self.num_source_classes:
            raise ReplayError(f"source class {source_class} out of range 0..{self.num_source_classes - 1}")
        size = self.size
        rng = np.random.default_rng(np.frombuffer(np.asarray(z, dtype=np.float64).tobytes(), dtype=np.uint32))
        image = render_background(size, rng)
        scratch = np.zeros((size, size), dtype=np.uint8)
        centre = (size / 2 + z[0] * POSITION_STD_FRAC * size, size / 2 + z[1] * POSITION_STD_FRAC * size)
        if z[6] > DISTRACTOR_Z_THRESHOLD and self._distractors:  # small object in the corner opposite the main one
            style = self._distractors[int(abs(z[7]) * 1000) % len(self._distractors)]
            offset = DISTRACTOR_OFFSET_FRAC * size
            spot = (size / 2 - np.sign(z[0] or 1) * offset, size / 2 - np.sign(z[1] or 1) * offset)
            draw_object(image, scratch, DISTRACTOR_LABEL, spot, DISTRACTOR_RADIUS_FRAC * size, rng, style=style)
        base = self.classes[source_class].style
        style = replace(base, hue=(base.hue + z[4] * HUE_JITTER_STD_DEG) % 360,
                        value=float(np.clip(base.value + z[5] * VALUE_JITTER_STD, 0.2, 1.0)))
        radius = max(size * (RADIUS_FRAC + RADIUS_STD_FRAC * z[2]), 2.0)
        draw_object(image, scratch, 1, centre, radius, rng, angle=float(z[3] * ROTATION_STD_RAD), style=style)
        image = image + rng.normal(0, PIXEL_NOISE_STD, image.shape).astype(np.float32)
        return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)), (scratch == 1).astype(np.uint8)

    def sample(self, source_class: int, n: int, start_index: int = 0) -> list[Image.Image]:
        """Samples ``start_index .. start_index + n - 1`` of ``source_class``."""
        return [self.render(source_class, self.latent(source_class, i)) for i in range(start_index, start_index + n)]

    # ------------------------------------------------------------ replay source
    def available(self, class_index: int, class_name: str) -> None:
        return None  # a generator never runs out

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        if class_index not in self.mapping:
            raise ReplayError(f"ToyGenerator has no source class for target class {class_index} ({class_name}); "
                              f"set a mapping (recall.replay.classmap.map_classes / load_mapping) covering it")
        source_class = self.mapping[class_index]
        for index in range(start, start + count):
            yield self.render(source_class, self.latent(source_class, index)), {
                "index": index, "source_class": self.source_names[source_class],
                "source_class_index": source_class, "license": "generated", "owner": None,
                "truncation": self.truncation, "seed": self.seed}
