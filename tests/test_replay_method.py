"""The replay data flow of a run, in process, on the hand-made world (tests/hand_world.py): what RECALL's replay
stream checks, labels, writes, records and plans, asserted on values worked out independently (the pool's hand-made
labels, the step-0 model's own argmax, hand-written pool statistics). The loop's side of replay is in test_wiring.py.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from hand_world import POOL_SHARES, SIDE, make_world, protocol_run, recall_run, replay_run, spy
from recall.atomic import write_json
from recall.data.transforms import eval_transform
from recall.errors import UserError
from recall.methods import METHODS
from recall.methods.replay import ReplayMethod, old_classes, spread
from recall.model import SegmentationModel, load_checkpoint, save_checkpoint
from recall.provenance import content_id
from recall.replay.pool import PoolDataset, ReplayPool
from recall.replay.sources import SOURCES


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    return make_world(tmp_path_factory.mktemp("hand_world"))


def noise_pool(root, counts: dict[int, int], seed: int = 1) -> ReplayPool:
    """A pool of SIDE x SIDE noise images: counts[c] of class c."""
    pool, rng = ReplayPool(root), np.random.default_rng(seed)
    for c, n in counts.items():
        for _ in range(n):
            pool.add(Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)), {"target_class": c})
    return pool


def argmax_labels(checkpoint, model_cfg, pool: ReplayPool, classes: list[int], channel_classes: list[int]) -> dict:
    """What label evaluation must write, worked out here: each pool image's argmax over the checkpoint's outputs,
    as the class of that output channel."""
    model, _ = load_checkpoint(checkpoint, model_cfg)
    data = PoolDataset(pool.root, classes=classes, transform=eval_transform())
    with torch.no_grad():
        return {r["id"]: np.array(channel_classes)[model.eval()(data[i][0][None])["out"][0].argmax(0).numpy()]
                for i, r in enumerate(data.records)}


def read_label(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


# --------------------------------------------------------------------------------------------- small pieces
def test_old_classes_and_spread():
    assert old_classes([[1, 2], [3], [4]], 0) == []
    assert old_classes([[1, 2], [3], [4]], 2) == [1, 2, 3]
    assert spread(5, 5) == [0, 1, 2, 3, 4]  # n <= k: all
    assert spread(3, 5) == [0, 1, 2]
    assert spread(10, 3) == [0, 4, 9]
    assert spread(100, 4) == [0, 33, 66, 99]


def test_replay_hooks_of_a_run_without_replay_do_nothing(world, tmp_path):
    """replay_ratio 0 (inpainting alone), or a run that stops at step 0: no pool is read, checked, recorded or
    labelled, even when it does not exist."""
    missing = tmp_path / "no_pool"
    for k, override in enumerate(["method.replay_ratio=0", "last_step=0"]):
        run = recall_run(world, tmp_path / str(k), override, pool=missing)
        m = run.method
        assert not m.replays(run)
        m.inputs(run, check=True)
        assert m.inputs(run) == {} and m.describe(run)["params"] == {} and m.stream(run).plan_inputs(1, [1]) is None
        assert m.stream(run).statistics(1) == {} and m.stream(run).figures(1, "t", tmp_path) == []
        assert not any(m.needs_helper(run, s) for s in range(3))
    assert not missing.exists()


def test_a_replaying_run_names_its_pool_as_an_input(world, tmp_path):
    run = recall_run(world, tmp_path)
    assert run.method.replays(run)
    assert run.method.inputs(run) == {"replay_pool": world.pool.root}
    assert run.method.stream(run).labels_dir == tmp_path / "run" / "steps" / "replay_labels"


def test_a_replay_source_without_a_pool_is_a_user_error(world, tmp_path):
    run = recall_run(world, tmp_path)
    run.cfg.replay.pool = None
    message = ("method=recall replays old classes: choose a replay source with a pool, e.g. replay=toy_gan after "
               "`recall classmap replay=toy_gan` and `recall pool replay=toy_gan`, or replay=folder with "
               "replay.pool=DIR")
    with pytest.raises(UserError) as error:
        run.method.inputs(run, check=True)
    assert str(error.value) == message
    without = recall_run(world, tmp_path / "without")
    with open_dict(without.cfg):
        del without.cfg["replay"]  # a configuration with no replay section at all
    with pytest.raises(UserError) as error:
        without.method.inputs(without, check=True)
    assert str(error.value) == message
    plan = run.method.stream(run).plan_inputs(1, [1])
    assert plan["eval_images"] == 0 and plan["replay"] == {"source": "folder", "pool": None}
    assert plan["lines"] == [("replay", "MISSING: the method replays old classes but replay=folder has no pool; "
                                        f"choose replay={', '.join(sorted(SOURCES))}")]  # every pool source
    assert {"folder", "gan", "web", "diffusion", "toy_gan"} <= set(SOURCES) and "memory" not in SOURCES


# --------------------------------------------------------------------------------------------- the checks
def test_check_inputs_names_a_pool_that_is_not_built(world, tmp_path):
    (tmp_path / "empty").mkdir()
    run = recall_run(world, tmp_path, pool=tmp_path / "empty")
    with pytest.raises(UserError) as error:
        run.method.inputs(run, check=True)
    assert str(error.value) == (f"replay pool {tmp_path / 'empty'} is not built (no manifest.jsonl): build it first "
                                "with `recall pool replay=folder` (same overrides)")


def test_check_inputs_names_every_old_class_the_pool_lacks(world, tmp_path):
    pool = noise_pool(tmp_path / "pool", {3: 1})  # 2-1-1 replays 1, 2 and 3 at its last step: 1 and 2 are missing
    run = recall_run(world, tmp_path, protocol="2-1-1", pool=pool.root)
    with pytest.raises(UserError) as error:
        run.method.inputs(run, check=True)
    assert str(error.value) == (f"replay pool {pool.root} has no image of 1, 2, which this run replays; rebuild it "
                                "with `recall pool replay=folder`")
    short = recall_run(world, tmp_path / "short", "last_step=1", protocol="2-1-1",
                       pool=noise_pool(tmp_path / "p12", {1: 1, 2: 1}).root)
    short.method.inputs(short, check=True)  # up to step 1, only 1 and 2 are replayed: nothing is missing


# --------------------------------------------------------------------------------------------- the params
def test_the_params_sum_up_the_pool_s_build_report(world, tmp_path):
    pool = noise_pool(tmp_path / "pool", {1: 1, 2: 1})
    run = recall_run(world, tmp_path, pool=pool.root)
    assert run.method.describe(run)["params"] == {}  # no finished build report (pool.json): nothing to record
    pool.summary_path.write_text(json.dumps({
        "total": 7, "dropped_dataset_copies": 2, "dropped_near_copies": 3,
        "source_skipped": {"corrupt": 4, "small": 5}, "shortfall": {"cat": {"missing": 6}, "dog": {"missing": 1}}}))
    assert run.method.describe(run)["params"] == {"pool_built": {
        "total": 7, "dropped_dataset_copies": 2, "dropped_near_copies": 3, "dropped_duplicates": 0,
        "source_skipped": 9, "shortfall": 7}}
    quiet = recall_run(world, tmp_path / "quiet", "method.replay_ratio=0", pool=pool.root)
    assert quiet.method.describe(quiet)["params"] == {}  # a run that replays nothing records no pool
    pool.summary_path.write_text(json.dumps({"total": 2}))  # an older report: what it lacks counts as 0
    assert run.method.describe(run)["params"] == {"pool_built": {
        "total": 2, "dropped_dataset_copies": 0, "dropped_near_copies": 0, "dropped_duplicates": 0,
        "source_skipped": 0, "shortfall": 0}}


# --------------------------------------------------------------------------------------------- label evaluation
def test_label_evaluation_writes_the_labelling_model_s_argmax_once_per_group_and_pool(world, tmp_path):
    """ensure_labels at step 2 of 2-1-1: the step-0 classes' images labelled by the step-0 model, class 3's by
    step 1's helper decoder (its channels: background, 3), each label the model's argmax; each group's marker
    written with what it certifies. A second call with the markers in place labels nothing again; a marker of
    another pool is not trusted."""
    pool = noise_pool(tmp_path / "pool", {1: 2, 2: 1, 3: 2, 4: 1})
    # the ASPP head: its untrained models' argmax is not constant on these images (DeepLab-v2's random ones are)
    run = recall_run(world, tmp_path, "model.head=aspp", protocol="2-1-1", pool=pool.root)
    torch.manual_seed(1)
    save_checkpoint(SegmentationModel(run.model_cfg, [1]), run.step_dir(1) / "helper.pt",
                    {"classes_per_step": [1], "helper_for": [3]})
    labels_dir = run.method.stream(run).ensure_labels(2)
    assert labels_dir == run.method.stream(run).labels_dir
    expected = {**argmax_labels(run.step_dir(0) / "model.pt", run.model_cfg, pool, [1, 2], [0, 1, 2]),
                **argmax_labels(run.step_dir(1) / "helper.pt", run.model_cfg, pool, [3], [0, 3])}
    assert sorted(p.stem for p in labels_dir.glob("*.png")) == sorted(expected)  # not class 4: learnt at step 2
    for image_id, labels in expected.items():
        assert np.array_equal(read_label(labels_dir / f"{image_id}.png"), labels), image_id
    assert any(len(np.unique(v)) > 1 for v in expected.values())  # not a constant the code could hard-code
    pool_id = content_id(pool.root)
    assert json.loads((labels_dir / "step0.done").read_text()) == {
        "pool": pool_id, "classes": [1, 2], "images": 3, "labeller": "steps/0/model.pt"}
    assert json.loads((labels_dir / "step1.done").read_text()) == {
        "pool": pool_id, "classes": [3], "images": 2, "labeller": "steps/1/helper.pt"}

    first_1 = pool.records(1)[0]["id"]
    first_3 = pool.records(3)[0]["id"]
    stamp = np.full((SIDE, SIDE), 7, dtype=np.uint8)
    for image_id in (first_1, first_3):
        Image.fromarray(stamp).save(labels_dir / f"{image_id}.png")
    write_json(labels_dir / "step1.done", {"pool": "another pool", "classes": [3]})
    run.method.stream(run).ensure_labels(2)
    assert np.array_equal(read_label(labels_dir / f"{first_1}.png"), stamp)  # group 0's marker holds: kept
    assert np.array_equal(read_label(labels_dir / f"{first_3}.png"), expected[first_3])  # group 1 labelled again
    assert json.loads((labels_dir / "step1.done").read_text())["pool"] == pool_id


def test_label_evaluation_sets_pixels_below_the_label_threshold_to_void(world, tmp_path):
    pool = noise_pool(tmp_path / "pool", {1: 1, 2: 1})
    run = recall_run(world, tmp_path, "method.label_threshold=0.5", pool=pool.root)
    model, _ = load_checkpoint(run.step_dir(0) / "model.pt", run.model_cfg)
    data = PoolDataset(pool.root, classes=[1, 2], transform=eval_transform())
    labels_dir = run.method.stream(run).ensure_labels(1)
    for i, record in enumerate(data.records):
        with torch.no_grad():
            confidence = model.eval()(data[i][0][None])["out"][0].softmax(0).max(0).values.numpy()
        labels = read_label(labels_dir / f"{record['id']}.png")
        assert np.array_equal(labels == 255, confidence < 0.5)
        assert set(np.unique(labels[confidence >= 0.5])) <= {0, 1, 2}


def test_label_evaluation_of_a_group_without_pool_images_names_its_classes(world, tmp_path):
    pool = noise_pool(tmp_path / "pool", {1: 1, 2: 1, 4: 1})
    run = recall_run(world, tmp_path, protocol="2-1-1", pool=pool.root)
    with pytest.raises(UserError) as error:
        run.method.stream(run).ensure_labels(2)
    assert str(error.value) == (f"replay pool {pool.root} has no usable image of the classes of step 1 (3); "
                                "rebuild it")
    assert (run.method.stream(run).labels_dir / "step0.done").is_file()  # the group before it is done and kept
    run = recall_run(world, tmp_path / "two", protocol="1-2-1", pool=noise_pool(tmp_path / "p14", {1: 1, 4: 1}).root)
    with pytest.raises(UserError, match=r"no usable image of the classes of step 1 \(2, 3\); rebuild it$"):
        run.method.stream(run).ensure_labels(2)


def test_label_evaluation_in_the_class_label_space_keeps_only_background_and_the_image_s_class(world, tmp_path):
    pool = noise_pool(tmp_path / "pool", {1: 3, 2: 3})
    seen = {}
    for space in ("all", "class"):
        run = recall_run(world, tmp_path / space, f"method.label_space={space}", pool=pool.root)
        labels_dir = run.method.stream(run).ensure_labels(1)
        seen[space] = {c: set(np.unique(np.concatenate([read_label(labels_dir / f"{r['id']}.png").ravel()
                                                        for r in pool.records(c)])).tolist()) for c in (1, 2)}
    assert seen["class"][1] <= {0, 1} and seen["class"][2] <= {0, 2}
    assert seen["all"][1] - {0, 1} or seen["all"][2] - {0, 2}  # the argmax over all outputs names the other class


# --------------------------------------------------------------------------------------------- the replay stream
def test_the_replay_stream_reports_skipped_and_dropped_images(world, tmp_path, capsys):
    pool_root = tmp_path / "pool"
    shutil.copytree(world.pool.root, pool_root)
    missing = ReplayPool(pool_root).records(2)[0]["id"]  # share 0.375
    ReplayPool(pool_root).image_path(missing).unlink()
    run = replay_run(SimpleNamespace(data=world.data, pool=ReplayPool(pool_root)), tmp_path,
                     "method.replay_ratio=0.25", "method.min_labelled=0.3")
    stream = run.method.stream(run).batches(1, torch.Generator().manual_seed(0))
    assert {int(((y > 0) & (y < 255)).sum()) for _ in range(8) for y in next(stream)[1]} == {128, 192}
    out = capsys.readouterr().out
    assert "replay: skipped 1 of 5 replay images (1 missing)\n" in out
    assert "replay: dropped 2 of 4 images whose evaluated label covers < 30% of the image\n" in out


def test_the_replay_stream_is_the_old_classes_shuffled_by_the_run_s_generator(world, tmp_path, capsys):
    """Step 1 of 2-1-1 replays classes 1 and 2 only (the pool holds class 3 too), in an order drawn from the
    generator the run hands over (not from torch's global one), shuffled, as normalised float images."""
    pool = noise_pool(tmp_path / "pool", {1: 4, 2: 4, 3: 4})
    run = recall_run(world, tmp_path, "method.replay_ratio=0.25", protocol="2-1-1", pool=pool.root)
    run.method.stream(run).ensure_labels(1)
    means = {}
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        stream = run.method.stream(run).batches(1, torch.Generator().manual_seed(0))
        batches = [next(stream) for _ in range(8)]  # one pass over the 8 images of classes 1 and 2
        means[global_seed] = [float(images.mean()) for images, _ in batches]
        assert all(images.dtype == torch.float32 and images.shape == (1, 3, SIDE, SIDE) for images, _ in batches)
    assert means[1] == pytest.approx(means[2], abs=1e-6)  # the same images in the same order (flips aside)
    data = PoolDataset(pool.root, classes=[1, 2], transform=eval_transform())
    in_pool_order = [float(data[i][0].mean()) for i in range(len(data))]
    assert sorted(means[1]) == pytest.approx(sorted(in_pool_order)) and means[1] != pytest.approx(in_pool_order)
    assert "dropped" not in capsys.readouterr().out  # min_labelled 0: nothing is filtered


def test_a_replay_stream_with_nothing_left_is_a_user_error(world, tmp_path):
    run = replay_run(world, tmp_path, "method.min_labelled=0.9")
    with pytest.raises(UserError) as error:
        next(run.method.stream(run).batches(1, torch.Generator().manual_seed(0)))
    assert str(error.value) == f"replay pool {world.pool.root} has no usable image of classes [1, 2]; rebuild it"


def test_a_pool_holding_a_dataset_image_stops_the_replay_stream(world, tmp_path):
    """Privacy at training time: a pool image with the pixels of a training image (saved again by the pool, so its
    bytes differ) is refused."""
    pool = noise_pool(tmp_path / "pool", {1: 1})
    with Image.open(world.data / "JPEGImages" / "t0.jpg") as image:
        pool.add(image.convert("RGB"), {"target_class": 2})
    run = recall_run(world, tmp_path, pool=pool.root)
    run.method.stream(run).ensure_labels(1)
    with pytest.raises(RuntimeError, match=r"privacy violation: replay pool .* holds 1 images of the dataset"):
        next(run.method.stream(run).batches(1, torch.Generator().manual_seed(0)))


def test_the_privacy_check_reads_the_configured_splits_and_image_directory(world, tmp_path):
    """A dataset whose image directory and validation split have other names: copies of four of its validation
    images in the pool are found (the message names three)."""
    data = tmp_path / "data"
    shutil.copytree(world.data, data)
    (data / "JPEGImages").rename(data / "Pictures")
    split = data / "ImageSets" / "Segmentation"
    (split / "val.txt").rename(split / "holdout.txt")
    pool = noise_pool(tmp_path / "pool", {1: 1})
    for image_id in ("a", "b", "c", "d"):
        with Image.open(data / "Pictures" / f"{image_id}.jpg") as image:
            pool.add(image.convert("RGB"), {"target_class": 2})
    run = recall_run(SimpleNamespace(data=data, pool=pool), tmp_path, "dataset.image_dir=Pictures",
                     "dataset.val_split=holdout", pool=pool.root)
    data_set = PoolDataset(pool.root, classes=[1, 2])
    with pytest.raises(RuntimeError) as error:
        run.method.stream(run).check_not_the_dataset(data_set)
    leaked = [r["id"] for r in data_set.records[1:]]
    assert str(error.value) == (f"privacy violation: replay pool {pool.root} holds 4 images of the dataset itself "
                                f"(e.g. {leaked[:3]}); rebuild it with `recall pool`, which drops them")


def test_the_split_rounds_the_replay_share_and_replays_nothing_at_step_0(world, tmp_path):
    run = replay_run(world, tmp_path, "method.replay_ratio=0.3")
    assert run.method.stream(run).split(0, 5) == (5, 0)
    assert run.method.stream(run).split(1, 5) == (3, 2)  # round(1.5) = 2
    assert run.method.stream(run).split(2, 10) == (7, 3)
    assert run.method.stream(run).batches(0, torch.Generator()) is None


# --------------------------------------------------------------------------------------------- what is recorded
def test_the_statistics_count_the_pool_its_labelled_share_and_what_inpainting_changed(world, tmp_path):
    """At tau = 0 every background pixel of a replay label takes the step-0 model's argmax: the inpainted share is
    the share of background pixels where that argmax is a class, worked out here from the model."""
    run = replay_run(world, tmp_path)
    assert run.method.stream(run).statistics(0) == {}
    stats = run.method.stream(run).statistics(1)
    data = PoolDataset(world.pool.root, classes=[1, 2], labels_dir=run.method.stream(run).labels_dir,
                       transform=eval_transform())
    model, _ = load_checkpoint(run.step_dir(0) / "model.pt", run.model_cfg)
    changed = 0
    for image, label in (data[i] for i in range(len(data))):
        with torch.no_grad():
            argmax = model.eval()(image[None])["out"][0].argmax(0)
        changed += int(((label == 0) & (argmax > 0)).sum())
    assert changed > 0
    assert stats == pytest.approx({"replay/pool_images": 5.0, "replay/labelled_share": np.mean([0, .25, .5, .75, .375]),
                                   "replay/inpainted_share": changed / (5 * SIDE * SIDE)})
    confident = replay_run(world, tmp_path / "tau", "method.inpaint_threshold=1.01").method
    assert confident.stream(run).statistics(1)["replay/inpainted_share"] == 0.0  # no confidence reaches 1.01


def test_the_statistics_of_a_pool_of_one_image(world, tmp_path):
    pool = noise_pool(tmp_path / "pool", {1: 1})
    run = recall_run(world, tmp_path, "method.inpaint_threshold=1.01", "last_step=1", protocol="1-3", pool=pool.root)
    stats = run.method.stream(run).statistics(1)
    labels = read_label(run.method.stream(run).labels_dir / f"{pool.records()[0]['id']}.png")
    assert stats == {"replay/pool_images": 1.0, "replay/labelled_share": float((labels == 1).mean()),
                     "replay/inpainted_share": 0.0}


def test_the_replay_figure_shows_one_image_per_old_class_with_its_label_and_target(world, tmp_path, monkeypatch):
    run = replay_run(world, tmp_path, "method.inpaint_threshold=1.01")  # targets = labels: nothing inpainted
    calls = []
    monkeypatch.setattr("recall.replay.stream.plot_grid", lambda *args: calls.append(args))
    assert run.method.stream(run).figures(0, "t", tmp_path) == []
    assert run.method.stream(run).figures(1, "my run", tmp_path / "fig") == [tmp_path / "fig" / "replay_labels.png"]
    (rows, headers, names, title, path), = calls
    assert (headers, names, title) == (["replay image", "evaluated label", "training target (step 1)"], ["1", "2"],
                                       "my run: replay at step 1")
    assert path == tmp_path / "fig" / "replay_labels.png"
    first = {c: world.pool.records(c)[0]["id"] for c in POOL_SHARES}  # the first image of each class
    for (image, label, target), c in zip(rows, (1, 2)):
        assert image.shape == (SIDE, SIDE, 3)
        assert np.array_equal(label, read_label(run.method.stream(run).labels_dir / f"{first[c]}.png"))
        assert np.array_equal(target, label)


def test_the_replay_figure_is_written(world, tmp_path):
    run = replay_run(world, tmp_path)
    path, = run.method.stream(run).figures(1, "my run", tmp_path)
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


# --------------------------------------------------------------------------------------------- RECALL's helpers
def test_recall_labels_each_group_with_the_model_that_learnt_it(world, tmp_path):
    run = recall_run(world, tmp_path, protocol="2-1-1")
    assert run.method.labeller(run, 0) == (run.step_dir(0) / "model.pt", [0, 1, 2])
    assert run.method.labeller(run, 1) == (run.step_dir(1) / "helper.pt", [0, 3])
    assert [run.method.needs_helper(run, s) for s in range(3)] == [False, True, False]  # not after the last step


@pytest.mark.parametrize("init", ["random", "step0"])
def test_a_helper_starts_from_the_step0_encoder_and_its_configured_head(world, tmp_path, init):
    run = recall_run(world, tmp_path, "model.head=aspp", f"method.helper_init={init}", protocol="2-1-1")
    step0, _ = load_checkpoint(run.step_dir(0) / "model.pt", run.model_cfg)
    helper = run.method.helper_model(run, 1)
    same = lambda a, b: all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())  # noqa: E731
    assert same(helper.encoder, step0.encoder)
    assert same(helper.head, step0.head) == (init == "step0")
    assert helper(torch.zeros(1, 3, SIDE, SIDE))["out"].shape[1] == 2  # background + step 1's one class


