"""The toy web replay source (Flickr stand-in): queries, determinism, tag noise, privacy, pool metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from recall.data.classes import VOC_CLASSES, web_query
from recall.errors import ReplayError
from recall.replay.leakage import dataset_hashes, pixel_sha256, sha256_bytes
from recall.replay.pool import ReplayPool, build_pool, encode_jpeg
from recall.replay.sources import build_source
from recall.sim.toy_web import FLICKR_LICENSES, ToyWebPhotos
from recall.sim.toyworld import SPLIT_CODES, generate, render_sample

CONF = Path(__file__).resolve().parents[1] / "conf" / "replay" / "toy_web.yaml"


def _bytes(source: ToyWebPhotos, c: int, start: int, count: int) -> list[bytes]:
    return [np.asarray(image).tobytes() for image, _ in source.images(c, VOC_CLASSES[c], start, count)]


def test_queries_spell_out_joined_class_names() -> None:
    queries = {name: web_query(name) for name in VOC_CLASSES[1:]}
    assert queries["diningtable"] == "dining table" and queries["pottedplant"] == "potted plant"
    assert queries["tvmonitor"] == "tv monitor" and queries["aeroplane"] == "aeroplane"
    assert all(q == name for name, q in queries.items() if name not in ("diningtable", "pottedplant", "tvmonitor"))
    _, meta = next(ToyWebPhotos(size=16).images(20, "tvmonitor", 0, 1))
    assert meta["query"] == meta["source_class"] == "tv monitor" and meta["tags"].split()[:2] == ["tv", "monitor"]


def test_photos_are_deterministic_per_seed_class_and_index() -> None:
    a, b = ToyWebPhotos(size=32, seed=1), build_source("toy_web", size=32, seed=1)
    assert _bytes(a, 5, 0, 6) == _bytes(b, 5, 0, 6)
    assert _bytes(a, 5, 3, 3) == _bytes(a, 5, 0, 6)[3:]  # index k is the same photo whatever the batch
    assert len(set(_bytes(a, 5, 0, 6))) == 6
    assert _bytes(a, 5, 0, 3) != _bytes(ToyWebPhotos(size=32, seed=2), 5, 0, 3)
    assert _bytes(a, 5, 0, 3) != _bytes(a, 6, 0, 3)
    metas = [meta for _, meta in a.images(5, "bottle", 7, 2)]
    assert [m["photo_id"] for m in metas] == ["w1_05_000007", "w1_05_000008"]
    assert metas == [meta for _, meta in b.images(5, "bottle", 7, 2)]
    image, mask = a.render_with_mask(5, 7)
    assert image.mode == "RGB" and image.size == (32, 32) and mask.dtype == bool and mask.shape == (32, 32)
    assert np.asarray(image).tobytes() == _bytes(a, 5, 7, 1)[0]
    assert a.available(5, "bottle") == 1000 and len(_bytes(ToyWebPhotos(size=16, per_class_limit=4), 5, 2, 10)) == 2
    assert a.params == {"size": 32, "seed": 1, "tag_noise": 0.15, "per_class_limit": 1000}


def test_tag_noise_share_and_the_queried_object_is_present() -> None:
    setting, per_class = 0.15, 20
    noisy = ToyWebPhotos(size=32, tag_noise=setting)
    clean = ToyWebPhotos(size=32, tag_noise=0.0)
    wrong = 0
    for c in range(1, 21):
        for (image, meta), (clean_image, clean_meta) in zip(noisy.images(c, VOC_CLASSES[c], 0, per_class),
                                                            clean.images(c, VOC_CLASSES[c], 0, per_class)):
            mask = noisy.render_with_mask(c, meta["index"])[1]
            assert clean_meta["shows_class"] and clean_meta["shown_class"] == c
            assert set(meta) >= {"index", "source_class", "query", "photo_id", "owner", "license", "tags",
                                 "shows_class", "shown_class"}
            assert meta["license"] in FLICKR_LICENSES and meta["owner"].startswith("user_")
            if meta["shows_class"]:
                assert meta["shown_class"] == c and mask.any()
                assert np.array_equal(np.asarray(image), np.asarray(clean_image))  # tag noise only swaps noise photos
            else:
                wrong += 1
                assert meta["shown_class"] != c and not mask.any()
    assert abs(wrong / (20 * per_class) - setting) < 0.05
    assert all(meta["shows_class"] for _, meta in ToyWebPhotos(size=16, tag_noise=0.0).images(3, "bird", 0, 50))
    assert not any(meta["shows_class"] for _, meta in ToyWebPhotos(size=16, tag_noise=1.0).images(3, "bird", 0, 20))


def test_photos_are_never_dataset_images(tmp_path: Path) -> None:
    generate(tmp_path, n_train=20, n_val=5, progress=False)
    forbidden = dataset_hashes(tmp_path)
    raw = {hashlib.sha256(render_sample(64, np.random.default_rng([0, code, i]))[0].tobytes()).hexdigest()
           for split, code in SPLIT_CODES.items() for i in range(20 if split == "train" else 5)}
    source = ToyWebPhotos()
    photos = [image for c in range(1, 21) for image, _ in source.images(c, VOC_CLASSES[c], 0, 10)]
    assert len(photos) == 200
    for image in photos:
        assert pixel_sha256(image) not in forbidden and sha256_bytes(encode_jpeg(image)) not in forbidden
        assert hashlib.sha256(np.asarray(image).tobytes()).hexdigest() not in raw


def test_pool_records_web_metadata_and_resumes_without_duplicates(tmp_path: Path) -> None:
    classes, per_class = {1: "aeroplane", 11: "diningtable"}, 6
    source = ToyWebPhotos(size=32)
    root = tmp_path / "pool"
    build_pool(source, classes, per_class // 2, root, progress=False)
    manifest = root / "manifest.jsonl"
    data = manifest.read_bytes()
    manifest.write_bytes(data[:len(data) - 20])  # killed mid-record
    summary = build_pool(source, classes, per_class, root, progress=False)
    records, problems = ReplayPool(root).load()
    assert problems == [] and summary["counts"] == {"aeroplane": per_class, "diningtable": per_class}
    assert summary["params"]["source"] == "toy_web" and summary["params"]["source_params"] == source.params
    for c, name in classes.items():
        mine = [r for r in records if r["target_class"] == c]
        assert sorted(r["source_index"] for r in mine) == list(range(per_class))
        assert {r["query"] for r in mine} == {r["source_class"] for r in mine} == {web_query(name)}
        assert sorted(r["photo_id"] for r in mine) == [source.photo_id(c, k) for k in range(per_class)]
    assert all(r["license"] in FLICKR_LICENSES and r["owner"].startswith("user_") for r in records)
    assert len({r["sha256"] for r in records}) == len(records) == len(list((root / "images").glob("*.jpg")))

    short = build_pool(ToyWebPhotos(size=16, per_class_limit=4), {3: "bird"}, 6, tmp_path / "short", progress=False)
    assert short["counts"] == {"bird": 4} and "only 4" in short["shortfall"]["bird"]["reason"]


def test_bad_options_and_classes_are_clear_errors() -> None:
    with pytest.raises(ReplayError, match=r"tag_noise.*\[0, 1\].*2\.0"):
        build_source("toy_web", tag_noise=2.0)
    with pytest.raises(ReplayError, match="size must be an integer >= 8.*-64"):
        build_source("toy_web", size=-64)
    with pytest.raises(ReplayError, match="per_class_limit"):
        build_source("toy_web", per_class_limit=-1)
    with pytest.raises(ReplayError, match="bad options"):
        build_source("toy_web", query="cow")
    with pytest.raises(ReplayError, match="toy classes 1..20, got class 21"):
        next(ToyWebPhotos(size=16).images(21, "21", 0, 1))


def test_config_builds_the_source() -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg.name == "toy_web" and cfg.mapping is None and cfg.per_class == 60
    source = build_source(cfg.name, **OmegaConf.to_container(cfg.source, resolve=True))
    assert source.params == {"size": 64, "seed": 0, "tag_noise": 0.15, "per_class_limit": 1000}
