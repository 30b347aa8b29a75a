"""`setting=partitioned` (Kwak et al., arXiv 2405.09858): each training image belongs to exactly one step, drawn as
the authors' code draws it (jihwankwak/CISS_partitioned, data_loader/dataset.py `generate_cil_partitioned`), on
hand-made image lists; then its wiring: the runner, the plans at paper scale and on the toy world, the command.
A whole toy run in this setting is in test_cli (it trains: not a fast test)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from recall.cli import main
from recall.config import compose
from recall.data.protocol import (
    PARTITIONED,
    SETTINGS,
    ProtocolError,
    partition,
    select_eval_images,
    select_train_images,
    steps,
    train_label_map,
)
from recall.data.voc import image_classes, read_split
from recall.errors import UserError
from recall.experiment import ProtocolRun
from recall.plan import build_plan
from recall.sim.toyworld import generate

RANDOM_INIT = "model.pretrained_file=null"

# --------------------------------------------------------------------------- the authors' draw, restated


@pytest.fixture
def global_rng():
    """The authors draw from NumPy's global generator: the reference below seeds it; put it back afterwards."""
    state = np.random.get_state()
    yield
    np.random.set_state(state)


def authors_split(lines: list[str], masks: dict[str, np.ndarray], task: list[list[int]], seed: int) -> list[list[str]]:
    """Their train split, restated from their code: train_voc.py seeds the global RNG with the run's seed
    (np.random.seed) before the dataset is built; generate_cil_partitioned then goes through train_aug.txt's lines,
    takes np.unique of the mask without 0 and 255, skips an image with nothing left, files it under
    labels[np.random.choice(len(labels))], and a step's images are its classes' lists in the task's class order."""
    np.random.seed(seed)
    task_info = {t: ([0] if t == 0 else []) + classes for t, classes in enumerate(task)}  # MiB's tables list bg
    per_class: dict[int, list[str]] = {c: [] for classes in task for c in classes}
    for line in lines:
        labels = np.unique(masks[line]).tolist()
        for void in (0, 255):
            if void in labels:
                labels.remove(void)
        if not labels:
            continue
        per_class[labels[np.random.choice(len(labels))]].append(line)
    return [[i for c in classes if c != 0 for i in per_class[c]] for classes in task_info.values()]


def random_masks(n: int, num_classes: int, rng_seed: int = 7, size: int = 6) -> dict[str, np.ndarray]:
    """`n` small uint8 masks of 0 to 4 classes each, some with void (255) pixels, ids in a shuffled order."""
    rng = np.random.default_rng(rng_seed)
    masks = {}
    for k in rng.permutation(n):
        mask = np.zeros((size, size), np.uint8)
        for c in rng.choice(np.arange(1, num_classes + 1), size=rng.integers(0, 5), replace=False):
            mask[rng.integers(size), rng.integers(size)] = c
        if rng.random() < 0.3:
            mask[0, 0] = 255
        masks[f"img_{k:04d}"] = mask
    return masks


def classes_of(masks: dict[str, np.ndarray]) -> dict[str, frozenset[int]]:
    """What recall.data.voc.image_classes makes of the masks: their values without 0 and 255, in the list's order."""
    return {i: frozenset(int(v) for v in np.unique(m)) - {0, 255} for i, m in masks.items()}


VOC = steps("15-1x5")
ADE = steps("100-10x5", num_classes=150)


@pytest.mark.parametrize("seed", [0, 1, 2, 12345])
@pytest.mark.parametrize("name,num_classes", [("15-1x5", 20), ("10-2x5", 20), ("19-1", 20), ("15-5", 20),
                                              ("100-10x5", 150), ("50-50x2", 150)])
def test_the_split_is_the_authors_on_a_random_image_list(global_rng, seed, name, num_classes):
    masks = random_masks(400, num_classes)
    task = steps(name, num_classes)
    theirs = authors_split(list(masks), masks, task, seed)
    ours = partition(classes_of(masks), task, seed)
    assert ours == [sorted(ids) for ids in theirs]
    assert all(select_train_images(classes_of(masks), task, t, PARTITIONED, seed=seed) == ours[t]
               for t in range(len(task)))


