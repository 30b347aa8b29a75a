"""The dose-response: every level replays the same class map through its own pool, the verdicts are the study's
paired rule applied per level against each reference line (benchmarks/dose_response.py's bookkeeping), and the
study's stage reads exactly the runs its section names."""

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
    pools = tmp_path / "s0" / "pools"
    dose_response.levels_figure({s: pools / f"toy_gan_shift{s}" for s in (0.0, 2.0)}, tmp_path / "levels.png")
    sheet = Image.open(tmp_path / "levels.png").convert("RGB")
    assert sheet.size == (2 * (84 + 2 * 64), 2 * (2 * 64 + 14))
    # row 0 (shift 0) is red, row 1 (shift 2) blue, in both class columns
    for col in (0, 1):
        x = 2 * (84 + 64 * col + 32)
        assert sheet.getpixel((x, 2 * (14 + 32))) == (255, 0, 0)
        assert sheet.getpixel((x, 2 * (14 + 64 + 32))) == (0, 0, 255)


def _finished_study(root: Path, levels: dict, protocols: list[str], seeds: list[int]) -> dict:
    """A study whose dose-response runs have finished: the real spec's section and expansion, with made-up metrics
    (old classes rise with the level's label IoU), class-map checks and level pools."""
    import yaml
    from PIL import Image

    from recall import study

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "study" / "spec.yaml").read_text())
    spec["seeds"] = seeds
    spec["dose_response"].update(protocols=protocols, levels=levels)
    tables = study.expand(spec)
    section = spec["dose_response"]
    lines = {**{float(k): v for k, v in levels.items()}, **section["references"], **section["points"]}
    for protocol in protocols:
        for line, variant in lines.items():
            for seed in seeds:
                iou = 1.0 if line == "oracle" else 0.8 - 0.3 * line if isinstance(line, float) else None
                final = {"miou": {"old_no_bg": 0.5 + (iou or 0.1) / 4 + seed / 100, "new": 0.1, "all": 0.4},
                         "statistics": {} if iou is None else {"replay_labels/iou_step0_classes": iou + seed / 100,
                                                                "replay_labels/iou_later_classes": 0.0}}
                run = root / "study" / "runs" / f"{section['world']}_{protocol}_{variant}_s{seed}"
                run.mkdir(parents=True)
                (run / "metrics.json").write_text(json.dumps({"final": final}))
    for seed in seeds:
        check = root / "study" / "chains" / f"{section['world']}_s{seed}" / "toy_gan_mapping_check.json"
        check.parent.mkdir(parents=True, exist_ok=True)
        check.write_text(json.dumps({"truth": {"correct": 19 + (seed == 0), "classes": 20}}))
    for level, variant in levels.items():
        pool = root / tables["runs"][f"{section['world']}_{protocols[0]}_{variant}_s{seeds[0]}"]["pool"]
        (pool / "images").mkdir(parents=True)
        (pool / "manifest.jsonl").write_text(json.dumps({"id": "a", "target_class": 3, "target_name": "cat"}) + "\n")
        Image.new("RGB", (64, 64), "red").save(pool / "images" / "a.png")
    return {"spec": spec, **tables}


def test_the_study_stage_scores_the_study_runs_its_section_names(tmp_path):
    from recall.dose_response import study_report
    from recall.errors import UserError

    levels = {0.0: "recall_shift0.0", 1.0: "recall_toy_gan", 2.0: "recall_shift2.0"}
    loaded = _finished_study(tmp_path, levels, ["15-1x5", "10-1x10"], [0, 1, 2])
    report, pools = study_report(loaded, tmp_path)
    assert report["shifts"] == [0.0, 1.0, 2.0] and report["chain"] == ["pretrain.threads=1"]
    assert report["class_map_correct"] == {"fewest": 19, "classes": 20}
    cell = report["cells"]["10-1x10"]
    # each line is its own variant's runs: the level's label IoU, seed by seed
    assert cell["recall_shift2.0"]["iou_step0_classes"]["values"] == pytest.approx([0.2, 0.21, 0.22])
    assert cell["recall_shift1.0"]["old_no_bg"]["values"] == pytest.approx([0.625, 0.635, 0.645])
    assert cell["oracle"]["iou_step0_classes"]["mean"] == pytest.approx(1.01)
    assert "iou_step0_classes" not in cell["mib"]
    # every seed agrees and the gap (0.025 + 0.05) is far above the spread (0): called
    assert report["contrasts"]["15-1x5"]["recall_shift0.0_vs_mib"]["old_no_bg"]["verdict"] == "recall_shift0.0 higher"
    assert [p.name for p in pools.values()] == ["toy_gan_shift0.0", "toy_gan", "toy_gan_shift2.0"]
    (tmp_path / "study" / "runs" / "float_order_10-1x10_mib_s2" / "metrics.json").unlink()
    with pytest.raises(UserError, match="float_order_10-1x10_mib_s2: not finished"):
        study_report(loaded, tmp_path)


