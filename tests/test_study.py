"""The study pipeline (study/): its spec expands into the tables DVC iterates over, and its report aggregates
finished runs over seeds into the numbers the docs quote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from recall import docs, study
from recall.errors import UserError
from recall.study_report import attribution, contrasts, interactions, study_cells, study_tables, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_study_tables_are_current():
    assert study.main(["--spec", str(ROOT / "study" / "spec.yaml"), "--check"]) == 0, \
        "run `python -m recall.study` after editing study/spec.yaml"


def test_the_study_is_a_dvc_project_of_its_own_that_the_demo_does_not_load():
    """The demo's `dvc repro` parses every dvc.yaml and dvc.lock of its project: the study (hundreds of stages, each
    listing its code closure) is a DVC project of its own, study/.dvc, committing to the top's cache. Each of its
    stages works from study/ (DVC refuses to commit a stage whose working directory lies outside its project) and
    runs its command at the top; every path it names is the top's, as `../<path>`."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as top:
        assert not [s for s in top.index.stages if (ROOT / "study") in Path(s.path).parents]
        assert Path(top.cache.local.path).resolve() == (ROOT / ".dvc" / "cache" / "files" / "md5").resolve()
    with Repo(str(ROOT / "study")) as project:
        assert Path(project.root_dir) == ROOT / "study"
        assert Path(project.cache.local.path).resolve() == (ROOT / ".dvc" / "cache" / "files" / "md5").resolve()
        stages = [s for s in project.index.stages if s.cmd]
        assert {s.name.split("@")[0] for s in stages} == {"pretrain", "standin", "classmap", "pool", "step0", "run",
                                                          "joint", "dose_response", "report"}
        for stage in stages:
            assert Path(stage.wdir) == ROOT / "study" and stage.cmd.startswith("cd .. && python -m recall."), stage
            paths = [d.def_path for d in stage.deps] + [o.def_path for o in stage.outs]
            assert all(p.startswith("../") for p in paths), (stage.name, [p for p in paths if p[:3] != "../"])


