"""The train/eval transforms keep image and mask aligned, pad with 0 (image) and PADDING (mask), scale the original
image (the authors' code) or the image fitted into the crop, and are repeatable per seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from recall.data.classes import PADDING
from recall.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    train_transform,
)


def _denormalise(x: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).round().numpy()


def _coded_sample(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = column index // 4 (16 labels); the image's red channel encodes the label, green the row."""
    labels = np.broadcast_to(np.arange(size) // 4, (size, size))
    image = np.stack([labels * 10, np.broadcast_to(np.arange(size)[:, None], (size, size)), np.full((size, size), 7)])
    return tv_tensors.Image(torch.from_numpy(image.astype(np.uint8))), tv_tensors.Mask(torch.from_numpy(labels.astype(np.int64)))


def test_crop_and_flip_keep_image_and_mask_aligned():
    image, mask = _coded_sample()
    transform = train_transform(32, (2.0, 2.0), reference="crop")  # scale 2 of "fit to 32" = 64 px: no resize
    torch.manual_seed(0)
    flipped, corners = 0, set()
    for _ in range(20):
        x, y = transform(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.int64
        red = _denormalise(x)[0]
        assert np.array_equal(red, y.numpy() * 10), "image and mask went different ways"
        flipped += int(y[0, 0] > y[0, -1])
        corners.add((int(_denormalise(x)[1, 0, 0]), int(y[0, :].min())))
    assert 0 < flipped < 20  # both flipped and unflipped samples occur
    assert len(corners) > 5  # and crops at different places  # both flipped and unflipped samples occur


def test_small_scale_pads_image_with_zero_and_mask_with_ignore():
    image, mask = _coded_sample()
    torch.manual_seed(1)
    x, y = train_transform(64, (0.5, 0.5))(image, mask)  # resized to 32x32, padded to 64x64
    padded = y == PADDING
    assert padded.float().mean() == pytest.approx(0.75)
    assert np.allclose(_denormalise(x)[:, padded.numpy()], 0)
    assert set(y[~padded].unique().tolist()) <= set(range(16))
    corners = set()
    for _ in range(10):  # the smaller image is placed anywhere in the crop, not always top-left
        _, y = train_transform(64, (0.5, 0.5))(image, mask)
        kept = (y != PADDING).nonzero()
        corners.add(tuple(kept.min(0).values.tolist()))
    assert len(corners) > 3


def test_the_scale_applies_to_the_original_image_or_to_the_image_fitted_into_the_crop():
    image, mask = _coded_sample()  # 64 x 64
    torch.manual_seed(0)
    _, y = train_transform(128, (1.0, 1.0))(image, mask)  # the authors' code: the image stays 64 px in a 128 crop
    assert (y != PADDING).sum() == 64 * 64
    _, y = train_transform(128, (1.0, 1.0), reference="crop")(image, mask)  # fitted into the crop: 128 px, no pad
    assert (y == PADDING).sum() == 0
    with pytest.raises(ValueError, match="scale_reference"):
        train_transform(64, (1.0, 1.0), reference="screen")


def test_same_seed_same_sample_and_eval_is_exact():
    image, mask = _coded_sample()
    transform = train_transform(48, (0.5, 1.5))
    torch.manual_seed(3)
    a = transform(image, mask)
    torch.manual_seed(3)
    b = transform(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y = eval_transform()(image, mask)
    assert np.array_equal(_denormalise(x), image.numpy()) and torch.equal(y, mask.as_subclass(torch.Tensor))
    assert eval_transform()(image)[1] is None  # replay images before label evaluation have no mask


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="scale"):
        train_transform(64, (1.5, 0.5))