def test_helpers_from_the_step0_head_are_refused_before_training_with_a_head_that_has_none(world, tmp_path):
    """DeepLab-v2's head is its per-step classifiers: there is no step-0 head for a helper to start from."""
    run = recall_run(world, tmp_path, "model.head=deeplabv2", "method.helper_init=step0")
    with pytest.raises(UserError, match="helper_init=step0 .* model.head=deeplabv2 .* method.helper_init=random"):
        run.method.inputs(run, check=True)
    aspp = recall_run(world, tmp_path / "aspp", "model.head=aspp", "method.helper_init=step0")
    assert "replay_pool" in aspp.method.inputs(aspp, check=True)  # the same run with the ASPP head passes its checks


def test_a_helper_trains_at_its_own_rate_and_budget(world, tmp_path):
    run = recall_run(world, tmp_path, "method.helper_lr_factor=0.5", "train.lr_end=0.002", "train.lr_incremental=0.1")
    t = run.method.helper_train_config(run.train_cfg)
    assert (t.lr_incremental, t.lr_end, t.iters_per_class) == (0.05, 0.001, None)
    assert t.batch_size == run.train_cfg.batch_size
    run = recall_run(world, tmp_path / "it", "method.helper_iters_per_class=7", "train.iters_per_class=11")
    assert run.method.helper_train_config(run.train_cfg).iters_per_class == 7
    run = recall_run(world, tmp_path / "ep", "method.helper_iters_per_class=7")  # an epoch budget stays one
    assert run.method.helper_train_config(run.train_cfg).iters_per_class is None


