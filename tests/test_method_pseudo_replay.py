"""A second replay-based method, added as a new contributor would: one module (recall/methods/pseudo_replay.py),
its line in the registry, one config (conf/method/pseudo_replay.yaml) and this test. Nothing in the runner, the
plan, the tuner or the figures names it: the replay data flow is the method's own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from hand_world import make_world, protocol_run
from PIL import Image

from recall.cli import main

ROOT = Path(__file__).resolve().parents[1]
THE_FILES = {"recall/methods/pseudo_replay.py", "recall/methods/__init__.py", "conf/method/pseudo_replay.yaml",
             "tests/test_method_pseudo_replay.py"}


def test_adding_a_replay_method_touches_four_files():
    """The code, configs and tests that name the method (docs may describe it, of course)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "recall", "conf", "tests",
                            "benchmarks", "dvc.yaml", "params.yaml"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    texts = {f: (ROOT / f).read_text(errors="ignore") for f in files if (ROOT / f).is_file()}
    assert {f for f, text in texts.items() if "pseudo_replay" in text or "PseudoReplay" in text} == THE_FILES


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from recall.replay.pool import build_pool
    from recall.sim.toy_gan import ToyGenerator

    root = tmp_path_factory.mktemp("pool") / "pool"
    build_pool(ToyGenerator(mapping=ToyGenerator().lookalike_mapping()), {c: f"c{c}" for c in range(1, 21)},
               per_class=4, root=root, progress=False)
    return root


def test_pseudo_replay_labels_each_group_with_the_model_that_learnt_it(tmp_path, tiny_world, pool):
    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={tiny_world}", "protocol=18-1x2", "method=pseudo_replay", "replay=toy_gan",
                 f"replay.pool={pool}", f"run_dir={run_dir}", "tracking.uri=", *FAST]) == 0
    labels = run_dir / "steps" / "replay_labels"
    markers = {k: json.loads((labels / f"step{k}.done").read_text()) for k in (0, 1)}
    assert [markers[k]["labeller"] for k in (0, 1)] == ["steps/0/model.pt", "steps/1/model.pt"]
    assert markers[1]["classes"] == [19] and markers[1]["images"] == 4
    assert not list((run_dir / "steps").glob("*/helper.pt")), "no helper decoders: that is RECALL's"
    for png in labels.glob("c019_*.png"):  # class 19 (learnt at step 1), labelled by the step-1 model: any class it knows
        assert set(np.unique(np.array(Image.open(png)))) <= set(range(20))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "pseudo_replay" and metrics["method_options"]["freeze_encoder"] is False
    statistics = json.loads((run_dir / "steps/2/eval.json").read_text())["statistics"]
    assert statistics["replay/pool_images"] == 19 * 4  # every class learnt before step 2, 4 images each
    assert statistics["replay/inpainted_share"] == 0.0  # no inpainting: training targets are the labels
    assert (run_dir / "figures" / "replay_labels.png").is_file()


def test_the_dry_run_plan_shows_its_replay_and_no_helpers(tmp_path, tiny_world, pool, capsys):
    assert main(["run", "--dry-run", "--json", f"dataset.root={tiny_world}", "protocol=18-1x2",
                 "method=pseudo_replay", "replay=toy_gan", f"replay.pool={pool}", f"run_dir={tmp_path}/r"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["batch"] for s in plan["steps"]] == [[16, 0], [8, 8], [8, 8]]
    assert [s.get("extra_data") for s in plan["steps"]] == [None, "18 old", "19 old"]
    assert not any("extra_training" in s for s in plan["steps"])
    assert plan["method_inputs"]["replay"]["images"] == 19 * 4


def test_pseudo_replay_s_labeller_of_each_group_is_the_model_of_its_step(tmp_path):
    """On the hand-made world (tests/hand_world.py), 2-1-1: group k is labelled by steps/<k>/model.pt, whose
    outputs are background and every class up to step k; no target rewriting."""
    world = make_world(tmp_path / "world")
    run = protocol_run(world, tmp_path, "protocol=2-1-1", "method=pseudo_replay", "replay=folder",
                       f"replay.pool={world.pool.root}")
    assert run.method.labeller(run, 0) == (run.step_dir(0) / "model.pt", [0, 1, 2])
    assert run.method.labeller(run, 1) == (run.step_dir(1) / "model.pt", [0, 1, 2, 3])
    targets = torch.tensor([[[0, 1], [255, 3]]])
    assert run.method.rewrite_targets(torch.zeros(1, 3, 2, 2), targets, run.context(1, None)) is targets
