"""Joint image/mask transforms (torchvision.transforms.v2): the paper's random scale, crop and flip."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from recall.data.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_model_input() -> list:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(crop: int, scale: tuple[float, float]) -> v2.Compose:
    """Random scale (relative to `crop`), random crop padded with 255 in the mask, horizontal flip."""
    return v2.Compose([
        v2.ScaleJitter(target_size=(crop, crop), scale_range=tuple(scale), antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        *_to_model_input(),
    ])


def eval_transform() -> v2.Compose:
    """Full image, no resizing (RECALL evaluates whole images)."""
    return v2.Compose(_to_model_input())
