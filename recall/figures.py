"""The figures of a protocol run (matplotlib, PNG), each written next to the data it draws (CSV).

    miou_curves.png      mIoU of old / new / all classes after each step (data: ../curve.csv)
    class_iou.png        per-class IoU, classes × steps (data: class_iou.csv)
    forgetting.png       per-class forgetting after the last step (data: forgetting.csv)
    predictions.png      val images, their ground truth and the final model's prediction
    replay_labels.png    replay images, their evaluated labels and the inpainted training targets (RECALL)

Pure functions of arrays and result records; ``recall.run_figures.write_figures`` gathers the inputs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from recall.atomic import write_text
from recall.data.classes import IGNORE_INDEX, voc_palette
from recall.metrics import HEADLINE, SUMMARIES

CURVES = tuple((m, SUMMARIES[m].figure_label, colour)
               for m, colour in zip(HEADLINE, ("tab:blue", "tab:orange", "black")))
DPI = 110
IGNORE_COLOUR = (255, 255, 255)


@functools.cache
def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display), imported when the first figure is drawn: a module
    that imports this one (a run stage, through its methods) does not pay for matplotlib until then."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = DPI, bbox_inches: str | None = "tight") -> None:
    """Write a figure as PNG atomically (temp file + rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches, format="png")
    pyplot().close(fig)
    tmp.replace(path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = [",".join(header)] + [",".join("" if v is None else (f"{v:.5f}" if isinstance(v, float) else str(v))
                                            for v in row) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def plot_miou_curves(steps: list[dict], title: str, path: Path) -> None:
    """mIoU of old / new / all classes after each step."""
    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    x = [s["step"] for s in steps]
    for key, label, colour in CURVES:
        y = [np.nan if s["miou"].get(key) is None else s["miou"][key] for s in steps]
        ax.plot(x, y, marker="o", label=label, color=colour)
    ax.set(xlabel="step", ylabel="mIoU", ylim=(0, 1), title=title, xticks=x)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def class_iou_matrix(steps: list[dict], classes: list[str]) -> np.ndarray:
    """IoU per class (rows) and step (columns); NaN where a class was not seen yet."""
    return np.array([[np.nan if s["iou"].get(c) is None else s["iou"][c] for s in steps] for c in classes],
                    dtype=float)


def plot_class_heatmap(steps: list[dict], classes: list[str], title: str, path: Path) -> None:
    """Per-class IoU after each step (classes × steps), written with its CSV."""
    matrix = class_iou_matrix(steps, classes)
    _write_csv(path.with_suffix(".csv"), ["class", *[f"step{s['step']}" for s in steps]],
               [[c, *[None if np.isnan(v) else float(v) for v in row]] for c, row in zip(classes, matrix)])
    fig, ax = pyplot().subplots(figsize=(1.2 + 0.55 * len(steps), 0.28 * len(classes) + 1.2))
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 0.5 else "black")
    ax.set_xticks(range(len(steps)), [str(s["step"]) for s in steps])
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="step", title=title)
    fig.colorbar(image, ax=ax, label="IoU", fraction=0.05)
    save_figure(fig, path)


def plot_forgetting(forgetting: dict[str, float | None], title: str, path: Path) -> None:
    """Per-class forgetting after the last step (best earlier IoU − final IoU), with its CSV."""
    items = [(c, v) for c, v in forgetting.items() if v is not None]
    _write_csv(path.with_suffix(".csv"), ["class", "forgetting"], [[c, float(v)] for c, v in items])
    fig, ax = pyplot().subplots(figsize=(max(4.0, 0.3 * len(items) + 1), 3.2))
    if items:
        names, values = zip(*items)
        ax.bar(range(len(values)), values, color=["tab:red" if v > 0 else "tab:green" for v in values])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.axhline(float(np.mean(values)), color="black", linestyle="--", linewidth=1,
                   label=f"mean {np.mean(values):.3f}")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no forgetting to show (a single step)", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylabel="forgetting (IoU)", title=title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def colourise(labels: np.ndarray) -> np.ndarray:
    """A label map (H, W) as RGB with the VOC palette; 255 (ignore) white."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3).copy()
    palette[IGNORE_INDEX] = IGNORE_COLOUR
    return palette[labels.astype(np.uint8)]


def plot_grid(rows: list[list[np.ndarray]], column_titles: list[str], row_titles: list[str], title: str,
              path: Path) -> None:
    """A grid of RGB images (uint8 H×W×3, or label maps H×W which are colourised)."""
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = pyplot().subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.6 * n_rows + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j, picture in enumerate(row):
            ax = axes[i][j]
            ax.imshow(colourise(picture) if picture.ndim == 2 else picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column_titles[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_titles[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)

