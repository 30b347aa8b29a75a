"""Continual-learning protocols: task strings, training/evaluation image selection, label maps.

A *task* is the list of classes learnt at each step, e.g. ``steps("15-1x5")`` ==
``[[1..15], [16], [17], [18], [19], [20]]``. Classes are 1-based in index order; background (0)
is never listed and the ignore label is 255.

Image selection follows MiB's ``filter_images`` (the rule all peers follow):

* **overlapped** keeps an image if it contains >= 1 pixel of a current-step class;
* **disjoint** additionally drops any image containing a future class;
* **sequential** uses the disjoint images but keeps old-class labels in training.

**partitioned** (Kwak et al., arXiv 2405.09858) is not a filter but a draw: each image is given one of its
classes at random (:func:`partition`), and belongs to the step that learns that class only.

Label maps are 256-entry lookup tables applied as ``lut[mask]``. The points on which the papers
disagree (border pixels in training, future classes at test, evaluation images, ...) are
collected in :data:`CONVENTIONS`. This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby
from typing import Literal

import numpy as np
import torch

from recall.errors import UserError

BACKGROUND = 0
IGNORE_INDEX = 255
LUT_SIZE = 256

JOINT = "joint"
PAPER_PROTOCOLS: tuple[str, ...] = ("19-1", "15-5", "10-5-5", "15-1x5", "10-10", "10-2x5", "10-1x10", "joint")
SETTINGS: tuple[str, ...] = ("disjoint", "overlapped", "partitioned", "sequential")
PARTITIONED = "partitioned"  # the setting whose images are drawn with a seed (:func:`partition`)
FUTURE_OPTIONS: tuple[str, ...] = ("ignore", "background")

_EXPECTED = (
    "expected 'joint' or '<n0>-<n>[-<n>...]' where n0 is the number of classes at step 0 and each "
    "later token is 'n' or 'nxk' (k steps of n classes), e.g. '19-1', '15-5', '10-5-5', '10-5x2', "
    "'15-1x5', '10-2x5'"
)
_NUMBER = re.compile(r"[0-9]+")
_RUN = re.compile(r"([0-9]+)(?:x([0-9]+))?")

Task = list[list[int]]


class ProtocolError(UserError):
    """An invalid task string, setting, step or convention."""


# --------------------------------------------------------------------------- task strings


def _fail(name: str, problem: str) -> ProtocolError:
    return ProtocolError(f"invalid task {name!r}: {problem}; {_EXPECTED}")


def _positive(name: str, text: str, what: str) -> int:
    value = int(text)
    if value <= 0:
        raise _fail(name, f"{what} must be a positive integer, got {text!r}")
    return value


def _parse_counts(name: str) -> list[int] | None:
    """Number of classes per step for ``name`` (None for 'joint'); checks syntax only."""
    text = name.strip()
    if not text:
        raise _fail(name, "the string is empty")
    if text == JOINT:
        return None
    tokens = text.split("-")
    if any(token == "" for token in tokens):
        raise _fail(name, "empty token (leading, trailing or double '-')")
    if not _NUMBER.fullmatch(tokens[0]):
        raise _fail(name, f"the first token {tokens[0]!r} must be a positive integer")
    counts = [_positive(name, tokens[0], "the number of classes at step 0")]
    for token in tokens[1:]:
        match = _RUN.fullmatch(token)
        if match is None:
            raise _fail(name, f"token {token!r} is neither 'n' nor 'nxk'")
        size = _positive(name, match.group(1), f"the class count in {token!r}")
        repeat = 1 if match.group(2) is None else _positive(name, match.group(2), f"the repeat count in {token!r}")
        counts.extend([size] * repeat)
    return counts


def steps(name: str, num_classes: int = 20) -> Task:
    """Classes learnt at each step of the task ``name`` (1-based, in index order).

    >>> steps("10-5x2")[1:]
    [[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]
    """
    counts = _parse_counts(name)
    if counts is None:
        return [list(range(1, num_classes + 1))]
    total = sum(counts)
    if total != num_classes:
        raise _fail(name, f"the steps add up to {total} classes but the dataset has {num_classes}")
    task, first = [], 1
    for count in counts:
        task.append(list(range(first, first + count)))
        first += count
    return task


def canonical(name: str, num_classes: int = 20) -> str:
    """Long form of a valid task string: ``'15-1x5'`` -> ``'15-1-1-1-1-1'``; 'joint' stays."""
    task = steps(name, num_classes)
    if name.strip() == JOINT:
        return JOINT
    return "-".join(str(len(classes)) for classes in task)


def short(name: str, num_classes: int | None = None) -> str:
    """Compact form: runs of >= 2 equal later tokens become ``nxk`` (``'10-5-5'`` -> ``'10-5x2'``).

    The total is checked against ``num_classes`` only when it is given.
    """
    counts = _parse_counts(name)
    if counts is None:
        return JOINT
    if num_classes is not None:
        steps(name, num_classes)  # checks the total
    tokens = [str(counts[0])]
    for size, run in groupby(counts[1:]):
        repeat = len(list(run))
        tokens.append(f"{size}x{repeat}" if repeat >= 2 else str(size))
    return "-".join(tokens)


def introduced_at(task: Task) -> dict[int, int]:
    """Map each class to the index of the step that introduces it."""
    return {c: t for t, classes in enumerate(task) for c in classes}


# --------------------------------------------------------------------------- conventions


@dataclass(frozen=True)
class Conventions:
    """How a paper trains and evaluates; see the conventions table in docs/design.md."""

    name: str
    border_in_training: Literal["background", "ignore"]
    future_at_test: Literal["ignore", "background"]
    eval_images: Literal["all", "seen_non_bg"]
    absent_class: Literal["recall", "mib", "plop"]
    old_includes_bg: bool

    @property
    def border_to_background(self) -> bool:
        """Whether 255 pixels become background in training (argument of :func:`train_label_map`)."""
        return self.border_in_training == "background"


CONVENTIONS: dict[str, Conventions] = {
    "recall": Conventions("recall", "background", "ignore", "all", "recall", False),
    "mib": Conventions("mib", "background", "ignore", "seen_non_bg", "mib", False),
    "plop": Conventions("plop", "ignore", "background", "seen_non_bg", "plop", True),
}


def get_convention(name: str) -> Conventions:
    """The :class:`Conventions` called ``name`` ('recall', 'mib' or 'plop')."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ProtocolError(
            f"unknown evaluation convention {name!r}; expected one of {', '.join(map(repr, CONVENTIONS))}"
        ) from None


