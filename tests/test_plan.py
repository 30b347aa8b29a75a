"""`recall run --dry-run`: the paper profiles compose to the paper's numbers, and the plan tells the truth about
steps, images, iterations, replay, checkpoints and compute, without writing anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from recall.cli import main
from recall.config import compose, default_params
from recall.data.classes import VOC_CLASSES
from recall.data.datasets.ade20k import ADE20K_CLASSES
from recall.data.protocol import select_train_images, steps
from recall.data.voc import image_classes, read_split
from recall.experiment import ProtocolRun, check_same_config
from recall.plan import PlanConfig, build_plan, estimate, format_plan, hours
from recall.sim.toyworld import generate

PAPER_VOC = ["experiment=paper_voc", "protocol=15-1x5", "method=recall", "replay=gan"]
RANDOM_INIT = "model.pretrained_file=null"  # on purpose: the profile asks for ImageNet weights


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan") / "toy"
    generate(root, n_train=120, n_val=24, size=32, progress=False)
    return root


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------------------- the paper profiles

def test_paper_voc_composes_to_the_papers_setting():
    cfg = compose(PAPER_VOC)
    assert (cfg.dataset.name, cfg.dataset.train_split, cfg.dataset.val_split) == ("voc", "train_aug", "val")
    assert (cfg.model.backbone, cfg.model.output_stride, cfg.model.frozen_bn) == ("resnet101", 8, True)
    t = cfg.train
    assert (t.batch_size, t.crop, list(t.scale), t.eval_batch_size) == (4, 321, [0.5, 1.5], 1)
    assert (t.momentum, t.weight_decay, t.poly_power) == (0.9, 1e-4, 0.9)
    # RECALL's gins: 1500 iterations per class learnt in the overlapped setting, 1000 in disjoint and sequential (and
    # ours in partitioned, which like disjoint trains each image once)
    assert dict(t.iters_per_class) == {"overlapped": 1500, "disjoint": 1000, "sequential": 1000, "partitioned": 1000}
    assert (t.lr, t.lr_incremental, t.lr_end) == (5e-4, 5e-4, 5e-6)  # 5e-4 -> 5e-6 within every step
    assert cfg.replay.per_class == 500 and cfg.replay.pool == "pools/paper_voc/gan"
    assert compose(["experiment=paper_voc", "replay=web"]).replay.per_class == 1000
    # only the paper's sources get the paper's budget; a toy source keeps its own, no source gets a stray key
    assert compose(["experiment=paper_voc", "replay=toy_gan"]).replay.per_class == 60
    assert "per_class" not in compose(["experiment=paper_voc"]).replay


def test_paper_voc_plan_15_1x5(tmp_path):
    """15-1x5 overlapped: steps 0..5, 15 then 1 class each, 1500 iterations per class, 4 images per iteration."""
    plan = build_plan(compose([*PAPER_VOC[:2], "method=ft", f"dataset.root={tmp_path / 'voc'}",
                               f"run_dir={tmp_path / 'run'}", RANDOM_INIT]))
    assert [len(s["classes"]) for s in plan["steps"]] == [15, 1, 1, 1, 1, 1]
    assert plan["steps"][0]["classes"] == list(VOC_CLASSES[1:16])
    assert [s["iterations"] for s in plan["steps"]] == [22500, 1500, 1500, 1500, 1500, 1500]
    assert {sum(s["batch"]) for s in plan["steps"]} == {4}
    assert [s["lr"] for s in plan["steps"]] == [5e-4] * 6
    # RECALL: 2 current + 2 replay images per iteration, a helper decoder for steps 1..4, 500 images x 19 classes
    recall = build_plan(compose([*PAPER_VOC, f"dataset.root={tmp_path / 'voc'}", f"run_dir={tmp_path / 'run'}",
                                 RANDOM_INIT]))
    assert [s["batch"] for s in recall["steps"][1:]] == [[2, 2]] * 5
    assert [s.get("extra_training", {}).get("iterations") for s in recall["steps"]] == [None, 1000, 1000, 1000, 1000, None]
    assert {s["extra_training"]["what"] for s in recall["steps"] if "extra_training" in s} == {"helper decoder"}
    pool = recall["method_inputs"]["replay"]
    assert (pool["per_class"], pool["old_classes"], pool["needed"]) == (500, 19, 9500)
    assert recall["estimate"]["method_eval_images"] == 9500


def test_paper_profile_survives_params_yaml(tmp_path):
    """With --params (DVC stages), params.yaml replaces the sections no group chose; a profile's sections stay."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(default_params()))
    cfg = compose(PAPER_VOC, params_file=path)
    assert (cfg.dataset.name, cfg.train.batch_size, cfg.model.backbone, cfg.replay.per_class) == ("voc", 4, "resnet101", 500)
    assert cfg.plan.device == compose(PAPER_VOC).plan.device


