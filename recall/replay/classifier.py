"""The source classifier: the model that names a generator's classes, its file and its preprocessing.

Classifiers here take float images in [0, 1] (N, 3, H, W) and return source-class logits; the
normalisation lives inside the module (``SourceClassifier``). One preprocessing wherever a classifier is used:
``classify`` (uint8 images -> [0, 1] at the classifier's input size -> softmax) scores the pretraining's held-out
images and maps the classes (``recall.replay.classmap``), and a classifier file carries the normalisation and input
size it was trained with (``save_classifier``; ``imagenet_classifier`` refuses a file without them).

`recall pretrain` writes such a file and the class mapping reads it: this module is what the two share, so the
pretraining does not depend on the class mapping or the pool code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from recall.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from recall.errors import ReplayError
from recall.replay.weights import IMAGENET_NUM_CLASSES, imagenet_names, load_strictly, read_checkpoint

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