def test_the_run_trains_and_saves_the_helper_on_the_step_s_images_in_its_label_space(world, tmp_path):
    """RECALL's extra model of step 1 of 2-1-1: the run trains it on step 1's loader with class 3 as its output 1
    and every other class void, it keeps the step-0 encoder (frozen), and it is saved with what it labels; no
    helper at steps 0 and 2."""
    run = recall_run(world, tmp_path, protocol="2-1-1")
    loaders = spy(run, "train_loader")
    for step in (0, 2):
        assert run.method.extra_model(run, step) is None
        run.train_extra_model(step, torch.Generator().manual_seed(0))
    assert loaders == [] and not list(run.run_dir.rglob("helper.pt"))
    run.train_extra_model(1, torch.Generator().manual_seed(0))
    assert [args[0] for args in loaders] == [1]
    helper, meta = load_checkpoint(run.step_dir(1) / "helper.pt", run.model_cfg)
    assert meta["classes_per_step"] == [1] and meta["helper_for"] == [3]
    step0, _ = load_checkpoint(run.step_dir(0) / "model.pt", run.model_cfg)
    assert all(torch.equal(v, step0.encoder.state_dict()[k]) for k, v in helper.encoder.state_dict().items())
    untrained = run.method.helper_model(run, 1).state_dict()
    decoder = {k: v for k, v in helper.state_dict().items() if not k.startswith("encoder.")}  # head + classifier
    assert decoder and not all(torch.equal(v, untrained[k]) for k, v in decoder.items())


