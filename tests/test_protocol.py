"""Task strings, MiB-style image selection and label maps (recall.data.protocol)."""

from __future__ import annotations

import pytest
import torch

from recall.data.protocol import (
    CONVENTIONS,
    PAPER_PROTOCOLS,
    SETTINGS,
    ProtocolError,
    canonical,
    eval_label_map,
    get_convention,
    introduced_at,
    select_eval_images,
    select_train_images,
    short,
    steps,
    train_label_map,
)


def r(first: int, last: int) -> list[int]:
    """Classes first..last inclusive."""
    return list(range(first, last + 1))


# --------------------------------------------------------------------------- task strings

VOC_TASKS = {
    "19-1": [r(1, 19), [20]],
    "15-5": [r(1, 15), r(16, 20)],
    "10-5-5": [r(1, 10), r(11, 15), r(16, 20)],
    "15-1x5": [r(1, 15), [16], [17], [18], [19], [20]],
    "10-10": [r(1, 10), r(11, 20)],
    "10-2x5": [r(1, 10), [11, 12], [13, 14], [15, 16], [17, 18], [19, 20]],
    "10-1x10": [r(1, 10)] + [[c] for c in r(11, 20)],
    "joint": [r(1, 20)],
}


def test_paper_protocols_are_all_tested():
    assert set(PAPER_PROTOCOLS) == set(VOC_TASKS)


@pytest.mark.parametrize("name", PAPER_PROTOCOLS)
def test_paper_protocols_parse(name):
    assert steps(name) == VOC_TASKS[name]


@pytest.mark.parametrize(
    "alias, name",
    [("15-1-1-1-1-1", "15-1x5"), ("10-5x2", "10-5-5"), ("10-2-2-2-2-2", "10-2x5"), ("10-1x10", "10-1-1-1-1-1-1-1-1-1-1")],
)
def test_aliases_give_the_same_steps(alias, name):
    assert steps(alias) == steps(name)


def test_surrounding_whitespace_is_stripped():
    assert steps("  15-5\n") == VOC_TASKS["15-5"]
    assert steps(" joint ") == VOC_TASKS["joint"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("100-50", [r(1, 100), r(101, 150)]),
        ("100-10x5", [r(1, 100), r(101, 110), r(111, 120), r(121, 130), r(131, 140), r(141, 150)]),
        ("50-50x2", [r(1, 50), r(51, 100), r(101, 150)]),
        ("joint", [r(1, 150)]),
    ],
)
def test_ade_protocols(name, expected):
    assert steps(name, num_classes=150) == expected


@pytest.mark.parametrize(
    "name, long, compact",
    [
        ("15-1x5", "15-1-1-1-1-1", "15-1x5"),
        ("15-1-1-1-1-1", "15-1-1-1-1-1", "15-1x5"),
        ("10-5-5", "10-5-5", "10-5x2"),
        ("10-5x2", "10-5-5", "10-5x2"),
        ("19-1", "19-1", "19-1"),
        ("10-10", "10-10", "10-10"),
        ("10-2x5", "10-2-2-2-2-2", "10-2x5"),
        ("10-1x10", "10-" + "-".join(["1"] * 10), "10-1x10"),
        ("10-5-1-1-1-1-1", "10-5-1-1-1-1-1", "10-5-1x5"),
        ("9-1x2-2x3-3", "9-1-1-2-2-2-3", "9-1x2-2x3-3"),
        ("joint", "joint", "joint"),
    ],
)
def test_canonical_and_short(name, long, compact):
    assert canonical(name) == long
    assert short(name) == compact
    assert short(canonical(name)) == compact
    assert canonical(short(name)) == long
    assert steps(long) == steps(compact) == steps(name)


