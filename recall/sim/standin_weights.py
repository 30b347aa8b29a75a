"""Stand-ins for downloaded weights: a tiny random BigGAN-deep and a random timm ImageNet classifier.

The demo has no internet, so the `standin_weights` stage writes these in the formats the real files come in, and
the product loads them through its real code paths (``recall.replay.gan.load_biggan``,
``recall.replay.classifier.imagenet_classifier``). Their outputs are noise: a plumbing check and a "replay noise"
control, never a model of anything.

``make_tiny_biggan`` writes a tiny random-weight BigGAN-deep. A fresh random BigGAN is unusable in eval mode: its
spectral-norm vectors are not converged (weights blow up to inf/NaN) and its batch-norm statistics (one row per
truncation value, ``n_stats`` rows) are zeros/ones. ``make_tiny_biggan`` therefore runs train-mode forwards (power
iterations) and then records each batch norm's statistics per truncation row, as BigGAN's "standing statistics" do.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from recall.atomic import write_bytes
from recall.replay.classifier import STANDIN_MODEL, _create_timm_model, save_classifier
from recall.replay.gan import CONFIG_NAME, WEIGHTS_NAME, _library, truncated_noise
from recall.errors import ReplayError
from recall.replay.weights import IMAGENET_NUM_CLASSES

if TYPE_CHECKING:
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

TINY_CHANNEL_WIDTH = 8
TINY_Z_DIM = 32
TINY_OUTPUT_DIM = 64
TINY_N_STATS = 51                   # as the released models: one statistics row per truncation 0, 0.02, ..., 1
TINY_EPS = 1e-4
SPECTRAL_WARMUP_STEPS = 30          # train-mode forwards: spectral-norm power iterations
WARMUP_BATCH = 2                    # power iterations do not depend on the batch
CALIBRATION_BATCH = 16              # samples per truncation row of the batch-norm statistics
CALIBRATION_ROW_STEP = 5            # measure every 5th row (truncation 0, 0.1, ..., 1); interpolate the others
BASE_CHANNELS = 16                  # BigGAN's Generator starts at 16 * channel_width channels at 4x4
BASE_RESOLUTION = 4


def tiny_layers(output_dim: int) -> list[list]:
    """BigGAN-deep block list from 4x4 to ``output_dim``: channel multiplier 16 halved down to 1.

    Each block is ``[up_sample, in_mult, out_mult]``; the library's blocks either keep the
    channels or halve them, and the final batch norm wants multiplier 1.
    """
    ups = round(math.log2(output_dim / BASE_RESOLUTION))
    if ups < 1 or BASE_RESOLUTION * 2 ** ups != output_dim:
        raise ReplayError(f"output_dim must be {BASE_RESOLUTION} times a power of two (8, 16, 32, 64, ...), "
                          f"got {output_dim}")
    halvings = round(math.log2(BASE_CHANNELS))
    blocks = max(ups, halvings)
    layers, mult = [], BASE_CHANNELS
    for i in range(blocks):
        out = mult // 2 if i >= blocks - halvings else mult
        layers.append([i >= blocks - ups, mult, out])
        mult = out
    return layers


def tiny_config(channel_width: int = TINY_CHANNEL_WIDTH, z_dim: int = TINY_Z_DIM,
                output_dim: int = TINY_OUTPUT_DIM) -> BigGANConfig:
    """A small BigGAN-deep config over the 1000 ImageNet classes (self-attention before the 4x-channel block)."""
    if channel_width < 2:
        raise ReplayError(f"channel_width must be >= 2 (self-attention needs 8 channels), got {channel_width}")
    layers = tiny_layers(output_dim)
    attention = next(i for i, layer in enumerate(layers) if layer[1] == 4)
    return _library().BigGANConfig(output_dim=output_dim, z_dim=z_dim, class_embed_dim=z_dim,
                                   channel_width=channel_width, num_classes=IMAGENET_NUM_CLASSES, layers=layers,
                                   attention_layer_position=attention, eps=TINY_EPS, n_stats=TINY_N_STATS)


def _random_inputs(model: BigGAN, n: int, truncation: float, rng: np.random.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    z = truncated_noise(model.config.z_dim, truncation, rng, n)
    classes = rng.integers(0, model.config.num_classes, n)
    return torch.from_numpy(z), torch.nn.functional.one_hot(torch.from_numpy(classes),
                                                            model.config.num_classes).float()


def _generate_raw(model: BigGAN, z: torch.Tensor, class_vector: torch.Tensor, truncation: float) -> torch.Tensor:
    """``BigGAN.forward`` without its ``0 < truncation`` assertion (truncation 0 is a statistics row too)."""
    condition = torch.cat((z, model.embeddings(class_vector)), dim=1)
    return model.generator(condition, truncation)


def _batch_norm_with_batch_statistics(module, row: int, x: torch.Tensor, truncation: float,
                                      condition_vector: torch.Tensor | None = None) -> torch.Tensor:
    """A BigGANBatchNorm forward normalising with ``x``'s own statistics, stored in statistics row ``row``."""
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    module.running_means[row] = mean
    module.running_vars[row] = var
    out = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + module.eps)
    if module.conditional:
        weight = 1 + module.scale(condition_vector).unsqueeze(-1).unsqueeze(-1)
        return out * weight + module.offset(condition_vector).unsqueeze(-1).unsqueeze(-1)
    return out * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)