@pytest.mark.parametrize("setting", ["overlapped", "disjoint"])
def test_the_helper_gets_its_label_map_the_step_s_generator_and_a_step_of_its_own(world, tmp_path, monkeypatch,
                                                                                  setting):
    """Step 1 of 1-2-1 learns classes 2 and 3: the helper's loader maps them to outputs 1 and 2 (background 0, the
    rest void), draws from the step's generator, and the helper trains through the run's loop as a fresh step of
    its own classes, in the run's setting, with the helper's learning rate."""
    import recall.experiment as experiment

    run = recall_run(world, tmp_path, f"setting={setting}", protocol="1-2-1")
    maps, trained = [], []
    real_loader, real_train = run.train_loader, experiment.train_step

    def recorded(step, generator, batch_size=None, label_map=None):
        maps.append((step, generator, label_map))
        return real_loader(step, generator, batch_size=batch_size, label_map=label_map)

    def train_step(model, method, loader, ctx, cfg, *args, **kw):
        trained.append((ctx, cfg))
        return real_train(model, method, loader, ctx, cfg, *args, **kw)

    monkeypatch.setattr(experiment, "train_step", train_step)
    run.train_loader = recorded
    generator = torch.Generator().manual_seed(0)
    run.train_extra_model(1, generator)
    (step, drawn_from, label_map), = maps
    expected = torch.full((256,), 255, dtype=torch.long)
    expected[0], expected[2], expected[3] = 0, 1, 2
    assert step == 1 and drawn_from is generator
    assert label_map.dtype == torch.long and torch.equal(label_map, expected)
    (ctx, cfg), = trained
    assert (ctx.step, ctx.task, ctx.new_classes, ctx.old_classes, ctx.setting, ctx.prev_model) == (
        1, [[1], [2, 3], [4]], [2, 3], [], setting, None)
    assert cfg.lr_incremental == pytest.approx(run.train_cfg.lr_incremental * run.method.helper_lr_factor)


