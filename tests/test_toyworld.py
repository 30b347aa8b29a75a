"""The procedurally generated toy world: VOC layout, palette masks, borders, determinism, coverage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recall.data.classes import IGNORE_INDEX, voc_palette
from recall.sim.toyworld import (
    CLASS_STYLES,
    ClassStyle,
    draw_object,
    generate,
    render_background,
)

N_TRAIN, N_VAL = 12, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    generate(out, n_train=N_TRAIN, n_val=N_VAL, seed=0, progress=False)
    return out


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def _masks(root: Path) -> list[np.ndarray]:
    return [np.array(_load(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))]


def test_layout(world: Path) -> None:
    train = (world / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (world / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert train[3] == "toy_train_000003" and val[0] == "toy_val_000000"
    for image_id in train + val:
        assert (world / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert (world / "SegmentationClass" / f"{image_id}.png").is_file()
    summary = json.loads((world / "toyworld.json").read_text())
    assert summary["params"]["n_train"] == N_TRAIN and summary["params"]["seed"] == 0
    assert len(summary["class_image_counts"]["train"]) == 20
    assert not list(world.rglob("*.tmp"))


def test_images_and_masks(world: Path) -> None:
    image = _load(world / "JPEGImages/toy_train_000000.jpg")
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
    mask = _load(world / "SegmentationClass/toy_train_000000.png")
    assert mask.mode == "P" and mask.size == (64, 64)
    assert mask.getpalette()[:768] == voc_palette()
    values = set(np.unique(np.concatenate([m.ravel() for m in _masks(world)])).tolist())
    assert values <= set(range(21)) | {IGNORE_INDEX}
    assert IGNORE_INDEX in values and 0 in values


def test_borders_surround_objects(world: Path) -> None:
    for mask in _masks(world):
        # No object pixel touches background directly: a 255 band separates them.
        horizontal = np.stack([mask[:, :-1], mask[:, 1:]])
        vertical = np.stack([mask[:-1], mask[1:]])
        for a, b in (horizontal, vertical):
            differ = (a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
            assert not differ.any()
        objects = (mask != 0) & (mask != IGNORE_INDEX)
        if objects.any():
            assert (mask == IGNORE_INDEX).any()


def _read_all(root: Path) -> dict[str, bytes]:
    files = sorted((root / "JPEGImages").iterdir()) + sorted((root / "SegmentationClass").iterdir())
    return {f.name: f.read_bytes() for f in files}


def test_deterministic(tmp_path: Path, world: Path) -> None:
    generate(tmp_path / "same", n_train=N_TRAIN, n_val=N_VAL, seed=0, progress=False)
    assert _read_all(tmp_path / "same") == _read_all(world)
    generate(tmp_path / "other", n_train=N_TRAIN, n_val=N_VAL, seed=1, progress=False)
    other = _read_all(tmp_path / "other")
    assert other.keys() == _read_all(world).keys() and other != _read_all(world)


def test_independent_of_split_size(tmp_path: Path, world: Path) -> None:
    generate(tmp_path / "fewer", n_train=3, n_val=1, seed=0, progress=False)
    name = "toy_train_000002.png"
    assert (tmp_path / "fewer/SegmentationClass" / name).read_bytes() == \
        (world / "SegmentationClass" / name).read_bytes()


def test_all_classes_appear_and_images_mix_classes(tmp_path: Path) -> None:
    summary = generate(tmp_path, n_train=200, n_val=0, size=48, seed=3, progress=False)
    assert all(count > 0 for count in summary["class_image_counts"]["train"].values())
    multi = sum(len(set(np.unique(m).tolist()) - {0, IGNORE_INDEX}) >= 2 for m in _masks(tmp_path))
    assert multi >= 20


def test_class_styles_are_distinct() -> None:
    assert sorted(CLASS_STYLES) == list(range(1, 21))
    keys = {(s.shape, s.texture, s.hue) for s in CLASS_STYLES.values()}
    assert len(keys) == 20


def test_draw_object_in_place_with_custom_style() -> None:
    rng = np.random.default_rng(0)
    image = render_background(64, rng)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    mask = np.zeros((64, 64), dtype=np.uint8)
    style = ClassStyle(shape="circle", texture="solid", hue=0.0)
    before = image.copy()
    draw_object(image, mask, 8, (32.0, 20.0), 10.0, rng, angle=0.1, style=style)
    assert mask[32, 20] == 8 and mask[0, 0] == 0 and mask[32, 40] == 0
    assert not np.allclose(image[32, 20], before[32, 20])
    assert image[32, 20, 0] > image[32, 20, 2]  # red hue
