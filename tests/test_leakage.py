"""The leakage guard: copies of dataset images (exact, resized, recompressed) never enter a replay pool."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recall.data.voc import read_split
from recall.replay.folder import FolderSource
from recall.replay.leakage import LeakageGuard, hamming, perceptual_hash
from recall.replay.pool import ReplayPool, build_pool
from recall.sim.toy_web import ToyWebPhotos


def reference_phash(image: Image.Image) -> int:
    """pHash computed with scipy's DCT (as the `imagehash` package does), to check ours independently."""
    from scipy.fft import dct

    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(grey, axis=0, norm="ortho"), axis=1, norm="ortho")[:8, :8]
    return int("".join("1" if bit else "0" for bit in (low > np.median(low)).ravel()), 2)


def recompress(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_perceptual_hash_matches_an_independent_dct(tiny_world: Path) -> None:
    for image_id in read_split(tiny_world, "val")[:8]:
        image = Image.open(tiny_world / "JPEGImages" / f"{image_id}.jpg")
        assert perceptual_hash(image) == reference_phash(image)
    assert hamming(0b1011, 0b0001) == 2


def test_guard_finds_resized_and_recompressed_val_images_but_not_other_images(tiny_world: Path) -> None:
    guard = LeakageGuard.from_dataset(tiny_world)
    assert len(guard) == len(read_split(tiny_world, "train")) + len(read_split(tiny_world, "val"))
    for image_id in read_split(tiny_world, "val")[:10]:
        original = Image.open(tiny_world / "JPEGImages" / f"{image_id}.jpg")
        for size, quality in [((48, 48), 60), ((100, 100), 70), ((128, 96), 90)]:
            copy = Image.open(io.BytesIO(recompress(original, size, quality)))
            match = guard.check(copy)
            assert match is not None and match.kind == "perceptual" and match.dataset_id == f"val/{image_id}"
    photos = ToyWebPhotos(size=64).images(3, "bird", 0, 40)  # other images of the same toy domain
    assert all(guard.check(image) is None for image, _ in photos)


def test_bad_max_distance_is_refused() -> None:
    with pytest.raises(ValueError, match="max_distance"):
        LeakageGuard(max_distance=64)


def test_build_pool_drops_planted_val_copies_and_records_them(tmp_path: Path, tiny_world: Path) -> None:
    folder = tmp_path / "crawl" / "bird"
    folder.mkdir(parents=True)
    val_ids = read_split(tiny_world, "val")[:3]
    for k, image_id in enumerate(val_ids):  # what a web crawl can return: VOC images, resized and recompressed
        original = Image.open(tiny_world / "JPEGImages" / f"{image_id}.jpg")
        (folder / f"a{k}_copy.jpg").write_bytes(recompress(original, (90, 90), 75))
    for k, (image, _) in enumerate(ToyWebPhotos(size=64).images(3, "bird", 0, 5)):
        image.save(folder / f"b{k}_own.png")
    guard = LeakageGuard.from_dataset(tiny_world)
    summary = build_pool(FolderSource(tmp_path / "crawl"), {3: "bird"}, 5, tmp_path / "pool", guard=guard,
                         progress=False)
    assert summary["dropped_near_copies"] == 3 and summary["counts"] == {"bird": 5}
    assert summary["params"]["leakage_guard"]["perceptual_hashes"] == len(guard)
    assert all(r["file"].startswith("bird/b") for r in ReplayPool(tmp_path / "pool").records())
    leaks = [json.loads(line) for line in (tmp_path / "pool" / "leakage.jsonl").read_text().splitlines()]
    assert sorted(leak["dataset_id"] for leak in leaks) == sorted(f"val/{i}" for i in val_ids)
    assert all(leak["match"] == "perceptual" and leak["distance"] <= guard.max_distance for leak in leaks)


class RepeatingSource:
    """Yields each image twice under the same source id (a photo listed on two result pages)."""

    name = "repeating"
    params: dict = {}

    def available(self, class_index: int, class_name: str) -> int:
        return 8

    def images(self, class_index: int, class_name: str, start: int, count: int):
        for index in range(start, min(start + count, 8)):
            image, _ = next(ToyWebPhotos(size=32).images(class_index, class_name, index // 2, 1))
            pixels = np.asarray(image).copy()
            pixels[0, 0] = index  # different bytes, same photo id
            yield Image.fromarray(pixels), {"index": index, "source_id": f"p{index // 2}"}


def test_a_repeated_source_id_is_a_duplicate(tmp_path: Path) -> None:
    summary = build_pool(RepeatingSource(), {3: "bird"}, 4, tmp_path / "pool", progress=False)
    records = ReplayPool(tmp_path / "pool").records()
    assert [r["source_id"] for r in records] == ["p0", "p1", "p2", "p3"]
    assert summary["dropped_duplicates"] == 3  # index 7 (p3 again) is never asked for


def test_similar_structure_in_other_colours_is_not_a_copy(tiny_world: Path) -> None:
    """pHash sees grey structure only; the colour check keeps a recoloured scene from counting as a copy."""
    image_id = read_split(tiny_world, "val")[0]
    original = Image.open(tiny_world / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
    swapped = Image.fromarray(np.asarray(original)[..., ::-1].copy())  # same structure, other colours
    guard = LeakageGuard.from_dataset(tiny_world)
    assert hamming(perceptual_hash(swapped), perceptual_hash(original)) <= guard.max_distance
    assert guard.check(swapped) is None
    assert guard.check(original).dataset_id == f"val/{image_id}"