# --------------------------------------------------------------------------------------------- recall run --dry-run
def test_the_plan_names_the_old_classes_and_recall_s_helper_training(world, tmp_path):
    from recall.step_plan import batches_per_epoch, plan_steps

    run = recall_run(world, tmp_path, protocol="2-1-1")
    train = run.classes_of("train")
    method_facts = lambda run: [{k: v for k, v in s.items() if k.startswith("extra_")}
                                for s in plan_steps(run, train, None)]
    images = len(run.train_ids(train, 1))
    helper = run.method.helper_train_config(run.train_cfg)
    assert method_facts(run) == [
        {}, {"extra_data": "2 old", "extra_training": {
            "what": "helper decoder", "batch": 4, "iterations": helper.epochs_incremental * batches_per_epoch(images, 4),
            "lr": pytest.approx(run.train_cfg.lr_incremental * 0.4)}},
        {"extra_data": "3 old"}]
    quiet = recall_run(world, tmp_path / "q", "method.replay_ratio=0", protocol="2-1-1")
    assert method_facts(quiet) == [{}, {}, {}]


def test_plan_inputs_of_a_complete_pool_count_the_images_left_to_label(world, tmp_path):
    run = replay_run(world, tmp_path, "replay.per_class=1")
    plan = run.method.stream(run).plan_inputs(1, [1])
    assert plan["lines"] == [("replay", f"folder pool {world.pool.root}: needs 1 per class x 2 old classes = 2 "
                                        "images; 5 images on disk, every class complete")]
    assert plan["eval_images"] == 0  # step 0's group is labelled (its marker is there)
    assert plan["replay"] == {"source": "folder", "pool": str(world.pool.root), "per_class": 1, "old_classes": 2,
                              "needed": 2, "exists": True, "images": 5, "short": [], "mapping": None,
                              "per_class_on_disk": {"1": 4, "2": 1}}
    (run.method.stream(run).labels_dir / "step0.done").unlink()
    assert run.method.stream(run).plan_inputs(1, [1])["eval_images"] == 5
    assert run.method.stream(run).plan_inputs(1, [])["eval_images"] == 0  # nothing left to train: nothing to label


