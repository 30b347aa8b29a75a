"""Tests for recall.metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, jaccard_score

from recall.metrics import ConfusionMatrix, forgetting, mean_iou, summarize

N = 6


def random_batch(gen: torch.Generator, shape=(2, 9, 11), n: int = N):
    target = torch.randint(0, n, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < 0.1] = 255
    pred = torch.randint(0, n, shape, generator=gen)
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_sklearn_over_several_updates(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cm = ConfusionMatrix(N)
    preds, targets = [], []
    for _ in range(4):
        p, t = random_batch(gen)
        cm.update(p, t)
        preds.append(p.flatten())
        targets.append(t.flatten())
    p, t = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    keep = t != 255
    labels = list(range(N))
    expected = confusion_matrix(t[keep], p[keep], labels=labels)
    np.testing.assert_array_equal(cm.mat.numpy(), expected)
    assert cm.mat.dtype == torch.int64
    np.testing.assert_allclose(
        cm.iou(), jaccard_score(t[keep], p[keep], labels=labels, average=None, zero_division=0)
    )
    assert cm.pixel_accuracy() == pytest.approx((t[keep] == p[keep]).mean())


def test_reset_merge_and_json_roundtrip() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b, both = ConfusionMatrix(N), ConfusionMatrix(N), ConfusionMatrix(N)
    for cm in (a, b):
        p, t = random_batch(gen)
        cm.update(p, t)
        both.update(p, t)
    a += b
    assert torch.equal(a.mat, both.mat)
    restored = ConfusionMatrix.from_dict(json.loads(json.dumps(a.to_dict())))
    assert torch.equal(restored.mat, a.mat)
    a.reset()
    assert int(a.mat.sum()) == 0 and a.pixel_accuracy() is None
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(N + 1))


def test_only_ignore_pixels_is_noop() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(4, dtype=torch.long), torch.full((4,), 255))
    assert int(cm.mat.sum()) == 0


def test_absent_class_conventions() -> None:
    # 4 classes: 0 and 1 in the ground truth; 2 predicted but absent; 3 never seen.
    target = torch.tensor([0, 0, 1, 1, 255])
    pred = torch.tensor([0, 2, 1, 1, 3])  # the 3 falls on an ignored pixel -> dropped
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    rec, mib, plop = cm.iou("recall"), cm.iou("mib"), cm.iou("plop")
    np.testing.assert_allclose(rec[:2], [0.5, 1.0])
    np.testing.assert_allclose(mib[:2], [0.5, 1.0])
    np.testing.assert_allclose(plop[:2], [0.5, 1.0])
    # PLOP's stream_metrics.py masks absent classes as MiB's does (gt_sum != 0)
    assert rec[2] == 0.0 and math.isnan(mib[2]) and math.isnan(plop[2])  # predicted but absent
    assert math.isnan(rec[3]) and math.isnan(mib[3]) and math.isnan(plop[3])  # never seen
    assert cm.iou().dtype == np.float64
    with pytest.raises(ValueError, match="recall"):
        cm.iou("voc")


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (torch.tensor([0, 1]), torch.tensor([0, 3]), "target"),
        (torch.tensor([0, 1]), torch.tensor([0, -1]), "target"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "pred"),
        (torch.tensor([0, -2]), torch.tensor([0, 1]), "pred"),
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1]), "number of elements"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_invalid_inputs(pred, target, match) -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=match):
        cm.update(pred, target)
    assert int(cm.mat.sum()) == 0


def test_mean_iou_and_summarize() -> None:
    iou = np.array([0.9, 0.5, np.nan, 0.3, 0.1])
    assert mean_iou(iou, []) is None
    assert mean_iou(iou, [2]) is None
    assert mean_iou(iou, [1, 2]) == pytest.approx(0.5)
    s = summarize(iou, old_classes=[1, 2], new_classes=[3, 4])
    assert s["all"] == pytest.approx((0.9 + 0.5 + 0.3 + 0.1) / 4)
    assert s["all_no_bg"] == pytest.approx((0.5 + 0.3 + 0.1) / 3)
    assert s["old"] == pytest.approx((0.9 + 0.5) / 2)
    assert s["old_no_bg"] == pytest.approx(0.5)
    assert s["new"] == pytest.approx(0.2)
    assert summarize(iou, [1], [])["new"] is None


def test_forgetting() -> None:
    history = [
        np.array([0.9, 0.8, np.nan, np.nan]),  # step 0: classes 0, 1
        np.array([0.8, 0.6, 0.7, np.nan]),  # step 1: class 2 added
        np.array([0.7, 0.5, 0.4, 0.6]),  # step 2: class 3 added
    ]
    introduced = {0: 0, 1: 0, 2: 1, 3: 2}
    f = forgetting(history, introduced)
    assert f[0] == pytest.approx(0.2)
    assert f[1] == pytest.approx(0.3)
    assert f[2] == pytest.approx(0.3)
    assert f[3] is None  # introduced at the current step
    assert forgetting(history[:1], {0: 0, 1: 0}) == {0: None, 1: None}
    assert 3 not in forgetting(history[:2], introduced)  # not yet introduced
    assert forgetting([], introduced) == {}


def test_forgetting_is_measured_from_the_best_earlier_iou_not_the_first() -> None:
    """A class that rose after it was introduced and then fell has forgotten from its peak: 0.8 - 0.3, not
    0.5 - 0.3 (the first earlier IoU) nor 0.8 - ... of a step before it was introduced."""
    history = [np.array([0.9, 0.5, np.nan]), np.array([0.7, 0.8, 0.95]), np.array([0.6, 0.3, 0.4])]
    f = forgetting(history, {0: 0, 1: 0, 2: 1})
    assert f[1] == pytest.approx(0.5)  # rise 0.5 -> 0.8, then fall to 0.3
    assert f[0] == pytest.approx(0.3)  # 0.9 at step 0 is the best
    assert f[2] == pytest.approx(0.55)  # introduced at step 1: its only earlier value


# --- what mutation testing found untested here (docs/testing.md) -------------------------------------------------

def test_hmean_mean_forgetting_and_derived() -> None:
    """The derived numbers of a step: harmonic mean of old_no_bg and new, mean of the known forgetting values of
    the old classes (the step-0 classes without background: never background, never a class learnt later)."""
    from recall.metrics import derived, hmean, mean_forgetting

    assert hmean(0.6, 0.2) == pytest.approx(0.3) and hmean(0.2, 0.6) == pytest.approx(0.3)
    assert hmean(None, 0.2) is None and hmean(0.6, None) is None and hmean(0.0, 0.0) == 0.0
    assert mean_forgetting({"a": 0.1, "b": None, "c": 0.4}, "abc") == pytest.approx(0.25)
    assert mean_forgetting({"a": 0.1, "b": None, "c": 0.4}, "ab") == pytest.approx(0.1)
    assert mean_forgetting({"a": None}, "a") is None and mean_forgetting({}, "a") is None
    result = {"miou": {"old_no_bg": 0.6, "new": 0.2}, "old_classes": ["a", "b"],
              "forgetting": {"background": 0.5, "a": 0.2, "b": None, "later": 0.0}}
    assert derived(result) == {"hmean": pytest.approx(0.3), "forgetting_mean": pytest.approx(0.2)}
    assert derived({"miou": {"new": 0.2}}) == {"hmean": None, "forgetting_mean": None}


def test_errors_name_what_is_wrong() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(TypeError, match="cannot merge int into ConfusionMatrix"):
        cm.merge(3)
    with pytest.raises(ValueError, match="cannot merge matrices with 4 and 3 classes"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match=r"matrix shape \(2, 2\) != \(3, 3\)"):
        ConfusionMatrix.from_dict({"num_classes": 3, "mat": [[0, 0], [0, 0]]})
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="ignore_index=2 collides with a class index"):
        ConfusionMatrix(3, ignore_index=2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 255]))
    assert repr(cm) == "ConfusionMatrix(num_classes=3, ignore_index=255, pixels=1)"


def test_from_dict_keeps_the_ignore_index_and_the_device() -> None:
    """A matrix read back keeps a non-default ignore_index (a record without one: 255) and lands on the device
    asked for ("meta" stands for an accelerator here: no data, but its own device)."""
    cm = ConfusionMatrix(3, ignore_index=300)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 300]))
    assert ConfusionMatrix.from_dict(cm.to_dict()).ignore_index == 300
    assert ConfusionMatrix.from_dict({"num_classes": 3, "mat": cm.mat.tolist()}).ignore_index == 255
    assert ConfusionMatrix.from_dict(cm.to_dict(), device="meta").mat.device.type == "meta"


def test_the_class_count_and_ignore_index_bounds() -> None:
    """One class is a valid matrix; an ignore_index is refused exactly when it is a class index (0..N-1)."""
    assert ConfusionMatrix(1).mat.shape == (1, 1)
    assert ConfusionMatrix(3, ignore_index=3).ignore_index == 3
    for bad in (0, 1, 2):
        with pytest.raises(ValueError, match=f"ignore_index={bad} collides"):
            ConfusionMatrix(3, ignore_index=bad)


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (torch.tensor([0, 1]), torch.tensor([0, 3]), r"target contains label 3 outside \[0, 3\) \(other than "
                                                     r"ignore_index=255\)$"),
        (torch.tensor([0, 1]), torch.tensor([0, -1]), r"target contains label -1 outside"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), r"pred contains label 3 outside \[0, 3\)$"),
        (torch.tensor([0, -2]), torch.tensor([0, 1]), r"pred contains label -2 outside \[0, 3\)$"),
        ([0, 1], torch.tensor([0, 1]), r"^pred and target must be torch tensors$"),
        (torch.tensor([0, 1]), [0, 1], r"^pred and target must be torch tensors$"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), r"pred must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([0, 1]), torch.tensor([True, False]), r"target must be an integer tensor, got dtype torch.bool"),
    ],
)
def test_invalid_inputs_are_named_in_the_message(pred, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(pred, target)


def test_uint8_masks_do_not_overflow_the_pair_index() -> None:
    """Masks read from PNGs are uint8: target * N + pred must be computed in int64 (19 * 20 + 19 > 255)."""
    cm = ConfusionMatrix(20)
    cm.update(torch.tensor([19, 0], dtype=torch.uint8), torch.tensor([19, 19], dtype=torch.uint8))
    assert int(cm.mat[19, 19]) == 1 and int(cm.mat[19, 0]) == 1 and int(cm.mat.sum()) == 2


def test_iou_of_absent_classes_warns_nothing() -> None:
    import warnings

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(cm.iou()[2])


def test_forgetting_with_the_growing_iou_arrays_of_a_run() -> None:
    """In a run, step s's IoU array covers the classes seen by s only, and a class map need not be in step order:
    earlier steps are read from the class's own step on, and every class up to the current step is scored."""
    history = [np.array([0.9, 0.5]), np.array([0.8, 0.7, 0.6]), np.array([0.7, 0.4, 0.3])]
    assert forgetting(history, {0: 0, 1: 0, 2: 1}) == pytest.approx({0: 0.2, 1: 0.3, 2: 0.3})
    assert forgetting(history[:2], {1: 0, 2: 1, 0: 0, 3: 5}) == pytest.approx({0: 0.1, 1: -0.2, 2: None})
    assert forgetting(history[:2], {1: 5, 2: 1}) == {2: None}  # class 1 comes later: skipped, not the end


