"""A text-to-image diffusion model as a replay source: the old classes generated from their *names* (``diffusers``).

RECALL's successors replace BigGAN by a text-to-image diffusion model prompted with the class name (DiffusePast,
DR.WILSS, TIKP, SDReplay): no ImageNet class map, so none of its mapping errors. The pipeline is loaded from a local
directory in the diffusers layout (``model_index.json`` and one folder per component: ``unet``, ``vae``,
``text_encoder``, ``tokenizer``, ``scheduler``), e.g. a Stable Diffusion 1.5 or 2.1-base snapshot saved with
``save_pretrained`` or downloaded with ``hf download``; see ``DOWNLOAD_HINT``. Nothing is ever downloaded:
the hub is switched offline (``HF_HUB_OFFLINE``) and the pipeline loaded with ``local_files_only``.

Prompts: image ``k`` of a class uses template ``k % len(templates)`` with ``{name}`` replaced by the class's name
as a search would spell it (``recall.data.classes.web_query``: "potted plant", "dining table"); ``prompts`` overrides
the templates of a class (by its dataset name). Every image has its own seed, derived from (``seed``, class, index),
and its own ``torch.Generator``: image ``k`` is the same whatever the batch it is generated in (up to float rounding
across batch sizes), and batches are aligned to multiples of ``batch_size`` (image ``k`` always at position
``k % batch_size`` of the same batch), so a resumed build gives the same images. Each pool record carries its
prompt, negative prompt and seed.

``diffusers`` and ``transformers`` are the optional extra ``recall[diffusion]``; they are imported (several seconds)
only when a pipeline is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from recall.data.classes import web_query
from recall.errors import ReplayError

MODEL_INDEX = "model_index.json"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
KNOWN_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # or stabilityai/stable-diffusion-2-1-base
DOWNLOAD_HINT = (f"download a Stable Diffusion pipeline in the diffusers layout once on a machine with internet, e.g. "
                 f"`hf download {KNOWN_MODEL} --local-dir DIR` (or DiffusionPipeline.from_pretrained("
                 f"'{KNOWN_MODEL}').save_pretrained(DIR)), copy DIR here and pass replay.source.model_dir=DIR; "
                 f"it must hold {MODEL_INDEX} and the folders {', '.join(REQUIRED_COMPONENTS)}")
EXTRA_HINT = "install the optional extra: pip install 'recall[diffusion]' (diffusers, transformers)"
UNUSED_COMPONENTS = ("safety_checker",)  # not loaded (see load_pipeline): a snapshot may leave it out
DEFAULT_TEMPLATES = ("a photo of a {name}",)
DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: float16 on a GPU, float32 on the CPU
RESIZE_FILTER = Image.Resampling.LANCZOS
SEED_TAG = 0xD1FF  # a tag no other random stream of the project starts with


class PromptBook:
    """The prompt of every image: image ``k`` of a class uses template ``k % len(templates)`` with ``{name}`` its name
    spelled out (``web_query``), or the class's own prompts (``prompts``, by dataset name), ``k % len`` of them."""

    def __init__(self, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 prompts: Mapping[str, str | Sequence[str]] | None = None) -> None:
        self.templates = self._checked("replay.source.templates", templates, needs_name=True)
        if prompts is not None and not isinstance(prompts, Mapping):
            raise ReplayError(f"replay.source.prompts must map class names to prompts, got {prompts!r}")
        self.prompts = {str(k): self._checked(f"replay.source.prompts.{k}", v, needs_name=False)
                        for k, v in (prompts or {}).items()}

    @staticmethod
    def _checked(key: str, value, needs_name: bool) -> tuple[str, ...]:
        values = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Sequence) else None
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise ReplayError(f"{key} must be a non-empty prompt or list of prompts, got {value!r}")
        if needs_name and not all("{name}" in v for v in values):
            raise ReplayError(f"{key}: every template needs {{name}} (the class name), got {list(values)}")
        return values

    @property
    def params(self) -> dict:
        return {"templates": list(self.templates), "prompts": {k: list(v) for k, v in sorted(self.prompts.items())}}

    def prompt(self, class_name: str, index: int) -> str:
        """The prompt of image ``index`` of the class named ``class_name``."""
        own = self.prompts.get(class_name)
        if own is not None:
            return own[index % len(own)]
        return self.templates[index % len(self.templates)].replace("{name}", web_query(class_name))


