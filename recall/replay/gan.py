"""BigGAN-deep as a replay source: RECALL's class-conditional generator (``pytorch_pretrained_biggan``).

The weights directory holds ``config.json`` and ``pytorch_model.bin`` as released for
``biggan-deep-512`` (download both once; see ``DOWNLOAD_HINT``). ``load_biggan`` checks them
strictly — the library's own ``from_pretrained`` ignores missing and unexpected keys.

``make_tiny_biggan`` writes a tiny random-weight BigGAN in the same format, for tests and the
demo pipeline. A fresh random BigGAN is unusable in eval mode: its spectral-norm vectors are not
converged (weights blow up to inf/NaN) and its batch-norm statistics (one row per truncation
value, ``n_stats`` rows) are zeros/ones. ``make_tiny_biggan`` therefore runs train-mode forwards
(power iterations) and then records each batch norm's statistics per truncation row, as BigGAN's
"standing statistics" do.

Sampling is deterministic per (seed, target class, ImageNet class, sample index): each z is drawn
from its own random stream (keyed on the target class too, so two target classes mapped to one
ImageNet class get different samples rather than the same images twice), and samples are generated in blocks aligned to multiples of ``batch_size``
(sample k always sits at position k % batch_size of the same block), so a resumed build gives
bit-identical images; another ``batch_size`` gives the same images up to float rounding (<= 1 LSB).
"""

from __future__ import annotations

import json
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
from PIL import Image

from recall.atomic import write_bytes
from recall.replay.classmap import checked_mapping
from recall.replay.pool import ReplayError
from recall.replay.weights import IMAGENET_NUM_CLASSES, file_sha256, imagenet_names, load_strictly, read_state_dict

if TYPE_CHECKING:  # the library imports boto3 and scipy (~1 s): loaded only when a BigGAN is used
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
RELEASED_MODEL = "biggan-deep-512"
DOWNLOAD_HINT = (f"download {RELEASED_MODEL} once on a machine with internet: "
                 f"https://s3.amazonaws.com/models.huggingface.co/biggan/{RELEASED_MODEL}-config.json -> "
                 f"{CONFIG_NAME} and https://s3.amazonaws.com/models.huggingface.co/biggan/"
                 f"{RELEASED_MODEL}-pytorch_model.bin -> {WEIGHTS_NAME}, both in this directory "
                 f"(or make a stand-in with recall.replay.gan.make_tiny_biggan)")
# Keys a BigGAN config.json must hold (BigGANConfig.from_dict silently fills absent ones with the 128px defaults).
CONFIG_KEYS = ("z_dim", "channel_width", "num_classes", "layers", "attention_layer_position", "eps", "n_stats")
# BigGAN's noise is a standard normal truncated to [-TRUNCATION_BOUND, TRUNCATION_BOUND], times the truncation.
TRUNCATION_BOUND = 2.0
MAX_RESAMPLE_ROUNDS = 100
RESIZE_FILTER = Image.Resampling.LANCZOS

# Tiny stand-in: 8 channels per width unit, 32-d noise and class embedding, 1000 classes (as ImageNet).
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


# ------------------------------------------------------------------------------ loading

def _library():
    import pytorch_pretrained_biggan

    return pytorch_pretrained_biggan


def read_config(path: str | Path) -> BigGANConfig:
    """A ``BigGANConfig`` from ``config.json``, requiring every key in ``CONFIG_KEYS``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ReplayError(f"{path}: not a valid JSON BigGAN config ({error}); {DOWNLOAD_HINT}") from error
    if not isinstance(raw, dict):
        raise ReplayError(f"{path}: a BigGAN config is a JSON object, got {type(raw).__name__}; {DOWNLOAD_HINT}")
    missing = [k for k in CONFIG_KEYS if k not in raw]
    if missing:
        raise ReplayError(f"{path}: not a BigGAN config (missing keys {missing}); {DOWNLOAD_HINT}")
    layers = raw["layers"]
    if not (isinstance(layers, list) and layers and all(isinstance(layer, list) and len(layer) == 3 for layer in layers)):
        raise ReplayError(f"{path}: 'layers' must be a list of [up_sample, in_mult, out_mult], got {layers!r}")
    for key in ("z_dim", "channel_width", "num_classes", "n_stats"):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
            raise ReplayError(f"{path}: {key!r} must be a positive integer, got {raw[key]!r}")
    return _library().BigGANConfig.from_dict(raw)


def build_biggan(config: BigGANConfig, path: str | Path = "<config>") -> BigGAN:
    """A BigGAN of ``config`` with random weights, built without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        try:
            return _library().BigGAN(config)
        except (TypeError, ValueError, IndexError, RuntimeError, AssertionError) as error:
            raise ReplayError(f"{path}: the config does not describe a buildable BigGAN ({error})") from error


