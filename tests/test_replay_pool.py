"""Replay pool (resume, verification, privacy check), folder and toy-GAN sources, class mapping."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from recall.data.transforms import eval_transform
from recall.data.voc import load_image, read_split
from recall.replay.classmap import load_mapping, map_classes, save_mapping
from recall.replay.folder import FolderSource
from recall.errors import ReplayError
from recall.replay.leakage import LeakageGuard, dataset_hashes
from recall.replay.pool import PoolDataset, ReplayPool, build_pool, describe_problems
from recall.replay.sources import build_source
from recall.sim.toy_gan import ToyGenerator
from recall.sim.toyworld import generate

CLASSES = {1: "aeroplane", 7: "car", 15: "person"}
PER_CLASS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    generate(root, n_train=60, n_val=4, progress=False)
    return root


@pytest.fixture(scope="module")
def generator() -> ToyGenerator:
    gen = ToyGenerator(size=32)
    gen.set_mapping(gen.lookalike_mapping())
    return gen


def _file_hashes(root: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "images").glob("*.jpg"))]


def test_build_resume_after_kill_has_no_duplicates(tmp_path: Path, generator: ToyGenerator) -> None:
    root = tmp_path / "pool"
    build_pool(generator, CLASSES, PER_CLASS // 2, root, progress=False)
    manifest = root / "manifest.jsonl"
    data = manifest.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    manifest.write_bytes(data[:last_start + (len(data) - last_start) // 2])  # killed mid-record
    pool = ReplayPool(root)
    assert len(pool.records()) == 3 * (PER_CLASS // 2) - 1 and pool.notes  # the cut line is ignored, with a note

    summary = build_pool(generator, CLASSES, PER_CLASS, root, progress=False)
    records, problems = ReplayPool(root).load()
    assert problems == []
    assert summary["counts"] == {name: PER_CLASS for name in CLASSES.values()}
    for c in CLASSES:
        mine = [r for r in records if r["target_class"] == c]
        assert len(mine) == PER_CLASS
        assert sorted(r["source_index"] for r in mine) == list(range(PER_CLASS))
    hashes = [r["sha256"] for r in records]
    assert len(set(hashes)) == len(hashes) == len(_file_hashes(root))  # no orphan left behind
    assert sorted(hashes) == sorted(_file_hashes(root))
    record = records[0]
    assert record["license"] == "generated" and record["owner"] is None and record["target_name"] == "aeroplane"
    assert record["source_class"] == generator.source_names[generator.mapping[1]]
    assert all(set(r["id"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
               for r in records)

    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir() if p.name != ".lock"}  # (the lock: its holder)
    assert build_pool(generator, CLASSES, PER_CLASS, root, progress=False) == summary  # complete: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir() if p.name != ".lock"} == before
    saved = json.loads((root / "pool.json").read_text())
    assert saved["params"]["per_class"] == PER_CLASS and saved["dropped_dataset_copies"] == 0


class Repeating:
    """The toy generator, with every third index a repeat of the image before it (a duplicate the build drops), and
    ``stop_at``: the index at which it dies, as a build killed there."""

    name = "repeating"

    def __init__(self, generator: ToyGenerator, stop_at: int | None = None):
        self.generator, self.stop_at = generator, stop_at

    @property
    def params(self) -> dict:
        return self.generator.params

    def available(self, class_index: int, class_name: str) -> None:
        return None

    def images(self, class_index: int, class_name: str, start: int, count: int):
        for i in range(start, start + count):
            if i == self.stop_at:
                raise KeyboardInterrupt("killed")
            image, meta = next(self.generator.images(class_index, class_name, i - 1 if i % 3 == 2 else i, 1))
            yield image, {**meta, "index": i}


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_killed_build_resumes_to_the_pool_an_uninterrupted_build_makes(tmp_path, generator) -> None:
    """Killed just after it dropped a duplicate: the resumed build examines that candidate again, and the pool, its
    logs and its drop counts are those of a build that was never interrupted, byte for byte."""
    classes = {7: "car"}
    reference = build_pool(Repeating(generator), classes, 5, tmp_path / "reference", progress=False)
    assert reference["dropped_duplicates"] == 2
    root = tmp_path / "pool"
    with pytest.raises(KeyboardInterrupt):
        build_pool(Repeating(generator, stop_at=6), classes, 5, root, progress=False)  # index 5 was a duplicate
    assert len((root / "duplicates.jsonl").read_text().splitlines()) == 2 and not (root / "pool.json").exists()
    assert build_pool(Repeating(generator), classes, 5, root, progress=False) == reference
    assert _files(root) == _files(tmp_path / "reference")


def test_orphan_removal_touches_only_what_a_killed_add_left(tmp_path, generator) -> None:
    root = tmp_path / "pool"
    build_pool(generator, {7: "car"}, 2, root, progress=False)
    images = root / "images"
    shutil.copyfile(images / "c007_000000.jpg", images / "c007_000002.jpg")  # a killed add(): renamed, not recorded
    (images / ".c007_000002.jpg.4242.tmp").write_bytes(b"half")  # a killed add(): not even renamed
    Image.new("RGB", (8, 8)).save(images / "mine.jpg")  # someone else's files in the pool's images/
    Image.new("RGB", (8, 8)).save(images / "c007_000009.jpg")
    kept = {name: (images / name).read_bytes() for name in ("mine.jpg", "c007_000009.jpg")}
    build_pool(generator, {7: "car"}, 2, root, progress=False)  # complete: nothing to do, nothing removed
    assert (images / "c007_000002.jpg").exists()
    assert ReplayPool(root).remove_orphans() == 2
    assert {name: (images / name).read_bytes() for name in kept} == kept
    assert sorted(p.name for p in images.iterdir()) == ["c007_000000.jpg", "c007_000001.jpg", "c007_000009.jpg",
                                                       "mine.jpg"]


def test_load_skips_missing_and_corrupt_images(tmp_path: Path, generator: ToyGenerator) -> None:
    root = tmp_path / "pool"
    build_pool(generator, {3: "bird"}, 4, root, progress=False)
    pool = ReplayPool(root)
    first, second = pool.records()[:2]
    pool.image_path(first["id"]).unlink()
    pool.image_path(second["id"]).write_bytes(b"not a jpeg at all")
    records, problems = pool.load()
    assert len(records) == 2
    reasons = dict(problems)
    assert reasons[first["id"]].startswith("missing")
    assert reasons[second["id"]].startswith("corrupt") and "sha256" in reasons[second["id"]]
    assert describe_problems(problems, 4) == "skipped 2 of 4 replay images (1 missing, 1 corrupt)"

    dataset = PoolDataset(root, classes=[3])
    assert len(dataset) == 2 and len(dataset.problems) == 2
    image, mask = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and mask is None
    labels = tmp_path / "labels"
    labels.mkdir()
    for record in dataset.records:
        Image.fromarray(np.full((32, 32), 3, dtype=np.uint8), mode="L").save(labels / f"{record['id']}.png")
    image, mask = PoolDataset(root, classes=[3], labels_dir=labels)[1]
    assert mask.dtype == torch.int64 and mask.shape == (32, 32) and int(mask.max()) == 3
    assert len(PoolDataset(root, classes=[4])) == 0


def test_load_reports_corrupt_image_with_matching_hash(tmp_path: Path) -> None:
    pool = ReplayPool(tmp_path)
    record = pool.add(Image.new("RGB", (8, 8), (200, 10, 10)), {"target_class": 2, "source": "test"})
    broken = b"\xff\xd8\xff\xe0 truncated"
    pool.image_path(record["id"]).write_bytes(broken)
    lines = pool.manifest_path.read_text().splitlines()
    lines[-1] = json.dumps({**record, "sha256": hashlib.sha256(broken).hexdigest()})
    pool.manifest_path.write_text("\n".join(lines) + "\n")
    records, problems = pool.load()
    assert records == [] and problems[0][1].startswith("corrupt") and "decode" in problems[0][1]


def test_exact_hashes_drop_dataset_copies(tmp_path: Path, world: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "car").mkdir(parents=True)
    train_id = read_split(world, "train")[0]
    shutil.copy(world / "JPEGImages" / f"{train_id}.jpg", folder / "car" / "a_copy.jpg")  # a privacy leak
    for k in range(3):
        Image.new("RGB", (16, 16), (40 * k, 90, 200)).save(folder / "car" / f"own_{k}.png")
    forbidden = dataset_hashes(world)
    assert len(forbidden) == 2 * (60 + 4)
    summary = build_pool(FolderSource(folder), {7: "car"}, 10, tmp_path / "pool", guard=LeakageGuard(forbidden),
                         progress=False)
    records = ReplayPool(tmp_path / "pool").records()
    assert summary["dropped_dataset_copies"] == 1 and len(records) == 3
    assert all(r["file"].startswith("car/own_") for r in records)
    assert summary["shortfall"]["car"]["missing"] == 7


def test_folder_source_skips_bad_images_and_names_missing_dirs(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (10, 12), (1, 2, 3)).save(tmp_path / "cat" / "b.jpeg")
    (tmp_path / "cat" / "a.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    source = build_source("folder", root=tmp_path)
    assert source.available(8, "cat") == 2
    got = list(source.images(8, "cat", 0, 5))
    assert len(got) == 1 and got[0][0].size == (10, 12) and got[0][1]["index"] == 1
    assert source.skipped == {"not_image": 1} and source.problems[0][0] == "cat/a.jpg"
    with pytest.raises(ReplayError, match=r"dog.*<class_name>/\*\.jpg"):
        list(source.images(12, "dog", 0, 1))
    with pytest.raises(ReplayError, match="missing"):
        FolderSource(tmp_path / "nowhere")
    with pytest.raises(ReplayError, match="unknown replay source 'biggan'"):
        build_source("biggan")


def test_toy_generator_is_deterministic_and_truncated() -> None:
    a, b = ToyGenerator(size=32, seed=1), ToyGenerator(size=32, seed=1)
    assert len(a.source_names) == 120 and len(set(a.source_names)) == 120  # the toy ImageNet's classes
    assert a.source_names[7].startswith("src07_")
    assert [np.asarray(x).tobytes() for x in a.sample(5, 3, 10)] == [np.asarray(x).tobytes() for x in b.sample(5, 3, 10)]
    assert np.asarray(a.sample(5, 1, 10)[0]).tobytes() != np.asarray(ToyGenerator(size=32, seed=2).sample(5, 1, 10)[0]).tobytes()
    assert np.asarray(a.sample(5, 1, 11)[0]).tobytes() == np.asarray(b.sample(5, 2, 10)[1]).tobytes()
    wide = np.stack([ToyGenerator(truncation=1.0).latent(0, i) for i in range(200)])
    narrow = np.stack([ToyGenerator(truncation=0.3).latent(0, i) for i in range(200)])
    assert np.abs(wide).max() <= 2.0 and np.abs(narrow).max() <= 0.6
    assert narrow.std() < 0.5 * wide.std()
    kinds = [c.kind for c in a.classes]
    assert kinds.count("lookalike") == 20 and kinds.count("variant") + kinds.count("distractor") == 20
    assert kinds.count("other") == 80
    assert sorted(a.lookalike_mapping()) == list(range(1, 21))
    with pytest.raises(ReplayError, match="mapping"):
        next(a.images(1, "aeroplane", 0, 1))


class OracleClassifier(nn.Module):
    """Knows each dataset image (by its pixels) and answers with the look-alikes of the classes in it."""

    def __init__(self, answers: dict[str, list[int]], num_source_classes: int) -> None:
        super().__init__()
        self.answers = answers
        self.num_source_classes = num_source_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(images), self.num_source_classes), -10.0)
        for row, image in enumerate(images):
            key = hashlib.sha256((image * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()
            logits[row, self.answers[key]] = 10.0
        return logits


def test_map_classes_with_an_oracle_finds_the_lookalikes(world: Path, tmp_path: Path) -> None:
    from recall.data.voc import image_classes

    generator = ToyGenerator()
    truth = generator.lookalike_mapping()
    ids = read_split(world, "train")
    present = image_classes(world, ids, progress=False)
    answers = {}
    for image_id in ids:
        pixels = torch.from_numpy(np.array(load_image(world / "JPEGImages" / f"{image_id}.jpg"))).permute(2, 0, 1)
        answers[hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()] = [truth[c] for c in present[image_id]]
    oracle = OracleClassifier(answers, generator.num_source_classes)
    mapping = map_classes(oracle, world, source_names=generator.source_names)
    assert {c: e["source_class"] for c, e in mapping.items()} == truth
    assert mapping[1]["source_name"] == generator.source_names[truth[1]] and mapping[1]["name"] == "aeroplane"

    path = tmp_path / "mapping.json"
    save_mapping(mapping, path)
    assert load_mapping(path) == truth
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"aeroplane": 3, "7": generator.source_names[12], "potted plant": "5"}))
    assert load_mapping(hand, source_names=generator.source_names) == {1: 3, 7: 12, 16: 5}
    hand.write_text(json.dumps({"unicorn": 3}))
    with pytest.raises(ReplayError, match="unicorn"):
        load_mapping(hand)


def test_pool_dataset_cache_and_keep(tmp_path: Path, generator: ToyGenerator) -> None:
    root = tmp_path / "pool"
    build_pool(generator, CLASSES, 2, root, progress=False)
    labels = tmp_path / "labels"
    labels.mkdir()
    for record in ReplayPool(root).records():
        Image.fromarray(np.full((32, 32), record["target_class"], dtype=np.uint8)).save(labels / f"{record['id']}.png")
    cached = PoolDataset(root, labels_dir=labels, transform=eval_transform(), cache_in_memory=True)
    plain = PoolDataset(root, labels_dir=labels, transform=eval_transform())
    for i in range(len(plain)):
        for a, b in zip(cached[i], plain[i]):
            assert torch.equal(a, b)
    (root / "images" / f"{cached.records[0]['id']}.jpg").unlink()
    assert cached[0][1].unique().tolist() == [1]  # served from memory after the file is gone
    assert cached.keep([c == 7 for c in cached.target_classes]) == 4 and set(cached.target_classes) == {7}
    assert len(cached) == 2 and cached[0][1].unique().tolist() == [7]  # cache dropped with the records
    with pytest.raises(ValueError, match="flags"):
        cached.keep([True])


def test_a_source_class_shared_by_two_classes_is_warned_unless_on_purpose(tmp_path: Path, capsys) -> None:
    from recall.replay.classmap import shared_sources
    from recall.stages.pool import warn_shared

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"aeroplane": 3, "bicycle": 3, "bird": 4}))
    warn_shared(load_mapping(path), path)
    err = capsys.readouterr().err
    assert "map.json: source class 3 replays classes [1, 2]" in err and '"_shared": true' in err
    path.write_text(json.dumps({"aeroplane": 3, "bicycle": 3, "_shared": True}))
    assert load_mapping(path) == {1: 3, 2: 3}
    warn_shared(load_mapping(path), path)
    assert capsys.readouterr().err == ""
    made = {1: {"name": "aeroplane", "source_name": "s3"}, 2: {"name": "bicycle", "source_name": "s3"},
            3: {"name": "bird", "source_name": "s4"}, 4: {"name": "boat", "source_name": None}}
    assert shared_sources(made) == {"s3": ["aeroplane", "bicycle"]}  # what the classmap stage warns about