def check_model_dir(model_dir: str | Path) -> dict:
    """The ``model_index.json`` of a diffusers pipeline directory, which must hold every component it lists (and at
    least ``REQUIRED_COMPONENTS``); a ReplayError naming what is missing otherwise."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise ReplayError(f"replay.source.model_dir={directory}: no such directory; {DOWNLOAD_HINT}")
    index_path = directory / MODEL_INDEX
    if not index_path.is_file():
        raise ReplayError(f"{index_path} is missing: {directory} is not a diffusers pipeline directory; "
                          f"{DOWNLOAD_HINT}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ReplayError(f"{index_path}: not valid JSON ({error}); {DOWNLOAD_HINT}") from None
    if not isinstance(index, dict):
        raise ReplayError(f"{index_path}: a JSON object expected; {DOWNLOAD_HINT}")
    listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None
              and k not in UNUSED_COMPONENTS]
    wanted = [*REQUIRED_COMPONENTS, *(k for k in listed if k not in REQUIRED_COMPONENTS)]
    missing = [k for k in wanted if not (directory / k).is_dir() or not any((directory / k).iterdir())]
    if missing:
        raise ReplayError(f"{directory}: component folder(s) {', '.join(missing)} missing or empty; {DOWNLOAD_HINT}")
    return index


def image_seed(seed: int, class_index: int, index: int) -> int:
    """The seed of image ``index`` of ``class_index`` (a 63-bit integer, recorded in the pool)."""
    state = np.random.SeedSequence([SEED_TAG, seed, class_index, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _configs_sha256(directory: Path) -> str:
    """A hash of the pipeline's model index and component configs: cheap, where hashing a snapshot's weights would
    read gigabytes; so replacing the weights alone, configs unchanged, is not seen (docs/replay.md)."""
    digest = hashlib.sha256()
    for path in sorted([directory / MODEL_INDEX, *directory.glob("*/*.json")]):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class DiffusionSource:
    """A local diffusers text-to-image pipeline as a replay source (see the module docstring).

    The directory is checked at construction; the pipeline is loaded on first use. ``batch_size`` and ``device``
    change speed only, so they are not part of ``params``; ``dtype`` is (half precision changes the images).
    """

    name = "diffusion"

    def __init__(self, model_dir: str, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 prompts: Mapping[str, str | Sequence[str]] | None = None, negative_prompt: str = "",
                 steps: int = 30, guidance: float = 7.5, resolution: int | None = None, size: int | None = None,
                 batch_size: int = 4, seed: int = 0, device: str = "cpu", dtype: str = "auto") -> None:
        self.book = PromptBook(templates, prompts)
        if not isinstance(negative_prompt, str):
            raise ReplayError(f"replay.source.negative_prompt must be a string, got {negative_prompt!r}")
        for key, value in (("steps", steps), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ReplayError(f"replay.source.{key} must be a positive integer, got {value!r}")
        for key, value in (("resolution", resolution), ("size", size)):
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                raise ReplayError(f"replay.source.{key} must be a multiple of 8 (pixels) or null, got {value!r}")
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or guidance < 0:
            raise ReplayError(f"replay.source.guidance must be a number >= 0 (1: no classifier-free guidance), "
                              f"got {guidance!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ReplayError(f"replay.source.seed must be a non-negative integer, got {seed!r}")
        if dtype not in DTYPES:
            raise ReplayError(f"replay.source.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if dtype in ("float16", "bfloat16") and not str(device).startswith("cuda"):
            raise ReplayError(f"replay.source.dtype={dtype} needs a GPU (replay.source.device=cuda); "
                              f"on device={device} use float32 (or auto)")
        self.model_dir = Path(model_dir)
        self.index = check_model_dir(self.model_dir)
        self.negative_prompt = negative_prompt
        self.steps, self.guidance = steps, float(guidance)
        self.resolution, self.size = resolution, size
        self.batch_size, self.seed, self.device = batch_size, seed, str(device)
        self.dtype = ("float16" if self.device.startswith("cuda") else "float32") if dtype == "auto" else dtype
        self._pipeline = None
        self._configs_sha256: str | None = None

    def __repr__(self) -> str:
        return (f"DiffusionSource(model_dir={str(self.model_dir)!r}, steps={self.steps}, guidance={self.guidance}, "
                f"batch_size={self.batch_size}, seed={self.seed}, device={self.device!r}, dtype={self.dtype!r})")

    @property
    def params(self) -> dict:
        if self._configs_sha256 is None:
            self._configs_sha256 = _configs_sha256(self.model_dir)
        return {"model_dir": str(self.model_dir), "configs_sha256": self._configs_sha256,
                **self.book.params,
                "negative_prompt": self.negative_prompt, "steps": self.steps, "guidance": self.guidance,
                "resolution": self.resolution, "size": self.size, "seed": self.seed, "dtype": self.dtype}

    # ---------------------------------------------------------------- the pipeline
    @property
    def pipeline(self):
        """The diffusers pipeline, loaded from ``model_dir`` on first use, offline."""
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.model_dir, self.index, self.device, self.dtype)
        return self._pipeline

    def generate(self, class_index: int, class_name: str, indices: range) -> list[tuple[Image.Image, dict]]:
        """Images ``indices`` of a class in one batch, each with its meta (prompt, seed)."""
        import torch

        seeds = [image_seed(self.seed, class_index, k) for k in indices]
        prompts = [self.book.prompt(class_name, k) for k in indices]
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        options = {"height": self.resolution, "width": self.resolution} if self.resolution else {}
        with torch.inference_mode():
            output = self.pipeline(prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts)
                                   if self.negative_prompt else None, num_inference_steps=self.steps,
                                   guidance_scale=self.guidance, generator=generators, output_type="np", **options)
        array = np.asarray(output.images)
        if not np.isfinite(array).all():
            raise ReplayError(f"{self.model_dir}: the pipeline's output holds NaN/inf (class {class_name}, images "
                              f"{indices.start}..{indices.stop - 1}); with float16, try dtype=bfloat16 or float32")
        images = [Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)) for a in array]
        return [(image, {"prompt": p, "negative_prompt": self.negative_prompt, "seed": s})
                for image, p, s in zip(images, prompts, seeds)]

    # ---------------------------------------------------------------- replay source
    def available(self, class_index: int, class_name: str) -> None:
        return None  # a generator never runs out

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        if count <= 0:
            return
        stop = start + count
        for block in range((start // self.batch_size) * self.batch_size, stop, self.batch_size):
            indices = range(block, block + self.batch_size)
            for index, (image, meta) in zip(indices, self.generate(class_index, class_name, indices)):
                if not start <= index < stop:
                    continue
                if self.size is not None and image.size != (self.size, self.size):
                    image = image.resize((self.size, self.size), RESIZE_FILTER)
                yield image, {"index": index, "source_class": web_query(class_name), "license": "generated",
                              "owner": None, **meta, "steps": self.steps, "guidance": self.guidance}


def load_pipeline(model_dir: Path, index: Mapping, device: str = "cpu", dtype: str = "float32"):
    """The diffusers pipeline of ``model_dir`` (checked by ``check_model_dir``), never touching the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the hub is imported: no download, no version check
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import torch
        from diffusers import DiffusionPipeline
    except ImportError as error:
        raise ReplayError(f"replay=diffusion needs diffusers and transformers ({error}); {EXTRA_HINT}") from None
    options = {"local_files_only": True, "torch_dtype": getattr(torch, dtype)}
    if "safety_checker" in index:  # Stable Diffusion's NSFW filter blackens images; replay images are never shown
        options.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(model_dir), **options)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as error:
        raise ReplayError(f"{model_dir}: diffusers could not load the pipeline ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); {DOWNLOAD_HINT}") from None
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