def test_plan_inputs_name_short_classes_a_missing_pool_and_the_class_mapping(world, tmp_path):
    run = replay_run(world, tmp_path, "replay.per_class=3", f"replay.mapping={tmp_path / 'map.json'}")
    plan = run.method.stream(run).plan_inputs(1, [1])
    assert plan["lines"] == [
        ("replay", f"folder pool {world.pool.root}: needs 3 per class x 2 old classes = 6 images; 5 images on disk; "
                   "fewer than 3 for 1 classes (2)"),
        ("", f"class mapping {tmp_path / 'map.json'}: missing")]
    assert plan["replay"]["short"] == ["2"] and plan["replay"]["mapping_exists"] is False
    (tmp_path / "map.json").write_text("{}")
    lines = run.method.stream(run).plan_inputs(1, [1])["lines"]
    assert lines[1] == ("", f"class mapping {tmp_path / 'map.json'}: found")

    absent = recall_run(world, tmp_path / "absent", "replay.per_class=3", protocol="2-1-1", pool=tmp_path / "nowhere")
    plan = absent.method.stream(absent).plan_inputs(2, [1, 2])
    assert plan["lines"] == [("replay", f"folder pool {tmp_path / 'nowhere'}: needs 3 per class x 3 old classes = "
                                        "9 images; not built yet: build it with `recall classmap` (GAN sources) and "
                                        "`recall pool`, same overrides")]
    assert plan["eval_images"] == 9  # groups 0 (2 classes) and 1 (1 class), per_class each, none labelled yet
    assert (plan["replay"]["exists"], plan["replay"]["images"], plan["replay"]["per_class_on_disk"]) == (False, 0, {})