@contextmanager
def _recording_statistics(model: BigGAN, row: int) -> Iterator[None]:
    """Within: every batch norm of ``model`` normalises with batch statistics and records them at ``row``."""
    norms = [m for m in model.modules() if isinstance(m, _library().model.BigGANBatchNorm)]
    for module in norms:
        module.forward = partial(_batch_norm_with_batch_statistics, module, row)
    try:
        yield
    finally:
        for module in norms:
            del module.forward


def _interpolate_rows(model: BigGAN, measured: list[int]) -> None:
    """Fill the statistics rows between ``measured`` rows (sorted, first and last included) linearly."""
    for module in model.modules():
        if not isinstance(module, _library().model.BigGANBatchNorm):
            continue
        for low, high in pairwise(measured):
            for row in range(low + 1, high):
                weight = (row - low) / (high - low)
                for stats in (module.running_means, module.running_vars):
                    stats[row] = (1 - weight) * stats[low] + weight * stats[high]


@torch.no_grad()
def warm_up(model: BigGAN, seed: int = 0, spectral_steps: int = SPECTRAL_WARMUP_STEPS,
            calibration_batch: int = CALIBRATION_BATCH, row_step: int = CALIBRATION_ROW_STEP) -> BigGAN:
    """Make a random BigGAN usable in eval mode: converge spectral norms, then record batch-norm statistics.

    1. ``spectral_steps`` train-mode forwards (each one spectral-norm power iteration; the library's
       batch norms never update their statistics themselves);
    2. in eval mode, for every ``row_step``-th truncation row t = i / (n_stats - 1) (and the last),
       one batch of ``calibration_batch`` samples at truncation t, every batch norm normalising with
       (and recording) its batch's statistics; rows in between are interpolated.
    Deterministic for a seed; returns the model in eval mode.
    """
    rng = np.random.default_rng([seed, 1])
    model.train()
    for _ in range(spectral_steps):
        _generate_raw(model, *_random_inputs(model, WARMUP_BATCH, 1.0, rng), 1.0)
    model.eval()
    rows = model.config.n_stats
    measured = sorted(set(range(0, rows, row_step)) | {rows - 1})
    for row in measured:
        truncation = row / max(rows - 1, 1)
        with _recording_statistics(model, row):
            _generate_raw(model, *_random_inputs(model, calibration_batch, truncation, rng), truncation)
    _interpolate_rows(model, measured)
    return model


def _write_dir_atomically(out_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into a temp directory next to ``out_dir``, then swap it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    for name, data in files.items():
        write_bytes(tmp / name, data)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def make_tiny_biggan(out_dir: str | Path, seed: int = 0, channel_width: int = TINY_CHANNEL_WIDTH,
                     z_dim: int = TINY_Z_DIM, output_dim: int = TINY_OUTPUT_DIM, warm: bool = True) -> Path:
    """Write a tiny random-weight BigGAN-deep (``config.json`` + ``pytorch_model.bin``) to ``out_dir``.

    Deterministic from ``seed`` (same bytes); written atomically (temp directory + rename). With the
    defaults: 64 px, ~0.3M parameters, ~1.3 MB. ``warm=False`` skips ``warm_up`` and leaves a fresh
    model, which typically outputs inf/NaN in eval mode (used to test that this is detected).
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    config = tiny_config(channel_width, z_dim, output_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _library().BigGAN(config)
    with torch.no_grad():  # the library leaves the final batch norm's affine parameters uninitialised
        model.generator.bn.weight.fill_(1.0)
        model.generator.bn.bias.zero_()
    if warm:
        warm_up(model, seed)
    _write_dir_atomically(out_dir, {CONFIG_NAME: config.to_json_string().encode(),
                                    WEIGHTS_NAME: _state_dict_bytes(model)})
    return out_dir


def make_standin_classifier(path: str | Path, model_name: str = STANDIN_MODEL, seed: int = 0) -> Path:
    """Write a random-weight 1000-class timm model as a classifier file (``classifier.save_classifier``: its state dict
    and the preprocessing of timm's config for it) to ``path``, atomically; returns it.

    The demo's stand-in for the EfficientNet-B2 ImageNet weights (``test_efficientnet``: 0.36M
    parameters). Deterministic from ``seed``; ``.safetensors`` paths are written in that format.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create_timm_model(model_name)
    config = model.pretrained_cfg
    return save_classifier(path, model.state_dict(), config["mean"], config["std"], config["input_size"][-1])


def standin_weights(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """The demo's stand-ins for downloaded weights: a tiny random BigGAN and a random timm ImageNet classifier."""
    out = Path(out)
    return {"biggan": make_tiny_biggan(out / "biggan", seed=seed),
            "classifier": make_standin_classifier(out / "imagenet_classifier.pth", seed=seed)}


# ------------------------------------------------------------------------------ `recall standin-weights OUT`
def add_arguments(parser) -> None:
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    for name, path in standin_weights(args.out, seed=args.seed).items():
        print(f"stand-in {name}: {path}")
    return 0


if __name__ == "__main__":
    import sys

    from recall.commands import script

    sys.exit(script(__name__))
