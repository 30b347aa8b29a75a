"""The report stage: one table (markdown + CSV) of old/new/all mIoU per protocol x method x replay, and
figures of the per-step curves, from finished run directories (their metrics.json)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import matplotlib

from recall.atomic import write_json, write_text
from recall.figures import save_figure
from recall.metrics import ALL, HEADLINE, LABEL_QUALITY, OLD_AND_ALL, SUMMARIES, report_metrics
from recall.replay.leakage import STORED_DATA_SOURCES

matplotlib.use("Agg")
import matplotlib.pyplot as plt

KEY = ("protocol", "setting", "method", "replay")
METHOD_ORDER = ("ft", "lwf", "ilt", "mib", "recall", "joint")  # the paper's table order; others follow by name
STORED_MARK = "†"  # a run replaying stored training images of earlier steps (replay=memory): not private
STORED_NOTE = (f"{STORED_MARK} replays stored training images of earlier steps (replay=memory, as SSUL-M): the "
               "real-image bound, which breaks the privacy rule the other sources keep.")


def columns() -> tuple[str, ...]:
    """The table's columns: the row's key, then the registry's report columns (recall.metrics.report_metrics), read
    now so that a number registered after import is one of them."""
    return (*KEY, "options", "seeds", "steps", *report_metrics())


def load_runs(run_dirs: list[Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        f = d / "metrics.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no metrics.json; is {d} a finished run directory?")
        runs.append({"dir": d, **json.loads(f.read_text())})
    return runs


def _order(key: tuple) -> tuple:
    protocol, setting, method, replay, variant = key
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (protocol == "joint", protocol, setting, rank, method, replay, variant)


def variants(runs: list[dict]) -> list[str]:
    """For each run, the method options in which it differs from other runs of the same method, e.g.
    "inpaint_threshold=0.5" ("" when all runs of that method share their options)."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r.get("method_options", {}))
    varying = {m: sorted({k for o in opts for k in o if len({json.dumps(x.get(k)) for x in opts}) > 1})
               for m, opts in by_method.items()}
    return [", ".join(f"{k}={r.get('method_options', {}).get(k)}" for k in varying[r["method"]]) for r in runs]


def rows(runs: list[dict]) -> list[dict]:
    """One row per protocol x setting x method x replay source x method options: final mIoU, mean and std over
    its seeds (sample std, n - 1; None when only one seed ran). Values missing in a run stay None."""
    groups: dict[tuple, list[dict]] = {}
    for r, variant in zip(runs, variants(runs)):
        groups.setdefault((*(r[k] for k in KEY), variant), []).append(r)
    out = []
    for key in sorted(groups, key=_order):
        members = groups[key]
        row = {**dict(zip(KEY, key)), "options": key[-1], "seeds": ",".join(str(r.get("seed", "")) for r in members),
               "steps": len(members[0]["steps"])}
        for m in report_metrics():
            values = [SUMMARIES[m].value(r["final"]) for r in members]
            values = [v for v in values if v is not None]
            row[m] = statistics.fmean(values) if values else None
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(row)
    return out


def stored_data(replay: str) -> bool:
    """Whether runs of this replay source replay stored training images (marked STORED_MARK)."""
    return replay in STORED_DATA_SOURCES


def _fmt(row: dict, column: str) -> str:
    value = row[column]
    if value is None:
        return "–"
    if column == "replay" and stored_data(value):
        return f"{value} {STORED_MARK}"
    if column in SUMMARIES:  # a registered number: mean ± std
        std = row.get(f"{column}_std")
        return f"{value:.3f}" + ("" if std is None else f" ± {std:.3f}")
    return str(value)


def markdown_table(table: list[dict]) -> str:
    names = columns()
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_fmt(row, c) for c in names) + " |" for row in table]
    note = ["", STORED_NOTE] if any(stored_data(row["replay"]) for row in table) else []
    return "\n".join(lines + note) + "\n"


