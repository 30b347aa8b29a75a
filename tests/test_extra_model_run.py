"""A method's extra model (`Method.extra_model`) in a run: the order of a step's files when it has one, the memory
handing a wrapped method's on, and the plan a run starts with drawing no random number and writing nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import recall.experiment as experiment
from hand_world import make_world, protocol_run, recall_run
from recall.methods.base import ExtraModel, Method, StepContext
from recall.methods.finetune import FineTuning
from recall.methods.memory import MemoryReplay
from recall.model import SegmentationModel, load_checkpoint
from recall.step_plan import batches_per_epoch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("hand_world"))


def test_the_extra_model_is_saved_before_the_record_and_the_checkpoint_that_mark_the_step(world, tmp_path,
                                                                                           monkeypatch):
    """Step 1 of 2-1-1 trains RECALL's helper: helper.pt, then plan.json (with its extra_training), then model.pt
    (the marker of a trained step), each written when the ones it certifies are on disk."""
    run = recall_run(world, tmp_path, protocol="2-1-1")
    written = []
    save, write = experiment.save_checkpoint, experiment.write_json

    def save_checkpoint(model, path, meta):
        written.append((path.name, {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()))
        save(model, path, meta)

    def write_json(path, payload, **kw):
        written.append((path.name, {p.name for p in path.parent.iterdir()} if path.parent.exists() else set()))
        write(path, payload, **kw)

    monkeypatch.setattr(experiment, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(experiment, "write_json", write_json)
    run.train(1, run.plan()[1])
    names = [name for name, _ in written]
    assert names == ["helper.pt", "plan.json", "model.pt"], names
    on_disk = dict(written)
    assert "helper.pt" in on_disk["plan.json"] and {"helper.pt", "plan.json"} <= on_disk["model.pt"]
    assert "model.pt" not in on_disk["plan.json"]


class WithExtra(Method):
    """A method of the step's own images that asks for an extra model at step 1 (none has one yet)."""
    name = "with_extra"

    def extra_model(self, run, step):
        if step != 1:
            return None
        return ExtraModel("probe", "probe.pt", lambda: None, FineTuning(), None, run.train_cfg, None)


def test_the_memory_hands_on_the_extra_model_of_a_method_it_does_not_replace(world, tmp_path):
    run = protocol_run(world, tmp_path, "protocol=2-1-1", "method=ft", "replay=memory", "replay.memory_size=2")
    wrapped = MemoryReplay(WithExtra(), memory_size=2)
    extra = wrapped.extra_model(run, 1)
    assert extra is not None and extra.what == "probe" and extra.file == "probe.pt"
    assert wrapped.extra_model(run, 0) is None and wrapped.extra_model(run, 2) is None


def test_the_memory_drops_the_extra_model_of_a_replay_method_it_replaces(world, tmp_path):
    """RECALL's helper decoders label its pool's images; the memory's stored images carry their labels, so a RECALL
    under replay=memory trains none (and the memory keeps RECALL's own replay ratio)."""
    from recall.methods import build_method, for_source

    run = protocol_run(world, tmp_path, "protocol=2-1-1", "method=ft", "replay=memory", "replay.memory_size=2")
    recall = build_method("recall")
    wrapped = for_source(recall, {"name": "memory", "memory_size": 2, "replay_ratio": 0.25})
    assert isinstance(wrapped, MemoryReplay) and wrapped.replaces and wrapped.source == "memory"
    assert wrapped.replay_ratio == recall.replay_ratio
    assert all(wrapped.extra_model(run, step) is None for step in (0, 1, 2))
    assert for_source(FineTuning(), {"name": "toy_gan"}).name == "ft"  # a pool source leaves the method as it is
    assert MemoryReplay(FineTuning()).source == "memory"  # built by hand: the run source's name (MLflow, the plan)
    with pytest.raises(Exception, match=r"replay.replay_ratio=1.5: must be in \(0, 1\) \(share of memory samples "
                                        r"per batch; SSUL replaces half of every batch: 0.5\)$"):
        MemoryReplay(FineTuning(), replay_ratio=1.5)


def test_the_plan_a_run_starts_with_draws_no_random_number_and_writes_nothing(world, tmp_path):
    """run_steps computes the plan before step 0: after the pre-flight (which writes the image caches) it leaves the
    global RNGs and the run directory as they were, for a method with an extra model and a replay stream."""
    import random

    import numpy as np
    import torch

    run = recall_run(world, tmp_path, protocol="2-1-1")
    for split in (run.cfg.dataset.train_split, run.cfg.dataset.val_split):
        run.classes_of(split)  # the pre-flight
    listing = lambda: sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    files, states = listing(), (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    plans = run.plan()
    assert [p["state"] for p in plans][1:] == ["train", "train"]
    assert "extra_training" in plans[1] and "extra_training" not in plans[2]
    assert listing() == files
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]


class Probe(Method):
    """A method of the step's own images asking, at step 1, for a model of its own: one output per class of the
    step, trained at a batch of its own (2, the run's is 4), saved as probe.pt."""
    name = "probe"

    def extra_model(self, run, step):
        if step != 1:
            return None
        label_map = torch.full((256,), 255, dtype=torch.long)
        label_map[0] = 0
        label_map[run.task[1][0]] = 1
        ctx = StepContext(step=1, task=run.task, new_classes=list(run.task[1]), old_classes=[], setting=run.setting)
        return ExtraModel("probe", "probe.pt", lambda: SegmentationModel(run.model_cfg, [1]), FineTuning(), ctx,
                          replace(run.train_cfg, batch_size=2, lr_incremental=0.02), label_map, {"classes_per_step": [1], "probe_of": 1})


def test_the_run_trains_an_extra_model_at_its_own_batch_records_and_saves_it(world, tmp_path):
    """`ExtraModel` as any method may ask for it: the run trains it at its train_cfg's batch (not the run's), records
    it as the step's `extra_training` (what, batch, iterations, lr read from its optimizer) and saves it with its
    meta in the step's directory; a step without one trains and records nothing."""
    run = protocol_run(world, tmp_path, "protocol=2-1-1", "method=ft")
    run.method = Probe()
    run.executed = {}
    run.train_extra_model(2, torch.Generator().manual_seed(0))
    assert run.executed == {} and not (run.step_dir(2) / "probe.pt").exists()
    run.train_extra_model(1, torch.Generator().manual_seed(0))
    images = len(run.train_ids(run.classes_of("train"), 1))
    assert run.executed == {"extra_training": {"what": "probe", "batch": 2, "lr": pytest.approx(0.02),
                                               "iterations": batches_per_epoch(images, 2)}}  # one epoch
    _, meta = load_checkpoint(run.step_dir(1) / "probe.pt", run.model_cfg)
    assert meta == {"classes_per_step": [1], "probe_of": 1}
