"""Local weight files for the replay models (BigGAN, the ImageNet classifier): read, check, hash.

No downloads happen here: each loader names the file it wanted and how to obtain it. State dicts
are loaded strictly — a renamed, missing or extra key, or a shape mismatch, is an error that lists
the keys, because a model with silently skipped weights still runs and produces garbage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from recall.errors import ReplayError

IMAGENET_NUM_CLASSES = 1000
# A checkpoint may wrap the state dict (e.g. {"state_dict": ..., "epoch": ...}); tried in this order.
STATE_DICT_WRAPPERS = ("state_dict", "model")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_LISTED_KEYS = 5
HASH_CHUNK_BYTES = 1 << 20


@lru_cache(maxsize=1)
def _imagenet_descriptions() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_descriptions())


def imagenet_names(num_classes: int = IMAGENET_NUM_CLASSES) -> list[str]:
    """The ImageNet-1k class descriptions by index (404 -> "airliner"); ``str(i)`` for another class count."""
    if num_classes == IMAGENET_NUM_CLASSES:
        return list(_imagenet_descriptions())
    return [str(i) for i in range(num_classes)]


def file_sha256(path: str | Path) -> str:
    """sha256 of a (possibly large) file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def read_checkpoint(path: str | Path, how_to_obtain: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a ``.pth``/``.bin``/``.pt`` (``torch.load``, weights only) or ``.safetensors`` file, and what
    the file holds beside them: the other entries of a checkpoint that wraps its state dict under one of
    ``STATE_DICT_WRAPPERS`` (unwrapped), or a safetensors file's metadata (strings). ``how_to_obtain`` ends the
    error for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"{path}: weights file is missing; {how_to_obtain}")
    extras: dict = {}
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                extras = dict(handle.metadata() or {})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load / safetensors raise many types for a bad or truncated file
        raise ReplayError(f"{path}: cannot load the weights ({type(error).__name__}: {error}); "
                          f"the file is damaged or not a weights file; {how_to_obtain}") from error
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            extras = {k: v for k, v in state.items() if k != wrapper}
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReplayError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}; "
                          f"{how_to_obtain}")
    return state, extras  # state keeps torch's _metadata (spectral-norm versions) when it is an OrderedDict


def read_state_dict(path: str | Path, how_to_obtain: str) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (``read_checkpoint`` without what the file holds beside it)."""
    return read_checkpoint(path, how_to_obtain)[0]


def load_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Load ``state`` into ``model``; any shape mismatch, missing or unexpected key is a ReplayError.

    Uses ``load_state_dict`` (so modules' own key conversions still apply) and checks its result,
    instead of trusting a non-strict load as ``BigGAN.from_pretrained`` does.
    """
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} (model wants {tuple(own[k].shape)})" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ReplayError(f"{path}: {len(mismatched)} tensors have the wrong shape for this model: "
                          f"{_listed(mismatched)}; the weights belong to another architecture or config")
    bad = [f"{k} (NaN/inf)" for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ReplayError(f"{path}: {len(bad)} tensors hold NaN/inf values: {_listed(bad)}; the file is damaged")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ReplayError(f"{path}: cannot load the weights into the model ({error})") from error
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys: {_listed(sorted(result.missing_keys))}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys: {_listed(sorted(result.unexpected_keys))}")
    if problems:
        raise ReplayError(f"{path}: the weights do not match the model ({'; '.join(problems)}); "
                          f"the file belongs to another model or config, or was saved from a modified model")