def check_weights_dir(weights_dir: str | Path) -> tuple[Path, Path]:
    """``(config.json, pytorch_model.bin)`` of a weights directory, which must hold both."""
    directory = Path(weights_dir)
    if not directory.is_dir():
        raise ReplayError(f"{directory}: BigGAN weights directory is missing (or not a directory); {DOWNLOAD_HINT}")
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config, weights):
        if not path.is_file():
            raise ReplayError(f"{path}: file is missing from the BigGAN weights directory; {DOWNLOAD_HINT}")
    return config, weights


def load_biggan(weights_dir: str | Path, device: str = "cpu") -> BigGAN:
    """The BigGAN of ``weights_dir`` (``config.json`` + ``pytorch_model.bin``), strictly loaded, in eval mode."""
    config_path, weights_path = check_weights_dir(weights_dir)
    model = build_biggan(read_config(config_path), config_path)
    state = read_state_dict(weights_path, DOWNLOAD_HINT)
    load_strictly(model, state, weights_path)
    check_statistics(model, weights_path)
    return model.eval().to(device)


def check_statistics(model: BigGAN, path: str | Path) -> None:
    """Refuse a BigGAN whose batch-norm statistics were never set (all means 0, all variances 1).

    The library's batch norms always use their stored statistics; a model saved straight after
    construction keeps the initial values and produces saturated or NaN images.
    """
    norms = [m for m in model.modules() if isinstance(m, _library().model.BigGANBatchNorm)]
    if norms and all(bool((m.running_means == 0).all() and (m.running_vars == 1).all()) for m in norms):
        raise ReplayError(f"{path}: every batch-norm statistic is at its initial value (means 0, variances 1): "
                          f"the weights look untrained (batch-norm statistics not warmed up); use the released "
                          f"weights, or make_tiny_biggan (which warms them up) for a stand-in")


# ------------------------------------------------------------------------------ tiny stand-in

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


# ------------------------------------------------------------------------------ sampling