def test_plan_inputs_list_at_most_five_short_classes(world, tmp_path):
    run = recall_run(world, tmp_path, "replay.per_class=1", "dataset.num_classes=12", protocol="7-5",
                     pool=noise_pool(tmp_path / "pool", {1: 1}).root)
    plan = run.method.stream(run).plan_inputs(1, [1])
    assert plan["lines"][0][1].endswith("1 images on disk; fewer than 1 for 6 classes (2, 3, 4, 5, 6, ...)")
    assert plan["replay"]["needed"] == 7
    run.cfg.replay.per_class = None
    plan = run.method.stream(run).plan_inputs(1, [1])
    assert "needs 7 old classes; 1 images on disk" in plan["lines"][0][1] and plan["replay"]["needed"] is None
    assert plan["eval_images"] == 1  # per class on disk, 0 for the classes the pool lacks


def test_plan_inputs_without_a_per_class_budget(world, tmp_path):
    """replay.per_class unset: a class is short only without any image; a pool not built yet has nothing to label."""
    pool = noise_pool(tmp_path / "pool", {1: 1, 2: 2})
    run = recall_run(world, tmp_path, pool=pool.root)
    run.cfg.replay.per_class = None
    plan = run.method.stream(run).plan_inputs(1, [1])
    assert plan["replay"]["short"] == [] and plan["eval_images"] == 3
    absent = recall_run(world, tmp_path / "absent", pool=tmp_path / "nowhere")
    absent.cfg.replay.per_class = None
    assert absent.method.stream(absent).plan_inputs(1, [1])["eval_images"] == 0


