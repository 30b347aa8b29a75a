"""The report stage: one table (markdown + CSV) of old/new/all mIoU per protocol x method x replay, and
figures of the per-step curves, from finished run directories (their metrics.json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

from recall.atomic import write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("protocol", "setting", "method", "replay", "seed", "steps", "old_no_bg", "new", "all", "all_no_bg")


def load_runs(run_dirs: list[Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        f = d / "metrics.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no metrics.json; is {d} a finished run directory?")
        runs.append({"dir": d, **json.loads(f.read_text())})
    return runs


def rows(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        final = r["final"]["miou"]
        out.append({"protocol": r["protocol"], "setting": r["setting"], "method": r["method"], "replay": r["replay"],
                    "seed": r.get("seed", ""), "steps": len(r["steps"]), **{k: final.get(k) for k in COLUMNS[6:]}})
    return sorted(out, key=lambda x: (x["protocol"], x["setting"], x["method"], x["replay"], str(x["seed"])))


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown_table(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: Path) -> None:
    """mIoU of old classes (no bg) and of all classes over steps, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in runs:
        label = r["protocol"] if r["protocol"] == r["method"] else f"{r['protocol']} {r['method']}" + ("" if r["replay"] == "none" else f" ({r['replay']})")
        x = [s["step"] for s in r["steps"]]
        for ax, key in zip(axes, ("old_no_bg", "all")):
            y = [s["miou"][key] if s["miou"][key] is not None else float("nan") for s in r["steps"]]
            ax.plot(x, y, marker="o", label=label)
    for ax, title in zip(axes, ("old classes (step 0, no bg)", "all seen classes (with bg)")):
        ax.set_title(f"mIoU of {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU")
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: list[Path], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    table = rows(runs)
    (out / "summary.md").write_text("# Final mIoU per protocol × method × replay source\n\n"
                                    "old = step-0 classes without background; all = every class with background.\n\n"
                                    + markdown_table(table))
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    summary = {r["dir"].name: {k: r["final"]["miou"].get(k) for k in COLUMNS[6:]} for r in runs}
    write_json(out / "summary.json", summary)
    plot_curves(runs, out / "curves.png")
    print(markdown_table(table))
    return table