def test_an_absolute_dataset_root_is_refused_for_the_study(tmp_path, capsys):
    """The study's stages read `../${dataset.root}` (paths from the top, seen from study/): an absolute root in the
    top's params.yaml is one line, exit 2, nothing written."""
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "spec.yaml").write_text((ROOT / "study" / "spec.yaml").read_text())
    (tmp_path / "params.yaml").write_text("dataset:\n  root: /mnt/voc\n")
    assert study.main(["--spec", str(tmp_path / "study" / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert "dataset.root=/mnt/voc is absolute" in err and "e.g. data/voc" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["spec.yaml"]


SOURCES = {"toy_gan": ["replay.mapping={chain}/toy_gan_mapping.json", "replay.source.seed={seed}"],
           "web": ["replay.source.standin.seed={seed}"]}
SPEC = {"seeds": [0, 1], "protocols": ["15-5", "10-2x5"], "joint": True, "chain": {"sources": SOURCES},
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
    chain = "study/chains/main_s0"
    assert tau["step0"] == "pretrained_10_s0" and tau["pool"] == f"{chain}/pools/toy_gan" and tau["chain"] == "main_s0"
    assert tau["overrides"].split() == [  # the seed's encoder, the study's threads, the variant, the seed's pool
        f"model.pretrained_file={chain}/pretrain/encoder.pth", "train.threads=1", "method=recall", "replay=toy_gan",
        "method.inpaint_threshold=0.5", f"replay.mapping={chain}/toy_gan_mapping.json", "replay.source.seed=0",
        f"replay.pool={chain}/pools/toy_gan"]
    scratch = tables["runs"]["scratch_15-5_mib_s1"]
    assert scratch["overrides"] == "model.pretrained_file=null train.threads=1 method=mib"  # the world's value wins
    assert scratch["pool"] == "conf/replay/none.yaml"
    assert tables["step0"]["scratch_15_s1"]["overrides"] == "model.pretrained_file=null train.threads=1 method=ft"
    assert set(tables["joint"]) == {f"{w}_joint_s{s}" for w in ("pretrained", "scratch") for s in (0, 1)}


def test_every_seed_owns_its_chain_and_a_world_may_have_chains_of_its_own():
    spec = {**SPEC, "worlds": {"pretrained": [], "float_order": {"chain": ["pretrain.threads=1"],
                                                                 "overrides": ["train.threads=2"],
                                                                 "protocols": ["15-5"]}}}
    tables = study.expand(spec)
    assert tables["chains"] == {"main_s0": {"seed": 0, "overrides": ""}, "main_s1": {"seed": 1, "overrides": ""},
                                "float_order_s0": {"seed": 0, "overrides": "pretrain.threads=1"},
                                "float_order_s1": {"seed": 1, "overrides": "pretrain.threads=1"}}
    # a class map only for a source with one, a pool per source and chain, each from the chain's own files
    assert sorted(tables["classmaps"]) == sorted(f"{c}_toy_gan" for c in tables["chains"])
    assert sorted(tables["pools"]) == sorted(f"{c}_{s}" for c in tables["chains"] for s in SOURCES)
    web = tables["pools"]["float_order_s1_web"]
    assert web == {"chain": "float_order_s1", "source": "web", "mapping": "conf/replay/web.yaml",
                   "pool": "study/chains/float_order_s1/pools/web",
                   "overrides": "replay.source.standin.seed=1 replay.pool=study/chains/float_order_s1/pools/web"}
    run = tables["runs"]["float_order_15-5_recall_gan_s1"]
    assert run["chain"] == "float_order_s1" and "train.threads=2" in run["overrides"].split()
    assert "train.threads=1" not in run["overrides"].split()
    with pytest.raises(ValueError, match="replays gan, which the spec's chain.sources lacks"):
        study.expand({**SPEC, "variants": {"noise": ["method=recall", "replay=gan"]}})


def test_a_source_may_be_another_setting_of_a_replay_config_with_a_pool_of_its_own_and_the_same_class_map():
    shifted = {"replay": "toy_gan", "overrides": [*SOURCES["toy_gan"], "replay.source.render_shift=0"]}
    spec = {**SPEC, "worlds": {"pretrained": []}, "chain": {"sources": {**SOURCES, "toy_gan_shift0": shifted}},
            "variants": {"shift0": ["method=recall", "replay=toy_gan_shift0"]}}
    tables = study.expand(spec)
    chain = "study/chains/main_s1"
    assert sorted(tables["classmaps"]) == ["main_s0_toy_gan", "main_s1_toy_gan"]  # one map, made once per chain
    pool = tables["pools"]["main_s1_toy_gan_shift0"]
    assert pool["source"] == "toy_gan" and pool["mapping"] == f"{chain}/toy_gan_mapping.json"
    assert pool["pool"] == f"{chain}/pools/toy_gan_shift0" and "replay.source.render_shift=0" in pool["overrides"]
    run = tables["runs"]["pretrained_15-5_shift0_s1"]
    assert run["pool"] == f"{chain}/pools/toy_gan_shift0"
    assert run["overrides"].split() == [  # the replay config's name, never the source's (Hydra knows no such group)
        f"model.pretrained_file={chain}/pretrain/encoder.pth", "train.threads=1", "method=recall", "replay=toy_gan",
        f"replay.mapping={chain}/toy_gan_mapping.json", "replay.source.seed=1", "replay.source.render_shift=0",
        f"replay.pool={chain}/pools/toy_gan_shift0"]
    orphan = {"replay": "toy_gan", "overrides": ["replay.mapping={chain}/elsewhere.json"]}
    with pytest.raises(ValueError, match="chain source orphan reads the class map .*elsewhere.json, which no source"):
        study.expand({**spec, "chain": {"sources": {**SOURCES, "orphan": orphan}}})
    with pytest.raises(ValueError, match="no source of replay config toy_gan makes"):  # its map would come after it
        study.expand({**spec, "chain": {"sources": {"toy_gan_shift0": shifted, **SOURCES}}})
    with pytest.raises(ValueError, match="chain source bad: a list of overrides, or"):
        study.expand({**spec, "chain": {"sources": {"bad": {"overrides": []}}}})


def _finish(root: Path, key: str, old: float, new: float, all_: float) -> None:
    """A finished run directory with the metrics.json of a 2-step run (old classes a, b; c learnt at step 1)."""
    final = {"step": 1, "miou": {"old_no_bg": old, "new": new, "all": all_, "all_no_bg": all_, "old": old},
             "forgetting": {"background": 0.9, "a": 0.1, "b": 0.3, "c": 0.7}, "iou": {}, "new_classes": ["c"],
             "old_classes": ["a", "b"]}
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
    assert mib["old_no_bg"]["std"] == pytest.approx(0.1 * 2 ** 0.5)  # the sample std (n - 1) over the seeds
    assert mib["hmean"]["values"] == pytest.approx([2 * 0.6 * 0.2 / 0.8, 2 * 0.8 * 0.4 / 1.2])
    assert mib["forgetting_mean"]["mean"] == pytest.approx(0.2)  # over the old classes a, b: not background, not c
    assert mib["all"]["text"] == "0.600 ± 0.141"
    report = {"cells": cells, "tables": study_tables(cells, ["mib"])}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.json").write_text(json.dumps(report))
    page = ("MiB keeps <!-- gen:value docs/results.json cells/default/15-5/mib/old_no_bg/text -->?<!-- /gen --> "
            "of the old classes.\n<!-- gen:table docs/results.json tables/default_15-5 -->\n<!-- /gen -->\n")
    text = docs.rewrite(page, tmp_path)
    shown = re.sub(r"<!--.*?-->", "", text)  # what a reader sees
    assert "MiB keeps 0.700 ± 0.141 of the old classes." in shown
    assert "| mib | 0.700 ± 0.141 | 0.300 ± 0.141 | 0.600 ± 0.141 |" in shown
    assert docs.rewrite(text, tmp_path) == text  # idempotent: a second pass changes nothing
    with pytest.raises(docs.DocsError, match="missing part 'lwf'"):
        docs.rewrite("<!-- gen:value docs/results.json cells/default/15-5/lwf/all/text --><!-- /gen -->", tmp_path)


def test_joint_is_scored_on_each_protocols_classes(tmp_path):
    """The upper bound's row of a protocol: old = that protocol's step-0 classes, new = its later ones."""
    spec = {"seeds": [0], "protocols": ["15-5", "10-2x5"], "joint": True, "variants": {"mib": ["method=mib"]}}
    tables = {"spec": spec, **study.expand(spec)}
    for key in tables["runs"]:
        _finish(tmp_path, key, 0.5, 0.5, 0.5)
    classes = ["background", *(f"c{i}" for i in range(1, 21))]
    iou = {name: (0.9 if i <= 10 else 0.6 if i <= 15 else 0.3) for i, name in enumerate(classes)}
    final = {"miou": {"old_no_bg": 0.6, "new": None, "all": 0.6, "all_no_bg": 0.6, "old": 0.6}, "iou": iou,
             "old_classes": classes[1:], "forgetting": {}}
    path = tmp_path / "study" / "runs" / "default_joint_s0" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"classes": classes, "final": final, "steps": [final]}))
    cells = study_cells(tables, tmp_path)["default"]
    assert cells["15-5"]["joint"]["old_no_bg"]["mean"] == pytest.approx((10 * 0.9 + 5 * 0.6) / 15)
    assert cells["15-5"]["joint"]["new"]["mean"] == pytest.approx(0.3)
    assert cells["10-2x5"]["joint"]["old_no_bg"]["mean"] == pytest.approx(0.9)
    assert cells["10-2x5"]["joint"]["new"]["mean"] == pytest.approx((5 * 0.6 + 5 * 0.3) / 10)
    assert cells["joint"]["joint"]["all"]["mean"] == pytest.approx(0.6)  # as the run reported it


def test_a_world_may_run_on_some_protocols_and_joint_in_some_worlds():
    spec = {**SPEC, "worlds": {"pretrained": [], "scratch": {"overrides": ["model.pretrained_file=null"],
                                                             "protocols": ["15-5"]}}, "joint": ["pretrained"]}
    tables = study.expand(spec)
    assert {(r["world"], r["protocol"]) for r in tables["runs"].values()} == {
        ("pretrained", "15-5"), ("pretrained", "10-2x5"), ("scratch", "15-5")}
    assert tables["runs"]["scratch_15-5_mib_s0"]["overrides"] == "model.pretrained_file=null train.threads=1 method=mib"
    assert set(tables["joint"]) == {"pretrained_joint_s0", "pretrained_joint_s1"}


def test_a_world_may_run_in_a_setting_of_its_own():
    """e.g. the partitioned split on one protocol: its step-0 models, runs and joint runs all carry its setting (the
    stages pass `setting=${item.setting}`), the other worlds keep the spec's."""
    spec = {**SPEC, "worlds": {"pretrained": [], "partitioned": {"setting": "partitioned", "protocols": ["10-2x5"]}}}
    tables = study.expand(spec)
    settings = {(r["world"], r["protocol"], r["setting"]) for r in tables["runs"].values()}
    assert settings == {("pretrained", "15-5", "overlapped"), ("pretrained", "10-2x5", "overlapped"),
                        ("partitioned", "10-2x5", "partitioned")}
    assert {k: v["setting"] for k, v in tables["step0"].items() if k.startswith("partitioned")} == {
        "partitioned_10_s0": "partitioned", "partitioned_10_s1": "partitioned"}  # step-0 models of its own
    assert tables["step0"]["pretrained_10_s0"]["setting"] == "overlapped"
    assert tables["runs"]["partitioned_10-2x5_mib_s1"]["step0"] == "partitioned_10_s1"
    assert "setting" not in tables["runs"]["partitioned_10-2x5_mib_s1"]["overrides"]
    assert {k: v["setting"] for k, v in tables["joint"].items()} == {
        "pretrained_joint_s0": "overlapped", "pretrained_joint_s1": "overlapped",
        "partitioned_joint_s0": "partitioned", "partitioned_joint_s1": "partitioned"}
    # without a setting of its own a world takes the spec's
    other = study.expand({**SPEC, "setting": "disjoint"})
    assert {r["setting"] for table in ("step0", "runs", "joint") for r in other[table].values()} == {"disjoint"}


@pytest.mark.parametrize("world", [["setting=partitioned"], {"overrides": ["model.head_channels=8", "setting=disjoint"]},
                                   {"setting": "partitioned", "overrides": ["+setting=partitioned"]}])
def test_a_setting_override_in_a_world_is_refused(world):
    with pytest.raises(UserError, match=r"^world odd: a setting= override is not allowed \(the study passes each "
                                        r"run's setting from its world\); give the world its setting as a key instead"):
        study.expand({**SPEC, "worlds": {"pretrained": [], "odd": world}})


def test_a_setting_override_in_a_variant_and_an_unknown_world_key_are_refused():
    with pytest.raises(UserError, match=r"^variant part: a setting= override is not allowed .*run it in a world of "
                                        r"that setting"):
        study.expand({**SPEC, "variants": {"part": ["method=mib", "setting=partitioned"]}})
    with pytest.raises(UserError, match=r"^world odd: unknown key\(s\) \['settings'\]; a world is a list of "
                                        r"overrides or a mapping of overrides, protocols, chain, setting$"):
        study.expand({**SPEC, "worlds": {"odd": {"settings": "partitioned"}}})


def _cells(values: dict[str, list[float]]) -> dict:
    """Cells of one world and protocol: variant -> old_no_bg over seeds 0, 1, 2 (as study_cells makes them)."""
    from recall.study_report import mean_std

    return {"w": {"p": {name: {"seeds": [0, 1, 2], "old_no_bg": mean_std(v)} for name, v in values.items()}}}


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


def test_an_attribution_share_never_crosses_worlds():
    cells = _cells({"recall": [0.40, 0.50, 0.60], "mib": [0.60, 0.70, 0.80]})
    with pytest.raises(ValueError, match=r"\['wide:recall'\] come from another world.*interactions"):
        attribution(cells, {"world": "w", "protocol": "p", "from": "recall", "to": "mib", "variants": ["wide:recall"]})


def test_an_interaction_is_the_difference_of_two_gains_per_seed():
    cells = _cells({"recall": [0.40, 0.50, 0.60], "mib": [0.60, 0.70, 0.80]})
    cells["wide"] = _cells({"recall": [0.50, 0.62, 0.71], "mib": [0.62, 0.71, 0.83]})["w"]  # the same seeds
    table = interactions(cells, [{"base": "w", "world": "wide", "protocol": "p", "variants": ["recall", "mib"]}])
    entry = table["values"]["recall vs mib in wide"]["old_no_bg"]
    assert entry["gain_a"]["values"] == pytest.approx([0.10, 0.12, 0.11])
    assert entry["gain_b"]["values"] == pytest.approx([0.02, 0.01, 0.03])
    assert entry["interaction"]["values"] == pytest.approx([0.08, 0.11, 0.08])
    assert entry["verdict"] == "recall gains more from wide"


def test_a_difference_is_called_only_when_every_seed_agrees_and_the_mean_exceeds_the_spread():
    assert verdict("a", "b", [0.2, 0.2, 0.2]) == "a higher"
    assert verdict("a", "b", [-0.1, -0.12, -0.08]) == "b higher"
    assert verdict("a", "b", [0.3, 0.3, -0.01]) == "no difference"  # one seed disagrees
    assert verdict("a", "b", [0.01, 0.3, 0.02]) == "no difference"  # same sign, mean 0.11 < sample std 0.16
    assert verdict("a", "b", [0.5]) == "no difference"  # one seed is no spread
    cells = _cells({"gan": [0.60, 0.62, 0.64], "none": [0.40, 0.42, 0.44], "noise": [0.58, 0.63, 0.66]})
    table = contrasts(cells, [{"world": "w", "protocol": "p", "metric": "old_no_bg",
                               "pairs": [["gan", "none"], ["gan", "noise"], ["none", "gan"]]}])
    verdicts = {(row[3], row[4]): row[-1] for row in table["rows"]}
    assert verdicts == {("gan", "none"): "gan higher", ("gan", "noise"): "no difference",
                        ("none", "gan"): "gan higher"}
    assert table["rows"][0][7] == "+0.200 / +0.200 / +0.200"  # paired by seed
    assert table["calls"]["w"]["p"]["old_no_bg"]["gan_vs_noise"]["difference"]["values"] == pytest.approx(
        [0.02, -0.01, -0.02])


def test_every_study_run_names_its_head_so_the_default_head_never_changes_what_the_study_ran():
    """The default head (conf/model/toy.yaml) is the demo's; the study's locked numbers were made with the toy ASPP
    head, so every step-0 model, run and joint run of study/params.yaml sets model.head=aspp itself."""
    tables = yaml.safe_load((ROOT / "study" / "params.yaml").read_text())
    entries = [(table, name, entry) for table in ("step0", "runs", "joint") for name, entry in tables[table].items()]
    assert len(entries) > 100
    heads = {(table, name): [o for o in entry["overrides"].split() if o.startswith("model.head=")]
             for table, name, entry in entries}
    assert {key: head for key, head in heads.items() if head != ["model.head=aspp"]} == {}
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["head"] == "deeplabv2"


def test_every_benchmark_process_that_builds_the_model_names_its_head():
    """A benchmark's `recall.stages.run` or `recall.stages.select` reading params.yaml builds the segmentation model,
    so its command names the head (regime.STUDY_HEAD, or model.head=): a step-0 checkpoint of the study's ASPP head
    does not load into the default DeepLab-v2 model, and a quoted number must not move with the default."""
    unpinned = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        for match in re.finditer(r'"recall\.stages\.(run|select)"', text):
            call = text[match.start():text.find(")", text.find("stderr=", match.start()))]
            if "STUDY_HEAD" not in call and "model.head=" not in call:
                unpinned.append(f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}")
    assert unpinned == []


def test_the_study_pipeline_runs_every_table_entry():
    stages = yaml.safe_load((ROOT / "study" / "dvc.yaml").read_text())["stages"]
    tables = {"pretrain": "chains", "standin": "chains", "classmap": "classmaps", "pool": "pools", "step0": "step0",
              "run": "runs", "joint": "joint"}
    assert {name: stages[name]["foreach"] for name in tables} == {k: f"${{{v}}}" for k, v in tables.items()}
    assert all("on_config_change=restart" in " ".join(stages[n]["do"]["cmd"].split()) for n in ("step0", "run", "joint"))


def test_label_tables_average_the_runs_own_label_quality_over_seeds(tmp_path):
    from recall.study_report import label_tables

    spec = {"seeds": [0, 1], "protocols": ["15-1x5"], "variants": {"gan": ["method=recall", "replay=toy_gan"]},
            "chain": {"sources": SOURCES}}
    tables = {"spec": spec, **study.expand(spec)}
    for seed, (iou, empty) in enumerate(((0.2, 0.5), (0.4, 0.3))):
        _finish(tmp_path, f"default_15-1x5_gan_s{seed}", 0.5, 0.5, 0.5)
        path = tmp_path / "study" / "runs" / f"default_15-1x5_gan_s{seed}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["final"]["statistics"] = {"replay/pool_images": 60.0, "replay_labels/iou/aeroplane": iou,
                                          "replay_labels/empty/aeroplane": empty, "replay_labels/iou_step0_classes": iou,
                                          "replay_labels/empty_step0_classes": empty}
        path.write_text(json.dumps(metrics))
    labels = label_tables(tables, tmp_path)
    assert labels["tables"]["default_15-1x5_gan"]["rows"] == [["aeroplane", "0.300 ± 0.141", "0.400 ± 0.141", 2]]
    assert labels["cells"]["default"]["15-1x5"]["gan"]["iou_step0_classes"]["values"] == [0.2, 0.4]
    assert labels["cells"]["default"]["15-1x5"]["gan"]["iou_later_classes"] is None  # no later class replayed
    assert labels["tables"]["summary"]["rows"][0][:5] == ["default", "15-1x5", "gan", "0.300 ± 0.141",
                                                          "0.400 ± 0.141"]