def test_the_split_follows_the_lists_order_as_their_line_by_line_draw_does(global_rng):
    """The draw goes down the split file's lines: another order is another split (ours: the order of the mapping,
    recall.data.voc.image_classes keeps the split file's)."""
    masks = random_masks(300, 20)
    backwards = dict(reversed(list(masks.items())))
    assert partition(classes_of(backwards), VOC, 0) == [sorted(ids) for ids in authors_split(list(backwards), masks, VOC, 0)]
    assert partition(classes_of(backwards), VOC, 0) != partition(classes_of(masks), VOC, 0)


# Hand-made: task 2-1-1 on 4 classes (step 0 = {1, 2}, step 1 = {3}, step 2 = {4}). RandomState(0) draws
# choice(2) = 0, choice(2) = 1, choice(3) = 1 for b, c, e (a, d, g have one class and draw nothing; f has none);
# RandomState(1) draws 1, 1, 0.
TASK = [[1, 2], [3], [4]]
IMAGES = {"a": {1}, "b": {1, 3}, "c": {2, 4}, "d": {3}, "e": {1, 2, 4}, "f": {0, 255}, "g": {4, 255, 0}}
BY_HAND = {
    0: [["a", "b", "e"],   # b: [1, 3][0] = 1; e: [1, 2, 4][1] = 2
        ["d"],
        ["c", "g"]],       # c: [2, 4][1] = 4
    1: [["a", "e"],        # e: [1, 2, 4][0] = 1
        ["b", "d"],        # b: [1, 3][1] = 3
        ["c", "g"]],       # c: [2, 4][1] = 4
}


@pytest.mark.parametrize("seed", [0, 1])
def test_images_with_classes_of_several_steps_go_where_the_draw_sends_them(seed):
    assert partition(IMAGES, TASK, seed) == BY_HAND[seed]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_select_train_images_gives_the_steps_share(seed, step):
    assert select_train_images(IMAGES, TASK, step, "partitioned", seed=seed) == BY_HAND[seed][step]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("task", [VOC, steps("10-2x5"), steps("10-1x10")])
def test_every_image_with_a_class_is_in_exactly_one_step_holding_one_of_its_classes(seed, task):
    images = classes_of(random_masks(300, 20))
    split = partition(images, task, seed)
    used = [i for ids in split for i in ids]
    assert len(used) == len(set(used))  # in at most one step
    assert set(used) == {i for i, classes in images.items() if classes}  # every image with a class in one
    for t, ids in enumerate(split):  # a step's images hold one of the step's classes: a subset of overlapped's
        assert all(images[i] & set(task[t]) for i in ids)
        assert set(ids) <= set(select_train_images(images, task, t, "overlapped"))
        assert ids == sorted(ids)


def test_an_image_with_one_class_is_in_that_classs_step_whatever_the_seed():
    images = {f"only_{c}": {c} for c in range(1, 21)}
    for seed in range(5):
        assert partition(images, VOC, seed) == [sorted(f"only_{c}" for c in classes) for classes in VOC]


def test_an_image_with_one_class_uses_no_random_number():
    """choice(1) draws nothing from a RandomState (their code calls it too): inserting such images anywhere leaves
    every other image's step as it was."""
    images = classes_of(random_masks(200, 20))
    padded = {}
    for k, (image_id, classes) in enumerate(images.items()):
        padded[image_id] = classes
        if k % 3 == 0:
            padded[f"single_{k}"] = {1 + k % 20}
    for seed in (0, 3):
        with_singles = partition(padded, VOC, seed)
        assert [[i for i in ids if not i.startswith("single_")] for ids in with_singles] == partition(images, VOC, seed)


def test_images_without_a_class_are_in_no_step():
    images = {"empty": set(), "void": {255}, "background": {0}, "both": (0, 255), "cat": {8}}
    assert partition(images, VOC, 0) == [["cat"], [], [], [], [], []]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_seed_gives_the_same_split_every_time_and_seeds_give_different_splits(seed):
    images = classes_of(random_masks(500, 20))
    first = partition(images, VOC, seed)
    assert partition(dict(images), VOC, seed) == first
    assert partition(images, VOC, np.int64(seed)) == first  # a NumPy integer is a seed too
    assert partition(images, VOC, seed + 10) != first