def test_short_checks_total_only_when_asked():
    assert short("100-10-10-10-10-10") == "100-10x5"
    assert short("100-10-10-10-10-10", num_classes=150) == "100-10x5"
    with pytest.raises(ProtocolError):
        short("100-10-10-10-10-10", num_classes=20)


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "15", "15-", "-5", "15--5", "15-5x", "15-5x0", "15-0-5", "0-20", "a-b", "15-6", "15 - 5", "20-1",
     "15-1x4", "15-x5", "15-5X1", "15x1-5", "15-5x1x1", "Joint", "15-+5"],
)
def test_bad_task_strings(bad):
    with pytest.raises(ProtocolError) as info:
        steps(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "15-1x5" in message  # shows examples of what is expected


def test_total_mismatch_message_names_both_numbers():
    with pytest.raises(ProtocolError, match=r"add up to 19 classes but the dataset has 20"):
        steps("15-1x4")
    with pytest.raises(ProtocolError, match=r"add up to 20 .* has 150"):
        steps("15-5", num_classes=150)


def test_protocol_error_is_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_introduced_at():
    assert introduced_at(steps("2-1-1", num_classes=4)) == {1: 0, 2: 0, 3: 1, 4: 2}
    mapping = introduced_at(steps("15-1x5"))
    assert mapping[15] == 0 and mapping[16] == 1 and mapping[20] == 5 and len(mapping) == 20


# --------------------------------------------------------------------------- image selection

# Protocol 2-1-1 on 4 classes: step 0 = {1, 2}, step 1 = {3}, step 2 = {4}.
IMAGES = {"a": {1}, "b": {1, 2}, "c": {3}, "d": {1, 3}, "e": {3, 4}, "f": {2, 4}}
TASK = [[1, 2], [3], [4]]

# Worked out by hand:
# overlapped = has a current class;  disjoint = has a current class and no future class.
EXPECTED_TRAIN = {
    "overlapped": [
        ["a", "b", "d", "f"],  # step 0: 1 or 2 present
        ["c", "d", "e"],       # step 1: 3 present
        ["e", "f"],            # step 2: 4 present
    ],
    "disjoint": [
        ["a", "b"],            # d has future 3, f has future 4
        ["c", "d"],            # e has future 4
        ["e", "f"],            # no future classes at the last step
    ],
}


def test_toy_task_parses():
    assert steps("2-1-1", num_classes=4) == TASK


@pytest.mark.parametrize("setting", ["overlapped", "disjoint"])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_select_train_images(setting, step):
    assert select_train_images(IMAGES, TASK, step, setting) == EXPECTED_TRAIN[setting][step]


@pytest.mark.parametrize("step", [0, 1, 2])
def test_sequential_uses_the_disjoint_images(step):
    assert select_train_images(IMAGES, TASK, step, "sequential") == select_train_images(IMAGES, TASK, step, "disjoint")


@pytest.mark.parametrize("setting", ["disjoint", "sequential"])
def test_disjoint_uses_each_image_at_most_once(setting):
    used = [i for t in range(len(TASK)) for i in select_train_images(IMAGES, TASK, t, setting)]
    assert len(used) == len(set(used))


def test_overlapped_reuses_images():
    used = [i for t in range(len(TASK)) for i in select_train_images(IMAGES, TASK, t, "overlapped")]
    assert len(used) > len(set(used)) and set(used) == set(IMAGES)


def test_selection_ignores_background_and_border_entries():
    images = {"x": [0, 255, 1], "y": (0, 255), "z": [255, 3]}
    assert select_train_images(images, TASK, 0, "disjoint") == ["x"]
    assert select_train_images(images, TASK, 1, "overlapped") == ["z"]


def test_unknown_setting_lists_valid_ones():
    with pytest.raises(ProtocolError) as info:
        select_train_images(IMAGES, TASK, 0, "overlap")
    assert all(s in str(info.value) for s in SETTINGS)


def test_step_out_of_range():
    with pytest.raises(ProtocolError, match="out of range"):
        select_train_images(IMAGES, TASK, 3, "disjoint")


EVAL_IMAGES = {**IMAGES, "g": set(), "h": {4}}


@pytest.mark.parametrize("step", [0, 1, 2])
def test_recall_evaluates_on_every_image(step):
    assert select_eval_images(EVAL_IMAGES, TASK, step) == sorted(EVAL_IMAGES)


@pytest.mark.parametrize("convention", ["mib", "plop"])
def test_mib_and_plop_evaluate_on_images_with_a_seen_class(convention):
    assert select_eval_images(EVAL_IMAGES, TASK, 0, convention) == ["a", "b", "d", "f"]
    assert select_eval_images(EVAL_IMAGES, TASK, 1, convention) == ["a", "b", "c", "d", "e", "f"]
    assert select_eval_images(EVAL_IMAGES, TASK, 2, convention) == ["a", "b", "c", "d", "e", "f", "h"]


def test_unknown_convention():
    with pytest.raises(ProtocolError, match="'recall', 'mib', 'plop'"):
        select_eval_images(EVAL_IMAGES, TASK, 0, "ssul")


# --------------------------------------------------------------------------- label maps

# A mask holding background, every class, the border, and an out-of-range value.
MASK = torch.tensor([[0, 1, 2, 3], [4, 255, 7, 0]], dtype=torch.uint8)


def apply(lut: torch.Tensor, mask: torch.Tensor = MASK) -> list[list[int]]:
    return lut[mask.long()].tolist()


@pytest.mark.parametrize(
    "setting, step, border, expected",
    [
        # step 0: current {1, 2}; future {3, 4} -> 0
        ("overlapped", 0, True, [[0, 1, 2, 0], [0, 0, 255, 0]]),
        ("overlapped", 0, False, [[0, 1, 2, 0], [0, 255, 255, 0]]),
        ("disjoint", 0, True, [[0, 1, 2, 0], [0, 0, 255, 0]]),
        ("sequential", 0, False, [[0, 1, 2, 0], [0, 255, 255, 0]]),
        # step 1: current {3}; old {1, 2} -> 0 unless sequential; future {4} -> 0
        ("overlapped", 1, True, [[0, 0, 0, 3], [0, 0, 255, 0]]),
        ("disjoint", 1, True, [[0, 0, 0, 3], [0, 0, 255, 0]]),
        ("disjoint", 1, False, [[0, 0, 0, 3], [0, 255, 255, 0]]),
        ("sequential", 1, True, [[0, 1, 2, 3], [0, 0, 255, 0]]),
        ("sequential", 1, False, [[0, 1, 2, 3], [0, 255, 255, 0]]),
        # step 2: current {4}
        ("overlapped", 2, False, [[0, 0, 0, 0], [4, 255, 255, 0]]),
        ("sequential", 2, True, [[0, 1, 2, 3], [4, 0, 255, 0]]),
    ],
)
def test_train_label_map(setting, step, border, expected):
    lut = train_label_map(TASK, step, setting, num_classes=4, border_to_background=border)
    assert lut.shape == (256,) and lut.dtype == torch.long
    assert apply(lut) == expected


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("border", [True, False])
def test_train_label_map_on_voc(setting, border):
    task = steps("15-1x5")
    lut = train_label_map(task, 2, setting, border_to_background=border)  # step 2 learns class 17
    assert lut[17] == 17 and lut[0] == 0
    assert lut[18] == 0 and lut[20] == 0  # future
    sequential = setting == "sequential"
    assert lut[1] == (1 if sequential else 0) and lut[16] == (16 if sequential else 0)  # old
    assert lut[255] == (0 if border else 255)
    assert (lut[21:255] == 255).all()


def test_train_label_map_needs_matching_num_classes():
    with pytest.raises(ProtocolError, match="num_classes"):
        train_label_map(steps("100-50", num_classes=150), 0, "overlapped")
    lut = train_label_map(steps("100-50", num_classes=150), 1, "overlapped", num_classes=150)
    assert lut[150] == 150 and lut[100] == 0 and lut[151] == 255


@pytest.mark.parametrize(
    "step, future, expected",
    [
        (0, "ignore", [[0, 1, 2, 255], [255, 255, 255, 0]]),
        (0, "background", [[0, 1, 2, 0], [0, 255, 255, 0]]),
        (1, "ignore", [[0, 1, 2, 3], [255, 255, 255, 0]]),
        (1, "background", [[0, 1, 2, 3], [0, 255, 255, 0]]),
        (2, "ignore", [[0, 1, 2, 3], [4, 255, 255, 0]]),
        (2, "background", [[0, 1, 2, 3], [4, 255, 255, 0]]),
    ],
)
def test_eval_label_map(step, future, expected):
    lut = eval_label_map(TASK, step, num_classes=4, future=future)
    assert lut.shape == (256,) and lut.dtype == torch.long
    assert apply(lut) == expected


def test_eval_label_map_rejects_unknown_future():
    with pytest.raises(ProtocolError, match="'ignore', 'background'"):
        eval_label_map(TASK, 0, num_classes=4, future="drop")


def test_label_maps_are_fresh_tensors():
    a = train_label_map(TASK, 0, "disjoint", num_classes=4)
    a[1] = 99
    assert train_label_map(TASK, 0, "disjoint", num_classes=4)[1] == 1


# --------------------------------------------------------------------------- conventions


def test_conventions_table():
    recall, mib, plop = CONVENTIONS["recall"], CONVENTIONS["mib"], CONVENTIONS["plop"]
    assert (recall.border_in_training, recall.future_at_test, recall.eval_images) == ("background", "ignore", "all")
    assert (mib.border_in_training, mib.future_at_test, mib.eval_images) == ("background", "ignore", "seen_non_bg")
    assert (plop.border_in_training, plop.future_at_test, plop.eval_images) == ("ignore", "background", "seen_non_bg")
    assert [c.absent_class for c in (recall, mib, plop)] == ["recall", "mib", "plop"]
    assert [c.old_includes_bg for c in (recall, mib, plop)] == [False, False, True]
    assert recall.border_to_background and mib.border_to_background and not plop.border_to_background


def test_conventions_drive_the_label_maps():
    plop = get_convention("plop")
    lut = eval_label_map(TASK, 0, num_classes=4, future=plop.future_at_test)
    assert lut[3] == 0
    lut = train_label_map(TASK, 0, "overlapped", num_classes=4, border_to_background=plop.border_to_background)
    assert lut[255] == 255


def test_get_convention_error():
    assert get_convention("mib") is CONVENTIONS["mib"]
    with pytest.raises(ProtocolError, match="unknown evaluation convention 'MiB'"):
        get_convention("MiB")


# --------------------------------------------------------------------------- ADE20K


# MiB's tasks.py, tasks_ade (class lists without background 0): "100-50", "100-10", and "50" (its paper's 50-50)
MIB_ADE_TASKS = {
    "100-50": [list(range(1, 101)), list(range(101, 151))],
    "100-10": [list(range(1, 101)), *[list(range(s, s + 10)) for s in range(101, 151, 10)]],
    "50-50": [list(range(1, 51)), list(range(51, 101)), list(range(101, 151))],
}


@pytest.mark.parametrize("option", sorted(MIB_ADE_TASKS))
def test_ade20k_protocols_are_mibs(option):
    from recall.config import compose

    name = str(compose(["dataset=ade20k", f"protocol={option}"]).protocol.name)
    assert steps(name, 150) == MIB_ADE_TASKS[option]
    with pytest.raises(ProtocolError, match="add up to 150"):
        steps(name, 20)


@pytest.mark.parametrize("bad, problem", [
    ("", "the string is empty"),
    ("   ", "the string is empty"),
    ("15--5", "empty token (leading, trailing or double '-')"),
    ("-15-5", "empty token (leading, trailing or double '-')"),
    ("a-5", "the first token 'a' must be a positive integer"),
    ("0-20", "the number of classes at step 0 must be a positive integer, got '0'"),
    ("15-y", "token 'y' is neither 'n' nor 'nxk'"),
    ("15-0-5", "the class count in '0' must be a positive integer, got '0'"),
    ("15-5x0", "the repeat count in '5x0' must be a positive integer, got '0'"),
])
def test_each_bad_task_string_says_what_is_wrong(bad, problem):
    import re

    with pytest.raises(ProtocolError, match="^" + re.escape(f"invalid task {bad!r}: {problem}; expected 'joint'")):
        steps(bad)


def test_step_and_setting_errors_give_the_valid_values():
    import re

    task = steps("15-5")
    with pytest.raises(ProtocolError, match=re.escape("step 2 is out of range for a task with 2 steps (0..1)") + "$"):
        train_label_map(task, 2, "overlapped")
    with pytest.raises(ProtocolError, match="^" + re.escape(
            "unknown setting 'mixed'; expected one of 'disjoint', 'overlapped', 'partitioned', 'sequential'") + "$"):
        train_label_map(task, 0, "mixed")


def test_canonical_uses_the_dataset_class_count():
    assert canonical("100-50x2", 200) == "100-50-50"


def test_label_map_defaults_are_the_voc_recall_conventions():
    task = steps("15-5")
    train, evaluation = train_label_map(task, 0, "overlapped"), eval_label_map(task, 0)  # 20 classes
    assert train[255] == 0  # the border becomes background (RECALL, MiB)
    assert evaluation[16] == 255 and evaluation[15] == 15  # future classes are ignored
