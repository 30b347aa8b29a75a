"""Segmentation metrics: confusion matrix, per-class IoU, old/new/all summaries, forgetting.

Conventions (see docs/design.md, "Conventions differ between the papers"):

* The confusion matrix is accumulated over the whole evaluation set; pixels whose ground
  truth equals ``ignore_index`` (255) are dropped. Rows = ground truth, columns = prediction.
* Per-class IoU = TP / (TP + FP + FN). A class absent from the ground truth is handled by
  the ``absent`` convention of :meth:`ConfusionMatrix.iou`:

  ========  =====================================  ======================
  absent    predicted but absent (TP+FN=0, FP>0)    never seen (all = 0)
  ========  =====================================  ======================
  "recall"  0.0                                     NaN
  "mib"     NaN                                     NaN
  "plop"    NaN                                     NaN  (PLOP's stream_metrics.py: MiB's mask)
  ========  =====================================  ======================

  NaN classes are excluded from the means (:func:`mean_iou` is a nanmean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

ABSENT_CONVENTIONS = ("recall", "mib", "plop")


class ConfusionMatrix:
    """Accumulating ``[N, N]`` confusion matrix (rows = ground truth, cols = prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Any = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class index (num_classes={num_classes})"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch. ``pred`` and ``target`` are integer tensors with the same numel.

        Pixels with ``target == ignore_index`` are dropped. Raises ValueError on a shape
        mismatch, on non-integer input, or on labels outside ``[0, num_classes)``.
        """
        pred, target = self._check_inputs(pred, target)
        n = self.num_classes
        keep = target != self.ignore_index
        t = target[keep]
        p = pred[keep]
        if t.numel() == 0:
            return
        self._check_range(t, "target", extra=f" (other than ignore_index={self.ignore_index})")
        self._check_range(p, "pred")
        idx = t.to(torch.int64) * n + p.to(torch.int64)
        counts = torch.bincount(idx, minlength=n * n)
        self.mat += counts.view(n, n).to(self.mat.device)

    def _check_inputs(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise ValueError("pred and target must be torch tensors")
        if pred.numel() != target.numel():
            raise ValueError(
                f"pred and target must have the same number of elements, got shapes "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        for name, x in (("pred", pred), ("target", target)):
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        return pred.reshape(-1), target.reshape(-1)

    def _check_range(self, x: Tensor, name: str, extra: str = "") -> None:
        lo, hi = torch.aminmax(x)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} contains label {bad} outside [0, {self.num_classes}){extra}"
            )

    def reset(self) -> None:
        """Zero the matrix."""
        self.mat.zero_()

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (same num_classes) into this one, in place; returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge {type(other).__name__} into ConfusionMatrix")
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge matrices with {other.num_classes} and {self.num_classes} classes"
            )
        self.mat += other.mat.to(self.mat.device)
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    # ------------------------------------------------------------------ scores
    def iou(self, absent: str = "recall") -> np.ndarray:
        """Per-class IoU (float64, length N) under the ``absent`` convention (module docstring)."""
        if absent not in ABSENT_CONVENTIONS:
            raise ValueError(f"unknown absent convention {absent!r}; valid: {ABSENT_CONVENTIONS}")
        m = self.mat.detach().cpu().numpy().astype(np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1)  # TP + FN
        pr = m.sum(axis=0)  # TP + FP
        union = gt + pr - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        if absent in ("mib", "plop"):  # PLOP's metrics/stream_metrics.py is MiB's: mask = gt_sum != 0
            iou[gt == 0] = np.nan
        return iou

    def pixel_accuracy(self) -> float | None:
        """Fraction of non-ignored pixels predicted correctly (None if no pixel)."""
        total = int(self.mat.sum())
        return None if total == 0 else float(self.mat.diag().sum()) / total

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"num_classes", "ignore_index", "mat": list of lists}``."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "mat": self.mat.cpu().tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: Any = None) -> "ConfusionMatrix":
        """Inverse of :meth:`to_dict`."""
        cm = cls(int(d["num_classes"]), int(d.get("ignore_index", 255)), device=device)
        mat = torch.as_tensor(d["mat"], dtype=torch.int64, device=cm.mat.device)
        if mat.shape != cm.mat.shape:
            raise ValueError(f"matrix shape {tuple(mat.shape)} != {tuple(cm.mat.shape)}")
        cm.mat.copy_(mat)
        return cm

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.mat.sum())})"
        )


def mean_iou(iou: np.ndarray, classes: Iterable[int]) -> float | None:
    """NaN-mean of ``iou`` over ``classes``; None if the set is empty or all NaN."""
    idx = list(classes)
    if not idx:
        return None
    vals = np.asarray(iou, dtype=np.float64)[idx]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else None


def summarize(
    iou: np.ndarray, old_classes: Sequence[int], new_classes: Sequence[int]
) -> dict[str, float | None]:
    """Mean IoUs over old/new/all, with and without background (class 0).

    ``old_classes``/``new_classes`` are the non-background (1-based) classes of step 0 and
    of the later steps seen so far.
    """
    old, new = list(old_classes), list(new_classes)
    return {
        "all": mean_iou(iou, [0] + old + new),
        "all_no_bg": mean_iou(iou, old + new),
        "old": mean_iou(iou, [0] + old),
        "old_no_bg": mean_iou(iou, old),
        "new": mean_iou(iou, new),
    }


def forgetting(
    history: Sequence[np.ndarray], introduced_at: dict[int, int]
) -> dict[int, float | None]:
    """Per-class forgetting at the latest step ``t = len(history) - 1``.

    ``history[s]`` is the per-class IoU after step ``s``; ``introduced_at[c]`` is the step
    class ``c`` was added. For each class with ``introduced_at[c] <= t``:
    ``max_{introduced_at[c] <= s < t} history[s][c] - history[t][c]`` (NaN earlier values
    are skipped). None if there is no earlier (non-NaN) value or the current IoU is NaN.
    """
    if not history:
        return {}
    t = len(history) - 1
    current = np.asarray(history[t], dtype=np.float64)
    out: dict[int, float | None] = {}
    for c, s0 in sorted(introduced_at.items()):
        if s0 > t:
            continue
        earlier = [float(history[s][c]) for s in range(s0, t)]
        earlier = [v for v in earlier if not np.isnan(v)]
        now = float(current[c])
        out[c] = None if not earlier or np.isnan(now) else max(earlier) - now
    return out


# --------------------------------------------------------------------------- derived numbers (one home)
def hmean(a: float | None, b: float | None) -> float | None:
    """Harmonic mean of two mIoUs (e.g. old_no_bg and new): high only when both are; None if one is unknown."""
    if a is None or b is None:
        return None
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


def mean_forgetting(per_class: Mapping[str, float | None], classes: Iterable[str]) -> float | None:
    """Mean of the known forgetting values of `classes` at a step; None when none is known (step 0)."""
    known = [v for c in classes if (v := per_class.get(c)) is not None]
    return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class Summary:
    """One number of a step's result record (metrics.json `steps[i]`), defined once: the report, the study's tables,
    MLflow and `recall tune` read it from `SUMMARIES`. An mIoU summary is read from the record's `miou`; a derived one
    is computed from the record by `compute`. Adding a derived number is one function and one `SUMMARIES` line: the
    report shows it too unless its line says `report=False`."""

    name: str        # metrics.json / report / study key
    label: str       # column title in the study's tables
    mlflow: str      # MLflow metric key (its Optuna name: "/" -> "_")
    direction: str   # "maximize" | "minimize": the Optuna direction when it is `tune.objective`
    compute: Callable[[Mapping], float | None] | None = None  # None: result["miou"][name]
    legend: str = ""  # its name in the figures' legends and bars, where it differs from `label`
    report: bool = True  # a column of the report (reports/summary.md/csv/json), in registry order

    @property
    def figure_label(self) -> str:
        return self.legend or self.label

    def value(self, result: Mapping) -> float | None:
        return result["miou"].get(self.name) if self.compute is None else self.compute(result)

    @property
    def derived(self) -> bool:
        return self.compute is not None


def _hmean_old_new(result: Mapping) -> float | None:
    miou = result["miou"]
    return hmean(miou.get("old_no_bg"), miou.get("new"))


def _forgetting_old(result: Mapping) -> float | None:
    """The mean forgetting of the old classes: the step-0 classes without background (the record's `old_classes`),
    as "old" is defined everywhere."""
    return mean_forgetting(result.get("forgetting") or {}, result.get("old_classes") or ())


SUMMARIES: dict[str, Summary] = {s.name: s for s in (
    Summary("old_no_bg", "old (no bg)", "miou/old_no_bg", "maximize"),
    Summary("new", "new", "miou/new", "maximize"),
    Summary("all", "all", "miou/all", "maximize", legend="all (with bg)"),
    Summary("all_no_bg", "all (no bg)", "miou/all_no_bg", "maximize"),
    # report=False: the demo's report shows the four above (reports/summary.json is DVC's metrics of the demo and
    # keeps its bytes); a number registered later is a column of the report unless its line says report=False
    Summary("old", "old (with bg)", "miou/old", "maximize", report=False),
    Summary("hmean", "hmean", "miou/hmean", "maximize", _hmean_old_new, report=False),
    Summary("forgetting_mean", "forgetting (old)", "forgetting/mean", "minimize", _forgetting_old, report=False),
)}


# The registry's names, grouped as the outputs show them (one place: a module that reads the registry spells none).
OLD = "old_no_bg"  # "the old classes": what the papers' orderings and the study's contrasts compare by default
ALL = "all"  # every class seen, with background: the reference lines (joint, MiB) of the report's bars
OLD_NEW = (OLD, "new")  # the trade-off: the old classes kept, the new ones learnt
HEADLINE = (*OLD_NEW, ALL)  # the three numbers every table, figure and run note shows, in this order
# the report's columns are no group: each Summary's `report` field chooses them (report_metrics(), below)
CURVE_METRICS = ("all", "old", "new", "all_no_bg", "old_no_bg")  # a run's curve.csv columns after "step"
OLD_AND_ALL = (OLD, ALL)  # the report's two curve panels, the step-0 models' table: old classes, every class
MULTI_OBJECTIVES = {"old_new": OLD_NEW}  # tune.objective names of several numbers (a Pareto front)
DEFAULT_OBJECTIVE = ALL  # tune.objective when the `tune` section names none
# the replay labels' quality a run logged (a simulated source knows its truth; recall/replay/stream.py) -> the
# report's column
LABEL_QUALITY = {"replay_labels/iou_step0_classes": "label_iou_step0", "replay_labels/empty_step0_classes":
                 "label_empty_step0", "replay_labels/iou_later_classes": "label_iou_later",
                 "replay_labels/empty_later_classes": "label_empty_later"}


def derived_summaries() -> list[Summary]:
    return [s for s in SUMMARIES.values() if s.derived]


def report_metrics() -> tuple[str, ...]:
    """The report's columns (reports/summary.md/csv/json): the registered numbers with `report`, in registry order
    (old_no_bg, new, all, all_no_bg, then any number registered later). Read when the report is written, so that
    a registry line is all a new column takes."""
    return tuple(s.name for s in SUMMARIES.values() if s.report)


def derived(result: Mapping) -> dict[str, float | None]:
    """The derived numbers of a step's result record (`SUMMARIES` with a `compute`: `hmean` of old_no_bg and new,
    `forgetting_mean` of the old classes, ...), by name."""
    return {s.name: s.compute(result) for s in derived_summaries()}