def test_plan_inputs_list_five_short_classes_without_an_ellipsis(world, tmp_path):
    run = recall_run(world, tmp_path, "replay.per_class=1", "dataset.num_classes=12", protocol="6-6",
                     pool=noise_pool(tmp_path / "pool", {1: 1}).root)
    line = run.method.stream(run).plan_inputs(1, [1])["lines"][0][1]
    assert line.endswith("fewer than 1 for 5 classes (2, 3, 4, 5, 6)")


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if issubclass(cls, ReplayMethod)))
def test_every_replay_method_labels_a_group_with_a_model_of_the_step_that_learnt_it(world, tmp_path, name):
    """The contract of `labeller` (2-1-1): group 0 is labelled by the step-0 model (background and step 0's
    classes, in order); group k by a checkpoint of step k whose outputs are background first, then classes learnt
    up to step k, step k's among them."""
    run = protocol_run(world, tmp_path, "protocol=2-1-1", f"method={name}", "replay=folder",
                       f"replay.pool={world.pool.root}")
    assert run.method.labeller(run, 0) == (run.step_dir(0) / "model.pt", [0, 1, 2])
    for k in (1, 2):
        checkpoint, channels = run.method.labeller(run, k)
        assert checkpoint.parent == run.step_dir(k) and checkpoint.suffix == ".pt"
        assert channels[0] == 0 and set(run.task[k]) <= set(channels) <= {0, *range(1, 2 + k + 1)}
        assert len(channels) == len(set(channels)) and channels[1:] == sorted(channels[1:])


# --------------------------------------------------------------------------------------------- the stream's checks
def test_without_check_the_inputs_are_named_not_checked(world, tmp_path):
    """`inputs(run)` (provenance, the dry-run, MLflow tags) names what a replay run reads without checking it: a pool
    that is not there yet is named; `inputs(run, check=True)` (before step 0) refuses it."""
    missing = tmp_path / "no_pool"
    for method in sorted(name for name, cls in METHODS.items() if issubclass(cls, ReplayMethod)):  # RECALL's own too
        run = protocol_run(world, tmp_path / method, "protocol=2-2", f"method={method}", "replay=folder",
                           f"replay.pool={missing}")
        assert run.method.inputs(run) == {"replay_pool": missing}
        with pytest.raises(UserError, match="replay pool"):
            run.method.inputs(run, check=True)


def test_a_pool_of_another_source_is_refused_unless_asked_for(world, tmp_path):
    from recall.ownership import Marker, write_marker

    pool = tmp_path / "pool"
    shutil.copytree(world.pool.root, pool)
    write_marker(pool, Marker("pool", "recall pool", {"source": "toy_web"}))
    run = recall_run(world, tmp_path / "run", pool=pool)
    with pytest.raises(UserError) as error:
        run.method.inputs(run, check=True)
    assert str(error.value) == (f"replay pool {pool} holds images of source toy_web, not folder: pass replay=toy_web, "
                                "or replay.pool= a pool of folder (`recall pool replay=folder`), or "
                                "+replay.any_source=true to replay it as it is")
    with open_dict(run.cfg):
        run.cfg.replay.any_source = True
    with pytest.raises(UserError, match=r"^replay pool .* is not complete \(no pool.json"):  # its source is let be
        run.method.inputs(run, check=True)


def label_scores(cfg, records, labels_dir) -> dict:
    """A stand-in of a simulation's label scorer (`replay.truth.labels`): class 1 learnt at step 0, 3 later."""
    return {1: {"iou": 0.5, "empty": 0.0}, 3: {"iou": 0.25, "empty": 1.0}}


def test_the_label_quality_is_averaged_over_the_step0_classes_and_the_later_ones(world, tmp_path):
    run = recall_run(world, tmp_path, protocol="2-1-1")
    with open_dict(run.cfg):
        run.cfg.replay.truth = {"labels": "test_replay_method:label_scores"}
    names = run.class_names
    quality = run.method.stream(run).label_quality(SimpleNamespace(records=[], labels_dir=tmp_path))
    assert quality == {f"replay_labels/iou/{names[1]}": 0.5, f"replay_labels/empty/{names[1]}": 0.0,
                       f"replay_labels/iou/{names[3]}": 0.25, f"replay_labels/empty/{names[3]}": 1.0,
                       "replay_labels/iou_step0_classes": 0.5, "replay_labels/empty_step0_classes": 0.0,
                       "replay_labels/iou_later_classes": 0.25, "replay_labels/empty_later_classes": 1.0}
