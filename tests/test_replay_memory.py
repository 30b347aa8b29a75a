"""`replay=memory` (recall/replay/memory.py): SSUL-M's stored exemplars. The class-balanced round robin against
hand-made candidate lists, the memory's storage, the privacy check (stored data for this source only), the
composition with RECALL, MiB and PLOP, the MLflow tag, the report's marker, the study and the dry-run plan."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, kill_when_written
from hand_world import make_world, protocol_run

from recall.cli import main
from recall.config import compose
from recall.errors import ReplayError, UserError
from recall.experiment import ProtocolRun
from recall.methods import RUN_SOURCES, build_method, for_source
from recall.methods.distillation import MiB
from recall.methods.memory import MemoryReplay
from recall.replay.leakage import STORED_DATA_SOURCES, check_replay_privacy
from recall.replay.memory import MEMORY_FILE, build_memory, memory_dir, read_memory, select_balanced
from recall.replay.sources import SOURCES, build_source


def candidates(*labels: list[int]) -> list[list]:
    """SSUL's candidate records [id, objs_num, objs_ratio, labels], one per label list, named i0, i1, ..."""
    return [[f"i{k}", len(ls), 0, list(ls)] for k, ls in enumerate(labels)]


# a hand-made list: class 1 in six images, class 2 in four, class 3 in two (one label each)
HAND = candidates(*[[1]] * 6, *[[2]] * 4, *[[3]] * 2)


def per_class(chosen: list[list]) -> Counter:
    return Counter(c for *_, labels in chosen for c in labels)


# ----------------------------------------------------------------------------------------------- the selection
def test_a_budget_every_class_can_fill_is_shared_equally():
    chosen = select_balanced(HAND, [1, 2, 3], 6, np.random.default_rng(0))
    assert len(chosen) == 6 and per_class(chosen) == {1: 2, 2: 2, 3: 2}


def test_a_class_that_runs_out_leaves_its_turns_to_the_others():
    """Rounds 1-2 take one image per class (6), round 3 finds no class-3 image left (8), round 4 stops at 9."""
    counts = per_class(select_balanced(HAND, [1, 2, 3], 9, np.random.default_rng(0)))
    assert sum(counts.values()) == 9 and counts[3] == 2 and {counts[1], counts[2]} == {3, 4}


@pytest.mark.parametrize("size", [12, 50])
def test_a_budget_beyond_the_candidates_takes_them_all_and_stops(size):
    """SSUL's loop would spin forever here; this one stops with every candidate taken once."""
    chosen = select_balanced(HAND, [1, 2, 3], size, np.random.default_rng(0))
    assert sorted(c[0] for c in chosen) == sorted(c[0] for c in HAND)


def test_each_image_is_taken_once_even_when_it_shows_several_classes():
    chosen = select_balanced(candidates([1, 2], [1, 2], [2], [3]), [1, 2, 3], 4, np.random.default_rng(1))
    assert len({c[0] for c in chosen}) == 4


def test_a_class_no_candidate_shows_is_skipped():
    chosen = select_balanced(candidates([1], [1], [2]), [1, 2, 7], 3, np.random.default_rng(0))
    assert per_class(chosen) == {1: 2, 2: 1}


def test_the_selection_is_grouped_by_class_and_repeats_with_its_seed():
    a = select_balanced(HAND, [1, 2, 3], 6, np.random.default_rng(5))
    assert [c[3][0] for c in a] == [1, 1, 2, 2, 3, 3]  # SSUL saves class_1, class_2, ... in order
    assert a == select_balanced(HAND, [1, 2, 3], 6, np.random.default_rng(5))
    picks = {tuple(c[0] for c in select_balanced(HAND, [1, 2, 3], 6, np.random.default_rng(s))) for s in range(6)}
    assert len(picks) > 1  # which images of a class: random, as SSUL's shuffle


def test_the_candidates_are_not_modified():
    before = json.dumps(HAND)
    select_balanced(HAND, [1, 2, 3], 5, np.random.default_rng(0))
    assert json.dumps(HAND) == before