def plot_curves(runs: list[dict], path: Path) -> None:
    """mIoU of old classes (no bg) and of all classes over steps, one line per run; joint (the upper
    bound) as a dashed horizontal line at its final value."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    last = max((len(r["steps"]) - 1 for r in runs), default=1) or 1
    for r in runs:
        label = r["method"] if r["protocol"] == r["method"] else f"{r['protocol']} {r['method']}"
        mark = f" {STORED_MARK}" if stored_data(r["replay"]) else ""
        label += "" if r["replay"] == "none" else f" ({r['replay']}{mark})"
        x = [s["step"] for s in r["steps"]]
        for ax, key in zip(axes, OLD_AND_ALL):
            y = [s["miou"][key] if s["miou"][key] is not None else float("nan") for s in r["steps"]]
            if r["method"] == "joint":
                ax.axhline(y[-1], color="black", linestyle="--", linewidth=1, label=f"{label} (upper bound)")
            else:
                ax.plot(x, y, marker="o", label=label)
    for ax, title in zip(axes, ("old classes (step 0, no bg)", "all seen classes (with bg)")):
        ax.set_title(f"mIoU of {title}")
        ax.set_xlabel("step")
        ax.set_xlim(-0.2, last + 0.2)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU")
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches=None)


REPLAY_BARS = tuple((m, SUMMARIES[m].figure_label, colour)
                    for m, colour in zip(HEADLINE, ("tab:blue", "tab:orange", "0.3")))


def plot_replay_comparison(table: list[dict], path: Path) -> bool:
    """Final old / new / all mIoU of each replay source, one panel per protocol (error bars: std over seeds);
    MiB (dotted) and joint (dashed) as reference lines for all classes. False when no run replays."""
    replayed = [r for r in table if r["replay"] != "none"]
    if not replayed:
        return False
    protocols = sorted({r["protocol"] for r in replayed})
    joint = next((r[ALL] for r in table if r["method"] == "joint"), None)
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols) + 1, 3.6), sharey=True, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        mine = [r for r in replayed if r["protocol"] == protocol]
        labels = [f"{r['method']}\n{r['replay']}" + (f"\n{r['options']}" if r["options"] else "") for r in mine]
        width = 0.8 / len(REPLAY_BARS)
        for k, (key, name, colour) in enumerate(REPLAY_BARS):
            values = [float("nan") if r[key] is None else r[key] for r in mine]
            errors = [r.get(f"{key}_std") or 0.0 for r in mine]
            ax.bar([i + (k - 1) * width for i in range(len(mine))], values, width, label=name, color=colour,
                   yerr=errors if any(errors) else None, capsize=2)
        mib = next((r[ALL] for r in table if r["protocol"] == protocol and r["method"] == "mib"), None)
        if mib is not None:
            ax.axhline(mib, color="tab:green", linestyle=":", label=f"MiB, {SUMMARIES[ALL].label}")
        if joint is not None:
            ax.axhline(joint, color="black", linestyle="--", linewidth=1, label=f"joint, {SUMMARIES[ALL].label}")
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        ax.set_title(protocol)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set(ylabel="final mIoU", ylim=(0, 1))
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("Replay sources compared (final step)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches=None)
    return True


LABEL_COLUMNS = LABEL_QUALITY  # the replay labels' quality a run logged -> the summary's column


def label_quality(final: dict) -> dict[str, float]:
    """The replay labels' quality of a run's last step, where it logged one: label IoU against the true masks and
    the share of images labelled empty, over the step-0 classes and over the classes learnt later."""
    statistics_ = final.get("statistics") or {}
    return {column: statistics_[key] for key, column in LABEL_COLUMNS.items() if key in statistics_}


def label_section(labels: dict[str, dict[str, float]]) -> str:
    """The summary's table of replay-label quality (runs whose source knows its truth), or nothing."""
    if not labels:
        return ""
    lines = ["\n## Replay labels against the simulation's truth\n", "Label IoU with the true objects and the share of "
             "replay images labelled empty, over the step-0 classes and the classes learnt later.\n",
             "| run | " + " | ".join(LABEL_COLUMNS.values()) + " |", "|---|" + "---|" * len(LABEL_COLUMNS)]
    for name, values in labels.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" if c in values else "–"
                                                  for c in LABEL_COLUMNS.values()) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    table = rows(runs)
    labels = {name: values for name, values in ((r["dir"].name, label_quality(r["final"])) for r in runs) if values}
    write_text(out / "summary.md", "# Final mIoU per protocol × method × replay source\n\n"
               "old = step-0 classes without background; new = classes added later; all = every class, with "
               "background (all_no_bg: without). Mean ± std over seeds where several ran.\n\n" + markdown_table(table)
               + label_section(labels))
    numbers = report_metrics()
    fields = [*columns(), *(f"{m}_std" for m in numbers)]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    write_text(out / "summary.csv", buffer.getvalue())
    summary = {r["dir"].name: {**{k: SUMMARIES[k].value(r["final"]) for k in numbers}, **label_quality(r["final"])}
               for r in runs}
    write_json(out / "summary.json", summary)
    plot_curves(runs, out / "curves.png")
    plot_replay_comparison(table, out / "replay_comparison.png")
    print(markdown_table(table))
    return table
