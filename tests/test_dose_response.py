"""benchmarks/dose_response.py's bookkeeping: every level replays the same class map through its own pool, and the
verdicts are the study's paired rule applied per level against each reference line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # dose_response imports regime, its sibling
SPEC = importlib.util.spec_from_file_location("dose_response", BENCHMARKS / "dose_response.py")
dose_response = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(dose_response)
sys.path.remove(str(BENCHMARKS))


def test_every_level_shares_the_seeds_class_map_and_owns_its_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(dose_response, "pretrained", lambda seed, work: work / f"s{seed}" / "pretrain")
    levels = {s: dict(o.split("=", 1) for o in dose_response.toy_gan(1, tmp_path, s)) for s in (0.0, 1.0, 2.0)}
    assert {v["replay.mapping"] for v in levels.values()} == {str(tmp_path / "s1" / "toy_gan_mapping.json")}
    assert {v["replay.classifier.weights"] for v in levels.values()} == {str(tmp_path / "s1/pretrain/classifier.pth")}
    assert [float(v["replay.source.render_shift"]) for v in levels.values()] == [0.0, 1.0, 2.0]
    assert len({v["replay.pool"] for v in levels.values()}) == 3
    assert all(v["replay.source.seed"] == "1" and v["replay"] == "toy_gan" for v in levels.values())
    # the class map is made without a level: no render shift, no pool of a level
    assert not any(o.startswith(("replay.source.render_shift", "replay.pool")) for o in dose_response.toy_gan(1, tmp_path))


def test_jobs_cover_every_seed_level_and_reference_longest_protocol_first(tmp_path, monkeypatch):
    monkeypatch.setattr(dose_response, "pretrained", lambda seed, work: work / f"s{seed}" / "pretrain")
    todo = dose_response.jobs([0, 1], [0.0, 1.0], ["15-1x5", "10-1x10"], tmp_path)
    assert len(todo) == 2 * 2 * (2 + len(dose_response.REFERENCES) + len(dose_response.POINTS))
    assert todo[0][1] == "10-1x10" and todo[-1][1] == "15-1x5"
    names = {(seed, protocol, name) for seed, protocol, name, _, _ in todo}
    assert (1, "15-1x5", "recall_shift1.0") in names and (0, "10-1x10", "mib") in names
    no_replay = next(o for _, _, name, o, _ in todo if name == "no_replay")
    assert "method.replay_ratio=0" in no_replay
    oracle = next(o for seed, _, name, o, _ in todo if name == "oracle" and seed == 1)
    assert "method.labels=oracle" in oracle and "replay.source.render_shift=1.0" in oracle
    web = next(o for seed, _, name, o, _ in todo if name == "web" and seed == 1)
    assert "replay=web" in web and "replay.source.standin.seed=1" in web


def _record(old, all_, label=None):
    out = {"old_no_bg": old, "new": 0.1, "all": all_}
    if label is not None:
        out.update(iou_step0_classes=label, iou_later_classes=label / 2, empty_step0_classes=0.1,
                   empty_later_classes=0.5)
    return out


def test_summary_calls_each_level_against_each_reference_by_the_paired_rule():
    seeds, shifts = [0, 1, 2], [0.0, 2.0]
    records = {"15-1x5": {
        "recall_shift0.0": {str(s): _record(0.80 + 0.01 * s, 0.70, 0.9) for s in seeds},  # above MiB by 0.05 each seed
        "recall_shift2.0": {str(s): _record(0.70 + 0.01 * s, 0.60, 0.3) for s in seeds},  # below it by 0.05
        "mib": {str(s): _record(0.75 + 0.01 * s, 0.65) for s in seeds},
        "no_replay": {"0": _record(0.70, 0.60), "1": _record(0.72, 0.60), "2": _record(0.69, 0.61)}}}
    records["15-1x5"]["web"] = {str(s): _record(0.74 + 0.01 * s, 0.62, 0.5) for s in seeds}  # as MiB, minus 0.01
    report = dose_response.summary(records, seeds, shifts, ["15-1x5"])
    calls = report["contrasts"]["15-1x5"]
    assert calls["web_vs_mib"]["old_no_bg"]["verdict"] == "mib higher"  # a point is called like a level
    assert calls["recall_shift0.0_vs_mib"]["old_no_bg"]["verdict"] == "recall_shift0.0 higher"
    assert calls["recall_shift0.0_vs_mib"]["old_no_bg"]["difference"]["mean"] == pytest.approx(0.05)
    assert calls["recall_shift2.0_vs_mib"]["old_no_bg"]["verdict"] == "mib higher"
    # against no replay at shift 2: differences 0, -0.01, +0.03: signs disagree, nothing is called
    assert calls["recall_shift2.0_vs_no_replay"]["old_no_bg"]["verdict"] == "no difference"
    cell = report["cells"]["15-1x5"]
    assert cell["recall_shift0.0"]["iou_step0_classes"]["mean"] == pytest.approx(0.9)
    assert "iou_step0_classes" not in cell["mib"]  # a reference without replay has no label quality
    rows = {(r[0], r[1]): r for r in report["table"]["rows"]}
    assert rows[("15-1x5", "mib")][5] == "–" and rows[("15-1x5", "shift 2.0")][2] == "0.710 ± 0.010"
    assert [r[1] for r in report["calls"]["rows"]] == ["0.0", "2.0", "web replay"]
    assert report["calls"]["rows"][1][2].startswith("mib higher")


def test_the_figure_is_drawn_from_the_report(tmp_path):
    seeds, shifts = [0, 1], [0.0, 1.0]
    records = {p: {**{f"recall_shift{s}": {str(x): _record(0.7 - 0.1 * s, 0.6, 0.8) for x in seeds} for s in shifts},
                   "mib": {str(x): _record(0.72, 0.62) for x in seeds},
                   "no_replay": {str(x): _record(0.6, 0.5) for x in seeds},
                   "oracle": {str(x): _record(0.71, 0.6, 0.95) for x in seeds}} for p in ("15-1x5", "10-1x10")}
    report = {"seeds": seeds, "shifts": shifts, "protocols": ["15-1x5", "10-1x10"],
              **dose_response.summary(records, seeds, shifts, ["15-1x5", "10-1x10"])}
    dose_response.figure(report, tmp_path / "dose.png")
    assert (tmp_path / "dose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_levels_sheet_shows_each_class_at_each_level(tmp_path):
    from PIL import Image

    for shift, colour in ((0.0, "red"), (2.0, "blue")):
        pool = tmp_path / "s0" / "pools" / f"toy_gan_shift{shift}"
        (pool / "images").mkdir(parents=True)
        records = [{"id": f"c00{c}_00000{i}", "target_class": c, "target_name": f"class{c}"} for c in (1, 2)
                   for i in range(2)]
        (pool / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for r in records:
            Image.new("RGB", (64, 64), colour).save(pool / "images" / f"{r['id']}.png")
    dose_response.levels_figure(tmp_path, 0, [0.0, 2.0], tmp_path / "levels.png")
    sheet = Image.open(tmp_path / "levels.png").convert("RGB")
    assert sheet.size == (2 * (84 + 2 * 64), 2 * (2 * 64 + 14))
    # row 0 (shift 0) is red, row 1 (shift 2) blue, in both class columns
    for col in (0, 1):
        x = 2 * (84 + 64 * col + 32)
        assert sheet.getpixel((x, 2 * (14 + 32))) == (255, 0, 0)
        assert sheet.getpixel((x, 2 * (14 + 64 + 32))) == (0, 0, 255)