# ----------------------------------------------------------------------------------------------- the storage
@pytest.fixture
def hand(tmp_path):
    """The hand-made world (tests/hand_world.py), protocol 2-1-1 overlapped: step 0 sees t0 (1), t1 (2), t4 (3 and
    1); step 1 (class 3) t2 (3) and t4."""
    world = make_world(tmp_path / "world")
    run = protocol_run(world, tmp_path, "protocol=2-1-1", "method=mib", "replay=memory", "replay.memory_size=2")
    return world, run


def test_the_memory_is_stored_as_the_dataset_stores_it_with_ssuls_memory_json(hand):
    world, run = hand
    out = build_memory(run, 0, size=2, seed=0)
    assert out == run.run_dir / "steps" / "memory" / "step0"
    saved = json.loads((out / MEMORY_FILE).read_text())
    entry = saved["step_0"]
    assert set(entry) == {"memory_candidates", "memory_list"} and (saved["size"], saved["classes"]) == (2, [1, 2])
    ids = entry["memory_list"]
    assert ids == sorted(c[0] for c in entry["memory_candidates"]) and len(ids) == 2
    assert "t1" in ids and len({"t0", "t4"} & set(ids)) == 1  # one image of each class seen (t4's 3 is not seen yet)
    for image_id, objs_num, objs_ratio, labels in entry["memory_candidates"]:
        for sub, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
            assert (out / sub / f"{image_id}{suffix}").read_bytes() == \
                (world.data / sub / f"{image_id}{suffix}").read_bytes()  # byte for byte, with its ground truth
        assert objs_num == len(labels) and objs_ratio == 4 * 8  # each object of the hand world: 4 x 8 pixels
    assert not list(out.parent.glob(".*tmp"))  # written whole, then renamed


def test_the_next_memory_draws_from_the_last_one_and_the_steps_own_images(hand):
    _, run = hand
    first = read_memory(build_memory(run, 0, size=2, seed=0), 0)["memory_list"]
    entry = read_memory(build_memory(run, 1, size=3, seed=0), 1)
    ids = entry["memory_list"]
    assert len(ids) == 3 and {"t2", "t4"} & set(ids)  # class 3 (step 1) is kept
    assert set(ids) <= set(first) | {"t2", "t4"}  # nothing of step 0 outside the previous memory
    assert per_class(entry["memory_candidates"])[3] >= 1 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_in_the_partitioned_setting_the_memory_draws_from_the_images_the_run_gives_the_step(tmp_path, seed):
    """The memory's candidates are the run's own training images of the step (partitioned: its seed's draw), never
    an image the draw gave another step."""
    world = make_world(tmp_path / "world")
    run = protocol_run(world, tmp_path, "protocol=2-1-1", "setting=partitioned", f"seed={seed}", "method=mib",
                       "replay=memory", "replay.memory_size=5")
    classes = run.classes_of(run.cfg.dataset.train_split)
    step0, step1 = run.train_ids(classes, 0), run.train_ids(classes, 1)
    assert not set(step0) & set(step1)  # the partitioned draw: each image in one step
    first = read_memory(build_memory(run, 0, size=5, seed=seed), 0)["memory_list"]
    assert first and set(first) <= set(step0)
    second = read_memory(build_memory(run, 1, size=5, seed=seed), 1)["memory_list"]
    assert set(second) <= set(first) | set(step1)


def test_a_stored_memory_is_kept_and_a_leftover_temp_dir_does_not_matter(hand):
    _, run = hand
    out = memory_dir(run, 0)
    (out.parent / ".step0.999.tmp" / "JPEGImages").mkdir(parents=True)  # a killed build's leftover
    build_memory(run, 0, size=2, seed=0)
    stamp = (out / MEMORY_FILE).stat().st_mtime_ns
    build_memory(run, 0, size=2, seed=1)  # a resumed run: what is stored stays
    assert (out / MEMORY_FILE).stat().st_mtime_ns == stamp