# --------------------------------------------------------------------------- image selection


def _check_step(task: Task, step: int) -> None:
    if not 0 <= step < len(task):
        raise ProtocolError(f"step {step} is out of range for a task with {len(task)} steps (0..{len(task) - 1})")


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ProtocolError(f"unknown setting {setting!r}; expected one of {', '.join(map(repr, SETTINGS))}")


def _seen(task: Task, step: int) -> set[int]:
    return {c for classes in task[: step + 1] for c in classes}


def _future(task: Task, step: int) -> set[int]:
    return {c for classes in task[step + 1 :] for c in classes}


def _labels(classes: Iterable[int]) -> set[int]:
    """Non-background, non-ignore classes of an image."""
    return set(classes) - {BACKGROUND, IGNORE_INDEX}


def select_train_images(
    image_classes: Mapping[str, Iterable[int]], task: Task, step: int, setting: str, seed: int | None = None
) -> list[str]:
    """Sorted ids of the training images of ``step``: MiB's ``filter_images`` rule, or (partitioned) the images
    :func:`partition` gives the step, which needs the run's ``seed``.

    ``image_classes`` maps an image id to the classes present in its mask.
    """
    _check_step(task, step)
    _check_setting(setting)
    if setting == PARTITIONED:
        if seed is None:
            raise ProtocolError("the partitioned setting draws each image's step at random: pass its seed "
                                "(select_train_images(..., seed=<the run's seed>))")
        return partition(image_classes, task, seed)[step]
    current, future = set(task[step]), _future(task, step)
    keep_future = setting == "overlapped"
    selected = []
    for image_id, classes in image_classes.items():
        labels = _labels(classes)
        if labels & current and (keep_future or not labels & future):
            selected.append(image_id)
    return sorted(selected)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ProtocolError(f"the partitioned setting's seed must be an integer in 0..2**32-1, got {seed!r}")
    return int(seed)


