"""The study pipeline (study/): its spec expands into the tables DVC iterates over, and its report aggregates
finished runs over seeds into the numbers the docs quote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from recall import docs, study
from recall.report import attribution, contrasts, study_cells, study_tables

ROOT = Path(__file__).resolve().parents[1]


def test_study_tables_are_current():
    assert study.main(["--spec", str(ROOT / "study" / "spec.yaml"), "--check"]) == 0, \
        "run `python -m recall.study` after editing study/spec.yaml"


SPEC = {"seeds": [0, 1], "protocols": ["15-5", "10-2x5"], "joint": True,
        "worlds": {"pretrained": [], "scratch": ["model.pretrained_file=null"]},
        "variants": {"mib": ["method=mib"], "recall_gan": ["method=recall", "replay=toy_gan"],
                     "tau": {"overrides": ["method=recall", "replay=toy_gan", "method.inpaint_threshold=0.5"],
                             "protocols": ["10-2x5"], "seeds": [0], "worlds": ["pretrained"]}}}


def test_expand_makes_one_step0_per_world_base_and_seed_and_one_run_per_cell():
    tables = study.expand(SPEC)
    assert sorted(tables["step0"]) == sorted(f"{w}_{b}_s{s}" for w in ("pretrained", "scratch") for b in (15, 10)
                                             for s in (0, 1))
    assert len(tables["runs"]) == 2 * 2 * 2 * 2 + 1  # worlds x protocols x seeds x (mib, recall_gan) + one tau run
    tau = tables["runs"]["pretrained_10-2x5_tau_s0"]
    assert tau["step0"] == "pretrained_10_s0" and tau["pool"] == "pools/toy_gan"
    assert tau["overrides"] == "method=recall replay=toy_gan method.inpaint_threshold=0.5"
    scratch = tables["runs"]["scratch_15-5_mib_s1"]
    assert scratch["overrides"] == "method=mib model.pretrained_file=null" and scratch["pool"] == "conf/replay/none.yaml"
    assert tables["step0"]["scratch_15_s1"]["overrides"] == "model.pretrained_file=null"
    assert set(tables["joint"]) == {f"{w}_joint_s{s}" for w in ("pretrained", "scratch") for s in (0, 1)}


def _finish(root: Path, key: str, old: float, new: float, all_: float) -> None:
    """A finished run directory with the metrics.json of a 2-step run."""
    final = {"step": 1, "miou": {"old_no_bg": old, "new": new, "all": all_, "all_no_bg": all_, "old": old},
             "forgetting": {"a": 0.1, "b": 0.3}, "iou": {}, "new_classes": ["b"]}
    path = root / "study" / "runs" / key / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"final": final, "steps": [final]}))


def test_report_aggregates_seeds_and_the_docs_quote_it(tmp_path):
    spec = {"seeds": [0, 1], "protocols": ["15-5"], "variants": {"mib": ["method=mib"]}}
    tables = {"spec": spec, **study.expand(spec)}
    with pytest.raises(FileNotFoundError, match="2 study runs are not finished"):
        study_cells(tables, tmp_path)
    _finish(tmp_path, "default_15-5_mib_s0", 0.6, 0.2, 0.5)
    _finish(tmp_path, "default_15-5_mib_s1", 0.8, 0.4, 0.7)
    cells = study_cells(tables, tmp_path)
    mib = cells["default"]["15-5"]["mib"]
    assert mib["seeds"] == [0, 1] and mib["old_no_bg"]["mean"] == pytest.approx(0.7)
    assert mib["old_no_bg"]["std"] == pytest.approx(0.1)  # population std over the seeds
    assert mib["hmean"]["values"] == pytest.approx([2 * 0.6 * 0.2 / 0.8, 2 * 0.8 * 0.4 / 1.2])
    assert mib["forgetting_mean"]["mean"] == pytest.approx(0.2)
    assert mib["all"]["text"] == "0.600 ± 0.100"
    report = {"cells": cells, "tables": study_tables(cells, ["mib"])}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.json").write_text(json.dumps(report))
    page = ("MiB keeps <!-- gen:value docs/results.json cells/default/15-5/mib/old_no_bg/text -->?<!-- /gen --> "
            "of the old classes.\n<!-- gen:table docs/results.json tables/default_15-5 -->\n<!-- /gen -->\n")
    text = docs.rewrite(page, tmp_path)
    shown = re.sub(r"<!--.*?-->", "", text)  # what a reader sees
    assert "MiB keeps 0.700 ± 0.100 of the old classes." in shown
    assert "| mib | 0.700 ± 0.100 | 0.300 ± 0.100 | 0.600 ± 0.100 |" in shown
    assert docs.rewrite(text, tmp_path) == text  # idempotent: a second pass changes nothing
    with pytest.raises(docs.DocsError, match="missing part 'lwf'"):
        docs.rewrite("<!-- gen:value docs/results.json cells/default/15-5/lwf/all/text --><!-- /gen -->", tmp_path)


def test_a_world_may_run_on_some_protocols_and_joint_in_some_worlds():
    spec = {**SPEC, "worlds": {"pretrained": [], "scratch": {"overrides": ["model.pretrained_file=null"],
                                                             "protocols": ["15-5"]}}, "joint": ["pretrained"]}
    tables = study.expand(spec)
    assert {(r["world"], r["protocol"]) for r in tables["runs"].values()} == {
        ("pretrained", "15-5"), ("pretrained", "10-2x5"), ("scratch", "15-5")}
    assert tables["runs"]["scratch_15-5_mib_s0"]["overrides"] == "method=mib model.pretrained_file=null"
    assert set(tables["joint"]) == {"pretrained_joint_s0", "pretrained_joint_s1"}


def _cells(values: dict[str, list[float]]) -> dict:
    """Cells of one world and protocol: variant -> old_no_bg over seeds 0, 1, 2 (as study_cells makes them)."""
    def stat(v):
        mean = sum(v) / len(v)
        std = (sum((x - mean) ** 2 for x in v) / len(v)) ** 0.5
        return {"mean": mean, "std": std, "values": v, "text": f"{mean:.3f} ± {std:.3f}"}
    return {"w": {"p": {name: {"seeds": [0, 1, 2], "old_no_bg": stat(v)} for name, v in values.items()}}}


def test_attribution_is_the_per_seed_share_of_the_gap_each_variant_closes():
    cells = _cells({"recall": [0.40, 0.50, 0.60], "mib": [0.60, 0.70, 0.80],  # gap 0.2 in every seed
                    "oracle": [0.50, 0.60, 0.70], "worse": [0.30, 0.50, 0.60], "same": [0.40, 0.50, 0.60]})
    table = attribution(cells, {"world": "w", "protocol": "p", "from": "recall", "to": "mib",
                                "variants": ["oracle", "worse", "same"]})
    rows = {row[0]: row for row in table["rows"]}
    assert table["columns"][1:3] == ["old (no bg) (mIoU)", "old (no bg) (share)"]
    share = 2
    assert rows["oracle"][share] == "0.500 ± 0.000"  # half the gap in every seed
    assert rows["worse"][share].startswith("-0.167")  # -0.5, 0, 0: the mean of the per-seed shares
    assert rows["same"][share] == "0.000 ± 0.000"
    assert rows["gap: mib - recall"][1] == "0.200 ± 0.000"
    assert table["shares"]["oracle"]["old_no_bg"]["values"] == pytest.approx([0.5, 0.5, 0.5])
    assert table["gap"]["old_no_bg"]["text"] == "0.200 ± 0.000"


def test_an_attribution_variant_may_come_from_another_world():
    cells = _cells({"recall": [0.40, 0.50, 0.60], "mib": [0.60, 0.70, 0.80]})
    cells["wide"] = _cells({"recall": [0.60, 0.70, 0.80]})["w"]  # the same seeds, its own step-0 models
    table = attribution(cells, {"world": "w", "protocol": "p", "from": "recall", "to": "mib",
                                "variants": ["wide:recall", "missing:recall"]})
    rows = {row[0]: row for row in table["rows"]}
    assert rows["wide:recall"][1:3] == ["0.700 ± 0.082", "1.000 ± 0.000"]  # closes the whole gap in every seed
    assert rows["missing:recall"][1:3] == [None, None]


def test_a_contrast_is_called_only_beyond_the_spread():
    cells = _cells({"gan": [0.60, 0.62, 0.64], "none": [0.40, 0.42, 0.44], "noise": [0.58, 0.63, 0.66]})
    table = contrasts(cells, [{"world": "w", "protocol": "p", "metric": "old_no_bg",
                               "pairs": [["gan", "none"], ["gan", "noise"], ["none", "gan"]]}])
    verdicts = {(row[3], row[4]): row[-1] for row in table["rows"]}
    assert verdicts == {("gan", "none"): "gan higher", ("gan", "noise"): "no difference beyond the spread",
                        ("none", "gan"): "gan higher"}
    assert table["rows"][0][7] == "+0.200 / +0.200 / +0.200"  # paired by seed


def test_the_study_pipeline_runs_every_table_entry():
    stages = yaml.safe_load((ROOT / "study" / "dvc.yaml").read_text())["stages"]
    assert {stages[name]["foreach"] for name in ("step0", "run", "joint")} == {"${step0}", "${runs}", "${joint}"}
    assert all("on_config_change=restart" in " ".join(stages[n]["do"]["cmd"].split()) for n in ("step0", "run", "joint"))


def test_label_quality_summary_averages_step0_and_later_classes_per_seed():
    from recall.sim.label_quality import class_means

    seed0 = {"aeroplane": {"iou": 0.2, "empty": 0.5}, "bicycle": {"iou": 0.4, "empty": 0.1},  # VOC 1, 2: step 0
             "bird": {"iou": 0.0, "empty": 1.0}}                                              # VOC 3: later
    seed1 = {"aeroplane": {"iou": 0.4, "empty": 0.3}, "bicycle": {"iou": 0.6, "empty": 0.1},
             "bird": {"iou": 0.2, "empty": 0.6}}
    iou_old, empty_old, iou_later, empty_later = class_means([seed0, seed1], base=2)
    assert iou_old == "0.400 ± 0.100"        # per seed 0.3 and 0.5
    assert empty_old == "0.250 ± 0.050"      # 0.3 and 0.2
    assert (iou_later, empty_later) == ("0.100 ± 0.100", "0.800 ± 0.200")
    assert class_means([seed0], base=3)[2:] == [None, None]  # no class learnt later


def test_the_step0_table_groups_the_step0_models_by_world_and_base(tmp_path):
    import json

    from recall.report import step0_table

    values = {"pretrained_15_s0": 0.6, "pretrained_15_s1": 0.8, "wide_decoder_15_s0": 0.7, "pretrained_10_s0": 0.5}
    for key, value in values.items():
        (tmp_path / "study" / "step0" / key).mkdir(parents=True)
        (tmp_path / "study" / "step0" / key / "metrics.json").write_text(
            json.dumps({"final": {"miou": {"old_no_bg": value, "all": value + 0.1}}}))
    study = {"step0": {key: {"protocol": "10-2x5" if "_10_" in key else "15-5"} for key in values},
             "runs": {f"run_{key}": {"step0": key, "world": key.rsplit("_", 2)[0]} for key in values}}
    table = step0_table(study, tmp_path)
    assert table["rows"] == [["pretrained", 15, "0.700 ± 0.100", "0.800 ± 0.100", 2],
                             ["wide_decoder", 15, "0.700", "0.800", 1], ["pretrained", 10, "0.500", "0.600", 1]]
