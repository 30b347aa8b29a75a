"""The Flickr stand-in: procedural "web search results" for a text query per class.

RECALL's web replay downloads ~1000 Flickr photos per class, found by searching the class name
(``web_query``: "dining table", "potted plant", "tv monitor" spelled out), and uses them unfiltered.
Without internet, ``ToyWebPhotos`` renders such results locally, in a *web domain* that differs
from both the toy dataset (``recall.sim.toyworld``) and the toy GAN (``recall.sim.toy_gan``):

- *scene photos*, not object-centric: the queried class's object anywhere in the frame, from small
  to filling (and cropped by) the frame, at any tilt; with probability ``WEB_CLUTTER_PROBABILITY``
  one or two smaller objects of other classes stand around it;
- a per-photo appearance shift of the class style (hue within +-``WEB_HUE_SHIFT_DEG``, texture
  period, brightness): other cameras, other lighting, other instances of the class;
- backgrounds of the toy world's family, colour-graded like processed photos (more saturated,
  other contrast and exposure), then lens vignetting and stronger sensor noise over the whole photo;
- *tag noise*: with probability ``tag_noise`` a result does not show the queried class at all
  (another class, or only background), like photos whose tags are wrong. The truth is recorded in
  the meta (``shows_class``, ``shown_class``) for diagnostics only; RECALL never looks at it.

Photo k of the results for class c is a deterministic function of (seed, c, k): its random stream
is ``default_rng([WEB_SEED_TAG, seed, c, k])``, a stream no toy-world image or GAN sample uses. All
of a photo's decisions are drawn first, by draws that do not depend on ``tag_noise``, so changing
``tag_noise`` only swaps the content of the photos that become noise and leaves every other photo unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from recall.data.classes import web_query
from recall.errors import ReplayError
from recall.sim.toyworld import (
    CLASS_STYLES,
    draw_object,
    render_background,
    shifted_style,
)

# A tag no other random stream of the project starts with ("F11C" ~ Flickr): the toy world seeds
# with [seed, split, index] and the GAN with [seed, source class, index] or its latent bytes.
WEB_SEED_TAG = 0xF11C
DEFAULT_PER_CLASS_LIMIT = 1000  # the paper downloads ~1000 photos per class
MIN_SIZE = 8  # below this a small object is a pixel or two
TOY_CLASSES = tuple(sorted(CLASS_STYLES))

# Tag noise: the share of wrong results that show no toy object at all (a landscape tagged "cow",
# no clutter either); the others show a random other class instead of the queried one.
NOISE_BACKGROUND_ONLY_SHARE = 0.3

# The main object (fractions of the image size unless noted). The dataset's radii are 0.125..0.31
# of the size; web photos range from a small object in a scene to a close-up cropped by the frame.
WEB_RADIUS_FRAC = (0.07, 0.6)  # drawn log-uniformly, so small and large objects are equally common
MIN_RADIUS_PX = 4.0  # smaller shapes are not recognisable (a crescent would vanish)
WEB_CENTER_MARGIN_RADII = 0.5  # the centre stays >= half a radius inside the frame: always visible
WEB_MAX_ROTATION_RAD = 0.6  # hand-held cameras tilt more than the dataset's 0.3
# Per-photo appearance shift of the class style (on top of draw_object's own per-object jitter).
WEB_HUE_SHIFT_DEG = 12.0
WEB_PERIOD_FACTOR = (0.7, 1.5)  # the texture seen from another distance / at another resolution
WEB_VALUE_JITTER = 0.12
WEB_VALUE_RANGE = (0.35, 1.0)

# Clutter: other classes standing around, drawn before (so behind) the queried object.
WEB_CLUTTER_PROBABILITY = 0.4
WEB_MAX_CLUTTER = 2
WEB_CLUTTER_RADIUS_FRAC = (0.05, 0.14)

# Web-domain look: background colour grading, then vignetting and sensor noise on the whole photo.
WEB_BG_SATURATION_GAIN = (1.2, 2.0)  # processed photos are more vivid than the toy backgrounds
WEB_BG_CONTRAST_GAIN = (0.7, 1.4)
WEB_BG_BRIGHTNESS_SHIFT = (-0.1, 0.15)
WEB_VIGNETTE_STRENGTH = (0.0, 0.35)  # darkening of the corners (a camera cue the dataset lacks)
WEB_PIXEL_NOISE_STD = 0.025  # the dataset uses PIXEL_NOISE_STD = 0.015

# Flickr metadata. Licence ids of flickr.photos.licenses.getInfo that allow reuse with derivatives:
# 1 BY-NC-SA, 2 BY-NC, 4 BY, 5 BY-SA, 9 CC0, 10 Public Domain Mark.
FLICKR_LICENSES = ("1", "2", "4", "5", "9", "10")
OWNER_COUNT = 5000  # owners are drawn from a fixed population, so some upload several results
EXTRA_TAGS = (1, 3)  # how many unrelated tags a photo carries besides the query words (inclusive)
TAG_WORDS = ("travel", "summer", "holiday", "nature", "city", "street", "sunset", "family", "friends", "vacation",
             "canon", "nikon", "iphone", "2019", "weekend", "outdoor", "light", "color", "art", "photo")


@dataclass(frozen=True)
class PhotoFacts:
    """What a search result is besides its pixels: the truth behind its tags and its Flickr metadata."""

    shown_class: int | None  # the class of the main object (None: background only)
    shows_class: bool  # False for a tag-noise result
    owner: str
    license: str
    extra_tags: tuple[str, ...]


class ToyWebPhotos:
    """Toy Flickr search results for each class (see the module docstring); a replay source.

    ``images`` yields results 0, 1, ... of the query ``web_query(class_name)``; the photo content
    comes from ``class_index`` (one of the 20 toy classes). At most ``per_class_limit`` results exist
    per class, like a search that stops after a fixed number of pages.
    """

    name = "toy_web"

    def __init__(self, size: int = 64, seed: int = 0, tag_noise: float = 0.15,
                 per_class_limit: int = DEFAULT_PER_CLASS_LIMIT) -> None:
        if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
            raise ReplayError(f"toy_web: size must be an integer >= {MIN_SIZE} (pixels), got {size!r}")
        if not 0.0 <= float(tag_noise) <= 1.0:
            raise ReplayError(f"toy_web: tag_noise is the share of results not showing the queried class and "
                              f"must be in [0, 1], got {tag_noise!r}")
        if not isinstance(per_class_limit, (int, np.integer)) or per_class_limit < 0:
            raise ReplayError(f"toy_web: per_class_limit must be an integer >= 0, got {per_class_limit!r}")
        self.size = int(size)
        self.seed = int(seed)
        self.tag_noise = float(tag_noise)
        self.per_class_limit = int(per_class_limit)

    def __repr__(self) -> str:
        return (f"ToyWebPhotos(size={self.size}, seed={self.seed}, tag_noise={self.tag_noise}, "
                f"per_class_limit={self.per_class_limit})")

    @property
    def params(self) -> dict:
        return {"size": self.size, "seed": self.seed, "tag_noise": self.tag_noise,
                "per_class_limit": self.per_class_limit}

    def photo_id(self, class_index: int, index: int) -> str:
        """A stable id of result ``index`` for class ``class_index``, like a Flickr photo id."""
        return f"w{self.seed}_{class_index:02d}_{index:06d}"

    # ------------------------------------------------------------------ rendering
    def render_with_mask(self, class_index: int, index: int) -> tuple[Image.Image, np.ndarray]:
        """Result ``index`` for ``class_index`` and a boolean mask of the queried class's pixels.

        The mask is ground truth that a real web search never gives (empty for tag-noise results),
        used only to measure label evaluation.
        """
        image, mask, _ = self._render(class_index, index)
        return image, mask

    def facts(self, class_index: int, index: int) -> PhotoFacts:
        """What result ``index`` for ``class_index`` is besides its pixels (the truth behind its tags)."""
        return self._render(class_index, index)[2]

    def _render(self, class_index: int, index: int) -> tuple[Image.Image, np.ndarray, PhotoFacts]:
        if class_index not in CLASS_STYLES:
            raise ReplayError(f"toy_web renders the toy classes {TOY_CLASSES[0]}..{TOY_CLASSES[-1]}, "
                              f"got class {class_index}")
        if index < 0:
            raise ReplayError(f"toy_web: result index must be >= 0, got {index}")
        size = self.size
        rng = np.random.default_rng([WEB_SEED_TAG, self.seed, class_index, index])
        others = [c for c in TOY_CLASSES if c != class_index]

        # Every decision first, independently of tag_noise (see the module docstring).
        noisy = rng.random() < self.tag_noise
        background_only = rng.random() < NOISE_BACKGROUND_ONLY_SHARE
        other_class = int(rng.choice(others))
        radius = max(size * float(np.exp(rng.uniform(*np.log(WEB_RADIUS_FRAC)))), MIN_RADIUS_PX)
        margin = min(WEB_CENTER_MARGIN_RADII * radius, size / 2)
        centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        angle = float(rng.uniform(-WEB_MAX_ROTATION_RAD, WEB_MAX_ROTATION_RAD))
        hue_shift = float(rng.uniform(-WEB_HUE_SHIFT_DEG, WEB_HUE_SHIFT_DEG))
        period_factor = float(rng.uniform(*WEB_PERIOD_FACTOR))
        value_shift = float(rng.uniform(-WEB_VALUE_JITTER, WEB_VALUE_JITTER))
        has_clutter = rng.random() < WEB_CLUTTER_PROBABILITY
        n_clutter = int(rng.integers(1, WEB_MAX_CLUTTER + 1)) * has_clutter  # drawn either way
        clutter_classes = rng.choice(others, WEB_MAX_CLUTTER)
        clutter_radii = rng.uniform(*WEB_CLUTTER_RADIUS_FRAC, WEB_MAX_CLUTTER) * size
        clutter_centres = rng.uniform(0, size, (WEB_MAX_CLUTTER, 2))
        saturation_gain = float(rng.uniform(*WEB_BG_SATURATION_GAIN))
        contrast_gain = float(rng.uniform(*WEB_BG_CONTRAST_GAIN))
        brightness_shift = float(rng.uniform(*WEB_BG_BRIGHTNESS_SHIFT))
        vignette = float(rng.uniform(*WEB_VIGNETTE_STRENGTH))
        owner = f"user_{int(rng.integers(OWNER_COUNT)):04d}"
        license_id = str(rng.choice(FLICKR_LICENSES))
        extra_tags = tuple(str(t) for t in rng.choice(TAG_WORDS, int(rng.integers(EXTRA_TAGS[0], EXTRA_TAGS[1] + 1)),
                                                      replace=False))
        shown = None if noisy and background_only else other_class if noisy else class_index
        if shown is None:
            n_clutter = 0  # a wrong result of pure scenery: no toy object at all

        image = _grade(render_background(size, rng), saturation_gain, contrast_gain, brightness_shift)
        scratch = np.zeros((size, size), dtype=np.uint8)
        for c, r, spot in zip(clutter_classes[:n_clutter], clutter_radii, clutter_centres):
            draw_object(image, scratch, int(c), (float(spot[0]), float(spot[1])), float(r), rng,
                        angle=float(rng.uniform(-WEB_MAX_ROTATION_RAD, WEB_MAX_ROTATION_RAD)))
        if shown is not None:
            base = CLASS_STYLES[shown]
            style = shifted_style(shown, hue_shift=hue_shift, texture_period=base.texture_period * period_factor,
                                  value=float(np.clip(base.value + value_shift, *WEB_VALUE_RANGE)))
            draw_object(image, scratch, shown, centre, radius, rng, angle=angle, style=style)
        image = _vignette(image, vignette)
        image = image + rng.normal(0, WEB_PIXEL_NOISE_STD, image.shape).astype(np.float32)
        pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        facts = PhotoFacts(shown_class=shown, shows_class=not noisy, owner=owner, license=license_id,
                           extra_tags=extra_tags)
        return Image.fromarray(pixels), scratch == class_index, facts

    # ------------------------------------------------------------ replay source
    def available(self, class_index: int, class_name: str) -> int:
        return self.per_class_limit

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        """``(RGB image, meta)`` for results ``start .. start + count - 1`` (up to ``per_class_limit``)."""
        query = web_query(class_name)
        for index in range(max(start, 0), min(start + count, self.per_class_limit)):
            image, _, facts = self._render(class_index, index)
            yield image, {"index": index, "source_class": query, "query": query,
                          "photo_id": self.photo_id(class_index, index), "owner": facts.owner,
                          "license": facts.license, "tags": " ".join([*query.split(), *facts.extra_tags]),  # Flickr returns tags as one string
                          "shows_class": facts.shows_class, "shown_class": facts.shown_class}


def _grade(image: np.ndarray, saturation_gain: float, contrast_gain: float, brightness_shift: float) -> np.ndarray:
    """Colour-grade an (H, W, 3) float image in [0, 1]: saturation and contrast about its grey / mean, exposure."""
    grey = image.mean(axis=2, keepdims=True)
    image = grey + saturation_gain * (image - grey)
    image = image.mean() + contrast_gain * (image - image.mean()) + brightness_shift
    return np.clip(image, 0, 1).astype(np.float32)


def _vignette(image: np.ndarray, strength: float) -> np.ndarray:
    """Darken towards the corners: brightness falls by ``strength`` at the corners, quadratically in the radius."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    yy, xx = yy / height - 0.5, xx / width - 0.5
    falloff = 1 - strength * (xx**2 + yy**2) / 0.5  # 0.5 = squared distance of a corner
    return image * falloff[..., None]