def partition(image_classes: Mapping[str, Iterable[int]], task: Task, seed: int) -> list[list[str]]:
    """The partitioned split: for each step, the sorted ids of the images that belong to it and to no other step.

    The draw of the authors' code (jihwankwak/CISS_partitioned, ``generate_cil_partitioned``): going through the
    images in the mapping's order (a split file's line order), each image with at least one class picks one of
    its sorted non-background, non-ignore classes, ``labels[rng.choice(len(labels))]``, from a NumPy
    ``RandomState(seed)`` (theirs: the global one, freshly seeded with the run's seed), and belongs to the step
    that learns that class. An image with one class keeps it (``choice(1)`` uses no random number, in their code
    as here); an image without classes belongs to no step. The draw does not depend on the task, only the grouping
    does: one seed gives every task string the same image-to-class assignment.
    """
    seed = _check_seed(seed)
    step_of = introduced_at(task)
    rng = np.random.RandomState(seed)
    out: list[list[str]] = [[] for _ in task]
    for image_id, classes in image_classes.items():
        labels = sorted(_labels(classes))
        if not labels:
            continue
        unknown = [c for c in labels if c not in step_of]
        if unknown:
            raise ProtocolError(f"image {image_id!r} has class(es) {unknown}, which no step of the task {task} "
                                "learns (build the task with the dataset's num_classes, e.g. 150 for ADE20K)")
        out[step_of[labels[int(rng.choice(len(labels)))]]].append(image_id)
    return [sorted(ids) for ids in out]


def select_eval_images(
    image_classes: Mapping[str, Iterable[int]], task: Task, step: int, convention: str = "recall"
) -> list[str]:
    """Sorted ids of the validation images scored after ``step`` under ``convention``.

    'recall' uses the whole set; 'mib' and 'plop' only images with >= 1 seen non-background class.
    """
    _check_step(task, step)
    if get_convention(convention).eval_images == "all":
        return sorted(image_classes)
    seen = _seen(task, step)
    return sorted(image_id for image_id, classes in image_classes.items() if _labels(classes) & seen)


# --------------------------------------------------------------------------- label maps


def _check_task(task: Task, num_classes: int) -> None:
    flat = [c for classes in task for c in classes]
    if sorted(flat) != list(range(1, num_classes + 1)):
        raise ProtocolError(
            f"the task {task} does not list each class 1..{num_classes} exactly once "
            f"(pass num_classes matching the dataset, e.g. 150 for ADE20K)"
        )


def _base_lut() -> torch.Tensor:
    lut = torch.full((LUT_SIZE,), IGNORE_INDEX, dtype=torch.long)
    lut[BACKGROUND] = BACKGROUND
    return lut


def train_label_map(
    task: Task, step: int, setting: str, num_classes: int = 20, border_to_background: bool = True
) -> torch.Tensor:
    """LUT (length 256) turning a ground-truth mask into the training target of ``step``.

    Current classes keep their index; old classes become background except in 'sequential';
    future classes become background; 255 becomes background if ``border_to_background``
    (RECALL, MiB) else stays ignore (PLOP); values outside 0..num_classes and 255 become 255.
    """
    _check_step(task, step)
    _check_setting(setting)
    _check_task(task, num_classes)
    lut = _base_lut()
    for t, classes in enumerate(task):
        keep = t == step or (t < step and setting == "sequential")
        for c in classes:
            lut[c] = c if keep else BACKGROUND
    lut[IGNORE_INDEX] = BACKGROUND if border_to_background else IGNORE_INDEX
    return lut


def eval_label_map(task: Task, step: int, num_classes: int = 20, future: str = "ignore") -> torch.Tensor:
    """LUT (length 256) turning a ground-truth mask into the evaluation target after ``step``.

    Background and seen classes keep their index; future classes become 255 ('ignore': RECALL,
    MiB) or 0 ('background': PLOP); 255 and unknown values stay/become 255.
    """
    _check_step(task, step)
    _check_task(task, num_classes)
    if future not in FUTURE_OPTIONS:
        raise ProtocolError(f"unknown future option {future!r}; expected one of {', '.join(map(repr, FUTURE_OPTIONS))}")
    future_value = IGNORE_INDEX if future == "ignore" else BACKGROUND
    lut = _base_lut()
    for t, classes in enumerate(task):
        for c in classes:
            lut[c] = c if t <= step else future_value
    return lut
