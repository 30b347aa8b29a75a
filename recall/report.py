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
from recall.metrics import derived

matplotlib.use("Agg")
import matplotlib.pyplot as plt

KEY = ("protocol", "setting", "method", "replay")
METRICS = ("old_no_bg", "new", "all", "all_no_bg")
METHOD_ORDER = ("ft", "lwf", "ilt", "mib", "recall", "joint")  # the paper's table order; others follow by name
COLUMNS = (*KEY, "options", "seeds", "steps", *METRICS)


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
    its seeds (population std, ddof 0; None when only one seed ran). Values missing in a run stay None."""
    groups: dict[tuple, list[dict]] = {}
    for r, variant in zip(runs, variants(runs)):
        groups.setdefault((*(r[k] for k in KEY), variant), []).append(r)
    out = []
    for key in sorted(groups, key=_order):
        members = groups[key]
        row = {**dict(zip(KEY, key)), "options": key[-1], "seeds": ",".join(str(r.get("seed", "")) for r in members),
               "steps": len(members[0]["steps"])}
        for m in METRICS:
            values = [r["final"]["miou"].get(m) for r in members]
            values = [v for v in values if v is not None]
            row[m] = statistics.fmean(values) if values else None
            row[f"{m}_std"] = statistics.pstdev(values) if len(values) > 1 else None
        out.append(row)
    return out


def _fmt(row: dict, column: str) -> str:
    value = row[column]
    if value is None:
        return "–"
    if column in METRICS:
        std = row.get(f"{column}_std")
        return f"{value:.3f}" + ("" if std is None else f" ± {std:.3f}")
    return str(value)


def markdown_table(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row, c) for c in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: Path) -> None:
    """mIoU of old classes (no bg) and of all classes over steps, one line per run; joint (the upper
    bound) as a dashed horizontal line at its final value."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    last = max((len(r["steps"]) - 1 for r in runs), default=1) or 1
    for r in runs:
        label = r["method"] if r["protocol"] == r["method"] else f"{r['protocol']} {r['method']}"
        label += "" if r["replay"] == "none" else f" ({r['replay']})"
        x = [s["step"] for s in r["steps"]]
        for ax, key in zip(axes, ("old_no_bg", "all")):
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


REPLAY_BARS = (("old_no_bg", "old (no bg)", "tab:blue"), ("new", "new", "tab:orange"), ("all", "all (with bg)", "0.3"))


