"""Pretraining a backbone as an image classifier: what every method in the papers starts from (an ImageNet
backbone), made here on a classification set named in the config (`pretrain.dataset`; the toy world's is the toy
"ImageNet", a simulation referenced by name).

`pretrain(cfg, backbone, out)` trains the timm model `backbone` (the same architecture as `model.backbone`) to
classify the set's training images and writes

    out/encoder.pth      the backbone's weights without its classifier: `model.pretrained_file` (loaded strictly)
    out/classifier.pth   the whole classifier (backbone + its classifier layer) and its preprocessing (ImageNet's
                         mean and std, the input size): the class mapping's classifier, as the paper maps VOC
                         classes with an ImageNet classifier (`recall.replay.classifier.save_classifier`)
    out/classes.json     the class names, in the classifier's order
    out/metrics.json     held-out top-1 / top-5 accuracy, training accuracy, images, seconds

The held-out accuracy is measured through `recall.replay.classifier.classify`, the class map's own preprocessing.

Training is deterministic for a seed (AdamW, one-cycle schedule, random flips and zoom-outs: the classifier must
also recognise the small objects of segmentation images).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recall.atomic import write_bytes, write_json
from recall.errors import Diverged, UserError
from recall.registry import resolve
from recall.replay.classifier import SourceClassifier, classify, save_classifier

# pretrain.dataset -> "module:function(split, per_class, size, seed, workers) -> (uint8 NHWC images, labels, names)"
DATASETS = {"toy_imagenet": "recall.sim.toy_imagenet:classification_set"}
# zoom-out augmentation: a part of each batch is shrunk and pasted at a random place on a smooth canvas
ZOOM_OUT_PROBABILITY = 0.5
ZOOM_OUT_SCALE = (0.35, 0.9)
CANVAS_GRID = 4


@dataclass
class PretrainConfig:
    dataset: str = "toy_imagenet"
    train_per_class: int = 60
    val_per_class: int = 20
    size: int = 64
    epochs: int = 16
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    workers: int = 2  # processes that render the images
    threads: int = 2

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UserError(f"pretrain.dataset={self.dataset!r}: expected one of {', '.join(DATASETS)}")
        for key in ("train_per_class", "val_per_class", "size", "epochs", "batch_size", "workers", "threads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise UserError(f"pretrain.{key}={getattr(self, key)!r}: must be an integer >= 1")


def zoom_out(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shrink a random part (``ZOOM_OUT_PROBABILITY``) of a float (N,3,H,W) batch onto smooth canvases: one scale
    per batch (a single resize), each image at its own position."""
    n, _, height, width = images.shape
    chosen = torch.rand(n, generator=generator) < ZOOM_OUT_PROBABILITY
    if not chosen.any():
        return images
    scale = ZOOM_OUT_SCALE[0] + float(torch.rand(1, generator=generator)) * (ZOOM_OUT_SCALE[1] - ZOOM_OUT_SCALE[0])
    h, w = max(int(height * scale), 1), max(int(width * scale), 1)
    picked = images[chosen]
    canvas = nn.functional.interpolate(nn.functional.adaptive_avg_pool2d(picked, CANVAS_GRID), size=(height, width),
                                       mode="bilinear", align_corners=False)
    small = nn.functional.interpolate(picked, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    corners = torch.rand(len(picked), 2, generator=generator)
    for k in range(len(picked)):
        top, left = int(corners[k, 0] * (height - h)), int(corners[k, 1] * (width - w))
        canvas[k, :, top:top + h, left:left + w] = small[k]
    out = images.clone()
    out[chosen] = canvas
    return out


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int,
                     lr: float, weight_decay: float, seed: int, progress: bool = True) -> list[float]:
    """Train `model` (a classifier of [0, 1] images) on uint8 NCHW `images`; returns the training accuracy per
    epoch."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(len(labels) // batch_size, 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    rng = torch.Generator().manual_seed(seed)
    accuracy = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=rng)
        correct = count = 0
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not progress)
        for step in bar:
            batch = order[step * batch_size:(step + 1) * batch_size]
            inputs = images[batch].float() / 255
            flip = torch.rand(len(batch), generator=rng) < 0.5
            inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
            logits = model(zoom_out(inputs, rng))
            loss = nn.functional.cross_entropy(logits, labels[batch])
            if not torch.isfinite(loss):  # nothing is written: the weights are saved after training only
                raise Diverged(f"pretrain epoch {epoch + 1}, batch {step + 1}: the loss ({loss.item()}) is not finite "
                               "(training diverged); nothing was saved: lower pretrain.lr and run it again")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(1) == labels[batch]).sum())
            count += len(batch)
        accuracy.append(correct / max(count, 1))
    return accuracy


def top_k_accuracy(classifier: SourceClassifier, images: torch.Tensor, labels: torch.Tensor, ks=(1, 5),
                   batch_size: int = 256) -> dict[int, float]:
    """Top-k accuracy of uint8 NCHW `images`, preprocessed as the class map preprocesses them (`classify`)."""
    top = classify(classifier, images, batch_size).topk(max(ks), dim=1).indices
    return {k: int((top[:, :k] == labels[:, None]).any(1).sum()) / len(labels) for k in ks}


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _state_bytes(state: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def classifier_head_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of a timm model's classifier layer (e.g. fc.weight, fc.bias)."""
    head = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    return [k for k in model.state_dict() if k == head or k.startswith(head + ".")]


def pretrain(cfg: PretrainConfig, backbone: str, out: Path, tracker=None, progress: bool = True) -> dict:
    """Train, evaluate and write the pretrained backbone and classifier (see the module docstring)."""
    import timm

    torch.set_num_threads(cfg.threads)
    started = time.time()
    make = resolve(DATASETS[cfg.dataset])
    train_x, train_y, names = make("train", cfg.train_per_class, cfg.size, cfg.seed, cfg.workers)
    val_x, val_y, _ = make("val", cfg.val_per_class, cfg.size, cfg.seed, cfg.workers)
    rendered = time.time() - started
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        network = timm.create_model(backbone, pretrained=False, num_classes=len(names))
    model = SourceClassifier(network, names, input_size=cfg.size)  # the ImageNet normalisation, then the net
    train_accuracy = train_classifier(model, _nchw(train_x), torch.from_numpy(train_y), cfg.epochs, cfg.batch_size,
                                      cfg.lr, cfg.weight_decay, cfg.seed, progress)
    held_out = top_k_accuracy(model, _nchw(val_x), torch.from_numpy(val_y))
    state = network.state_dict()
    head = set(classifier_head_keys(network))
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "encoder.pth", _state_bytes({k: v for k, v in state.items() if k not in head}))
    save_classifier(out / "classifier.pth", state, model.mean.flatten().tolist(), model.std.flatten().tolist(),
                    cfg.size)
    write_json(out / "classes.json", names)
    metrics = {"top1": held_out[1], "top5": held_out[5], "train_top1": train_accuracy[-1],
               "classes": len(names), "train_images": len(train_y), "val_images": len(val_y),
               "render_seconds": round(rendered, 1), "seconds": round(time.time() - started, 1)}
    write_json(out / "metrics.json", metrics)
    if tracker is not None:
        tracker.log_pretraining({"backbone": backbone, **asdict(cfg)}, metrics, train_accuracy,
                                [out / "metrics.json", out / "classes.json"])
    return metrics
