"""Bad input through the `recall` command: a clear error naming the input (exit 2), and nothing left behind that
looks finished (no metrics.json, no checkpoint of an unfinished step, no complete pool)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

from recall.cli import main
from recall.data.voc import read_split


@pytest.fixture
def world(tmp_path: Path, tiny_world: Path) -> Path:
    """A private copy of the tiny world, to break."""
    return Path(shutil.copytree(tiny_world, tmp_path / "world"))


def run(world: Path, tmp_path: Path, *overrides: str) -> int:
    return main(["run", f"dataset.root={world}", "tracking.uri=", *FAST, "protocol=19-1",
                 f"run_dir={tmp_path / 'run'}", *overrides])


def assert_nothing_finished(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("steps/*/model.pt")), "no checkpoint of a step that did not finish"


def first(world: Path, split: str = "train") -> str:
    return read_split(world, split)[0]


def test_truncated_jpeg_is_named(world: Path, tmp_path: Path, capsys) -> None:
    path = world / "JPEGImages" / f"{first(world)}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    assert run(world, tmp_path) == 2
    assert path.name in capsys.readouterr().err
    assert_nothing_finished(tmp_path)


def test_mask_values_outside_the_class_set_are_named(world: Path, tmp_path: Path, capsys) -> None:
    path = world / "SegmentationClass" / f"{first(world)}.png"
    with Image.open(path) as mask:
        labels = np.array(mask)
        palette = mask.getpalette()
    labels[0, 0] = 42
    out = Image.fromarray(labels, mode="P")
    out.putpalette(palette)
    out.save(path)
    assert run(world, tmp_path) == 2
    err = capsys.readouterr().err
    assert path.name in err and "42" in err
    assert_nothing_finished(tmp_path)


def test_mask_of_another_size_is_named(world: Path, tmp_path: Path, capsys) -> None:
    path = world / "SegmentationClass" / f"{first(world)}.png"
    with Image.open(path) as mask:
        mask.resize((32, 32), Image.Resampling.NEAREST).save(path)
    assert run(world, tmp_path) == 2
    assert path.name in capsys.readouterr().err
    assert_nothing_finished(tmp_path)


def test_empty_split_list_is_named(world: Path, tmp_path: Path, capsys) -> None:
    (world / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    assert run(world, tmp_path) == 2
    assert "train.txt" in capsys.readouterr().err
    assert_nothing_finished(tmp_path)


def test_malformed_protocol_is_named(world: Path, tmp_path: Path, capsys) -> None:
    assert run(world, tmp_path, "protocol=15-x5") == 2
    assert "15-x5" in capsys.readouterr().err
    assert_nothing_finished(tmp_path)


def test_contradictory_replay_ratio_is_named(world: Path, tmp_path: Path, capsys) -> None:
    assert run(world, tmp_path, "method=recall", "method.replay_ratio=1.5") == 2
    assert "replay_ratio" in capsys.readouterr().err
    assert_nothing_finished(tmp_path)


def test_unknown_class_folder_in_a_folder_pool_is_named(world: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "mine"
    (root / "unicorn").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(root / "unicorn" / "a.jpg")
    code = main(["pool", f"dataset.root={world}", "replay=folder", f"replay.source.root={root}",
                 f"replay.pool={tmp_path / 'pool'}", "replay.per_class=2"])
    err = capsys.readouterr().err
    assert code == 2 and "unicorn" in err
    assert not (tmp_path / "pool" / "pool.json").exists(), "no pool summary: the build did not finish"
