"""The figures of a finished protocol run, under ``<run_dir>/figures/``: drawn from the saved step results and
checkpoints (so a resumed run draws the same pictures), plus whatever its method's stream draws
(``Stream.figures``: RECALL's replay images with their labels and training targets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recall.figures import plot_class_heatmap, plot_forgetting, plot_grid, plot_miou_curves
from recall.model import load_checkpoint

PREDICTION_SAMPLES = 6  # val images in predictions.png


def write_figures(run, results: list[dict], title: str) -> list[Path]:
    """Every figure of the run (see ``recall.figures``) under ``<run_dir>/figures``; returns their paths."""
    out = run.run_dir / "figures"
    last = results[-1]["step"]
    plot_miou_curves(results, title, out / "miou_curves.png")
    plot_class_heatmap(results, run.class_names, title, out / "class_iou.png")
    plot_forgetting(results[-1]["forgetting"], title, out / "forgetting.png")
    prediction_grid(run, last, title, out / "predictions.png")
    run.method.stream(run).figures(last, title, out)
    return sorted(p for p in out.iterdir() if p.suffix in (".png", ".csv"))


@torch.no_grad()
def prediction_grid(run, step: int, title: str, path: Path) -> None:
    """The first val images of step ``step``'s evaluation: image, ground truth, the step's prediction."""
    model, _ = load_checkpoint(run.step_dir(step) / "model.pt", run.model_cfg)
    model.eval()
    data = run.eval_loader(step).dataset
    rows, names = [], []
    for i in range(min(PREDICTION_SAMPLES, len(data))):
        image, target = data[i]
        prediction = model(image[None])["out"].argmax(1)[0]
        rows.append([np.asarray(data.load_raw(i)[0]), target.numpy(), prediction.numpy()])
        names.append(str(data.ids[i]) if hasattr(data, "ids") else str(i))
    plot_grid(rows, ["image", "ground truth", f"prediction (step {step})"], names, title, path)
