"""What a finished protocol run looks like: its figures and its replay statistics.

``write_figures`` draws ``<run_dir>/figures/`` from the saved step results and checkpoints (so a resumed
run draws the same pictures); ``replay_statistics`` measures, for each incremental step of a replay
method, how much of its replay the label evaluation labelled and how much inpainting rewrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recall import distributed
from recall.data.transforms import eval_transform
from recall.figures import plot_class_heatmap, plot_forgetting, plot_grid, plot_miou_curves
from recall.labeling import labelled_share, same_size_batches
from recall.model import load_checkpoint
from recall.replay.pool import PoolDataset

PREDICTION_SAMPLES = 6  # val images in predictions.png
REPLAY_SAMPLES = 8  # replay images in replay_labels.png (spread over the old classes)
INPAINT_SAMPLE = 256  # replay images the inpainted share is measured on, per step (evenly spaced)
TARGET_BATCH = 64


def write_figures(run, results: list[dict], title: str) -> list[Path]:
    """Every figure of the run (see ``recall.figures``) under ``<run_dir>/figures``; returns their paths."""
    out = run.run_dir / "figures"
    last = results[-1]["step"]
    plot_miou_curves(results, title, out / "miou_curves.png")
    plot_class_heatmap(results, run.class_names, title, out / "class_iou.png")
    plot_forgetting(results[-1]["forgetting"], title, out / "forgetting.png")
    prediction_grid(run, last, title, out / "predictions.png")
    if run.method.uses_replay and last >= 1:
        replay_grid(run, last, title, out / "replay_labels.png")
    return sorted(p for p in out.iterdir() if p.suffix in (".png", ".csv"))


@torch.no_grad()
def prediction_grid(run, step: int, title: str, path: Path) -> None:
    """The first val images of step ``step``'s evaluation: image, ground truth, the step's prediction."""
    model, _ = load_checkpoint(run.step_dir(step) / "model.pt", run.model_cfg)
    model.eval()
    data = run.eval_loader(step).dataset
    rows, names = [], []
    for i in range(min(PREDICTION_SAMPLES, len(data))):
        image, target = data[i]
        prediction = model(image[None])["out"].argmax(1)[0]
        rows.append([np.asarray(data.load_raw(i)[0]), target.numpy(), prediction.numpy()])
        names.append(str(data.ids[i]) if hasattr(data, "ids") else str(i))
    plot_grid(rows, ["image", "ground truth", f"prediction (step {step})"], names, title, path)


def _replay_data(run, step: int) -> PoolDataset:
    old = [c for s in range(step) for c in run.task[s]]
    labels_dir = run.ensure_replay_labels(step)
    return PoolDataset(run.cfg.replay.pool, classes=old, labels_dir=labels_dir, transform=eval_transform())


def _spread(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)`` (all when ``n <= k``)."""
    return list(range(n)) if n <= k else sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


@torch.no_grad()
def _targets(run, step: int, data: PoolDataset, indices: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(evaluated label, training target after the method's target rewriting) for replay items ``indices``."""
    device = distributed.device(run.train_cfg.device)
    prev, _ = load_checkpoint(run.step_dir(step - 1) / "model.pt", run.model_cfg)
    prev.to(device).eval()
    ctx = run.context(step, prev)
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    records = [data.records[i] for i in indices]
    for batch in same_size_batches(records, TARGET_BATCH):  # positions in `indices`, images of one size each
        items = [data[indices[k]] for k in batch]
        images, labels = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        targets = run.method.rewrite_targets(images.to(device), labels.clone().to(device), ctx).cpu()
        for k, label, target in zip(batch, labels, targets):
            pairs[k] = (label.numpy(), target.numpy())
    return [pairs[k] for k in range(len(indices))]


def replay_grid(run, step: int, title: str, path: Path) -> None:
    """Replay images of step ``step`` with their evaluated labels and inpainted targets."""
    data = _replay_data(run, step)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(data.target_classes):
        by_class.setdefault(c, []).append(i)
    classes = sorted(by_class)
    chosen = [by_class[classes[k]][0] for k in _spread(len(classes), REPLAY_SAMPLES)]
    rows, names = [], []
    for i, (label, target) in zip(chosen, _targets(run, step, data, chosen)):
        rows.append([data.load_raw(i)[0], label, target])
        names.append(run.class_names[data.target_classes[i]])
    plot_grid(rows, ["replay image", "evaluated label", f"training target (step {step})"], names,
              f"{title}: replay at step {step}", path)


def replay_statistics(run, step: int) -> dict[str, float]:
    """Replay of step ``step``: pool images of old classes, mean share of their pixels labelled with their class,
    and the share of pixels the method's target rewriting (RECALL: inpainting) changed, on a sample."""
    data = _replay_data(run, step)
    if len(data) == 0:
        return {"replay/pool_images": 0.0}
    shares = labelled_share(data.labels_dir, data.records)
    pairs = _targets(run, step, data, _spread(len(data), INPAINT_SAMPLE))
    changed = sum(int((label != target).sum()) for label, target in pairs)
    pixels = sum(label.size for label, _ in pairs)
    return {"replay/pool_images": float(len(data)), "replay/labelled_share": float(np.mean(shares)),
            "replay/inpainted_share": changed / pixels}
