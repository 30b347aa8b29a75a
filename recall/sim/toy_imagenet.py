"""A toy "ImageNet": the broad, object-centric classification set the toy world's encoder is pretrained on.

Every method in the papers starts from a backbone pretrained on a large, broad image set; this is the toy world's.
Its class space (``class_space``) holds

- the toy generator's classes (``recall.sim.toy_gan`` samples *this* class space, as BigGAN samples ImageNet's):
  a look-alike of every toy-world class (hue, texture period and brightness shifted), more-shifted variants of
  some, and distractors that are no toy class;
- further classes that are none of them: shape x texture x colour combinations kept away from every toy-world
  class.

"Kept away" (``_far_from_the_toy_world``, for distractors and further classes alike): a class differs from every
toy-world class in at least two of shape, texture and hue (by ``MIN_HUE_DISTANCE``). A class that shares two of
them with a toy class (the same hue and texture in another shape, say) would be closer to that class than its
look-alike is, and the class map would rightly pick it: in ImageNet the look-alike is the nearest class.

An image of a class is one object of the class's style with strong variation within the class (hue, saturation,
brightness, texture period and angle, size, position, rotation), on a random textured background, with 0-2 small
clutter objects of other classes: ImageNet photos, not toy-world scenes (a toy-world image has 1-3 objects of
its own classes, borders, a different random stream; ``tests/test_toy_imagenet.py`` checks no image is one of the
toy world's by hash). Everything is deterministic from (seed, split, class, index).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from recall.sim.toyworld import (CLASS_STYLES, PIXEL_NOISE_STD, SHAPES, ClassStyle, draw_object,
                                 render_background, shifted_style)

NUM_CLASSES = 120
GENERATOR_CLASSES = 40  # the first classes: the toy generator's look-alikes, variants and distractors
TEXTURES = ("solid", "stripes", "dots", "checker", "gradient", "noise")
CLASS_SPACE_SEED = 20210  # the generator's part (unchanged from the toy generator's own class space)
OTHER_CLASSES_SEED = 31337  # the rest
SPLIT_CODES = {"train": 0, "val": 1}
IMAGE_SEED_TAG = 0x1A9E  # no other random stream of the project starts with it (toy world: [seed, split, index])
MIN_HUE_DISTANCE = 35.0  # hues closer than this count as the same (``_far_from_the_toy_world``)
MIN_DIFFERENCES = 2  # of shape, texture and hue: how many a distractor or further class differs in from a toy class

# Domain shift of the generator's classes from the toy-world classes they imitate.
LOOKALIKE_HUE_SHIFT = (10.0, 20.0)
LOOKALIKE_PERIOD_FACTOR = (0.75, 1.3)
LOOKALIKE_VALUE_DROP = (0.03, 0.12)
VARIANT_HUE_SHIFT = (30.0, 45.0)
VARIANT_PERIOD_FACTOR = (1.4, 1.8)
VARIANT_VALUE_DROP = (0.15, 0.25)

# Variation within a class (an ImageNet class holds many looks of its object).
HUE_JITTER_DEG = 12.0
SATURATION_JITTER = 0.12
VALUE_JITTER = 0.12
PERIOD_FACTOR = (0.7, 1.45)
ANGLE_JITTER_DEG = 25.0
RADIUS_FRAC = (0.16, 0.42)  # the object's radius, a fraction of the image side
CENTRE_JITTER_FRAC = 0.16
ROTATION_RAD = 0.7
CLUTTER_OBJECTS = (0, 2)  # small objects of other classes
CLUTTER_RADIUS_FRAC = (0.07, 0.14)


@dataclass(frozen=True)
class SourceClass:
    """One class: how it looks and, for inspection only, what it imitates."""

    name: str
    style: ClassStyle
    kind: str  # "lookalike" | "variant" | "distractor" | "other"
    target: int | None  # the toy-world class it was made from (look-alikes and variants)


def _signed(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(*bounds))


def _derived(rng: np.random.Generator, c: int, hue: tuple[float, float], period: tuple[float, float],
             value_drop: tuple[float, float]) -> ClassStyle:
    base = CLASS_STYLES[c]
    return shifted_style(c, hue_shift=_signed(rng, hue), texture_period=base.texture_period * rng.uniform(*period),
                         value=base.value - rng.uniform(*value_drop),
                         secondary_value=float(np.clip(base.secondary_value + rng.uniform(-0.05, 0.05), 0.1, 0.5)))


def _generator_classes(n: int) -> list[SourceClass]:
    """The toy generator's part: 20 look-alikes, then variants and distractors, in a fixed shuffled order."""
    used = {(s.shape, s.texture) for s in CLASS_STYLES.values()}
    free = [(shape, texture) for shape in SHAPES for texture in TEXTURES if (shape, texture) not in used]
    targets = sorted(CLASS_STYLES)
    n_extra = n - len(targets)
    n_variants = min(n_extra // 2, len(targets))
    n_distractors = n_extra - n_variants
    rng = np.random.default_rng(CLASS_SPACE_SEED)
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
        while not _far_from_the_toy_world(style):  # another hue until no toy class is as near as its look-alike
            style = replace(style, hue=float(rng.uniform(0, 360)))
        made.append((style, "distractor", None))
    order = rng.permutation(len(made))
    return [SourceClass(name=f"src{i:02d}_{made[j][0].shape}_{made[j][0].texture}", style=made[j][0],
                        kind=made[j][1], target=made[j][2]) for i, j in enumerate(order)]


def _far_from_the_toy_world(style: ClassStyle) -> bool:
    """Whether `style` differs from every toy-world class in at least ``MIN_DIFFERENCES`` of shape, texture and hue
    (hues nearer than ``MIN_HUE_DISTANCE`` count as the same)."""
    for toy in CLASS_STYLES.values():
        hue_gap = abs((style.hue - toy.hue + 180) % 360 - 180)
        differences = (style.shape != toy.shape) + (style.texture != toy.texture) + (hue_gap >= MIN_HUE_DISTANCE)
        if differences < MIN_DIFFERENCES:
            return False
    return True


def _other_classes(n: int, first_index: int) -> list[SourceClass]:
    rng = np.random.default_rng(OTHER_CLASSES_SEED)
    shapes, made = sorted(SHAPES), []
    while len(made) < n:
        style = ClassStyle(shape=str(rng.choice(shapes)), texture=str(rng.choice(TEXTURES)),
                           hue=float(rng.uniform(0, 360)), saturation=float(rng.uniform(0.55, 0.95)),
                           value=float(rng.uniform(0.6, 0.95)), secondary_value=float(rng.uniform(0.15, 0.45)),
                           texture_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
                           texture_period=float(rng.uniform(3.5, 9.0)))
        if _far_from_the_toy_world(style):
            index = first_index + len(made)
            made.append(SourceClass(name=f"src{index:03d}_{style.shape}_{style.texture}", style=style, kind="other",
                                    target=None))
    return made


@cache
def class_space(num_classes: int = NUM_CLASSES) -> tuple[SourceClass, ...]:
    """The toy ImageNet's classes: the generator's first (fixed order), then the others."""
    if num_classes < GENERATOR_CLASSES:
        raise ValueError(f"the toy ImageNet has at least the generator's {GENERATOR_CLASSES} classes, not {num_classes}")
    return tuple(_generator_classes(GENERATOR_CLASSES) + _other_classes(num_classes - GENERATOR_CLASSES,
                                                                        GENERATOR_CLASSES))


def class_names(num_classes: int = NUM_CLASSES) -> list[str]:
    return [c.name for c in class_space(num_classes)]


def render(class_index: int, index: int, split: str = "train", size: int = 64, seed: int = 0,
           num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Image ``index`` of class ``class_index`` (uint8, size x size x 3): one object of the class, varied, on a
    random background with small clutter objects of other classes."""
    classes = class_space(num_classes)
    rng = np.random.default_rng([IMAGE_SEED_TAG, seed, SPLIT_CODES[split], class_index, index])
    image = render_background(size, rng)
    scratch = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(CLUTTER_OBJECTS[0], CLUTTER_OBJECTS[1] + 1))):
        other = int(rng.integers(len(classes) - 1))
        other += other >= class_index  # any class but this one
        draw_object(image, scratch, 2, (rng.uniform(0, size), rng.uniform(0, size)),
                    size * rng.uniform(*CLUTTER_RADIUS_FRAC), rng, angle=float(rng.uniform(-np.pi, np.pi)),
                    style=classes[other].style)
    base = classes[class_index].style
    style = replace(base, hue=(base.hue + rng.uniform(-HUE_JITTER_DEG, HUE_JITTER_DEG)) % 360,
                    saturation=float(np.clip(base.saturation + rng.uniform(-SATURATION_JITTER, SATURATION_JITTER),
                                             0.2, 1.0)),
                    value=float(np.clip(base.value + rng.uniform(-VALUE_JITTER, VALUE_JITTER), 0.25, 1.0)),
                    texture_period=base.texture_period * rng.uniform(*PERIOD_FACTOR),
                    texture_angle=base.texture_angle + rng.uniform(-ANGLE_JITTER_DEG, ANGLE_JITTER_DEG))
    radius = size * rng.uniform(*RADIUS_FRAC)
    centre = (size / 2 + rng.uniform(-1, 1) * CENTRE_JITTER_FRAC * size,
              size / 2 + rng.uniform(-1, 1) * CENTRE_JITTER_FRAC * size)
    draw_object(image, scratch, 1, centre, radius, rng, angle=float(rng.uniform(-ROTATION_RAD, ROTATION_RAD)),
                style=style)
    image = image + rng.normal(0, PIXEL_NOISE_STD, image.shape).astype(np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def render_split(split: str, per_class: int, size: int = 64, seed: int = 0, num_classes: int = NUM_CLASSES,
                 classes: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size, 3 uint8) and labels (N int64) of `per_class` images of every class (or `classes`)."""
    classes = range(num_classes) if classes is None else classes
    images = np.empty((len(classes) * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.asarray(list(classes), dtype=np.int64), per_class)
    for n, (c, i) in enumerate((c, i) for c in classes for i in range(per_class)):
        images[n] = render(c, i, split, size, seed, num_classes)
    return images, labels


def _render_classes(args: tuple) -> np.ndarray:
    split, per_class, size, seed, num_classes, first, last = args
    return render_split(split, per_class, size, seed, num_classes, classes=range(first, last))[0]


def classification_set(split: str, per_class: int, size: int = 64, seed: int = 0, workers: int = 2,
                       num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The toy ImageNet as a classification set (what `recall.pretrain` trains on): `per_class` images of every
    class of `split` (uint8 N x size x size x 3), their labels and the class names. Rendered by `workers`
    processes; the same images whatever their number."""
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, num_classes, max(workers, 1) * 4 + 1).astype(int)
    jobs = [(split, per_class, size, seed, num_classes, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers > 1:
        from recall.processes import die_with_parent

        with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(False,)) as pool:  # no orphans
            parts = list(pool.map(_render_classes, jobs))
    else:
        parts = [_render_classes(job) for job in jobs]
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.concatenate(parts), labels, class_names(num_classes)


# ------------------------------------------------------------------------------ the class map's truth
MAP_KINDS = ("lookalike", "variant", "wrong_target", "distractor", "other")  # what a mapped source class can be


def class_map_score(mapping: dict[int, int], num_classes: int = NUM_CLASSES) -> dict:
    """A class map (toy class -> source class index of this class space) against the truth the class space knows:
    per toy class the kind of source class it got (``MAP_KINDS``: its own look-alike, a variant of it, a look-alike
    or variant made from another toy class, a distractor, another class), the counts of each kind, ``correct``
    (look-alikes and variants of the right class) out of ``classes``, and the source classes that serve more than
    one toy class (``shared``)."""
    classes = class_space(num_classes)
    per_class, serves = {}, {}
    for target, source in sorted(mapping.items()):
        s = classes[int(source)]
        kind = s.kind if s.kind in ("distractor", "other") else s.kind if s.target == int(target) else "wrong_target"
        per_class[int(target)] = {"source": s.name, "kind": kind}
        serves.setdefault(s.name, []).append(int(target))
    counts = {kind: sum(v["kind"] == kind for v in per_class.values()) for kind in MAP_KINDS}
    return {"correct": counts["lookalike"] + counts["variant"], "classes": len(per_class), **counts,
            "shared": {name: targets for name, targets in serves.items() if len(targets) > 1},
            "per_class": per_class}
