"""`recall run --dry-run` against what the run executes: for every method (overlapped; in disjoint and partitioned a
few), the dry-run's plan of each step equals, field by field, the facts the run records of the step it trained
(steps/<t>/plan.json), which the run takes from its loaders, its optimizer and its training loop, never from the
plan's code."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from recall.cli import main
from recall.config import compose
from recall.experiment import run_protocol
from recall.methods import METHODS as REGISTERED
from recall.methods.replay import ReplayMethod

from conftest import FAST

PROTOCOL = "18-1x2"  # step 0 (18 classes, shared by every run of a setting), then two incremental steps
SETTINGS = ["overlapped", "disjoint", "partitioned"]
# every registered method (a replay method with the toy pool), and run sources and budgets on top
METHODS = {**{name: (["replay=toy_gan"] if issubclass(cls, ReplayMethod) else []) for name, cls in REGISTERED.items()},
           "ft+memory": ["replay=memory"], "recall+memory": ["replay=memory"],
           # a budget in iterations per class (the papers'), the helper decoders' own
           "recall+iterations": ["replay=toy_gan", "train.iters_per_class=3", "method.helper_iters_per_class=2"]}
LOSSES_ONLY = ("lwf", "ilt", "mib")  # ft's data flow, other losses: one incremental step covers them
# every method in the overlapped setting; in the others, a method of the step's own images, joint (every image of
# the classes seen, whatever the setting) and a replay
RUNS = ([("overlapped", method) for method in METHODS] + [("disjoint", "ft"), ("disjoint", "joint"),
                                                           ("partitioned", "recall")])


SMALL = [*FAST, "train.crop=32", "train.eval_batch_size=8"]  # 32-pixel images: what is compared is counts, not skill


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> SimpleNamespace:
    """A small toy world, a toy replay pool, and the step-0 run of each setting (trained on first use)."""
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator
    from recall.sim.toyworld import generate

    tmp = tmp_path_factory.mktemp("plan_run")
    world = tmp / "toy"
    generate(world, n_train=48, n_val=8, size=32, seed=3, progress=False)
    pool = tmp / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=2, root=pool, progress=False)
    step0: dict[str, tuple[dict, dict]] = {}

    def base(setting: str, run_dir: Path) -> list[str]:
        return [f"dataset.root={world}", f"protocol={PROTOCOL}", f"setting={setting}", f"run_dir={run_dir}",
                "tracking.uri=", *SMALL]

    def shared_step0(setting: str, capsys) -> tuple[dict, dict]:
        if setting not in step0:
            run_dir = tmp / f"step0_{setting}"
            step0[setting] = planned_and_executed([*base(setting, run_dir), "last_step=0"], run_dir, capsys)
        return step0[setting]

    return SimpleNamespace(tmp=tmp, base=base, step0=shared_step0, pool=pool)


def planned_and_executed(args: list[str], run_dir: Path, capsys) -> tuple[dict, dict]:
    """The dry-run's steps (before the run), and the run's record of every step (after it)."""
    capsys.readouterr()
    assert main(["run", "--dry-run", "--json", *args]) == 0
    plan = json.loads(capsys.readouterr().out)
    run_protocol(compose(args), figures=False)  # what `recall run` runs, without its figures (seconds a run)
    executed = {s["step"]: json.loads((run_dir / "steps" / str(s["step"]) / "plan.json").read_text())
                for s in plan["steps"]}
    return {s["step"]: s for s in plan["steps"]}, executed


def assert_same(planned: dict, executed: dict) -> None:
    for step, plan in planned.items():
        for field in sorted(set(plan) | set(executed[step])):
            assert plan.get(field) == executed[step].get(field), (
                f"step {step}, {field}: the dry-run says {plan.get(field)!r}, the run did {executed[step].get(field)!r}")


@pytest.mark.parametrize("setting", SETTINGS)
def test_step0_run_matches_its_plan(shared, setting, capsys, monkeypatch):
    import recall.experiment as experiment

    found = []  # when a marker is written, the facts it certifies are on disk already
    save, write = experiment.save_checkpoint, experiment.write_json

    def save_checkpoint(model, path, meta):
        found.append(path.with_name("plan.json").is_file())
        save(model, path, meta)

    def write_json(path, payload, **kw):
        if path.name == "eval.json":
            found.append("eval_images" in json.loads(path.with_name("plan.json").read_text()))
        write(path, payload, **kw)

    monkeypatch.setattr(experiment, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(experiment, "write_json", write_json)
    planned, executed = shared.step0(setting, capsys)
    assert planned[0]["state"] == "train" and executed[0]["iterations"] > 0
    assert_same(planned, executed)
    assert found in ([], [True, True]), found  # (empty when an earlier test trained this step 0)


@pytest.mark.parametrize("setting,method", RUNS)
def test_run_matches_its_plan(shared, method, setting, capsys):
    shared.step0(setting, capsys)
    run_dir = shared.tmp / f"{method}_{setting}"
    adopts = not (method == "joint" and setting != "overlapped")  # joint selects other step-0 images there
    args = [*shared.base(setting, run_dir), f"method={method.split('+')[0]}", *METHODS[method],
            *([f"replay.pool={shared.pool}"] if "replay=toy_gan" in METHODS[method] else []),
            *([f"step0={shared.tmp / f'step0_{setting}'}"] if adopts else []),
            *(["last_step=1"] if method in LOSSES_ONLY else [])]
    planned, executed = planned_and_executed(args, run_dir, capsys)
    assert planned[0]["state"] == executed[0]["state"] == ("adopt step0" if adopts else "train")
    assert_same(planned, executed)
    if METHODS[method]:  # a replay: the comparison covers the replay stream (and RECALL's helper decoder)
        assert executed[1]["batch"][1] > 0 and executed[1]["extra_data"].endswith(" old")
        assert ("extra_training" in executed[1]) == (METHODS[method][0] == "replay=toy_gan"
                                                     and method.split("+")[0] == "recall")  # its helper decoders


def test_joint_refuses_a_step_0_trained_on_other_images(shared, capsys):
    """In the disjoint setting joint's step 0 sees every image of its classes, the shared step 0 only the images
    without a future class: the dry-run says the shared model does not fit, and the run refuses it (exit 2, one
    line naming both image sets) before copying anything."""
    shared.step0("disjoint", capsys)
    run_dir = shared.tmp / "joint_refused"
    args = [*shared.base("disjoint", run_dir), "method=joint", f"step0={shared.tmp / 'step0_disjoint'}"]
    capsys.readouterr()
    assert main(["run", "--dry-run", "--json", *args]) == 0
    mismatch = json.loads(capsys.readouterr().out)["checkpoints"]["step0"]["mismatch"]
    assert len(mismatch) == 1 and mismatch[0].startswith("training images: ")
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this run (training images: " in err[0], err
    assert not (run_dir / "steps" / "0").exists()


def test_a_refused_step_0_leaves_the_run_directory_unwritten(shared, capsys):
    """The adoption check runs before the run writes its configuration: after the refusal, the command the error
    suggests (the same run without step0=) runs in the same run_dir."""
    shared.step0("disjoint", capsys)
    run_dir = shared.tmp / "joint_refused_then_own"
    args = [*shared.base("disjoint", run_dir), "method=joint", "last_step=0"]
    assert main(["run", *args, f"step0={shared.tmp / 'step0_disjoint'}"]) == 2
    assert not (run_dir / "steps" / "config.yaml").exists()
    capsys.readouterr()
    assert main(["run", *args]) == 0


def test_a_step_0_saved_before_its_images_were_recorded_is_checked_by_their_number(shared, capsys, tmp_path):
    """A shared step 0 without `images_id` (saved by an older version) is compared by the image count its run
    recorded (steps/0/plan.json)."""
    import shutil

    import torch

    shared.step0("disjoint", capsys)
    old = tmp_path / "step0_old"
    shutil.copytree(shared.tmp / "step0_disjoint", old)
    blob = torch.load(old / "steps" / "0" / "model.pt", weights_only=True)
    del blob["meta"]["images_id"]
    torch.save(blob, old / "steps" / "0" / "model.pt")
    args = [*shared.base("disjoint", tmp_path / "run"), "method=joint", f"step0={old}"]
    capsys.readouterr()
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this run (training images: " in err[0], err


def test_an_unreadable_step_0_is_one_line(shared, capsys, tmp_path):
    import shutil

    shared.step0("disjoint", capsys)
    broken = tmp_path / "step0_broken"
    shutil.copytree(shared.tmp / "step0_disjoint", broken)
    ckpt = broken / "steps" / "0" / "model.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    args = [*shared.base("disjoint", tmp_path / "run"), "method=ft", f"step0={broken}"]
    capsys.readouterr()
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable checkpoint" in err[0], err
    assert main(["run", "--dry-run", "--json", *args]) == 0
    assert "is not a readable checkpoint" in json.loads(capsys.readouterr().out)["checkpoints"]["step0"]["mismatch"][0]
