"""The VOC-layout reader on the toy world and on small hand-made datasets with defects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from recall.data.classes import voc_palette
from recall.data.voc import DatasetError, VOCSegmentation, image_classes, read_split
from recall.sim.toyworld import generate

SIZE = 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    generate(out, n_train=6, n_val=2, seed=0, progress=False)
    return out


def _write_mask(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8)).convert("P")
    image.putpalette(voc_palette())
    image.save(path)


def make_dataset(root: Path, masks: dict[str, np.ndarray], split: str = "train") -> Path:
    """A hand-made VOC-layout dataset: grey images, the given masks."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for image_id, mask in masks.items():
        Image.new("RGB", (mask.shape[1], mask.shape[0]), (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.jpg")
        _write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(masks) + "\n\n")
    return root


def _mask(*labels: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for k, label in enumerate(labels):
        mask[k, :] = label
    return mask


def test_reads_toy_world(toy: Path) -> None:
    ds = VOCSegmentation(toy, "train")
    assert len(ds) == 6 and ds.ids[0] == "toy_train_000000" and ds.root == toy
    image, mask = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (64, 64)
    assert set(mask.unique().tolist()) <= set(range(21)) | {255}
    subset = VOCSegmentation(toy, "train", ids=["toy_train_000004"])
    assert len(subset) == 1 and torch.equal(subset[0][1], ds[4][1])


def test_transform_and_label_map(toy: Path) -> None:
    label_map = torch.full((256,), 255, dtype=torch.long)
    label_map[0] = 0
    label_map[1:21] = 1  # every class -> 1
    transform = v2.Compose([v2.RandomCrop(32), v2.ToDtype(torch.float32, scale=True)])
    ds = VOCSegmentation(toy, "val", transform=transform, label_map=label_map)
    image, mask = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and set(mask.unique().tolist()) <= {0, 1, 255}
    with pytest.raises(ValueError):
        VOCSegmentation(toy, "val", label_map=torch.zeros(10, dtype=torch.long))


def test_read_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train.txt"):
        read_split(tmp_path, "train")
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match="train.txt"):
        read_split(tmp_path, "train")
    (tmp_path / "ImageSets/Segmentation/aug.txt").write_text(" a \n\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\n")
    assert read_split(tmp_path, "aug") == ["a", "b"]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds", {"a": _mask(1, 2), "b": _mask(5), "c": _mask(255, 20)})


def test_missing_image(good: Path) -> None:
    os.remove(good / "JPEGImages/b.jpg")
    with pytest.raises(DatasetError, match=r"b\.jpg.*missing"):
        VOCSegmentation(good)[1]


def test_missing_mask(good: Path) -> None:
    os.remove(good / "SegmentationClass/b.png")
    with pytest.raises(DatasetError, match=r"b\.png.*missing"):
        VOCSegmentation(good)[1]
    with pytest.raises(DatasetError, match=r"b\.png"):
        image_classes(good, ["a", "b"], progress=False)


def test_wrong_size_mask(good: Path) -> None:
    _write_mask(good / "SegmentationClass/a.png", np.zeros((SIZE, SIZE + 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"a\.png.*a\.jpg") as info:
        VOCSegmentation(good)[0]
    assert "19" in str(info.value)


def test_bad_label_value(good: Path) -> None:
    _write_mask(good / "SegmentationClass/c.png", _mask(42))
    with pytest.raises(DatasetError, match=r"c\.png.*42"):
        VOCSegmentation(good, num_classes=20)[2]
    with pytest.raises(DatasetError, match=r"c\.png.*42"):
        image_classes(good, ["c"], progress=False)
    # Label 20 is legal with 20 classes, illegal with 15.
    assert VOCSegmentation(good, num_classes=20)[0][1].max() == 2
    with pytest.raises(DatasetError, match="a.png"):
        VOCSegmentation(good, num_classes=1)[0]


def test_corrupt_image(good: Path) -> None:
    (good / "JPEGImages/a.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(DatasetError, match=r"a\.jpg"):
        VOCSegmentation(good)[0]
    (good / "SegmentationClass/b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"b\.png"):
        VOCSegmentation(good)[1]


def test_grey_masks_accepted(good: Path) -> None:
    Image.fromarray(_mask(7, 255)).save(good / "SegmentationClass/b.png")  # mode "L", like SBD
    with Image.open(good / "SegmentationClass/b.png") as grey:
        assert grey.mode == "L"
    _, mask = VOCSegmentation(good)[1]
    assert set(mask.unique().tolist()) == {0, 7, 255}


def test_image_classes_and_cache(good: Path, tmp_path: Path) -> None:
    expected = {"a": frozenset({1, 2}), "b": frozenset({5}), "c": frozenset({20})}
    ids = read_split(good, "train")
    cache = tmp_path / "cache" / "classes.json"
    assert image_classes(good, ids, cache=cache, progress=False) == expected
    assert cache.is_file()

    # Second call is served from the cache: make a mask unreadable without changing its stat.
    path = good / "SegmentationClass/a.png"
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image_classes(good, ids, cache=cache, progress=False) == expected

    # A changed mask invalidates the cache.
    _write_mask(path, _mask(3))
    assert image_classes(good, ids, cache=cache, progress=False)["a"] == frozenset({3})
    # A different id list is not served from the cache.
    assert image_classes(good, ["b"], cache=cache, progress=False) == {"b": frozenset({5})}


def test_a_voc_layout_dataset_is_one_config_file(tmp_path: Path, tiny_world: Path, monkeypatch, capsys) -> None:
    """conf/dataset/<name>.yaml with its root, splits, directories and class names is all a new VOC-layout dataset
    needs: a run reads it and names its classes as the file says; a wrong list is refused, naming the key."""
    import json
    import shutil

    from conftest import FAST

    from recall import config
    from recall.cli import main

    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    names = ["void", *(f"shape{c}" for c in range(1, 21))]
    (conf / "dataset" / "shapes.yaml").write_text(
        "name: shapes\nroot: data/shapes\nnum_classes: 20\ntrain_split: train\nval_split: val\n"
        f"image_dir: JPEGImages\nmask_dir: SegmentationClass\nclasses: [{', '.join(names)}]\n")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    run_dir = tmp_path / "run"
    assert main(["run", "dataset=shapes", f"dataset.root={tiny_world}", "protocol=15-5", "last_step=0",
                 f"run_dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["classes"] == names and set(metrics["final"]["iou"]) == set(names[:16])
    capsys.readouterr()
    assert main(["run", "dataset=shapes", f"dataset.root={tiny_world}", "dataset.classes=[a,b]", "--dry-run"]) == 2
    assert "dataset.classes has 2 names; dataset.num_classes=20 needs 21" in capsys.readouterr().err
