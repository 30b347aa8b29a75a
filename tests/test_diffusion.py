"""replay=diffusion on a tiny randomly-initialised Stable Diffusion pipeline built here from configs (as diffusers' own
tests do), saved in the diffusers layout: `recall pool` builds a pool of it, each record with its prompt and seed;
missing directories and components are clear errors; nothing imports diffusers until a pipeline is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from recall.cli import main
from recall.errors import ReplayError
from recall.replay.diffusion import DiffusionSource, check_model_dir, image_seed
from recall.replay.pool import ReplayPool
from recall.replay.sources import build_source

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "replay" / "diffusion.yaml"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _tiny_tokenizer(directory: Path):
    """A CLIP tokenizer of single letters (no merges): vocabulary files written here, nothing downloaded."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
                         model_max_length=16)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: this tiny model's steps take milliseconds, and a second thread spinning beside busy processes
    made each ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A Stable Diffusion pipeline with random weights: a 2-level UNet of 4 and 8 channels, a 2-level VAE (latents at
    half the image side, 16 -> 32 px), a one-layer CLIP text encoder of width 8."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("diffusion")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=2, attention_head_dim=2)
        vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            norm_num_groups=2)
        text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8,
                                                    intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                                                    vocab_size=128, max_position_embeddings=16, projection_dim=8))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                                       tokenizer=_tiny_tokenizer(root / "vocab"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(root / "pipe")
    return root / "pipe"


def _source(model_dir: Path, **options) -> DiffusionSource:
    return DiffusionSource(str(model_dir), **{"steps": 2, "batch_size": 2, "resolution": 32, **options})


def test_recall_pool_builds_a_pool_whose_records_carry_prompt_and_seed(tiny_pipeline: Path, tiny_world: Path,
                                                                       tmp_path: Path) -> None:
    common = [f"dataset.root={tiny_world}", "replay=diffusion", f"replay.source.model_dir={tiny_pipeline}",
              "replay.source.steps=2", "replay.source.resolution=32", "replay.source.size=32",
              "replay.source.batch_size=2", f"replay.pool={tmp_path}/pool",
              "+replay.source.prompts.pottedplant=[a plant in a pot]", "replay.source.negative_prompt=blurry"]
    assert main(["pool", *common, "replay.per_class=1"]) == 0
    assert main(["pool", *common, "replay.per_class=2"]) == 0  # grown in place, resumably
    pool = ReplayPool(tmp_path / "pool")
    records, problems = pool.load()
    summary = pool.summary()
    assert problems == [] and summary["params"]["source"] == "diffusion" and summary["total"] == 40
    assert set(summary["counts"].values()) == {2}
    for record in records:
        assert record["seed"] == image_seed(0, record["target_class"], record["source_index"])
        assert record["negative_prompt"] == "blurry" and record["license"] == "generated"
        assert (record["width"], record["height"]) == (32, 32)
    prompts = {(r["target_name"], r["source_index"]): r["prompt"] for r in records}
    assert prompts[("diningtable", 1)] == "a photo of a dining table" and prompts[("cow", 0)] == "a photo of a cow"
    assert prompts[("pottedplant", 0)] == "a plant in a pot"
    assert len({r["seed"] for r in records}) == len(records)


def test_image_k_is_the_same_in_any_batch_and_from_any_start(tiny_pipeline: Path) -> None:
    one = [np.asarray(image, dtype=int) for image, _ in _source(tiny_pipeline, batch_size=1).images(3, "bird", 1, 3)]
    three = list(_source(tiny_pipeline, batch_size=3).images(3, "bird", 2, 2))
    assert [meta["index"] for _, meta in three] == [2, 3]
    for a, (b, _) in zip(one[1:], three):
        assert np.abs(a - np.asarray(b, dtype=int)).max() <= 2  # float rounding across batch sizes
    again = [np.asarray(image, dtype=int) for image, _ in _source(tiny_pipeline, batch_size=1).images(3, "bird", 1, 3)]
    assert all((a == b).all() for a, b in zip(one, again))
    other = next(_source(tiny_pipeline, batch_size=1, seed=1).images(3, "bird", 1, 1))[0]
    assert (np.asarray(other, dtype=int) != one[0]).any()


def test_missing_directory_or_component_names_what_to_download(tiny_pipeline: Path, tmp_path: Path,
                                                               capsys) -> None:
    with pytest.raises(ReplayError, match=r"no such directory.*hf download stable-diffusion"):
        check_model_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="model_index.json is missing"):
        check_model_dir(tmp_path / "empty")
    for component in ("unet", "tokenizer", "scheduler"):
        broken = tmp_path / f"no_{component}"
        shutil.copytree(tiny_pipeline, broken)
        shutil.rmtree(broken / component)
        with pytest.raises(ReplayError, match=rf"component folder\(s\) {component} missing.*model_dir=DIR"):
            check_model_dir(broken)
    index = json.loads((tiny_pipeline / "model_index.json").read_text())
    shutil.copytree(tiny_pipeline, tmp_path / "listed")
    (tmp_path / "listed" / "model_index.json").write_text(json.dumps(
        {**index, "image_encoder": ["transformers", "CLIPVisionModel"], "safety_checker": ["x", "Checker"]}))
    with pytest.raises(ReplayError, match=r"component folder\(s\) image_encoder missing"):  # any listed component
        check_model_dir(tmp_path / "listed")  # but the safety checker, which is never loaded
    assert main(["pool", "replay=diffusion", f"replay.source.model_dir={tmp_path}/no_unet",
                 f"replay.pool={tmp_path}/pool"]) == 2
    assert "unet missing" in capsys.readouterr().err and not (tmp_path / "pool").exists()


def test_options_are_checked_before_anything_is_loaded(tiny_pipeline: Path) -> None:
    for options, message in [({"dtype": "float16"}, "needs a GPU"), ({"dtype": "half"}, "dtype must be one of"),
                             ({"templates": ["a cow"]}, r"needs \{name\}"), ({"steps": 0}, "steps must be"),
                             ({"prompts": {"cow": ""}}, "prompts.cow"), ({"size": 30}, "multiple of 8"),
                             ({"guidance": -1}, "guidance")]:
        with pytest.raises(ReplayError, match=message):
            _source(tiny_pipeline, **options)
    with pytest.raises(ReplayError, match="bad options"):
        build_source("diffusion", model_dir=str(tiny_pipeline), prompt="a cow")
    source = _source(tiny_pipeline, templates=["a photo of a {name}", "a {name} outdoors"])
    assert [source.book.prompt("pottedplant", k) for k in range(3)] == ["a photo of a potted plant",
                                                                   "a potted plant outdoors",
                                                                   "a photo of a potted plant"]
    assert source._pipeline is None and source.params["configs_sha256"]  # nothing loaded yet


def test_the_config_file_names_every_option_and_the_extra_is_imported_lazily() -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg.name == "diffusion" and cfg.mapping is None
    with pytest.raises(ReplayError, match="models/diffusion: no such directory"):
        build_source(cfg.name, **OmegaConf.to_container(cfg.source, resolve=True))
    code = ("import sys, recall.replay.diffusion, recall.stages.pool, recall.cli; "
            "assert not {'diffusers', 'transformers'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)
