"""The hand-made world of the wiring tests (tests/test_wiring.py, tests/test_replay_method.py): small enough to
count by hand.

4 classes, 16x16 training images (step 0 of 2-2 learns classes 1 and 2, step 1 classes 3 and 4), four 8x8
validation images with hand-made ground truth and predictions (`VAL`), and a replay pool of 16x16 noise images of
classes 1 and 2 whose evaluated labels `replay_run` writes by hand (`POOL_SHARES`). `spy` wraps a real hook.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from recall.atomic import write_json
from recall.config import compose
from recall.data.classes import IGNORE_INDEX
from recall.experiment import ProtocolRun
from recall.model import SegmentationModel, save_checkpoint
from recall.provenance import content_id
from recall.replay.pool import ReplayPool

SIDE = 16  # training and replay images are SIDE x SIDE; the crop is the whole image and the scale 1
POOL_SHARES = {1: [0.0, 0.25, 0.5, 0.75], 2: [0.375]}  # per replay image: the share its evaluated label covers


# --------------------------------------------------------------------------------------------- hand-made pieces
def spy(obj, name: str) -> list[tuple]:
    """Wrap the real hook `obj.name`: every call's positional arguments are recorded, then the hook runs."""
    calls, real = [], getattr(obj, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    setattr(obj, name, recorded)
    return calls


def save_png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def flat_image(rgb: tuple[int, int, int], side: int) -> np.ndarray:
    return np.tile(np.array(rgb, dtype=np.uint8), (side, side, 1))


def write_split(root: Path, split: str, samples: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """VOC layout: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt."""
    for image_id, (image, mask) in samples.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=100)
        save_png(root / "SegmentationClass" / f"{image_id}.png", mask, "L")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(samples) + "\n")


def train_samples() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Step 0 of 2-2 learns classes 1 and 2, step 1 classes 3 and 4 (three images: t2, t3, t4)."""
    samples = {}
    for i, classes in enumerate([(1,), (2,), (3,), (4,), (3, 1)]):
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        for k, c in enumerate(classes):
            mask[4 * k:4 * k + 4, 4:12] = c
        samples[f"t{i}"] = (flat_image((0, 30 + 40 * i, 100), SIDE), mask)
    return samples


# Validation (8x8), evaluated after step 0 of 2-1-1 (seen: 1, 2; future: 3, 4). Each image is one flat colour
# (red = 40 + 50 i) that the ColourModel reads to give the image's hand-made prediction.
def _halves(left: int, right: int) -> np.ndarray:
    mask = np.full((8, 8), right, dtype=np.uint8)
    mask[:, :4] = left
    return mask


def _quarters(top: int, bottom_left: int, bottom_right: int) -> np.ndarray:
    mask = np.full((8, 8), top, dtype=np.uint8)
    mask[4:, :4], mask[4:, 4:] = bottom_left, bottom_right
    return mask


VAL = {  # id: (ground truth, prediction)
    "a": (_halves(1, 0), _halves(1, 0)),  # a seen class, predicted right
    "b": (_halves(4, 0), _halves(0, 0)),  # only a future class (and background)
    "c": (_quarters(1, 3, 0), _quarters(1, 1, 2)),  # future class 3 predicted as 1; absent class 2 predicted
    "d": (_halves(0, 0), _halves(1, 0)),  # background only, half of it predicted as class 1
}


def write_pool(root: Path) -> ReplayPool:
    """Replay images of classes 1 and 2 (noise: no copy of a dataset image), one per entry of POOL_SHARES."""
    pool, rng = ReplayPool(root), np.random.default_rng(0)
    for c, shares in POOL_SHARES.items():
        for _ in shares:
            pool.add(Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)), {"target_class": c})
    return pool


def make_world(root: Path) -> SimpleNamespace:
    """The dataset (VOC layout) and the replay pool, under `root`."""
    write_split(root / "data", "train", train_samples())
    write_split(root / "data", "val", {i: (flat_image((40 + 50 * k, 0, 0), 8), gt)
                                       for k, (i, (gt, _)) in enumerate(VAL.items())})
    return SimpleNamespace(data=root / "data", pool=write_pool(root / "pool"))


def protocol_run(world: SimpleNamespace, tmp: Path, *overrides: str) -> ProtocolRun:
    """A ProtocolRun on the hand-made world, built from the configuration as `recall run` builds it."""
    cfg = compose([f"dataset.root={world.data}", "dataset.name=hand", "dataset.num_classes=4", f"run_dir={tmp}/run",
                   "model.head_channels=16", "model.pretrained_file=null", "tracking.uri=", "train.batch_size=4",
                   f"train.crop={SIDE}", "train.scale=[1.0,1.0]", "train.epochs_incremental=1", *overrides])
    return ProtocolRun(cfg)


def save_step0(run: ProtocolRun) -> SegmentationModel:
    torch.manual_seed(0)
    model = SegmentationModel(run.model_cfg, [len(run.task[0])])
    save_checkpoint(model, run.step_dir(0) / "model.pt", run.meta(0))
    return model


def recall_run(world: SimpleNamespace, tmp: Path, *overrides: str, protocol: str = "2-2",
               pool: Path | None = None) -> ProtocolRun:
    """A RECALL run replaying from `pool` (the world's by default) with its step-0 checkpoint saved."""
    run = protocol_run(world, tmp, f"protocol={protocol}", "method=recall", "replay=folder",
                       f"replay.pool={pool or world.pool.root}", *overrides)
    save_step0(run)
    return run


def replay_run(world: SimpleNamespace, tmp: Path, *overrides: str) -> ProtocolRun:
    """A RECALL run of 2-2 at step 1: the step-0 checkpoint saved, and the pool's labels written by hand as label
    evaluation would have (class pixels first in raster order, share POOL_SHARES), with the group's marker."""
    run = recall_run(world, tmp, *overrides)
    labels_dir = run.method.stream(run).labels_dir
    records = {c: world.pool.records(c) for c in POOL_SHARES}
    for c, shares in POOL_SHARES.items():
        for record, share in zip(records[c], shares):
            label = np.zeros(SIDE * SIDE, dtype=np.uint8)
            label[:round(share * SIDE * SIDE)] = c
            save_png(labels_dir / f"{record['id']}.png", label.reshape(SIDE, SIDE), "L")
    write_json(labels_dir / "step0.done", {"pool": content_id(world.pool.root), "classes": run.task[0]})
    return run


def labelled_pixels(targets: torch.Tensor) -> list[int]:
    """Per sample: how many pixels carry a class (not background, not ignored)."""
    return [int(((t > 0) & (t < IGNORE_INDEX)).sum()) for t in targets]