def test_memory_labels_keep_the_classes_seen_so_far_and_255(hand, tmp_path):
    """SSUL's memory loader: every class seen up to the replaying step kept, future ones background, 255 ignored."""
    world, run = hand
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[0:4], mask[4:8], mask[8:12], mask[12:] = 1, 3, 4, 255
    from hand_world import save_png
    save_png(world.data / "SegmentationClass" / "t4.png", mask, "L")  # t4: classes 1, 3, 4 and a void border
    run = protocol_run(world, tmp_path / "again", "protocol=2-1-1", "method=mib", "replay=memory",
                       "replay.memory_size=5")
    wrapper = run.method
    data = wrapper.stream(run).data(1, transform=None)  # replayed at step 1 (seen: 1, 2, 3; future: 4)
    target = dict(zip(data.ids, (data[i][1] for i in range(len(data)))))["t4"]
    assert [int(target[r, 0]) for r in (0, 4, 8, 12)] == [1, 3, 0, 255]


def test_the_memory_is_built_where_a_run_has_none_yet(hand):
    """A step-0 model adopted from a shared run stored no memory: the first replaying step builds it."""
    _, run = hand
    assert read_memory(memory_dir(run, 0), 0) is None
    data = run.method.stream(run).data(1, transform=None, at_least=4)
    assert len(data) == 4 and sorted(set(data.ids)) == read_memory(memory_dir(run, 0), 0)["memory_list"]


# ----------------------------------------------------------------------------------------------- privacy
@pytest.mark.parametrize("source", sorted({*SOURCES, "none"} - STORED_DATA_SOURCES))
def test_the_privacy_check_refuses_earlier_step_images_for_every_other_source(source):
    with pytest.raises(RuntimeError, match="privacy violation"):
        check_replay_privacy(source, 2, ["a", "b"], {"b", "c"})
    check_replay_privacy(source, 2, ["a"], {"b", "c"})  # no earlier image read: fine


def test_only_the_memory_stores_data_and_the_check_lets_it_through():
    assert STORED_DATA_SOURCES == {"memory"} and set(RUN_SOURCES) == {"memory"}
    assert not STORED_DATA_SOURCES & set(SOURCES)
    check_replay_privacy("memory", 2, ["a", "b"], {"a", "b"})


# ----------------------------------------------------------------------------------------------- wiring
def test_the_source_registry_wraps_the_method_for_memory_only():
    mib = build_method("mib")
    assert for_source(mib, {"name": "none"}) is mib and for_source(mib, {"name": "toy_gan", "pool": "x"}) is mib
    wrapped = for_source(mib, {"name": "memory", "memory_size": 7, "replay_ratio": 0.25})
    assert isinstance(wrapped, MemoryReplay) and wrapped.method is mib and wrapped.name == "mib"
    assert wrapped.stream(None).split(0, 8) == (8, 0) and wrapped.stream(None).split(1, 8) == (6, 2)
    assert wrapped.options() == mib.options() and wrapped.kd_weight == mib.kd_weight
    recall = for_source(build_method("recall", replay_ratio=0.75), {"name": "memory", "memory_size": 7})
    assert recall.replaces and recall.stream(None).split(1, 8) == (2, 6)  # a replay method keeps its own ratio


@pytest.mark.parametrize("replay, error", [({"name": "memory", "memory_size": 0}, UserError),
                                           ({"name": "memory", "replay_ratio": 1.0}, UserError),
                                           ({"name": "memory", "per_class": 3}, ReplayError)])
def test_bad_memory_options_are_refused(replay, error):
    with pytest.raises(error, match="replay"):
        for_source(build_method("mib"), replay)


def test_joint_and_a_pool_build_are_refused():
    with pytest.raises(UserError, match="every image seen so far"):
        for_source(build_method("joint"), {"name": "memory"})
    with pytest.raises(ReplayError, match="no pool to build"):
        build_source("memory")


def test_recall_pool_says_the_memory_has_no_pool(capsys):
    assert main(["pool", "replay=memory"]) == 2
    assert "no pool to build" in capsys.readouterr().err


def test_the_config_composes_with_the_papers_sizes():
    assert compose(["replay=memory"]).replay.memory_size == 19
    assert compose(["experiment=paper_voc", "replay=memory"]).replay.memory_size == 100
    assert compose(["experiment=paper_ade", "replay=memory"]).replay.memory_size == 300