def truncated_noise(dim: int, truncation: float, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """``n`` BigGAN noise vectors (float32, n x dim): a standard normal truncated to +-2, times ``truncation``.

    Values outside the bound are redrawn (the library's ``truncated_noise_sample`` uses scipy's
    ``truncnorm`` for the same distribution).
    """
    z = rng.standard_normal((n, dim))
    for _ in range(MAX_RESAMPLE_ROUNDS):
        outside = np.abs(z) > TRUNCATION_BOUND
        if not outside.any():
            break
        z[outside] = rng.standard_normal(int(outside.sum()))
    return (np.clip(z, -TRUNCATION_BOUND, TRUNCATION_BOUND) * truncation).astype(np.float32)


def to_images(output: torch.Tensor) -> list[Image.Image]:
    """RGB images from a BigGAN output in [-1, 1] (N, 3, H, W), as the library's ``convert_to_images``."""
    array = output.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    array = np.clip((array + 1) / 2.0 * 256, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


class BigGANSource:
    """A pretrained BigGAN(-deep) as a replay source (see the module docstring).

    ``mapping`` (target class -> ImageNet class index, from ``classmap.map_classes`` with
    ``classmap.imagenet_classifier``, or a hand-written file such as
    ``conf/replay/voc_imagenet_mapping.json``) says which ImageNet class replays which target class.
    The directory and config are checked at construction; the model is loaded on first use.
    ``batch_size`` and ``device`` change speed only, so they are not part of ``params``.
    """

    name = "gan"

    def __init__(self, weights: str, truncation: float = 1.0, batch_size: int = 8, size: int | None = None,
                 seed: int = 0, device: str = "cpu", mapping: Mapping[int | str, int] | None = None) -> None:
        if not 0 < float(truncation) <= 1:
            raise ReplayError(f"truncation must be in (0, 1] (BigGAN samples at 1.0 in RECALL), got {truncation}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ReplayError(f"batch_size must be a positive integer, got {batch_size!r}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ReplayError(f"size must be a positive integer (pixels) or None, got {size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ReplayError(f"seed must be a non-negative integer, got {seed!r}")
        self.weights = Path(weights)
        config_path, self.weights_file = check_weights_dir(self.weights)
        self.config = read_config(config_path)
        self.truncation = float(truncation)
        self.batch_size = batch_size
        self.size = size
        self.seed = seed
        self.device = device
        self.num_classes = int(self.config.num_classes)
        self.source_names = imagenet_names(self.num_classes)
        self.mapping: dict[int, int] = {}
        self._model: BigGAN | None = None
        self._weights_sha256: str | None = None
        if mapping is not None:
            self.set_mapping(mapping)

    def __repr__(self) -> str:
        return (f"BigGANSource(weights={str(self.weights)!r}, truncation={self.truncation}, "
                f"batch_size={self.batch_size}, size={self.size}, seed={self.seed}, device={self.device!r})")

    @property
    def model(self) -> BigGAN:
        """The BigGAN, loaded (strictly) on first use."""
        if self._model is None:
            self._model = load_biggan(self.weights, self.device)
        return self._model

    @property
    def params(self) -> dict:
        if self._weights_sha256 is None:
            self._weights_sha256 = file_sha256(self.weights_file)
        return {"weights": str(self.weights), "weights_sha256": self._weights_sha256,
                "truncation": self.truncation, "seed": self.seed, "size": self.size,
                "mapping": {str(k): v for k, v in sorted(self.mapping.items())}}

    def set_mapping(self, mapping: Mapping[int | str, int]) -> None:
        """Set target class -> ImageNet class index (keys may be strings, e.g. from a config)."""
        self.mapping = checked_mapping(mapping, self.num_classes, what="ImageNet class")

    def available(self, class_index: int, class_name: str) -> None:
        return None  # a generator never runs out

    def latent(self, source_class: int, index: int, target_class: int = 0) -> np.ndarray:
        """The noise vector of sample ``index`` of ``source_class`` for ``target_class``: its own random stream,
        so any order gives it."""
        rng = np.random.default_rng([self.seed, target_class, source_class, index])
        return truncated_noise(self.config.z_dim, self.truncation, rng)[0]

    @torch.inference_mode()
    def generate(self, source_class: int, indices: range, target_class: int = 0) -> list[Image.Image]:
        """Samples ``indices`` of ``source_class`` (for ``target_class``) in one batch, at the model's resolution."""
        model = self.model
        z = torch.from_numpy(np.stack([self.latent(source_class, k, target_class) for k in indices])).to(self.device)
        classes = torch.zeros(len(indices), self.num_classes, device=self.device)
        classes[:, source_class] = 1.0
        output = model(z, classes, self.truncation)
        if not torch.isfinite(output).all():
            raise ReplayError(f"{self.weights}: BigGAN output holds NaN/inf (class {source_class}, samples "
                              f"{indices.start}..{indices.stop - 1}); the weights look untrained (batch-norm "
                              f"statistics not warmed up?); use the released weights or make_tiny_biggan")
        return to_images(output)

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        if class_index not in self.mapping:
            raise ReplayError(f"BigGANSource has no ImageNet class for target class {class_index} ({class_name}); "
                              f"set a mapping (recall.replay.classmap.map_classes / load_mapping, or "
                              f"conf/replay/voc_imagenet_mapping.json) covering it")
        source_class = self.mapping[class_index]
        if count <= 0:
            return
        stop = start + count
        first_block = (start // self.batch_size) * self.batch_size
        for block in range(first_block, stop, self.batch_size):
            indices = range(block, block + self.batch_size)
            for index, image in zip(indices, self.generate(source_class, indices, class_index)):
                if not start <= index < stop:
                    continue
                if self.size is not None and image.size != (self.size, self.size):
                    image = image.resize((self.size, self.size), RESIZE_FILTER)
                yield image, {"index": index, "source_class": self.source_names[source_class],
                              "source_class_index": source_class, "license": "generated", "owner": None,
                              "truncation": self.truncation, "seed": self.seed}