def test_the_step0_table_groups_the_step0_models_by_world_and_base(tmp_path):
    import json

    from recall.study_report import step0_table

    values = {"pretrained_15_s0": 0.6, "pretrained_15_s1": 0.8, "wide_decoder_15_s0": 0.7, "pretrained_10_s0": 0.5}
    for key, value in values.items():
        (tmp_path / "study" / "step0" / key).mkdir(parents=True)
        (tmp_path / "study" / "step0" / key / "metrics.json").write_text(
            json.dumps({"final": {"miou": {"old_no_bg": value, "all": value + 0.1}}}))
    study = {"step0": {key: {"protocol": "10-2x5" if "_10_" in key else "15-5"} for key in values},
             "runs": {f"run_{key}": {"step0": key, "world": key.rsplit("_", 2)[0]} for key in values}}
    table = step0_table(study, tmp_path)
    assert table["rows"] == [["pretrained", 15, "0.700 ± 0.141", "0.800 ± 0.141", 2],
                             ["wide_decoder", 15, "0.700", "0.800", 1], ["pretrained", 10, "0.500", "0.600", 1]]


def test_the_chains_table_names_each_class_another_float_order_maps_differently_and_how_near_a_tie_it_was(tmp_path):
    from recall.study_report import chains_table

    picks = {"main_s0": {"1": (32, 0.30, 0.10), "2": (79, 0.094, 0.092)},
             "float_order_s0": {"1": (32, 0.31, 0.09), "2": (12, 0.097, 0.090)}}
    kinds = {32: "lookalike", 79: "other", 12: "lookalike"}
    for chain, mapping in picks.items():
        directory = tmp_path / "study" / "chains" / chain
        (directory / "pretrain").mkdir(parents=True)
        (directory / "pretrain" / "metrics.json").write_text(json.dumps({"top1": 0.7, "top5": 0.9}))
        (directory / "toy_gan_mapping.json").write_text(json.dumps({c: {
            "name": f"class{c}", "source_class": s, "source_name": f"src{s}",
            "top_k": [[s, f"src{s}", top], [5, "src5", second]]} for c, (s, top, second) in mapping.items()}))
        truth = {"correct": sum(kinds[s] == "lookalike" for s, _, _ in mapping.values()), "classes": 2,
                 "per_class": {c: {"source": f"src{s}", "kind": kinds[s]} for c, (s, _, _) in mapping.items()}}
        (directory / "toy_gan_mapping_check.json").write_text(json.dumps({"classes": 2, "shared": {},
                                                                            "truth": truth}))
    made = {"chains": {"main_s0": {"seed": 0}, "float_order_s0": {"seed": 0}},
            "classmaps": {f"{c}_toy_gan": {"chain": c, "source": "toy_gan"} for c in picks}}
    table = chains_table(made, tmp_path)
    assert table["summary"]["same_map_in_other_float_order"] == {"float_order": {"toy_gan": {0: False}}}
    assert table["summary"]["classes_mapped_differently"] == 1
    assert table["summary"]["largest_margin_of_a_differing_class"] == pytest.approx(0.002)  # the nearer tie
    assert table["differing"]["rows"] == [["float_order", 0, "toy_gan", "class2", "src79 (other)", "0.0020",
                                           "src12 (lookalike)", "0.0070"]]
    assert table["summary"]["toy_gan_correct"] == [1, 2]


