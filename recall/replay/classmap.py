"""Class mapping: which generator class replays which target class (RECALL's procedure).

RECALL classifies the VOC training images containing class c with an ImageNet classifier, averages the softmax
over them (over *all* of them, as the authors' README says) and takes the ImageNet class with the highest mean.
On the toy world the "ImageNet classifier" is the classifier `recall pretrain` trained on the toy ImageNet, whose
class space the toy generator samples; ``map_classes`` is the same code for both.

Classifiers here take float images in [0, 1] (N, 3, H, W) and return source-class logits; the
normalisation lives inside the module (``SourceClassifier``).
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
from recall.replay.pool import ReplayError
from recall.replay.weights import IMAGENET_NUM_CLASSES, imagenet_names, load_strictly, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCORE_DECIMALS = 6
# RECALL's ImageNet classifier, and the tiny random-weight timm model standing in for it in the demo.
IMAGENET_MODEL = "efficientnet_b2"
STANDIN_MODEL = "test_efficientnet"


class SourceClassifier(nn.Module):
    """Normalisation + a timm classifier over the generator's classes; knows their names."""

    def __init__(self, model: nn.Module, source_names: Sequence[str], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, input_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.source_names = list(source_names)
        self.input_size = input_size  # the side the model expects (pass to map_classes), None: any
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


@torch.inference_mode()
def _softmax(classifier: nn.Module, images: list[torch.Tensor], batch_size: int,
             input_size: int | None) -> torch.Tensor:
    """Softmax of each uint8 CHW image (batched when sizes agree)."""
    out = []
    for first in range(0, len(images), batch_size):
        chunk = [x.float().unsqueeze(0) / 255 for x in images[first:first + batch_size]]
        if input_size is not None:
            chunk = [nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear",
                                               align_corners=False, antialias=True) for x in chunk]
        if all(x.shape == chunk[0].shape for x in chunk):
            logits = classifier(torch.cat(chunk))
        else:
            logits = torch.cat([classifier(x) for x in chunk])
        out.append(logits.float().softmax(dim=1))
    return torch.cat(out)


def map_classes(classifier: nn.Module, dataset_root: str | Path, split: str = "train", num_classes: int = 20,
                top_k: int = 3, max_images_per_class: int | None = None, source_names: Sequence[str] | None = None,
                class_names: Sequence[str] = VOC_CLASSES, batch_size: int = 32, input_size: int | None = None,
                image_dir: str = "JPEGImages", mask_dir: str = "SegmentationClass",
                progress: bool = False) -> dict[int, dict]:
    """For each target class, the source class with the highest mean softmax over its training images.

    Uses every image of ``split`` whose mask contains the class, as the authors (or, with
    ``max_images_per_class``, the first that many in split order) whose mask
    contains the class. Returns ``{c: {"name", "source_class", "source_name", "top_k":
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
    was_training = classifier.training
    classifier.eval()
    try:
        probabilities = _softmax(classifier, images, batch_size, input_size) if images else torch.empty(0)
    finally:
        classifier.train(was_training)
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


# ------------------------------------------------------------------------------ ImageNet classifier

def _weights_hint(model_name: str, path: str | Path) -> str:
    return (f"on a machine with internet run `import timm, torch; model = timm.create_model({model_name!r}, "
            f"pretrained=True); torch.save(model.state_dict(), {str(path)!r})` and copy the file here "
            f"(or make a random stand-in with `recall standin-weights`)")


def _create_timm_model(model_name: str, num_classes: int = IMAGENET_NUM_CLASSES) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ReplayError(f"cannot create timm model {model_name!r} ({error}); see timm.list_models()") from error


def imagenet_classifier(model_name: str = IMAGENET_MODEL, *, weights: str | Path, input_size: int | None = None,
                        names: str | Path | None = None) -> SourceClassifier:
    """RECALL's ImageNet classifier (EfficientNet-B2 by default) from a local weights file, in eval mode.

    ``weights`` is a state dict saved with ``torch.save`` (``.pth``/``.bin``/``.pt``, possibly wrapped
    under "state_dict" or "model") or a ``.safetensors`` file; it is loaded strictly. ``names`` is a JSON list of
    its class names (a classifier of another class set, e.g. the toy world's, pretrained by `recall pretrain`);
    without it the classes are ImageNet-1k's. ``input_size`` (default: timm's ``pretrained_cfg`` input size, 256
    for EfficientNet-B2) is stored on the classifier for ``map_classes(..., input_size=...)``.
    """
    if names is not None:
        try:
            source_names = [str(n) for n in json.loads(Path(names).read_text())]
        except (OSError, ValueError) as error:
            raise ReplayError(f"{names}: cannot read the classifier's class names ({error}); `recall pretrain` "
                              "writes them next to its classifier") from error
    else:
        source_names = imagenet_names()
    model = _create_timm_model(model_name, len(source_names))
    state = read_state_dict(weights, _weights_hint(model_name, weights))
    load_strictly(model, state, weights)
    config = getattr(model, "pretrained_cfg", None) or {}
    size = input_size if input_size is not None else (config.get("input_size") or (None,))[-1]
    classifier = SourceClassifier(model, source_names, mean=config.get("mean", IMAGENET_MEAN),
                                  std=config.get("std", IMAGENET_STD), input_size=size)
    return classifier.eval()


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


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_mapping(path: str | Path, source_names: Sequence[str] | None = None,
                 class_names: Sequence[str] = VOC_CLASSES) -> dict[int, int]:
    """Target class index -> source class index, from ``save_mapping`` output or a hand-written file.

    A hand-written file is ``{"<class name or index>": <source index or name>}``, e.g.
    ``{"aeroplane": 7, "potted plant": "src12_star_dots"}``; names need ``source_names``.
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