def test_a_derived_number_is_one_function_and_one_registry_line(monkeypatch) -> None:
    """Registering a Summary is all it takes: MLflow logs it, the study's cells and tables carry it, and
    `recall tune` can optimize it in its direction; nothing else names it."""
    from recall import metrics, study_report, tracking, tune

    def old_minus_new(result):  # the one function
        miou = result["miou"]
        return miou["old_no_bg"] - miou["new"]

    monkeypatch.setitem(metrics.SUMMARIES, "gap",  # the one registry line
                        metrics.Summary("gap", "old − new", "miou/gap", "minimize", old_minus_new))
    result = {"step": 1, "miou": {"all": 0.5, "old_no_bg": 0.6, "new": 0.2}, "iou": {}, "forgetting": {},
              "old_classes": []}
    assert metrics.derived(result)["gap"] == pytest.approx(0.4)
    assert tracking.step_metrics(result)["miou/gap"] == pytest.approx(0.4)
    assert "gap" in study_report.study_metrics()
    cells = {"toy": {"15-1x5": {"mib": {"seeds": [0], **{m: study_report.mean_std([0.4])
                                                          for m in study_report.study_metrics()}}}}}
    table = study_report.study_tables(cells, ["mib"])["toy_15-1x5"]
    assert "old − new" in table["columns"] and table["rows"][0][table["columns"].index("old − new")] == "0.400"
    assert tune.directions("gap") == ("minimize",) and tune.objective_names("gap") == ["miou_gap"]
    assert tune.step_value(result, "gap") == pytest.approx(0.4)
    assert tune.final_values(result, "gap") == [pytest.approx(0.4)]


def test_a_summary_reads_its_miou_or_computes_its_derived_number() -> None:
    from recall.metrics import SUMMARIES

    result = {"miou": {"all": 0.5, "old_no_bg": 0.6, "new": 0.3}}
    assert SUMMARIES["all"].value(result) == 0.5 and not SUMMARIES["all"].derived
    assert SUMMARIES["new"].value(result) == 0.3
    assert SUMMARIES["hmean"].derived and SUMMARIES["hmean"].value(result) == pytest.approx(2 * 0.6 * 0.3 / 0.9)