def test_the_draw_does_not_depend_on_the_task_only_the_grouping_does():
    """One image, one class, for every task string: a step of 15-5 is the union of the 15-1x5 steps it covers."""
    images = classes_of(random_masks(400, 20))
    fine, coarse = partition(images, VOC, 4), partition(images, steps("15-5"), 4)
    assert coarse == [fine[0], sorted(i for ids in fine[1:] for i in ids)]


def test_the_label_map_is_the_overlapped_and_disjoint_one():
    """In training, a partitioned step keeps its own classes; old and future classes are background."""
    for step in range(len(VOC)):
        lut = train_label_map(VOC, step, "partitioned")
        assert torch.equal(lut, train_label_map(VOC, step, "disjoint"))
        assert torch.equal(lut, train_label_map(VOC, step, "overlapped"))


def test_the_validation_images_are_unchanged():
    """Only the training split is partitioned: evaluation images have no setting (their code's test set too is
    every val image with a seen class, i.e. our mib convention)."""
    images = classes_of(random_masks(100, 20))
    for convention in ("recall", "mib", "plop"):
        for step in range(len(VOC)):
            chosen = select_eval_images(images, VOC, step, convention)
            seen = {c for classes in VOC[: step + 1] for c in classes}
            assert chosen == (sorted(images) if convention == "recall" else
                              sorted(i for i, c in images.items() if c & seen))


def test_partitioned_is_a_setting():
    assert PARTITIONED in SETTINGS and SETTINGS == tuple(sorted(SETTINGS))
    assert compose(["setting=partitioned"]).setting.name == "partitioned"


# --------------------------------------------------------------------------- bad inputs


def test_the_seed_is_required():
    with pytest.raises(ProtocolError) as error:
        select_train_images(IMAGES, TASK, 0, "partitioned")
    assert str(error.value) == ("the partitioned setting draws each image's step at random: pass its seed "
                                "(select_train_images(..., seed=<the run's seed>))")
    assert issubclass(ProtocolError, UserError)
    assert select_train_images(IMAGES, TASK, 0, "disjoint") == select_train_images(IMAGES, TASK, 0, "disjoint", seed=5)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "0", True, None])
def test_a_bad_seed_is_refused(bad):
    with pytest.raises(ProtocolError, match=r"seed must be an integer in 0\.\.2\*\*32-1, got " + repr(bad).replace(".", r"\.")):
        partition(IMAGES, TASK, bad)


def test_a_class_no_step_learns_is_refused_naming_the_image():
    with pytest.raises(ProtocolError, match=r"image 'x' has class\(es\) \[150\], which no step"):
        partition({"a": {1}, "x": {3, 150}}, VOC, 0)


def test_a_step_out_of_range_is_refused():
    with pytest.raises(ProtocolError, match="step 3 is out of range"):
        select_train_images(IMAGES, TASK, 3, "partitioned", seed=0)


# --------------------------------------------------------------------------- the toy world and the runner


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("partitioned") / "toy"
    generate(root, n_train=120, n_val=24, size=32, progress=False)
    return root


def toy_overrides(toy: Path, tmp: Path, *extra: str) -> list[str]:
    return [f"dataset.root={toy}", "protocol=15-1x5", "setting=partitioned", "method=ft", f"run_dir={tmp / 'run'}",
            *extra]


def test_the_runner_trains_each_step_on_its_partition_with_the_runs_seed(toy, tmp_path):
    classes = image_classes(toy, read_split(toy, "train"), progress=False)
    for seed in (0, 1):
        run = ProtocolRun(compose(toy_overrides(toy, tmp_path / str(seed), f"seed={seed}")))
        split = partition(classes, VOC, seed)
        assert [run.train_ids(classes, t) for t in range(len(VOC))] == split
        for t in range(len(VOC)):
            run.check_no_earlier_images(classes, t, split[t])  # the privacy check holds
            assert len(run.train_loader(t, torch.Generator()).dataset) == len(split[t])
    assert partition(classes, VOC, 0) != partition(classes, VOC, 1)