@pytest.mark.parametrize("protocol,name,sizes", [("100-50", "100-50", [100, 50]),
                                                 ("100-10", "100-10x5", [100, 10, 10, 10, 10, 10]),
                                                 ("50-50", "50-50x2", [50, 50, 50])])
def test_paper_ade_protocols(tmp_path, protocol, name, sizes):
    cfg = compose(["experiment=paper_ade", f"protocol={protocol}", "method=mib", f"dataset.root={tmp_path / 'ade'}",
                   RANDOM_INIT])
    assert (cfg.dataset.name, cfg.dataset.num_classes, cfg.protocol.name) == ("ade20k", 150, name)
    t = cfg.train  # MiB's ADE20K recipe
    assert (t.batch_size, t.crop, t.epochs, t.epochs_incremental, t.lr, t.lr_incremental) == (24, 512, 60, 60, 0.01, 0.001)
    assert (t.iters_per_class, cfg.model.backbone, cfg.model.output_stride) == (None, "resnet101", 16)
    plan = build_plan(cfg)
    assert [len(s["classes"]) for s in plan["steps"]] == sizes
    assert plan["steps"][1]["classes"][0] == ADE20K_CLASSES[sizes[0] + 1]
    # epochs x batches: unknown until the dataset is there, and the estimate says so
    assert all(s["iterations"] is None for s in plan["steps"]) and not plan["dataset"]["prepared"]
    assert "recall data prepare ade20k" in format_plan(plan) and "unknown until the dataset is prepared" in format_plan(plan)


def test_default_composition_has_no_experiment():
    assert compose().dataset.name == "toy" and compose().plan.device == "2 CPU cores"


# ----------------------------------------------------------------------------------------- the toy world

@pytest.mark.parametrize("method,extra", [("recall", ["replay=toy_gan"]), ("ft", []), ("joint", [])])
def test_toy_plan_counts_what_the_run_would_train(toy, tmp_path, method, extra):
    cfg = compose([f"dataset.root={toy}", "protocol=15-1x5", f"method={method}", f"run_dir={tmp_path / 'run'}", *extra])
    before = listing(tmp_path)
    plan = build_plan(cfg)
    assert listing(tmp_path) == before  # no cache, no run directory
    classes = image_classes(toy, read_split(toy, "train"), progress=False)
    task = steps("15-1x5")
    expected = [len(select_train_images(classes, task, t, "overlapped")) for t in range(len(task))]
    if method != "joint":
        assert [s["images"] for s in plan["steps"]] == expected
    assert plan["dataset"]["splits"] == {"train": 120, "val": 24}
    assert all(s["eval_images"] == 24 for s in plan["steps"])  # RECALL's convention scores the whole val set
    # the iterations are the real DataLoader's length x epochs (the run's own loader, in another directory)
    run = ProtocolRun(compose([f"dataset.root={toy}", "protocol=15-1x5", f"method={method}",
                               f"run_dir={tmp_path / 'real'}", *extra]))
    for s in plan["steps"]:
        n_current = run.method.stream(run).split(s["step"], run.train_cfg.batch_size)[0]
        loader = run.train_loader(s["step"], torch.Generator(), batch_size=n_current)
        epochs = run.train_cfg.epochs if s["step"] == 0 else run.train_cfg.epochs_incremental
        assert (s["images"], s["iterations"]) == (len(loader.dataset), len(loader) * epochs)
        if "extra_training" in s:  # RECALL's helper decoder: full batches of the step's images
            assert s["extra_training"]["iterations"] == len(run.train_loader(s["step"], torch.Generator())) * epochs