def plot_replay_comparison(table: list[dict], path: Path) -> bool:
    """Final old / new / all mIoU of each replay source, one panel per protocol (error bars: std over seeds);
    MiB (dotted) and joint (dashed) as reference lines for all classes. False when no run replays."""
    replayed = [r for r in table if r["replay"] != "none"]
    if not replayed:
        return False
    protocols = sorted({r["protocol"] for r in replayed})
    joint = next((r["all"] for r in table if r["method"] == "joint"), None)
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
        mib = next((r["all"] for r in table if r["protocol"] == protocol and r["method"] == "mib"), None)
        if mib is not None:
            ax.axhline(mib, color="tab:green", linestyle=":", label="MiB, all")
        if joint is not None:
            ax.axhline(joint, color="black", linestyle="--", linewidth=1, label="joint, all")
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        ax.set_title(protocol)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set(ylabel="final mIoU", ylim=(0, 1))
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle("Replay sources compared (final step)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches=None)
    return True


def write_report(run_dirs: list[Path], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    table = rows(runs)
    write_text(out / "summary.md", "# Final mIoU per protocol × method × replay source\n\n"
               "old = step-0 classes without background; new = classes added later; all = every class, with "
               "background (all_no_bg: without). Mean ± std over seeds where several ran.\n\n" + markdown_table(table))
    fields = [*COLUMNS, *(f"{m}_std" for m in METRICS)]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    write_text(out / "summary.csv", buffer.getvalue())
    summary = {r["dir"].name: {k: r["final"]["miou"].get(k) for k in METRICS} for r in runs}
    write_json(out / "summary.json", summary)
    plot_curves(runs, out / "curves.png")
    plot_replay_comparison(table, out / "replay_comparison.png")
    print(markdown_table(table))
    return table


# ---------------------------------------------------------------------------------------------- the study
STUDY_METRICS = (*METRICS, "hmean", "forgetting_mean")


def mean_std(values: list[float]) -> dict:
    """Mean and population std of per-seed values, with the text the docs quote ("0.495 ± 0.015"; one value: "0.495")."""
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values, "text": f"{mean:.3f} ± {std:.3f}" if len(values) > 1
            else f"{mean:.3f}"}


def study_cells(study: dict, root: Path = Path(".")) -> dict:
    """{world: {protocol: {variant: {"seeds": [...], metric: {mean, std, values, text}}}}} over the study's finished
    runs (`study/runs/<key>/metrics.json`); a run not finished is an error naming it."""
    tables = [*study["runs"].items(), *study.get("joint", {}).items()]
    missing = [key for key, _ in tables if not (root / "study" / "runs" / key / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} study runs are not finished (e.g. {', '.join(missing[:3])}): run "
                                "`dvc repro study/dvc.yaml` first")
    grouped: dict[tuple, list[dict]] = {}
    for key, item in tables:
        metrics = json.loads((root / "study" / "runs" / key / "metrics.json").read_text())
        grouped.setdefault((item["world"], item["protocol"], item["variant"]), []).append(
            {"seed": item["seed"], **metrics["final"]["miou"], **derived(metrics["final"])})
    cells: dict = {}
    for (world, protocol, variant), members in grouped.items():
        entry = {"seeds": [m["seed"] for m in members]}
        for metric in STUDY_METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                entry[metric] = mean_std(values)
        cells.setdefault(world, {}).setdefault(protocol, {})[variant] = entry
    return cells


def step0_table(study: dict, root: Path = Path(".")) -> dict:
    """The step-0 models the runs start from: per world and step-0 class count, mIoU of the step-0 classes (without
    and with background), mean ± std over the seeds (`study/step0/<world>_<base>_s<seed>/metrics.json`)."""
    from recall.study import base_of

    world_of = {run["step0"]: run["world"] for run in study["runs"].values()}  # a step-0 model exists for its runs
    grouped: dict[tuple, list[dict]] = {}
    for key, item in study["step0"].items():
        metrics = json.loads((root / "study" / "step0" / key / "metrics.json").read_text())
        grouped.setdefault((world_of[key], base_of(item["protocol"])), []).append(metrics["final"]["miou"])
    rows = [[world, int(base), mean_std([m["old_no_bg"] for m in members])["text"],
             mean_std([m["all"] for m in members])["text"], len(members)]
            for (world, base), members in grouped.items()]
    return {"columns": ["world", "step-0 classes", "mIoU (no bg)", "mIoU (with bg)", "seeds"], "rows": rows}


def study_tables(cells: dict, variants: list[str]) -> dict:
    """One table per world and protocol: a row per variant (in the spec's order), mean ± std over seeds."""
    columns = ["variant", "old (no bg)", "new", "all", "hmean", "forgetting", "seeds"]
    metrics = ("old_no_bg", "new", "all", "hmean", "forgetting_mean")
    out = {}
    for world, protocols in cells.items():
        for protocol, by_variant in protocols.items():
            rows = [[v, *(by_variant[v].get(m, {}).get("text") for m in metrics), len(by_variant[v]["seeds"])]
                    for v in [*variants, "joint"] if v in by_variant]
            out[f"{world}_{protocol}"] = {"columns": columns, "rows": rows}
    return out


def attribution(cells: dict, spec: dict | None) -> dict | None:
    """The share of the gap from `spec["from"]` to `spec["to"]` that each variant closes, per metric: per seed
    (variant - from) / (to - from), then mean ± std over the seeds all three ran with; the gap itself too. A variant
    named "world:variant" is taken from another world of the study (the same seeds, its own step-0 models).
    Besides the table: "gap" and "shares" ({variant: {metric: mean_std}}) for the prose to quote."""
    if not spec:
        return None

    def cell(variant: str) -> dict:
        world, _, name = variant.rpartition(":")
        return cells.get(world or spec["world"], {}).get(spec["protocol"], {}).get(name, {})

    def per_seed(variant: str, metric: str) -> dict:
        entry = cell(variant)
        return dict(zip(entry.get("seeds", []), entry.get(metric, {}).get("values", [])))

    metrics = ("old_no_bg", "new", "all")
    columns = ["variant", *(f"{m} ({label})" for m in ("old (no bg)", "new", "all") for label in ("mIoU", "share"))]
    rows, gaps, shares = [], {}, {}
    for metric in metrics:
        low, high = per_seed(spec["from"], metric), per_seed(spec["to"], metric)
        gaps[metric] = mean_std([high[s] - low[s] for s in low if s in high]) if set(low) & set(high) else None
    for variant in spec["variants"]:
        row = [variant]
        for metric in metrics:
            low, high, mine = per_seed(spec["from"], metric), per_seed(spec["to"], metric), per_seed(variant, metric)
            seeds = [s for s in mine if s in low and s in high and high[s] != low[s]]
            row.append(cell(variant).get(metric, {}).get("text"))
            share = mean_std([(mine[s] - low[s]) / (high[s] - low[s]) for s in seeds]) if seeds else None
            row.append(share["text"] if share else None)
            shares.setdefault(variant, {})[metric] = share
        rows.append(row)
    gap_row = [f"gap: {spec['to']} - {spec['from']}"]
    for metric in metrics:
        gap_row += [gaps[metric]["text"] if gaps[metric] else None, None]
    return {"world": spec["world"], "protocol": spec["protocol"], "from": spec["from"], "to": spec["to"],
            "columns": columns, "rows": [gap_row, *rows], "gap": gaps, "shares": shares}


def plot_study(cells: dict, variants: list[str], out: Path) -> list[Path]:
    """Per world: final old / new / all mIoU of every variant, one panel per protocol, error bars = std over seeds."""
    written = []
    for world, protocols in cells.items():
        names = [p for p in protocols if p != "joint"]
        counts = [sum(v in protocols[p] for v in variants) for p in names]  # panels as wide as their bars
        fig, axes = plt.subplots(1, len(names), figsize=(0.55 * sum(counts) + 2.5, 4.6), sharey=True, squeeze=False,
                                 gridspec_kw={"width_ratios": counts})
        for ax, protocol in zip(axes[0], names):
            mine = [v for v in variants if v in protocols[protocol]]
            width = 0.8 / len(REPLAY_BARS)
            for k, (key, name, colour) in enumerate(REPLAY_BARS):
                cells_k = [protocols[protocol][v].get(key) for v in mine]
                ax.bar([i + (k - 1) * width for i in range(len(mine))],
                       [c["mean"] if c else float("nan") for c in cells_k], width, label=name, color=colour,
                       yerr=[c["std"] if c else 0.0 for c in cells_k], capsize=2)
            joint = protocols.get("joint", {}).get("joint", {}).get("all")
            if joint:
                ax.axhline(joint["mean"], color="black", linestyle="--", linewidth=1, label="joint, all")
            ax.set_xticks(range(len(mine)), mine, fontsize=7, rotation=40, ha="right", rotation_mode="anchor")
            ax.set_title(f"{protocol} ({world})")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set(ylabel="final mIoU (mean ± std over seeds)", ylim=(0, 1))
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        fig.tight_layout()
        path = out / f"{world}.png"
        save_figure(fig, path, dpi=100, bbox_inches=None)
        written.append(path)
    return written


def contrasts(cells: dict, spec: list | None) -> dict | None:
    """Pairs of variants compared on one metric, where the spec lists them ({world, protocol, metric, pairs}):
    the difference of the means, the per-seed (paired: same step-0 model) differences, and a verdict that calls a
    difference only when it exceeds the spread: |mean A - mean B| > std A + std B."""
    if not spec:
        return None
    columns = ["world", "protocol", "metric", "A", "B", "A", "B", "A - B (per seed)", "verdict"]
    rows = []
    for group in spec:
        by_variant = cells.get(group["world"], {}).get(group["protocol"], {})
        metric = group.get("metric", "old_no_bg")
        for a, b in group["pairs"]:
            ca, cb = by_variant.get(a, {}).get(metric), by_variant.get(b, {}).get(metric)
            if not ca or not cb:
                continue
            seeds_a, seeds_b = by_variant[a]["seeds"], by_variant[b]["seeds"]
            paired = [va - cb["values"][seeds_b.index(s)] for s, va in zip(seeds_a, ca["values"]) if s in seeds_b]
            diff = ca["mean"] - cb["mean"]
            spread = ca["std"] + cb["std"]
            verdict = (f"{a} higher" if diff > spread else f"{b} higher" if -diff > spread
                       else "no difference beyond the spread")
            rows.append([group["world"], group["protocol"], metric, a, b, ca["text"], cb["text"],
                         " / ".join(f"{d:+.3f}" for d in paired), verdict])
    return {"columns": columns, "rows": rows}


def write_study_report(study_file: Path, out: Path) -> dict:
    """docs/results.json (cells and tables) and the study's figures under `out`."""
    from recall.study import load

    study = load(study_file)
    variants = list(study["spec"]["variants"])
    cells = study_cells(study)
    report = {"study": str(study_file), "seeds": study["spec"]["seeds"], "cells": cells,
              "tables": {**study_tables(cells, variants), "step0": step0_table(study)}}
    pretrain = Path("models/pretrain/metrics.json")  # the encoder every run of the pretrained world starts from
    if pretrain.is_file():
        report["pretrain"] = json.loads(pretrain.read_text())
    if (shares := attribution(cells, study["spec"].get("attribution"))) is not None:
        report["tables"]["attribution"] = shares
    if (compared := contrasts(cells, study["spec"].get("contrasts"))) is not None:
        report["tables"]["contrasts"] = compared
    figures = plot_study(cells, variants, out)
    report["figures"] = [p.as_posix() for p in figures]
    write_json(out.with_suffix(".json"), report)
    return report