def test_the_privacy_check_refuses_an_image_of_an_earlier_partition(toy, tmp_path):
    classes = image_classes(toy, read_split(toy, "train"), progress=False)
    run = ProtocolRun(compose(toy_overrides(toy, tmp_path)))
    split = partition(classes, VOC, 0)
    with pytest.raises(RuntimeError) as error:
        run.check_no_earlier_images(classes, 2, [*split[2], split[1][0]])
    assert str(error.value) == f"privacy violation: step 2 would read 1 images of earlier steps (e.g. {[split[1][0]]})"
    earlier = sorted([*split[0], *split[1]])[:5]  # the message names the first three, sorted
    with pytest.raises(RuntimeError, match=rf"would read 5 images of earlier steps \(e\.g\. {re.escape(str(earlier[:3]))}\)$"):
        run.check_no_earlier_images(classes, 2, [*split[2], *earlier])


def test_the_toy_plan_counts_the_partition_and_evaluates_on_the_whole_val_set(toy, tmp_path):
    plan = build_plan(compose(toy_overrides(toy, tmp_path, "seed=2")))
    classes = image_classes(toy, read_split(toy, "train"), progress=False)
    assert [s["images"] for s in plan["steps"]] == [len(ids) for ids in partition(classes, VOC, 2)]
    assert sum(s["images"] for s in plan["steps"]) == sum(1 for c in classes.values() if c)  # each image once
    overlapped = build_plan(compose([*toy_overrides(toy, tmp_path, "seed=2"), "setting=overlapped"]))
    assert [s["eval_images"] for s in plan["steps"]] == [s["eval_images"] for s in overlapped["steps"]] == [24] * 6


def test_the_protocol_command_prints_the_partition(toy, capsys):
    assert main(["protocol", "15-1x5", f"dataset.root={toy}", "setting=partitioned", "seed=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    classes = image_classes(toy, read_split(toy, "train"), progress=False)
    assert out["setting"] == "partitioned"
    assert [s["images"] for s in out["steps"]] == partition(classes, VOC, 3)


# --------------------------------------------------------------------------- paper scale (--dry-run)


def test_paper_voc_plans_partitioned_at_1000_iterations_per_class(tmp_path):
    cfg = compose(["experiment=paper_voc", "protocol=15-1x5", "setting=partitioned", "method=mib",
                   f"dataset.root={tmp_path / 'voc'}", f"run_dir={tmp_path / 'run'}", RANDOM_INIT])
    plan = build_plan(cfg)
    assert plan["run"]["setting"] == "partitioned"
    assert [s["iterations"] for s in plan["steps"]] == [15000, 1000, 1000, 1000, 1000, 1000]


def test_paper_ade_plans_partitioned(tmp_path):
    cfg = compose(["experiment=paper_ade", "protocol=100-10", "setting=partitioned", "method=mib",
                   f"dataset.root={tmp_path / 'ade'}", f"run_dir={tmp_path / 'run'}", RANDOM_INIT])
    plan = build_plan(cfg)
    assert plan["run"]["setting"] == "partitioned" and [len(s["classes"]) for s in plan["steps"]] == [100] + [10] * 5


@pytest.mark.parametrize("experiment,protocol", [("paper_voc", "15-1x5"), ("paper_ade", "100-10")])
def test_the_dry_run_plans_the_partitioned_setting(tmp_path, capsys, experiment, protocol):
    assert main(["run", "--dry-run", f"experiment={experiment}", f"protocol={protocol}", "setting=partitioned",
                 "method=mib", RANDOM_INIT, f"dataset.root={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}"]) == 0
    assert " · partitioned · method mib" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_a_step_without_images_says_why_and_in_the_partitioned_setting_to_try_another_seed(toy, tmp_path):
    for setting, hint in (("partitioned", " (the partitioned setting gives each image to one step: on a small "
                                          "dataset a step may draw none; try another seed)"), ("disjoint", "")):
        run = ProtocolRun(compose([f"dataset.root={toy}", "protocol=15-1x5", f"setting={setting}", "method=ft",
                                   f"run_dir={tmp_path / setting}"]))
        run.train_ids = lambda classes, step: []
        with pytest.raises(UserError) as error:
            run.train_loader(1, torch.Generator())
        assert str(error.value) == (f"step 1 of 15-1x5 ({setting}) has no training image in {toy}; check "
                                    f"dataset.root and the protocol{hint}")