def test_toy_plan_with_iters_per_class(toy, tmp_path):
    plan = build_plan(compose([f"dataset.root={toy}", "protocol=10-5-5", "train.iters_per_class=7",
                               f"run_dir={tmp_path}"]))
    assert [s["iterations"] for s in plan["steps"]] == [70, 35, 35]


def test_existing_run_dir_is_resumed_and_counted_as_done(toy, tmp_path):
    cfg = compose([f"dataset.root={toy}", "protocol=15-5", "method=ft", f"run_dir={tmp_path / 'run'}"])
    run = ProtocolRun(cfg)
    check_same_config(run.run_dir / "steps" / "config.yaml", ProtocolRun(cfg))  # what a started run writes first
    run.step_dir(0).mkdir(parents=True)
    (run.step_dir(0) / "model.pt").write_bytes(b"")
    (run.step_dir(0) / "eval.json").write_text("{}")
    before = listing(tmp_path)
    plan = build_plan(cfg)
    assert listing(tmp_path) == before
    assert [s["state"] for s in plan["steps"]] == ["done", "train"]
    assert plan["checkpoints"]["run_dir"]["finished"] == [0]
    assert plan["checkpoints"]["run_dir"]["resume"].startswith("same configuration")
    step1 = plan["steps"][1]
    assert plan["estimate"]["train_images"] == step1["iterations"] * 16  # step 0 is not counted again
    assert plan["estimate"]["eval_images"] == 24
    changed = build_plan(compose([f"dataset.root={toy}", "protocol=15-5", "method=ft", "train.lr=0.5",
                                  f"run_dir={tmp_path / 'run'}"]))
    assert changed["checkpoints"]["run_dir"]["resume"].startswith("REFUSED")
    # what a DVC stage's command does (on_config_change=restart): the plan says so, and moves nothing
    before = listing(tmp_path)
    restart = build_plan(compose([f"dataset.root={toy}", "protocol=15-5", "method=ft", "train.lr=0.5",
                                  "on_config_change=restart", f"run_dir={tmp_path / 'run'}"]))
    assert listing(tmp_path) == before
    assert restart["checkpoints"]["run_dir"]["resume"].startswith("RESTARTS: differs in train")
    assert [s["state"] for s in restart["steps"]] == ["train", "train"]


def test_a_finished_step_is_planned_as_it_ran(toy, tmp_path):
    """A step trained (or adopted) already shows the facts its run recorded (steps/<t>/plan.json), not what this
    configuration would train now; the fields it did not record (eval_images before its evaluation) are planned."""
    cfg = compose([f"dataset.root={toy}", "protocol=15-5", "method=ft", f"run_dir={tmp_path / 'run'}"])
    run = ProtocolRun(cfg)
    check_same_config(run.run_dir / "steps" / "config.yaml", ProtocolRun(cfg))
    run.step_dir(0).mkdir(parents=True)
    (run.step_dir(0) / "model.pt").write_bytes(b"")
    recorded = {"step": 0, "classes": ["x"], "state": "adopt step0", "images": 7, "batch": [3, 0], "iterations": 5,
                "lr": 0.5}
    (run.step_dir(0) / "plan.json").write_text(json.dumps(recorded))
    step0 = build_plan(cfg)["steps"][0]
    assert step0 == {**recorded, "state": "evaluate", "eval_images": 24}


def test_step0_checkpoint_is_checked(toy, tmp_path):
    shared = ProtocolRun(compose([f"dataset.root={toy}", "protocol=15-5", f"run_dir={tmp_path / 'step0'}"]))
    shared.step_dir(0).mkdir(parents=True)
    torch.save({"meta": shared.meta(0)}, shared.step_dir(0) / "model.pt")
    fits = build_plan(compose([f"dataset.root={toy}", "protocol=15-1x5", "method=mib", f"step0={tmp_path / 'step0'}",
                               f"run_dir={tmp_path / 'run'}"]))
    assert fits["checkpoints"]["step0"] == {"dir": str(tmp_path / "step0"), "exists": True, "mismatch": []}
    assert fits["steps"][0]["state"] == "adopt step0"
    other = build_plan(compose([f"dataset.root={toy}", "protocol=15-5", "setting=disjoint", "method=mib",
                                f"step0={tmp_path / 'step0'}", f"run_dir={tmp_path / 'run'}"]))
    assert other["checkpoints"]["step0"]["mismatch"] == ["setting: 'overlapped' (needs 'disjoint')"]


