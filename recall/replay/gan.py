"""BigGAN-deep as a replay source: RECALL's class-conditional generator (``pytorch_pretrained_biggan``).

The weights directory holds ``config.json`` and ``pytorch_model.bin`` as released for
``biggan-deep-512`` (download both once; see ``DOWNLOAD_HINT``). ``load_biggan`` checks them
strictly — the library's own ``from_pretrained`` ignores missing and unexpected keys.

The demo's stand-in weights (a tiny random BigGAN in the same format) are made by
``recall.sim.standin_weights.make_tiny_biggan``.

Sampling is deterministic per (seed, target class, ImageNet class, sample index): each z is drawn
from its own random stream (keyed on the target class too, so two target classes mapped to one
ImageNet class get different samples rather than the same images twice), and samples are generated in blocks aligned to multiples of ``batch_size``
(sample k always sits at position k % batch_size of the same block), so a resumed build gives
bit-identical images; another ``batch_size`` gives the same images up to float rounding (<= 1 LSB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from recall.replay.classmap import checked_mapping
from recall.errors import ReplayError
from recall.replay.weights import file_sha256, imagenet_names, load_strictly, read_state_dict

if TYPE_CHECKING:  # the library imports boto3 and scipy (~1 s): loaded only when a BigGAN is used
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
RELEASED_MODEL = "biggan-deep-512"
DOWNLOAD_HINT = (f"download {RELEASED_MODEL} once on a machine with internet: "
                 f"https://s3.amazonaws.com/models.huggingface.co/biggan/{RELEASED_MODEL}-config.json -> "
                 f"{CONFIG_NAME} and https://s3.amazonaws.com/models.huggingface.co/biggan/"
                 f"{RELEASED_MODEL}-pytorch_model.bin -> {WEIGHTS_NAME}, both in this directory "
                 f"(or make a stand-in with `recall standin-weights`)")
# Keys a BigGAN config.json must hold (BigGANConfig.from_dict silently fills absent ones with the 128px defaults).
CONFIG_KEYS = ("z_dim", "channel_width", "num_classes", "layers", "attention_layer_position", "eps", "n_stats")
# BigGAN's noise is a standard normal truncated to [-TRUNCATION_BOUND, TRUNCATION_BOUND], times the truncation.
TRUNCATION_BOUND = 2.0
MAX_RESAMPLE_ROUNDS = 100
RESIZE_FILTER = Image.Resampling.LANCZOS

# Tiny stand-in: 8 channels per width unit, 32-d noise and class embedding, 1000 classes (as ImageNet).


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
                          f"weights, or `recall standin-weights` (which warms them up) for a stand-in")


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
    ``classifier.imagenet_classifier``, or a hand-written file such as
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
                              f"statistics not warmed up?); use the released weights or `recall standin-weights`")
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
