"""The BigGAN stand-in: a procedural class-conditional generator of the toy "ImageNet"'s classes.

Like BigGAN, which samples ImageNet's classes, the generator samples the toy ImageNet's class space
(``recall.sim.toy_imagenet.class_space``: look-alikes of every toy-world class, shifted in hue, texture period and
brightness, more-shifted variants, distractors and further classes that are none of them). Source index !=
target index, so the mapping has to be found (``recall.replay.classmap``, with the classifier pretrained on the toy
ImageNet). A sample is driven by a latent ``z ~ N(0, I)`` of ``LATENT_DIM`` entries, truncated BigGAN-style
(entries beyond ``2 * truncation`` are resampled); z sets the object's position, scale, rotation, colour jitter,
the background and an optional small distractor object. Samples are object-centric and less varied than the toy
ImageNet's photos (a generator's modes, not a photo collection), deterministic per (seed, source class, index).

``render_shift`` scales the domain shift the generator *renders* for a class made from a toy-world class (a
look-alike or a more-shifted variant): 1 draws the class as the toy ImageNet holds it (the default, what the
classifier learnt and the class map chose), 0 draws it in the toy-world class's own style (hue, texture period,
brightness of both colours), 2 twice as far from it. Only the rendering changes: the class space, and with it the
toy ImageNet, the pretrained encoder and the class map, stay as they are, so a sweep over it changes replay quality
alone. What it never removes is the generator's own composition (one large centred object on a random background,
where a toy-world image holds several objects in a scene).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

import numpy as np
from PIL import Image

from recall.replay.classmap import checked_mapping
from recall.errors import ReplayError
from recall.sim.toy_imagenet import NUM_CLASSES, class_space
from recall.sim.toyworld import CLASS_STYLES, PIXEL_NOISE_STD, ClassStyle, draw_object, render_background

LATENT_DIM = 8
TRUNCATION_SIGMAS = 2.0  # |z| <= 2 * truncation
MAX_RESAMPLE_ROUNDS = 100  # then clip (only reached for tiny truncations)

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


def shifted_render_style(own: ClassStyle, imitation: ClassStyle, shift: float) -> ClassStyle:
    """`imitation` (a class made from the toy-world class styled `own`) with its shift from `own` scaled by `shift`:
    the hue along the shorter way round the circle, the texture period geometrically, the brightness of both colours
    linearly (clipped to what the renderer draws). shift=1 returns `imitation` itself, shift=0 `own`'s colours."""
    if shift == 1.0:
        return imitation
    hue_gap = (imitation.hue - own.hue + 180.0) % 360.0 - 180.0

    def linear(a: float, b: float, low: float, high: float) -> float:
        return float(np.clip(a + shift * (b - a), low, high))

    return replace(imitation, hue=(own.hue + shift * hue_gap) % 360.0,
                   texture_period=own.texture_period * (imitation.texture_period / own.texture_period) ** shift,
                   value=linear(own.value, imitation.value, 0.2, 1.0),
                   secondary_value=linear(own.secondary_value, imitation.secondary_value, 0.1, 0.5))


class ToyGenerator:
    """A class-conditional toy "GAN" (see the module docstring) that is also a replay source.

    ``mapping`` (target class -> source class index, from ``classmap.map_classes`` or a hand-written
    file) says which source class replays which target class; ``images`` needs it.
    """

    name = "toy_gan"

    def __init__(self, num_source_classes: int = NUM_CLASSES, truncation: float = 1.0, size: int = 64, seed: int = 0,
                 mapping: Mapping[int | str, int] | None = None, render_shift: float = 1.0) -> None:
        if truncation < 0:
            raise ReplayError(f"truncation must be >= 0, got {truncation}")
        if not 0 <= render_shift <= 3:
            raise ReplayError(f"replay.source.render_shift must be in [0, 3] (0: the toy-world classes' own style, 1: "
                              f"the toy ImageNet's look-alikes, as the class map saw them), got {render_shift}")
        self.render_shift = float(render_shift)
        self.num_source_classes = num_source_classes
        self.truncation = float(truncation)
        self.size = size
        self.seed = seed
        try:
            self.classes = class_space(num_source_classes)
        except ValueError as error:
            raise ReplayError(f"toy generator: {error}") from None
        self.source_names = [c.name for c in self.classes]
        self._distractors = [c.style for c in self.classes if c.kind == "distractor"]
        self._styles = [c.style if c.target is None else shifted_render_style(CLASS_STYLES[c.target], c.style,
                                                                              self.render_shift)
                        for c in self.classes]
        self.mapping: dict[int, int] = {}
        if mapping is not None:
            self.set_mapping(mapping)

    def __repr__(self) -> str:
        return (f"ToyGenerator(num_source_classes={self.num_source_classes}, truncation={self.truncation}, "
                f"size={self.size}, seed={self.seed}, render_shift={self.render_shift})")

    @property
    def params(self) -> dict:
        return {"num_source_classes": self.num_source_classes, "truncation": self.truncation, "size": self.size,
                "seed": self.seed, "render_shift": self.render_shift,
                "mapping": {str(k): v for k, v in sorted(self.mapping.items())}}

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
        gives, used only to measure label evaluation (`recall.sim.truth`)."""
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
        base = self._styles[source_class]
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
                "truncation": self.truncation, "seed": self.seed, "render_shift": self.render_shift}
