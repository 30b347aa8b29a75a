"""Class mapping: which generator class replays which target class (RECALL's procedure).

RECALL classifies the VOC training images containing class c with an ImageNet classifier, averages the softmax
over them (over *all* of them, as the authors' README says) and takes the ImageNet class with the highest mean.
On the toy world the "ImageNet classifier" is the classifier `recall pretrain` trained on the toy ImageNet, whose
class space the toy generator samples; ``map_classes`` is the same code for both.

Classifiers here take float images in [0, 1] (N, 3, H, W) and return source-class logits; the
normalisation lives inside the module (``SourceClassifier``). One preprocessing wherever a classifier is used:
``classify`` (uint8 images -> [0, 1] at the classifier's input size -> softmax) scores the pretraining's held-out
images and maps the classes, and a classifier file carries the normalisation and input size it was trained with
(``save_classifier``; ``imagenet_classifier`` refuses a file without them).
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
from recall.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from recall.data.voc import image_classes, load_image, read_split
from recall.errors import ReplayError
from recall.replay.weights import IMAGENET_NUM_CLASSES, imagenet_names, load_strictly, read_checkpoint

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


def classifier_input(image: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """A uint8 CHW image as the classifier sees it: (1, 3, S, S) floats in [0, 1], resized to ``input_size`` (kept
    as it is when it has that size already, or when ``input_size`` is None); the normalisation is the classifier's."""
    x = image.float().unsqueeze(0) / 255
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        x = nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                                      antialias=True)
    return x


@torch.inference_mode()
def classify(classifier: nn.Module, images, batch_size: int = 32, input_size: int | None = None) -> torch.Tensor:
    """Softmax over the source classes of each uint8 CHW image of ``images`` (a list, or an N x 3 x H x W tensor),
    batched when sizes agree, in eval mode. ``input_size`` defaults to the classifier's own (``SourceClassifier``)."""
    if input_size is None:
        input_size = getattr(classifier, "input_size", None)
    was_training = classifier.training
    classifier.eval()
    out = []
    try:
        for first in range(0, len(images), batch_size):
            chunk = [classifier_input(x, input_size) for x in images[first:first + batch_size]]
            if all(x.shape == chunk[0].shape for x in chunk):
                logits = classifier(torch.cat(chunk))
            else:
                logits = torch.cat([classifier(x) for x in chunk])
            out.append(logits.float().softmax(dim=1))
    finally:
        classifier.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


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


# ------------------------------------------------------------------------------ classifier files

PREPROCESSING_KEY = "preprocessing"  # {"mean": [r, g, b], "std": [r, g, b], "input_size": side}, beside the weights


def _save_hint(model_name: str, path: str | Path) -> str:
    return (f"on a machine with internet run `import timm, torch; m = timm.create_model({model_name!r}, "
            f"pretrained=True); c = m.pretrained_cfg; torch.save({{'state_dict': m.state_dict(), "
            f"'{PREPROCESSING_KEY}': {{'mean': list(c['mean']), 'std': list(c['std']), "
            f"'input_size': c['input_size'][-1]}}}}, {str(path)!r})` and copy the file here "
            f"(or make a random stand-in with `recall standin-weights`)")


def checked_preprocessing(value, path: str | Path) -> dict:
    """A file's preprocessing as {"mean": 3 floats, "std": 3 positive floats, "input_size": int >= 1}."""
    try:
        mean, std = [float(v) for v in value["mean"]], [float(v) for v in value["std"]]
        size = value["input_size"]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or isinstance(size, bool) or int(size) != size \
                or size < 1:
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise ReplayError(f"{path}: its {PREPROCESSING_KEY!r} must be {{'mean': [3 numbers], 'std': [3 positive "
                          f"numbers], 'input_size': side in pixels}}, got {value!r}") from None
    return {"mean": mean, "std": std, "input_size": int(size)}


def save_classifier(path: str | Path, state: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
                    input_size: int) -> Path:
    """Write a classifier file (atomically): its weights and the preprocessing they were trained with, so that
    every user of the file sees images as its training did. ``.safetensors`` keeps the preprocessing as JSON in
    the file's metadata; other suffixes are ``torch.save`` of ``{"state_dict", "preprocessing"}``."""
    import io

    from recall.atomic import write_bytes

    path = Path(path)
    preprocessing = checked_preprocessing({"mean": list(mean), "std": list(std), "input_size": input_size}, path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in state.items()},
                    metadata={PREPROCESSING_KEY: json.dumps(preprocessing)})
    else:
        buffer = io.BytesIO()
        torch.save({"state_dict": dict(state), PREPROCESSING_KEY: preprocessing}, buffer)
        data = buffer.getvalue()
    write_bytes(path, data)
    return path


def read_classifier(path: str | Path, model_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and the preprocessing of a classifier file (``save_classifier``). A file without its
    preprocessing is refused: a model fed other inputs than it was trained on still runs, and classifies badly."""
    state, extras = read_checkpoint(path, _save_hint(model_name, path))
    value = extras.get(PREPROCESSING_KEY)
    if isinstance(value, str):  # safetensors metadata
        try:
            value = json.loads(value)
        except ValueError:
            pass  # checked_preprocessing names it
    if value is None:
        raise ReplayError(f"{path}: the classifier file does not say how its images were preprocessed (mean, std, "
                          f"input size); a plain state dict is refused, because the model would silently see other "
                          f"inputs than it was trained on. Save it with them: {_save_hint(model_name, path)}")
    return state, checked_preprocessing(value, path)


# ------------------------------------------------------------------------------ ImageNet classifier


def _create_timm_model(model_name: str, num_classes: int = IMAGENET_NUM_CLASSES) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ReplayError(f"cannot create timm model {model_name!r} ({error}); see timm.list_models()") from error


def imagenet_classifier(model_name: str = IMAGENET_MODEL, *, weights: str | Path,
                        names: str | Path | None = None) -> SourceClassifier:
    """RECALL's ImageNet classifier (EfficientNet-B2 by default) from a local classifier file, in eval mode.

    ``weights`` is a classifier file (``save_classifier``): the state dict, loaded strictly, and the normalisation
    and input size it was trained with, which the classifier then applies (``classify``). ``names`` is a JSON list
    of its class names (a classifier of another class set, e.g. the toy world's, pretrained by `recall pretrain`);
    without it the classes are ImageNet-1k's.
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
    state, preprocessing = read_classifier(weights, model_name)
    load_strictly(model, state, weights)
    classifier = SourceClassifier(model, source_names, mean=preprocessing["mean"], std=preprocessing["std"],
                                  input_size=preprocessing["input_size"])
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
