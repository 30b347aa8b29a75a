"""Joint image/mask transforms: the paper's random scale, crop and flip, then normalisation.

They take what the datasets return (uint8 CHW image tensor, int64 HW mask tensor or None) and give
(float32 normalised CHW image, int64 HW mask). The work is done per sample with PIL and numpy, which is
single-threaded: on 64x64 samples, torch's own kernels (torchvision.transforms.v2) spend much of their time
in dispatch and thread-pool start-up; this is 1.7x the samples/s of the v2 pipeline on the toy world
(benchmarks/transforms.py). Randomness comes from torch's
generator, so `torch.manual_seed` makes a run repeatable as before.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from recall.data.classes import PADDING

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255
_INV_STD = 1 / (np.asarray(IMAGENET_STD, dtype=np.float32) * 255)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return torch.Tensor.numpy(image.as_subclass(torch.Tensor)).transpose(1, 2, 0)


def to_model_input(image_hwc: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW, normalised with the ImageNet mean and std."""
    normalised = (image_hwc.astype(np.float32) - _MEAN) * _INV_STD
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def _mask_out(mask: np.ndarray | None) -> torch.Tensor | None:
    return None if mask is None else torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


SCALE_REFERENCES = ("image", "crop")


class TrainTransform:
    """Random scale s ~ U(scale), random crop of `crop` x `crop` padded with 0 (image) and PADDING (mask: the loop
    ignores it, `recall.labeling.ignore_padding`), horizontal flip with probability 0.5.

    `reference="image"` scales the original image by s, as the authors' code (LTTM/RECALL `preprocessing.py`:
    `random_image_scaling`, then `random_crop_and_pad_image_and_labels`); `"crop"` first fits the image into the
    crop (torchvision's ScaleJitter), so on VOC (~500 px images, crop 321) the mean training scale would be ~0.64x
    the test scale. On the 64 px toy world with a 64 px crop both are the same."""

    def __init__(self, crop: int, scale: tuple[float, float], reference: str = "image"):
        low, high = float(scale[0]), float(scale[1])
        if crop <= 0 or not 0 < low <= high:
            raise ValueError(f"train transform: need crop > 0 and 0 < scale[0] <= scale[1], got crop={crop}, "
                             f"scale={list(scale)}")
        if reference not in SCALE_REFERENCES:
            raise ValueError(f"train.scale_reference={reference!r}: expected one of {', '.join(SCALE_REFERENCES)}")
        self.crop, self.scale, self.reference = int(crop), (low, high), reference

    def __repr__(self) -> str:
        return f"TrainTransform(crop={self.crop}, scale={list(self.scale)}, reference={self.reference!r})"

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        array = _hwc(image)
        labels = None if mask is None else torch.Tensor.numpy(mask.as_subclass(torch.Tensor)).astype(np.uint8)
        height, width = array.shape[:2]
        s = self.scale[0] + float(torch.rand(())) * (self.scale[1] - self.scale[0])
        ratio = s if self.reference == "image" else min(self.crop / height, self.crop / width) * s
        size = (max(round(width * ratio), 1), max(round(height * ratio), 1))
        if size != (width, height):
            array = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))  # PIL antialiases downscaling
            if labels is not None:
                labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        pad_h, pad_w = max(self.crop - array.shape[0], 0), max(self.crop - array.shape[1], 0)
        if pad_h or pad_w:  # a smaller image lands at a random place in the crop (as padding both sides would)
            top, left = int(torch.randint(pad_h + 1, ())), int(torch.randint(pad_w + 1, ()))
            widths = ((top, pad_h - top), (left, pad_w - left))
            array = np.pad(array, (*widths, (0, 0)))
            if labels is not None:
                labels = np.pad(labels, widths, constant_values=PADDING)
        top = int(torch.randint(array.shape[0] - self.crop + 1, ()))
        left = int(torch.randint(array.shape[1] - self.crop + 1, ()))
        window = (slice(top, top + self.crop), slice(left, left + self.crop))
        array = array[window]
        labels = None if labels is None else labels[window]
        if float(torch.rand(())) < 0.5:
            array = array[:, ::-1]
            labels = None if labels is None else labels[:, ::-1]
        return to_model_input(array), _mask_out(labels)


class EvalTransform:
    """Full image, no resizing (RECALL evaluates whole images); only normalisation."""

    def __repr__(self) -> str:
        return "EvalTransform()"

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        labels = None if mask is None else torch.Tensor.numpy(mask.as_subclass(torch.Tensor))
        return to_model_input(_hwc(image)), _mask_out(labels)


def train_transform(crop: int, scale: tuple[float, float], reference: str = "image") -> TrainTransform:
    return TrainTransform(crop, scale, reference)


def eval_transform() -> EvalTransform:
    return EvalTransform()
