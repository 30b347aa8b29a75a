"""The report table: one row per protocol x method x replay source, mean ± std over seeds, paper order."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from recall.report import write_report


def _run(tmp: Path, name: str, method: str, replay: str, seed: int, old: float, new: float | None,
         tau: float = 0.0) -> Path:
    d = tmp / name
    d.mkdir()
    miou = {"all": 0.5, "all_no_bg": 0.45, "old": old, "old_no_bg": old, "new": new}
    steps = [{"step": 0, "miou": {**miou, "new": None}}, {"step": 1, "miou": miou}]
    (d / "metrics.json").write_text(json.dumps({"protocol": "15-5", "setting": "overlapped", "method": method,
                                                "replay": replay, "seed": seed, "steps": steps,
                                                "method_options": {"inpaint_threshold": tau, "replay_ratio": 0.5},
                                                "final": {"miou": miou}}))
    return d


def test_seeds_are_averaged_and_rows_follow_the_papers_order(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "r0", "recall", "toy_gan", 0, 0.50, 0.30), _run(tmp_path, "r1", "recall", "toy_gan", 1, 0.60, 0.40),
            _run(tmp_path, "r2", "recall", "toy_web", 0, 0.55, 0.35), _run(tmp_path, "m0", "mib", "none", 0, 0.40, None),
            _run(tmp_path, "f0", "ft", "none", 0, 0.0, 0.2), _run(tmp_path, "t0", "recall", "toy_gan", 0, 0.1, 0.1, tau=0.9)]
    table = write_report(runs, tmp_path / "out")
    assert [(r["method"], r["replay"], r["options"]) for r in table] == [
        ("ft", "none", ""), ("mib", "none", ""), ("recall", "toy_gan", "inpaint_threshold=0.0"),
        ("recall", "toy_gan", "inpaint_threshold=0.9"), ("recall", "toy_web", "inpaint_threshold=0.0")]
    gan = table[2]
    assert gan["seeds"] == "0,1" and gan["old_no_bg"] == pytest.approx(0.55)
    assert gan["old_no_bg_std"] == pytest.approx(statistics.stdev([0.5, 0.6]))
    assert table[1]["new"] is None and table[1]["old_no_bg_std"] is None
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "0.550 ± 0.071" in markdown and "| 15-5 | overlapped | mib | none |  | 0 | 2 | 0.400 | – |" in markdown
    with (tmp_path / "out" / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 5
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == {"r0", "r1", "r2", "m0", "f0", "t0"} and summary["r1"]["old_no_bg"] == 0.6
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000


def test_missing_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere"):
        write_report([tmp_path / "nothere"], tmp_path / "out")


def test_the_replay_labels_quality_stands_beside_the_miou_it_drives(tmp_path: Path) -> None:
    """A run whose source knows its truth logged its labels' quality: the summary carries it beside its mIoU."""
    run = _run(tmp_path, "g0", "recall", "toy_gan", 0, 0.5, 0.3)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["final"]["statistics"] = {"replay/pool_images": 60.0, "replay_labels/iou_step0_classes": 0.41,
                                      "replay_labels/empty_step0_classes": 0.2, "replay_labels/iou/cat": 0.9}
    (run / "metrics.json").write_text(json.dumps(metrics))
    plain = _run(tmp_path, "m0", "mib", "none", 0, 0.4, 0.2)
    write_report([run, plain], tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["g0"] == {"old_no_bg": 0.5, "new": 0.3, "all": 0.5, "all_no_bg": 0.45, "label_iou_step0": 0.41,
                             "label_empty_step0": 0.2}
    assert set(summary["m0"]) == {"old_no_bg", "new", "all", "all_no_bg"}
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| g0 | 0.410 | 0.200 | – | – |" in markdown and "| m0 |" not in markdown.split("## Replay labels")[1]
