"""RECALL's label evaluation and background inpainting, as pure tensor functions (no in-place edits).

* `label_replay_all` / `label_replay`: pixel labels for a replay image that carries only an image-level class:
  the argmax over *all* outputs of the labelling model (the authors' code, LTTM/RECALL `compute_labels`: a pixel
  may get another class it looks like), or restricted to {background, that class}; optionally pixels whose
  confidence is below a threshold become 255 (ignored).
* `inpaint_background`: in the current step's ground truth, background pixels (and, as an option, 255)
  take the previous model's prediction where its confidence is at least tau. tau = 0 is the original
  RECALL: every background pixel takes the previous model's argmax (which may itself be background).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from recall.data.classes import BACKGROUND, IGNORE_INDEX, PADDING


def label_replay(logits: torch.Tensor, class_channel: torch.Tensor | int, class_index: torch.Tensor | int,
                 threshold: float = 0.0) -> torch.Tensor:
    """Labels [B, H, W] from a labelling model's logits [B, C, H, W].

    class_channel: which logit channel holds the image's class in that model (per image or one int);
    class_index: the label to write for it (the class's index in the full label space).
    Background is channel 0. Pixels whose two-way softmax confidence is below `threshold` become 255.
    """
    batch = logits.shape[0]
    channel = torch.as_tensor(class_channel, device=logits.device).expand(batch).long()
    label = torch.as_tensor(class_index, device=logits.device).expand(batch).long()
    pair = torch.stack([logits[:, 0], logits[torch.arange(batch, device=logits.device), channel]], dim=1)  # [B, 2, H, W]
    confidence, winner = pair.softmax(dim=1).max(dim=1)
    labels = torch.where(winner == 1, label[:, None, None], torch.full_like(winner, BACKGROUND))
    return torch.where(confidence >= threshold, labels, torch.full_like(labels, IGNORE_INDEX))


def inpaint_background(targets: torch.Tensor, prev_logits: torch.Tensor, threshold: float = 0.0,
                       include_ignore: bool = False) -> torch.Tensor:
    """New targets [B, H, W]: background (and the image's own 255 pixels if `include_ignore`) replaced by the
    previous model's argmax over its classes (background + old classes) where its softmax confidence is at least
    `threshold`. Crop padding (PADDING) is never replaced: it is not image content."""
    confidence, prediction = prev_logits.softmax(dim=1).max(dim=1)
    replaceable = targets == BACKGROUND
    if include_ignore:
        replaceable = replaceable | (targets == IGNORE_INDEX)
    return torch.where(replaceable & (confidence >= threshold), prediction, targets)


def ignore_padding(targets: torch.Tensor) -> torch.Tensor:
    """Targets with crop padding (PADDING) as 255: what the loss ignores. The loop calls it after the method
    rewrote the targets, so no method trains on padding."""
    return torch.where(targets == PADDING, torch.full_like(targets, IGNORE_INDEX), targets)


def label_replay_all(logits: torch.Tensor, channel_classes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Labels [B, H, W]: the class of each pixel's argmax over every channel of the labelling model's logits
    [B, C, H, W] (`channel_classes[c]`: the class of channel c in the full label space); pixels whose softmax
    confidence is below `threshold` become 255."""
    confidence, winner = logits.softmax(dim=1).max(dim=1)
    labels = channel_classes.to(logits.device)[winner]
    return torch.where(confidence >= threshold, labels, torch.full_like(labels, IGNORE_INDEX))


LABEL_SPACES = ("all", "class")


@torch.no_grad()
def label_pool(model: torch.nn.Module, data, channel_classes: list[int], out: Path, threshold: float = 0.0,
               space: str = "all", batch_size: int = 32, device: str | torch.device = "cpu") -> int:
    """Label every image of a replay `PoolDataset` (eval transform, no labels) with `model`: the argmax over all
    its outputs (`space="all"`, the authors') or restricted to {background, the image's class} (`"class"`); writes
    `<out>/<id>.png` (uint8, full label space) atomically. `channel_classes[c]` is the class of the model's
    output channel c. Returns the number of images labelled."""
    if space not in LABEL_SPACES:
        raise ValueError(f"label space {space!r}: expected one of {', '.join(LABEL_SPACES)}")
    device = torch.device(device)
    model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    classes = torch.tensor(data.target_classes)
    channel_of = {c: k for k, c in enumerate(channel_classes)}
    for idx in tqdm(same_size_batches(data.records, batch_size), desc="label evaluation", leave=False):
        images = torch.stack([data[i][0] for i in idx]).to(device)
        logits = model(images)["out"]
        if space == "all":
            labels = label_replay_all(logits, torch.tensor(channel_classes), threshold).cpu()
        else:
            channels = torch.tensor([channel_of[int(classes[i])] for i in idx], device=device)
            labels = label_replay(logits, channels, classes[idx].to(device), threshold).cpu()
        for i, mask in zip(idx, labels):
            save_label_png(out / f"{data.records[i]['id']}.png", mask.to(torch.uint8).numpy())
    return len(data)


def same_size_batches(records: list[dict], batch_size: int) -> list[list[int]]:
    """Indices of ``records`` in batches of equal image size (web photos come in many sizes), in pool order
    within a size."""
    by_size: dict[tuple, list[int]] = {}
    for i, record in enumerate(records):
        by_size.setdefault((record.get("height"), record.get("width")), []).append(i)
    return [group[first:first + batch_size] for group in by_size.values() for first in range(0, len(group), batch_size)]


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """A uint8 label map as a greyscale PNG, written to a temp file and renamed (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(labels, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def labelled_share(labels_dir: Path, records: list[dict]) -> list[float]:
    """For each pool record, the share of its evaluated label's pixels that carry the record's class."""
    shares = []
    for record in records:
        with Image.open(labels_dir / f"{record['id']}.png") as label:
            shares.append(float((np.asarray(label) == int(record["target_class"])).mean()))
    return shares
