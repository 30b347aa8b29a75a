"""Class mapping: which generator class replays which target class (RECALL's procedure).

RECALL classifies the VOC training images containing class c with an ImageNet classifier, averages the softmax
over them (over *all* of them, as the authors' README says) and takes the ImageNet class with the highest mean.
On the toy world the "ImageNet classifier" is the classifier `recall pretrain` trained on the toy ImageNet, whose
class space the toy generator samples; ``map_classes`` is the same code for both.

The classifier itself (``SourceClassifier``, its preprocessing ``classify``, its file) is ``recall.replay.classifier``,
which the pretraining shares without depending on the mapping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recall.atomic import write_json
from recall.data.classes import VOC_CLASSES
from recall.data.voc import image_classes, load_image, read_split
from recall.errors import ReplayError
from recall.replay.classifier import classify

SCORE_DECIMALS = 6


def map_classes(classifier: nn.Module, dataset_root: str | Path, split: str = "train", num_classes: int = 20,
                top_k: int = 3, max_images_per_class: int | None = None, source_names: Sequence[str] | None = None,
                class_names: Sequence[str] = VOC_CLASSES, batch_size: int = 32, input_size: int | None = None,
                image_dir: str = "JPEGImages", mask_dir: str = "SegmentationClass",
                progress: bool = False) -> dict[int, dict]:
    """For each target class, the source class with the highest mean softmax over its training images.

    Uses every image of ``split`` whose mask contains the class, as the authors (or, with
    ``max_images_per_class``, the first that many in split order), preprocessed by ``classify`` (at
    ``input_size``, default the classifier's own). Returns ``{c: {"name", "source_class", "source_name", "top_k":
    [[index, name, mean score], ...] (best first), "n_images"}}``; a class without images gets
    ``source_class`` None.
    """
    root = Path(dataset_root)
    names = list(source_names if source_names is not None else getattr(classifier, "source_names", []))
    ids = read_split(root, split)
    present = image_classes(root, ids, num_classes=num_classes, mask_dir=mask_dir, progress=progress)
    chosen = {c: [i for i in ids if c in present[i]][:max_images_per_class] for c in range(1, num_classes + 1)}
    if len(class_names) != num_classes + 1:
        raise ReplayError(f"class mapping: {len(class_names)} class names for {num_classes} classes + background")
    position = {image_id: k for k, image_id in enumerate(ids)}
    needed = sorted({i for members in chosen.values() for i in members}, key=position.__getitem__)
    images = [torch.from_numpy(np.array(load_image(root / image_dir / f"{i}.jpg"))).permute(2, 0, 1)
              for i in needed]
    probabilities = classify(classifier, images, batch_size, input_size)
    row = {image_id: k for k, image_id in enumerate(needed)}

    def name_of(index: int) -> str:
        return names[index] if index < len(names) else str(index)

    mapping: dict[int, dict] = {}
    for c, members in chosen.items():
        entry = {"name": class_names[c] if c < len(class_names) else str(c), "source_class": None,
                 "source_name": None, "top_k": [], "n_images": len(members)}
        if members:
            mean = probabilities[[row[i] for i in members]].mean(dim=0)
            scores, order = mean.topk(min(top_k, mean.numel()))
            entry["top_k"] = [[int(k), name_of(int(k)), round(float(s), SCORE_DECIMALS)]
                              for s, k in zip(scores, order)]
            entry["source_class"], entry["source_name"] = entry["top_k"][0][0], entry["top_k"][0][1]
        mapping[c] = entry
    return mapping


def shared_sources(mapping: dict[int, dict]) -> dict[str, list[str]]:
    """The source classes that a mapping (``map_classes``) gives to more than one target class, with those targets'
    names: their replay images would be the same images (RECALL's procedure does not prevent it)."""
    serves: dict[str, list[str]] = {}
    for entry in mapping.values():
        if entry["source_name"] is not None:
            serves.setdefault(entry["source_name"], []).append(entry["name"])
    return {source: names for source, names in serves.items() if len(names) > 1}


def checked_mapping(mapping, num_source_classes: int, what: str = "source class") -> dict[int, int]:
    """Target class -> source class index as ints (keys may be strings, e.g. from a config), each source index
    checked against ``0 .. num_source_classes - 1``; ``what`` names the source classes in errors."""
    checked = {}
    for target, source in mapping.items():
        try:
            source_index, target_index = int(source), int(target)
        except (TypeError, ValueError):
            raise ReplayError(f"mapping {target!r} -> {source!r}: expected integer class indices "
                              f"(use classmap.load_mapping to resolve names)") from None
        if not 0 <= source_index < num_source_classes:
            raise ReplayError(f"mapping {target!r} -> {source_index}: {what} out of range "
                              f"0..{num_source_classes - 1}")
        checked[target_index] = source_index
    return checked


# ------------------------------------------------------------------------------ files

def save_mapping(mapping: dict[int, dict], path: str | Path) -> None:
    """Write a mapping (from ``map_classes``) as JSON, atomically."""
    write_json(path, {str(c): v for c, v in sorted(mapping.items())})


SHARED_KEY = "_shared"  # in a map file: true when target classes share a source class on purpose


def shared_on_purpose(path: str | Path) -> bool:
    """Whether a map file says that its target classes share source classes on purpose (``"_shared": true``)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get(SHARED_KEY) is True


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_mapping(path: str | Path, source_names: Sequence[str] | None = None,
                 class_names: Sequence[str] = VOC_CLASSES) -> dict[int, int]:
    """Target class index -> source class index, from ``save_mapping`` output or a hand-written file.

    A hand-written file is ``{"<class name or index>": <source index or name>}``, e.g.
    ``{"aeroplane": 7, "potted plant": "src12_star_dots"}``; names need ``source_names``. The key ``SHARED_KEY``
    (``"_shared": true``) says that target classes share a source class on purpose (``shared_on_purpose``).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ReplayError(f"{path}: cannot read class mapping ({error})") from error
    if not isinstance(raw, dict):
        raise ReplayError(f"{path}: a class mapping is a JSON object {{\"<class>\": <source class>}}")
    by_name = {_normalise(n): i for i, n in enumerate(class_names)}
    sources = list(source_names) if source_names is not None else None
    mapping: dict[int, int] = {}
    for key, value in raw.items():
        if key == SHARED_KEY:
            continue
        key_text = str(key).strip()
        if key_text.isdigit():
            target = int(key_text)
        elif _normalise(key_text) in by_name:
            target = by_name[_normalise(key_text)]
        else:
            raise ReplayError(f"{path}: unknown target class {key!r}; use an index or one of {list(class_names)}")
        if isinstance(value, dict):
            value = value.get("source_class")
        if value is None:
            raise ReplayError(f"{path}: class {key!r} has no source class (no training image contained it?); "
                              f"write one by hand")
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            source = int(value)
        elif isinstance(value, str) and sources is not None and value in sources:
            source = sources.index(value)
        elif isinstance(value, str):
            hint = f"known: {sources[:5]}..." if sources else "pass source_names to resolve names"
            raise ReplayError(f"{path}: class {key!r}: unknown source class {value!r} ({hint})")
        else:
            raise ReplayError(f"{path}: class {key!r}: source class must be an index or a name, got {value!r}")
        if sources is not None and not 0 <= source < len(sources):
            raise ReplayError(f"{path}: class {key!r}: source class {source} out of range 0..{len(sources) - 1}")
        mapping[target] = source
    return mapping