# ----------------------------------------------------------------------------------------- the command

def test_dry_run_through_the_cli_writes_nothing(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.symlink(toy, tmp_path / "toy")
    before = listing(tmp_path)
    assert main(["run", "--dry-run", "dataset.root=toy", "protocol=15-1x5", "method=recall", "replay=toy_gan"]) == 0
    text = capsys.readouterr().out
    assert listing(tmp_path) == before
    assert "nothing is trained or written" in text and "pottedplant" in text
    assert "toy_gan pool pools/toy_gan: needs 60 per class x 19 old classes = 1,140 images; not built yet" in text
    assert "batch norm, DeepLab-v2 classifiers, rates [2, 4, 6], backbone weights" in " ".join(text.split())
    assert main(["run", "--dry-run", "--json", "dataset.root=toy", "protocol=19-1", "model.head=aspp"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [len(s["classes"]) for s in plan["steps"]] == [19, 1] and plan["model"]["head"] == "aspp"
    assert main(["run", "--dry-run", "dataset.root=toy", "protocol=19-1", "model.head=aspp"]) == 0
    assert "ASPP head, rates [2, 4, 6] x 64 channels, 1x1 classifiers" in " ".join(capsys.readouterr().out.split())
    assert listing(tmp_path) == before


def test_dry_run_against_a_missing_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dry-run", "dataset.root=nowhere", "protocol=15-5"]) == 0
    text = capsys.readouterr().out
    assert "toy at nowhere: NOT PREPARED" in text and "recall toyworld nowhere" in text
    assert main(["run", "--dry-run", *PAPER_VOC, "dataset.root=data/voc", "model.pretrained_file=resnet101.pth"]) == 0
    text = capsys.readouterr().out
    assert "voc at data/voc: NOT PREPARED" in text and "recall data prepare voc --root data/voc" in text
    assert "22,500" in text and "not counted: evaluation (validation images unknown) of steps 0, 1, 2, 3, 4, 5" in text
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- the arithmetic

def test_hours():
    assume = PlanConfig(device="a GPU", train_images_per_second=10, eval_images_per_second=2)
    assert hours(36_000, 7_200, assume) == pytest.approx(2.0)


def test_estimate_counts_only_the_work_left():
    assume = PlanConfig(device="a GPU", train_images_per_second=4, eval_images_per_second=1)
    base = {"images": 10, "lr": 1e-3, "classes": ["a"]}
    plan = {"steps": [
        {**base, "step": 0, "state": "done", "batch": [4, 0], "iterations": 15000, "eval_images": 100},
        {**base, "step": 1, "state": "evaluate", "batch": [2, 2], "iterations": 1000, "eval_images": 100},
        {**base, "step": 2, "state": "train", "batch": [2, 2], "iterations": 1000, "eval_images": 100,
         "extra_training": {"what": "helper decoder", "iterations": 500, "batch": 4}},
        {**base, "step": 3, "state": "train", "batch": [2, 2], "iterations": None, "eval_images": None},
    ]}
    e = estimate(plan, extra_eval=50, assume=assume)
    assert e["train_images"] == 1000 * 4 + 500 * 4
    assert e["eval_images"] == 100 + 100 + 50
    assert e["hours"] == pytest.approx((6000 / 4 + 250 / 1) / 3600)
    assert e["not_counted"] == ["training (images unknown) of steps 3", "evaluation (validation images unknown) of steps 3"]


def test_paper_voc_estimate_arithmetic(tmp_path):
    """15-1x5 overlapped fine-tuning on the paper's setting: 30,000 iterations of 4 images at the profile's rate."""
    cfg = compose([*PAPER_VOC[:2], "method=ft", f"dataset.root={tmp_path}", "plan.train_images_per_second=10",
                   RANDOM_INIT])
    e = build_plan(cfg)["estimate"]
    assert e["train_images"] == 30_000 * 4
    assert e["hours"] == pytest.approx(120_000 / 10 / 3600)
    assert "10 images/s" in format_plan(build_plan(cfg))
