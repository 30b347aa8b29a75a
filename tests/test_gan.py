"""BigGAN replay source (tiny random BigGAN), strict weight loading, the ImageNet classifier, the VOC mapping."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recall.data.classes import VOC_CLASSES
from recall.replay.classifier import imagenet_classifier
from recall.replay.classmap import (
    load_mapping,
    map_classes,
    save_mapping,
)
from recall.replay.gan import CONFIG_NAME, WEIGHTS_NAME, BigGANSource, load_biggan
from recall.replay.pool import ReplayPool, build_pool
from recall.errors import ReplayError
from recall.replay.weights import imagenet_names
from recall.sim.standin_weights import (
    make_standin_classifier,
    make_tiny_biggan,
    tiny_layers,
)

MAPPING_FILE = Path(__file__).resolve().parents[1] / "conf" / "replay" / "voc_imagenet_mapping.json"
POOL_CLASSES = {1: "aeroplane", 2: "bicycle"}
POOL_MAPPING = {1: 404, 2: 671}
# first name of each chosen ImageNet class (ImageNet-1k has no person class: "groom" stands in)
EXPECTED_IMAGENET = {
    "aeroplane": "airliner", "bicycle": "mountain bike", "bird": "robin", "boat": "speedboat",
    "bottle": "beer bottle", "bus": "school bus", "car": "beach wagon", "cat": "tabby", "chair": "folding chair",
    "cow": "ox", "diningtable": "dining table", "dog": "golden retriever", "horse": "sorrel",
    "motorbike": "motor scooter", "person": "groom", "pottedplant": "pot", "sheep": "ram", "sofa": "studio couch",
    "train": "electric locomotive", "tvmonitor": "monitor"}


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory) -> Path:
    return make_tiny_biggan(tmp_path_factory.mktemp("gan") / "biggan", seed=0)


@pytest.fixture(scope="module")
def other_gan(tmp_path_factory) -> Path:
    return make_tiny_biggan(tmp_path_factory.mktemp("gan") / "biggan", seed=1)


def _digest(weights_dir: Path) -> str:
    return hashlib.sha256((weights_dir / WEIGHTS_NAME).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return make_standin_classifier(tmp_path_factory.mktemp("classifier") / "efficientnet.pth")


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image, _ in images])


def _copy_with_state(src: Path, dst: Path, edit) -> Path:
    """A copy of the weights dir ``src`` whose state dict went through ``edit(state) -> state``."""
    shutil.copytree(src, dst)
    state = torch.load(dst / WEIGHTS_NAME, weights_only=True)
    torch.save(edit(state), dst / WEIGHTS_NAME)
    return dst


# ------------------------------------------------------------------------------ tiny BigGAN

def test_tiny_biggan_is_small_and_makes_finite_images(tiny_gan: Path) -> None:
    assert (tiny_gan / WEIGHTS_NAME).stat().st_size < 5_000_000
    model = load_biggan(tiny_gan)
    assert not model.training and model.config.num_classes == 1000
    source = BigGANSource(str(tiny_gan), mapping={1: 404})
    images = list(source.images(1, "aeroplane", 0, 3))
    assert [meta["index"] for _, meta in images] == [0, 1, 2]
    image, meta = images[0]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert meta == {"index": 0, "source_class": "airliner", "source_class_index": 404, "license": "generated",
                    "owner": None, "truncation": 1.0, "seed": 0}
    pixels = _pixels(images)
    assert pixels.std() > 10 and len({p.tobytes() for p in pixels}) == 3  # varied, not saturated, not repeated
    resized = next(BigGANSource(str(tiny_gan), size=40, mapping={1: 404}).images(1, "aeroplane", 0, 1))[0]
    assert resized.size == (40, 40)


def test_tiny_layers_reach_the_output_size() -> None:
    assert tiny_layers(64) == [[True, 16, 8], [True, 8, 4], [True, 4, 2], [True, 2, 1]]
    assert sum(up for up, _, _ in tiny_layers(32)) == 3 and tiny_layers(32)[-1][2] == 1
    with pytest.raises(ReplayError, match="power of two"):
        tiny_layers(48)


def test_tiny_biggan_is_deterministic_and_replaced_atomically(tiny_gan: Path, other_gan: Path,
                                                              tmp_path: Path) -> None:
    out = make_tiny_biggan(tmp_path / "g", seed=0)
    assert _digest(out) == _digest(tiny_gan) != _digest(other_gan)
    (out / "stale.txt").write_text("old")
    make_tiny_biggan(out, seed=1)
    assert _digest(out) == _digest(other_gan)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp directory left


# ------------------------------------------------------------------------------ strict loading

def _rename(state):
    state["generator.gen_z.b"] = state.pop("generator.gen_z.bias")
    return state


def _remove(state):
    del state["generator.layers.0.conv_1.weight_orig"]
    return state


def _extra(state):
    state["generator.extra.weight"] = torch.zeros(3)
    return state


def _reshape(state):
    state["embeddings.weight"] = torch.zeros(16, 1000)
    return state


@pytest.mark.parametrize("edit, message", [
    (_rename, r"missing keys: generator\.gen_z\.bias.*unexpected keys: generator\.gen_z\.b\b"),
    (_remove, r"1 missing keys: generator\.layers\.0\.conv_1\.weight_orig"),
    (_extra, r"1 unexpected keys: generator\.extra\.weight"),
    (_reshape, r"wrong shape.*embeddings\.weight \(16, 1000\) \(model wants \(32, 1000\)\)"),
])
def test_load_biggan_rejects_mismatched_state_dicts(tiny_gan: Path, tmp_path: Path, edit, message: str) -> None:
    broken = _copy_with_state(tiny_gan, tmp_path / "broken", edit)
    with pytest.raises(ReplayError, match=message) as error:
        load_biggan(broken)
    assert str(broken / WEIGHTS_NAME) in str(error.value)


def test_load_biggan_names_missing_and_bad_files(tiny_gan: Path, tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"nowhere: BigGAN weights directory is missing.*biggan-deep-512"):
        load_biggan(tmp_path / "nowhere")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        partial = tmp_path / f"without_{name}"
        shutil.copytree(tiny_gan, partial)
        (partial / name).unlink()
        with pytest.raises(ReplayError, match=rf"{name}: file is missing.*download"):
            BigGANSource(str(partial))

    bad = tmp_path / "bad"
    shutil.copytree(tiny_gan, bad)
    (bad / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ReplayError, match=r"config\.json: not a valid JSON BigGAN config"):
        load_biggan(bad)
    (bad / CONFIG_NAME).write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(ReplayError, match=r"not a BigGAN config \(missing keys \['z_dim'"):
        load_biggan(bad)
    config = json.loads((tiny_gan / CONFIG_NAME).read_text())
    (bad / CONFIG_NAME).write_text(json.dumps({**config, "channel_width": 4}))
    with pytest.raises(ReplayError, match="wrong shape"):
        load_biggan(bad)
    (bad / CONFIG_NAME).write_text(json.dumps(config))
    (bad / WEIGHTS_NAME).write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(ReplayError, match=r"pytorch_model\.bin: cannot load the weights"):
        load_biggan(bad)


def test_untrained_biggan_is_refused(tiny_gan: Path, tmp_path: Path) -> None:
    cold = make_tiny_biggan(tmp_path / "cold", seed=1, warm=False)
    source = BigGANSource(str(cold), mapping={1: 404})
    with pytest.raises(ReplayError, match="untrained.*not warmed up"):
        next(source.images(1, "aeroplane", 0, 1))

    source = BigGANSource(str(tiny_gan), mapping={1: 404})
    with torch.no_grad():
        source.model.generator.conv_to_rgb.bias.fill_(float("nan"))  # stands in for exploding activations
    with pytest.raises(ReplayError, match=r"NaN/inf \(class 404, samples 0\.\.7\).*not warmed up"):
        next(source.images(1, "aeroplane", 0, 1))


# ------------------------------------------------------------------------------ sampling

def test_image_k_does_not_depend_on_batch_size_or_start(tiny_gan: Path) -> None:
    def pixels(batch_size: int, start: int, count: int) -> np.ndarray:
        source = BigGANSource(str(tiny_gan), batch_size=batch_size, seed=3, mapping={5: 7})
        return _pixels(source.images(5, "car", start, count))

    reference = pixels(4, 0, 10)
    assert np.array_equal(pixels(4, 3, 5), reference[3:8])  # resumed in mid-batch: bit-identical
    assert np.array_equal(pixels(4, 9, 1), reference[9:])
    for batch_size in (1, 3, 16):  # another batch composition: float rounding only
        assert np.abs(pixels(batch_size, 0, 10) - reference).max() <= 1
    assert not np.array_equal(_pixels(BigGANSource(str(tiny_gan), seed=4, mapping={5: 7}).images(5, "car", 0, 2)),
                              reference[:2])


def test_options_and_mapping_are_validated(tiny_gan: Path) -> None:
    for truncation in (0.0, -0.5, 1.5):
        with pytest.raises(ReplayError, match=r"truncation must be in \(0, 1\]"):
            BigGANSource(str(tiny_gan), truncation=truncation)
    with pytest.raises(ReplayError, match="batch_size"):
        BigGANSource(str(tiny_gan), batch_size=0)
    with pytest.raises(ReplayError, match="out of range 0..999"):
        BigGANSource(str(tiny_gan), mapping={1: 1000})
    source = BigGANSource(str(tiny_gan), truncation=0.4, mapping={"1": "404"})
    assert source.mapping == {1: 404} and source.available(1, "aeroplane") is None
    assert len(source.source_names) == 1000 and source.source_names[671].startswith("mountain bike")
    with pytest.raises(ReplayError, match=r"no ImageNet class for target class 2 \(bicycle\).*mapping"):
        next(source.images(2, "bicycle", 0, 1))
    image, meta = next(source.images(1, "aeroplane", 0, 1))
    assert meta["truncation"] == 0.4 and np.isfinite(np.asarray(image)).all()


def test_params_follow_the_weights(tiny_gan: Path, other_gan: Path) -> None:
    params = BigGANSource(str(tiny_gan), mapping=POOL_MAPPING).params
    assert params["weights_sha256"] == _digest(tiny_gan)
    assert params["mapping"] == {"1": 404, "2": 671} and params["truncation"] == 1.0
    assert BigGANSource(str(tiny_gan), batch_size=2, mapping=POOL_MAPPING).params == params  # speed only
    assert BigGANSource(str(other_gan), mapping=POOL_MAPPING).params["weights_sha256"] != params["weights_sha256"]


class _Interrupted(Exception):
    pass


class _InterruptAfter:
    """Delegates to a source, raising after ``limit`` images (a killed build)."""

    def __init__(self, source: BigGANSource, limit: int) -> None:
        self.source, self.limit, self.name = source, limit, source.name

    @property
    def params(self) -> dict:
        return self.source.params

    def available(self, class_index: int, class_name: str) -> None:
        return None

    def images(self, class_index: int, class_name: str, start: int, count: int
               ) -> Iterator[tuple[Image.Image, dict]]:
        for item in self.source.images(class_index, class_name, start, count):
            if self.limit == 0:
                raise _Interrupted
            self.limit -= 1
            yield item


def _pool_content(root: Path) -> list[tuple]:
    records, problems = ReplayPool(root).load()
    assert problems == []
    return sorted((r["id"], r["target_class"], r["source_index"], r["source_class"], r["sha256"],
                   r["pixel_sha256"]) for r in records)


def test_interrupted_pool_build_resumes_to_the_same_pool(tiny_gan: Path, tmp_path: Path) -> None:
    source = BigGANSource(str(tiny_gan), batch_size=4, mapping=POOL_MAPPING)
    full = build_pool(source, POOL_CLASSES, 5, tmp_path / "full", progress=False)

    with pytest.raises(_Interrupted):
        build_pool(_InterruptAfter(source, 3), POOL_CLASSES, 5, tmp_path / "resumed", progress=False)
    assert len(ReplayPool(tmp_path / "resumed").records()) == 3
    resumed = build_pool(BigGANSource(str(tiny_gan), batch_size=4, mapping=POOL_MAPPING), POOL_CLASSES, 5,
                         tmp_path / "resumed", progress=False)

    assert resumed == full and full["counts"] == {"aeroplane": 5, "bicycle": 5}
    assert _pool_content(tmp_path / "resumed") == _pool_content(tmp_path / "full")
    assert {r[3] for r in _pool_content(tmp_path / "full")} == {"airliner", imagenet_names()[671]}


# ------------------------------------------------------------------------------ ImageNet classifier

def test_imagenet_classifier_loads_standin_weights(standin: Path, tmp_path: Path) -> None:
    classifier = imagenet_classifier("test_efficientnet", weights=standin)
    assert classifier.input_size == 160 and not classifier.training  # timm's config of the model, kept in the file
    assert classifier.source_names[404] == "airliner"
    assert classifier(torch.rand(2, 3, 64, 64)).shape == (2, 1000)

    saved = torch.load(standin, weights_only=True)
    wrapped = tmp_path / "checkpoint.pth"  # a checkpoint with more in it: the state dict and the preprocessing found
    torch.save({"epoch": 3, **saved}, wrapped)
    safetensors = make_standin_classifier(tmp_path / "weights.safetensors")
    reference = classifier.model.state_dict()
    for path in (wrapped, safetensors):
        loaded = imagenet_classifier("test_efficientnet", weights=path)
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in reference.items())
        assert loaded.input_size == 160 and torch.equal(loaded.mean, classifier.mean)


def test_imagenet_classifier_loads_strictly(standin: Path, tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"b2\.pth: weights file is missing.*timm\.create_model\('efficientnet_b2', "
                                          r"pretrained=True\).*torch\.save"):
        imagenet_classifier(weights=tmp_path / "b2.pth")
    saved = torch.load(standin, weights_only=True)
    state = saved["state_dict"]
    removed = {k: v for k, v in state.items() if k != "classifier.bias"}
    extra = {**state, "head.fc.weight": torch.zeros(2)}
    cases = ((removed, r"missing keys: classifier\.bias"), (extra, r"unexpected keys: head\.fc\.weight"))
    for edited, message in cases:
        path = tmp_path / "edited.pth"
        torch.save({**saved, "state_dict": edited}, path)
        with pytest.raises(ReplayError, match=rf"edited\.pth: .*{message}"):
            imagenet_classifier("test_efficientnet", weights=path)
    with pytest.raises(ReplayError, match=r"efficientnet\.pth: .*wrong shape.*conv_stem\.weight"):
        imagenet_classifier("efficientnet_b0", weights=standin)  # weights of another architecture
    with pytest.raises(ReplayError, match="cannot create timm model 'no_such_net'"):
        imagenet_classifier("no_such_net", weights=standin)


def test_map_classes_with_the_imagenet_classifier_round_trips(standin: Path, tiny_world: Path, tmp_path: Path) -> None:
    classifier = imagenet_classifier("test_efficientnet", weights=standin)
    mapping = map_classes(classifier, tiny_world, max_images_per_class=3)
    assert {entry["source_name"] for entry in mapping.values() if entry["n_images"]} <= set(imagenet_names())
    save_mapping(mapping, tmp_path / "mapping.json")
    loaded = load_mapping(tmp_path / "mapping.json", source_names=imagenet_names())
    assert loaded == {c: e["source_class"] for c, e in mapping.items() if e["source_class"] is not None}
    assert loaded and all(0 <= v < 1000 for v in loaded.values())


# ------------------------------------------------------------------------------ hand-written VOC mapping

def test_voc_imagenet_mapping_file_is_valid() -> None:
    raw = json.loads(MAPPING_FILE.read_text())
    assert list(raw) == list(VOC_CLASSES[1:])
    names = imagenet_names()
    assert {voc: names[index].split(",")[0] for voc, index in raw.items()} == EXPECTED_IMAGENET
    mapping = load_mapping(MAPPING_FILE, source_names=names)
    assert mapping == {VOC_CLASSES.index(voc): index for voc, index in raw.items()}