def test_a_verdict_repeated_in_another_world_is_compared_with_the_base_worlds():
    from recall.study_report import verdicts_across_worlds

    call = lambda verdict: {"difference": {}, "verdict": verdict}  # noqa: E731
    calls = {"pretrained": {"15-1x5": {"old_no_bg": {"a_vs_b": call("a higher"), "a_vs_c": call("no difference")}}},
             "float_order": {"15-1x5": {"old_no_bg": {"a_vs_b": call("a higher"), "a_vs_c": call("a higher")}}},
             "scratch": {"15-1x5": {"new": {"a_vs_b": call("a higher")}}}}  # not in the base world: not compared
    table = verdicts_across_worlds(calls)
    assert table["same"] == {"float_order": 1} and table["of"] == {"float_order": 2}
    assert table["rows"] == [["float_order", "15-1x5", "old_no_bg", "a vs b", "a higher", "a higher", "yes"],
                             ["float_order", "15-1x5", "old_no_bg", "a vs c", "no difference", "a higher", "no"]]


@pytest.mark.parametrize("text, message", [
    ("seeds: [0\n", "while parsing"),
    ("[1, 2]\n", "not a mapping"),
    ("seeds: [0]\nprotocols: [15-5]\n", "missing key 'variants'"),
    ("seeds: [0]\nprotocols: [15-5]\nvariants: {a: [method=mib]}\nchain: {sources: {toy_gan: {replay: 1}}}\n",
     "chain source toy_gan"),
])
def test_a_broken_spec_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert study.main(["--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(spec) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "params.yaml").exists()