def test_a_replay_method_gives_its_pool_and_helpers_to_the_memory(hand, tmp_path):
    world, _ = hand
    run = protocol_run(world, tmp_path / "r", "protocol=2-1-1", "method=recall", "replay=memory",
                       "replay.memory_size=2")
    run.method.inputs(run, check=True)  # no pool asked for
    assert run.method.inputs(run) == {} and run.method.describe(run)["tags"] == {"replay.stored_data": "true"}
    assert run.method.extra_model(run, 1) is None  # no helper decoder


# ----------------------------------------------------------------------------------------------- runs
RUN = ["protocol=18-1x2", "replay=memory", "replay.memory_size=6", *FAST]


@pytest.mark.slow
def test_recall_with_memory_replays_stored_labels_without_helpers(tmp_path, tiny_world):
    run_dir = tmp_path / "run"
    assert main(["run", f"dataset.root={tiny_world}", "method=recall", *RUN, f"run_dir={run_dir}",
                 "tracking.uri="]) == 0
    assert not list((run_dir / "steps").glob("*/helper.pt")) and not (run_dir / "steps/replay_labels").exists()
    assert sorted(p.name for p in (run_dir / "steps/memory").iterdir()) == ["step0", "step1"]
    statistics = json.loads((run_dir / "steps/2/eval.json").read_text())["statistics"]
    assert statistics["replay/memory_images"] == 6
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["method"], metrics["replay"]) == ("recall", "memory")
    assert (run_dir / "figures" / "memory.png").is_file() and not (run_dir / "figures" / "replay_labels.png").exists()