def test_the_study_stage_writes_the_report_and_its_figures(tmp_path, monkeypatch):
    import yaml

    from recall.commands import script

    levels = {0.0: "recall_shift0.0", 1.0: "recall_toy_gan"}
    loaded = _finished_study(tmp_path, levels, ["15-1x5"], [0, 1])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(loaded["spec"]))
    monkeypatch.chdir(tmp_path)
    assert script("recall.stages.dose_response", ["--study", "spec.yaml", "--out", "out/dose.json"]) == 0
    report = json.loads((tmp_path / "out" / "dose.json").read_text())
    assert report["runs"]["recall_shift1.0"] == "recall_toy_gan" and report["seeds"] == [0, 1]
    assert (tmp_path / "out" / "dose.png").stat().st_size > 0 and (tmp_path / "out" / "dose_levels.png").is_file()


def test_the_stage_reads_every_run_of_its_section(tmp_path):
    """The `dose_response` stage's deps (generated into study/dvc.yaml by `python -m recall.study`) name every run of
    the section, so DVC re-runs it when one changes."""
    import yaml

    from recall import study

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "study" / "spec.yaml").read_text())
    inputs = study.dose_inputs(spec, study.expand(spec))
    section = spec["dose_response"]
    runs = [p for p in inputs if p.startswith("study/runs/")]
    lines = len(section["levels"]) + len(section["references"]) + len(section["points"])
    assert len(runs) == len(section["protocols"]) * lines * len(spec["seeds"])
    world, seed = section["world"], spec["seeds"][-1]
    assert f"study/runs/{world}_10-1x10_recall_shift0.0_s{seed}/metrics.json" in runs
    dvc_yaml = (Path(__file__).resolve().parents[1] / "study" / "dvc.yaml").read_text()
    assert study.with_dose_inputs(dvc_yaml, inputs) == dvc_yaml, "run `python -m recall.study`"


def test_the_study_stage_refuses_a_section_it_cannot_draw(tmp_path, capsys):
    """A reference left out, a level paired with another level's variant, a pool image missing: each one line, exit 2,
    and no JSON (it is written after the figures)."""
    import yaml

    from recall.commands import script
    from recall.dose_response import study_report
    from recall.errors import UserError

    levels = {0.0: "recall_shift0.0", 1.0: "recall_toy_gan"}
    loaded = _finished_study(tmp_path, levels, ["15-1x5"], [0, 1])
    broken = {**loaded, "spec": {**loaded["spec"], "dose_response": {**loaded["spec"]["dose_response"],
                                                                     "references": {"mib": "mib"}}}}
    with pytest.raises(UserError, match="the references are exactly"):
        study_report(broken, tmp_path)
    swapped = {**loaded, "spec": {**loaded["spec"], "dose_response": {
        **loaded["spec"]["dose_response"], "levels": {0.0: "recall_toy_gan", 1.0: "recall_shift0.0"}}}}
    with pytest.raises(UserError, match="level 0.0 names variant recall_toy_gan, whose pool renders at 1.0"):
        study_report(swapped, tmp_path)
    next((tmp_path / "study" / "chains").glob("*/pools/toy_gan_shift0.0/images/a.png")).unlink()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(loaded["spec"]))
    import os

    os.chdir(tmp_path)
    try:
        assert script("recall.stages.dose_response", ["--study", "spec.yaml", "--out", "out/dose.json"]) == 2
    finally:
        os.chdir(Path(__file__).resolve().parents[1])
    err = capsys.readouterr().err
    assert "no image a of its manifest" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "dose.json").exists()


def test_a_chain_source_names_chains_the_spec_has():
    import yaml

    from recall import study

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "study" / "spec.yaml").read_text())
    sources = spec["chain"]["sources"]
    sources["toy_gan_shift0.0"]["chains"] = ["main"]  # a variant of float_order replays it: its chains lack the pool
    with pytest.raises(ValueError, match="whose chain float_order_s0 has no such pool"):
        study.expand(spec)
    sources["toy_gan_shift0.0"]["chains"] = ["float_order"]
    sources["unused"] = {**sources["toy_gan_shift0.0"], "chains": ["float_ordr"]}  # a typo, read by no variant
    with pytest.raises(ValueError, match=r"no chain \['float_ordr'\]"):
        study.expand(spec)
    spec["chain"]["sources"]["toy_gan_shift0.0"]["chains"] = "float_order"
    with pytest.raises(ValueError, match="chains is a list of chain names"):
        study.expand(spec)
    with pytest.raises(ValueError, match="lack the line"):
        study.with_dose_inputs("stages: {}\n", ["some/input"])
