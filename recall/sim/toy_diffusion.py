"""The text-to-image diffusion stand-in: a procedural generator prompted by the toy world's class *names*.

It stands in for a diffusion pipeline (``recall.replay.diffusion``) on the toy world the way the toy GAN stands in for
BigGAN: same prompts (``PromptBook``: templates such as "a photo of a {name}", per-class overrides), a seed per image,
no class map. What it simulates:

- *reading the prompt*: its "text encoder" knows the toy classes by their spelled-out names ("potted plant"); the
  longest name found in the prompt is the concept drawn. A prompt naming no class (a bad override) draws scenery only;
  one naming another class draws that class. Nothing maps generator classes to target classes.
- *concept confusion*: with probability ``confusion`` the concept drawn is the class that shares its shape (every
  toy shape belongs to two classes), as diffusion models mix up related concepts.
- *context*: with probability ``context`` a smaller object of a class that goes with the concept
  (``CO_OCCURRING``: a rider beside a horse, a chair at a dining table) stands behind it, as generated scenes
  include what usually surrounds their subject.
- *its own domain*: a rendering style of its own, scaled by ``render_shift`` (0: the toy world's own style): every
  class's hue off by a fixed per-class bias (up to +-``HUE_BIAS_DEG``), over-saturated, brighter, with coarser
  (smoother) textures, on a blurred, low-contrast "bokeh" background without sensor noise.
- *within-class variation*: position, size (larger than the dataset's: "a photo of a X" frames its subject), tilt,
  colour per image, and sometimes two instances.

Image ``k`` of class ``c`` is a deterministic function of (seed, c, k, its prompt): its random stream is
``default_rng([DIFFUSION_SEED_TAG, seed, c, k])``, a stream no toy-world image, GAN sample or web photo uses; every
decision is drawn first, so ``confusion``, ``context`` and ``render_shift`` change only what they are about. The true
mask of the prompted class (``render_with_mask``) is the simulation's truth, for scores only (`recall.sim.truth`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from recall.data.classes import VOC_CLASSES, web_query
from recall.errors import ReplayError
from recall.replay.diffusion import DEFAULT_TEMPLATES, PromptBook
from recall.sim.toyworld import CLASS_STYLES, draw_object, render_background

DIFFUSION_SEED_TAG = 0xD1F5  # "diffusion": a tag no other random stream of the project starts with
NAMES = {web_query(VOC_CLASSES[c]): c for c in CLASS_STYLES}  # what the toy text encoder understands
SAME_SHAPE = {c: next(o for o in CLASS_STYLES if o != c and CLASS_STYLES[o].shape == s.shape)
              for c, s in CLASS_STYLES.items()}
# What a generated scene puts beside its subject (VOC indices; every class has one): people with what they ride or
# sit on, chairs at tables, sofas by the tv...
CO_OCCURRING = {1: 15, 2: 15, 4: 15, 6: 15, 7: 15, 9: 11, 10: 15, 11: 9, 13: 15, 14: 15, 17: 15, 18: 15, 19: 15,
                20: 18, 12: 15, 8: 18, 15: 12, 16: 9, 3: 16, 5: 11}

# The generator's domain (at render_shift 1).
HUE_BIAS_DEG = 20.0  # a fixed per-class hue bias, drawn once per seed
SATURATION_GAIN = 1.15  # over-saturated colours (clipped to 1)
VALUE_GAIN = 0.08  # brighter objects
TEXTURE_PERIOD_GAIN = 1.5  # coarser, smoother textures
BACKGROUND_BLUR_PX = 3  # a bokeh background (box blur radius, pixels)
BACKGROUND_CONTRAST = 0.6  # of the background about its mean
# Within-class variation (fractions of the image size).
RADIUS_FRAC = (0.2, 0.42)  # "a photo of a X" frames its subject larger than the dataset's scenes (0.125..0.31)
CENTRE_STD_FRAC = 0.12
MAX_ROTATION_RAD = 0.4
HUE_JITTER_DEG = 6.0
VALUE_JITTER = 0.06
TWO_INSTANCES = 0.15  # probability of a second, smaller instance of the concept
CONTEXT_RADIUS_FRAC = (0.1, 0.2)
PIXEL_NOISE_STD = 0.005  # a generator's output is clean (the dataset: 0.015)


def concept_of(prompt: str) -> int | None:
    """The toy class a prompt names (the longest name in it, by whole words), None when it names none."""
    words = f" {' '.join(prompt.lower().replace(',', ' ').split())} "
    found = [(len(name), c) for name, c in NAMES.items() if f" {name} " in words]
    return max(found)[1] if found else None


def _blur(image: np.ndarray, radius: int) -> np.ndarray:
    """A separable box blur (edges replicated)."""
    if radius <= 0:
        return image
    kernel = np.ones(2 * radius + 1, dtype=np.float32) / (2 * radius + 1)
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 0, padded)
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 1, rows).astype(np.float32)


class ToyDiffusion:
    """A prompted toy generator that is also a replay source (see the module docstring)."""

    name = "toy_diffusion"

    def __init__(self, size: int = 64, seed: int = 0, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 prompts: Mapping[str, str | Sequence[str]] | None = None, render_shift: float = 1.0,
                 confusion: float = 0.05, context: float = 0.3) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 16:
            raise ReplayError(f"toy_diffusion: replay.source.size must be an integer >= 16, got {size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ReplayError(f"toy_diffusion: replay.source.seed must be a non-negative integer, got {seed!r}")
        if not 0 <= render_shift <= 3:
            raise ReplayError(f"toy_diffusion: replay.source.render_shift must be in [0, 3] (0: the toy world's own "
                              f"style, 1: the generator's), got {render_shift}")
        for key, value in (("confusion", confusion), ("context", context)):
            if not 0 <= value <= 1:
                raise ReplayError(f"toy_diffusion: replay.source.{key} is a probability in [0, 1], got {value}")
        self.book = PromptBook(templates, prompts)
        self.size, self.seed = size, seed
        self.render_shift, self.confusion, self.context = float(render_shift), float(confusion), float(context)
        bias = np.random.default_rng([DIFFUSION_SEED_TAG, seed]).uniform(-1, 1, max(CLASS_STYLES) + 1)
        self._styles = {c: self._domain_style(c, float(bias[c])) for c in CLASS_STYLES}

    def __repr__(self) -> str:
        return (f"ToyDiffusion(size={self.size}, seed={self.seed}, render_shift={self.render_shift}, "
                f"confusion={self.confusion}, context={self.context})")

    @property
    def params(self) -> dict:
        return {"size": self.size, "seed": self.seed, **self.book.params, "render_shift": self.render_shift,
                "confusion": self.confusion, "context": self.context}

    def _domain_style(self, c: int, bias: float):
        """Class ``c`` as this generator draws it (the module docstring's domain, times ``render_shift``)."""
        own, shift = CLASS_STYLES[c], self.render_shift
        return replace(own, hue=(own.hue + shift * bias * HUE_BIAS_DEG) % 360,
                       saturation=float(min(own.saturation * (1 + shift * (SATURATION_GAIN - 1)), 1.0)),
                       value=float(np.clip(own.value + shift * VALUE_GAIN, 0.2, 1.0)),
                       texture_period=own.texture_period * TEXTURE_PERIOD_GAIN ** shift)

    # ------------------------------------------------------------------ rendering
    def render_with_mask(self, class_index: int, class_name: str, index: int) -> tuple[Image.Image, np.ndarray, dict]:
        """Image ``index`` of the class (its prompt from ``class_name``), the true mask of ``class_index``'s pixels
        in it, and what was drawn (prompt, concept, whether confused, context class)."""
        if class_index not in CLASS_STYLES:
            raise ReplayError(f"toy_diffusion draws the toy classes 1..{max(CLASS_STYLES)}, got class {class_index}")
        if index < 0:
            raise ReplayError(f"toy_diffusion: image index must be >= 0, got {index}")
        size, shift = self.size, self.render_shift
        prompt = self.book.prompt(class_name, index)
        rng = np.random.default_rng([DIFFUSION_SEED_TAG, self.seed, class_index, index])
        # Every decision first (see the module docstring).
        confused, with_context, two = rng.random(3) < (self.confusion, self.context, TWO_INSTANCES)
        centre = size / 2 + rng.normal(0, CENTRE_STD_FRAC * size, 2)
        radius = size * float(rng.uniform(*RADIUS_FRAC))
        angle = float(rng.uniform(-MAX_ROTATION_RAD, MAX_ROTATION_RAD))
        hue_jitter, value_jitter = rng.normal(0, (HUE_JITTER_DEG, VALUE_JITTER))
        second_centre, second_radius = rng.uniform(0.2, 0.8, 2) * size, radius * float(rng.uniform(0.5, 0.8))
        context_centre = rng.uniform(0.15, 0.85, 2) * size
        context_radius = size * float(rng.uniform(*CONTEXT_RADIUS_FRAC))

        named = concept_of(prompt)
        drawn = None if named is None else SAME_SHAPE[named] if confused else named
        background = render_background(size, rng)
        mean = background.mean(axis=(0, 1), keepdims=True)
        styled = mean + (1 - shift * (1 - BACKGROUND_CONTRAST)) * (_blur(background, BACKGROUND_BLUR_PX) - mean)
        image = np.clip(background + min(shift, 1.0) * (styled - background), 0, 1).astype(np.float32)
        scratch = np.zeros((size, size), dtype=np.uint8)
        context_class = CO_OCCURRING.get(drawn) if with_context and drawn is not None else None
        if context_class is not None:
            draw_object(image, scratch, context_class, (float(context_centre[0]), float(context_centre[1])),
                        context_radius, rng, style=self._styles[context_class])
        if drawn is not None:
            base = self._styles[drawn]
            style = replace(base, hue=(base.hue + hue_jitter) % 360,
                            value=float(np.clip(base.value + value_jitter, 0.2, 1.0)))
            if two:
                draw_object(image, scratch, drawn, (float(second_centre[0]), float(second_centre[1])),
                            second_radius, rng, angle=-angle, style=style)
            draw_object(image, scratch, drawn, (float(centre[0]), float(centre[1])), radius, rng, angle=angle,
                        style=style)
        image = image + rng.normal(0, PIXEL_NOISE_STD, image.shape).astype(np.float32)
        pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        facts = {"prompt": prompt, "concept": drawn, "confused": bool(confused and drawn is not None),
                 "context_class": context_class}
        return Image.fromarray(pixels), scratch == class_index, facts

    # ------------------------------------------------------------ replay source
    def available(self, class_index: int, class_name: str) -> None:
        return None  # a generator never runs out

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        for index in range(max(start, 0), start + count):
            image, _, facts = self.render_with_mask(class_index, class_name, index)
            yield image, {"index": index, "source_class": web_query(class_name), "license": "generated",
                          "owner": None, "prompt": facts["prompt"], "seed": self.seed,
                          "concept": facts["concept"], "confused": facts["confused"],
                          "context_class": facts["context_class"]}