@pytest.mark.slow
def test_mib_with_memory_is_tagged_as_stored_data_in_mlflow(tmp_path, tiny_world):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", f"dataset.root={tiny_world}", "method=mib", *RUN, f"run_dir={tmp_path}/run",
                 f"tracking.uri={uri}"]) == 0
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if "mlflow.parentRunId" not in r.data.tags]  # the parent run (its step runs copy its tags)
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert (tags["replay"], tags["method"], tags["replay.stored_data"]) == ("memory", "mib", "true")
    steps = client.search_runs([runs[0].info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
    assert any("replay/memory_images" in s.data.metrics for s in steps)
    assert "**stored data**" in tags["mlflow.note.content"]


@pytest.mark.slow
def test_mib_with_memory_blends_memory_batches_into_training(tmp_path, tiny_world):
    """MiB's loss sees current + memory samples: half of every incremental batch (FAST's batch 8: 4 + 4)."""
    cfg = compose([f"dataset.root={tiny_world}", "method=mib", *RUN, f"run_dir={tmp_path}/run", "tracking.uri="])
    run = ProtocolRun(cfg)
    assert isinstance(run.method, MemoryReplay) and isinstance(run.method.method, MiB)
    sizes = []
    real = run.method.method.loss
    run.method.method.loss = lambda outputs, targets, images, ctx: (sizes.append((ctx.step, len(images))),
                                                                     real(outputs, targets, images, ctx))[1]
    run.train(0, run.plan()[0])
    run.train(1, run.plan()[1])
    current = len(run.train_loader(1, torch.Generator(), batch_size=4).dataset)
    assert {n for step, n in sizes if step == 1} == {min(current, 4) + 4}
    assert read_memory(memory_dir(run, 0), 0) is not None


@pytest.mark.slow
def test_a_killed_run_resumes_with_its_stored_memory(tmp_path, tiny_world):
    run_dir = tmp_path / "run"
    args = ["run", f"dataset.root={tiny_world}", "method=mib", *RUN, f"run_dir={run_dir}", "tracking.uri="]
    kill_when_written(args, run_dir / "steps" / "1" / "model.pt", timeout=300)
    memory = run_dir / "steps" / "memory" / "step0" / MEMORY_FILE
    assert memory.is_file()
    before = (memory.read_bytes(), memory.stat().st_mtime_ns)
    assert main(args) == 0
    assert (memory.read_bytes(), memory.stat().st_mtime_ns) == before
    assert (run_dir / "metrics.json").is_file() and (run_dir / "steps/memory/step1" / MEMORY_FILE).is_file()


# ----------------------------------------------------------------------------------------------- report, study, plan
def test_the_report_marks_runs_with_stored_data():
    from recall.report import STORED_MARK, markdown_table

    row = {"protocol": "15-1x5", "setting": "overlapped", "method": "mib", "options": "", "seeds": "0", "steps": 6,
           "old_no_bg": 0.5, "new": 0.2, "all": 0.4, "all_no_bg": 0.4}
    plain = markdown_table([{**row, "replay": "none"}, {**row, "method": "recall", "replay": "toy_gan"}])
    assert STORED_MARK not in plain
    marked = markdown_table([{**row, "replay": "none"}, {**row, "replay": "memory"}])
    assert f"| memory {STORED_MARK} |" in marked and f"{STORED_MARK} replays stored training images" in marked


def test_a_study_variant_with_memory_needs_no_pool_stage():
    from recall import study

    spec = {"seeds": [0], "protocols": ["15-1x5"], "chain": {"sources": {}},
            "variants": {"mib": ["method=mib"], "mib_memory": ["method=mib", "replay=memory"],
                         "recall_memory": ["method=recall", "replay=memory"]}}
    tables = study.expand(spec)
    assert tables["pools"] == {}
    run = tables["runs"]["default_15-1x5_mib_memory_s0"]
    assert run["pool"] == study.NO_POOL and "replay=memory" in run["overrides"].split()
    assert "replay.pool" not in run["overrides"]
    assert tables["runs"]["default_15-1x5_recall_memory_s0"]["step0"] == run["step0"]


@pytest.mark.parametrize("method", ["mib", "recall"])
def test_the_paper_voc_dry_run_plans_the_memory(tmp_path, capsys, method):
    assert main(["run", "--dry-run", "--json", "experiment=paper_voc", "protocol=15-1x5", f"method={method}",
                 "replay=memory", "model.pretrained_file=null", f"dataset.root={tmp_path}/voc",
                 f"run_dir={tmp_path}/run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["batch"] for s in plan["steps"]] == [[4, 0], *[[2, 2]] * 5]
    assert [s.get("extra_data") for s in plan["steps"]] == [None, *[f"memory: {n} old" for n in range(15, 20)]]
    assert plan["method_inputs"]["replay"] == {"source": "memory", "stored_data": True, "memory_size": 100,
                                               "stored_after_steps": []}
    assert not any("extra_training" in s for s in plan["steps"])  # RECALL's helper decoders are not needed
    assert not (tmp_path / "run").exists()


def test_the_toy_memory_scales_ssuls_share_of_the_training_set():
    """SSUL-M keeps 100 of VOC's 10,582 training images; the toy world's 2,000 at that share: 19."""
    toy = compose([]).toyworld.n_train
    assert compose(["replay=memory"]).replay.memory_size == round(100 * toy / 10582)


def test_plop_keeps_its_thresholds_pass_and_its_loss_under_the_memory():
    """PLOP-M: the wrapper hands PLOP's run and loop hooks to PLOP (its thresholds before the step, its loss)."""
    plop = build_method("plop")
    wrapped = for_source(plop, {"name": "memory", "memory_size": 4})
    calls = []
    plop.before_step = lambda *args: calls.append("before_step")
    plop.loss = lambda *args: calls.append("loss") or torch.tensor(0.0)
    plop.rewrite_targets = lambda images, targets, ctx: calls.append("rewrite_targets") or targets
    wrapped.before_step(None, 1, None, None)
    wrapped.rewrite_targets(None, None, None)
    wrapped.loss({}, None, None, None)
    assert calls == ["before_step", "rewrite_targets", "loss"] and not wrapped.replaces
    assert wrapped.needs_previous_model and wrapped.classifier_init == "background"


def test_building_a_missing_memory_asks_the_privacy_check_as_the_memory(hand, monkeypatch):
    import recall.replay.memory as memory

    _, run = hand
    asked = []
    monkeypatch.setattr(memory, "check_replay_privacy", lambda source, step, images, earlier:
                        asked.append((source, step, sorted(images))))
    run.method.stream(run).memory(1)
    assert asked == [("memory", 1, ["t0", "t1", "t4"])]  # step 0's images, read at step 1 on purpose
    run.method.stream(run).memory(1)
    assert len(asked) == 1  # stored: nothing read again
