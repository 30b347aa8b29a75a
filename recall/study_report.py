"""The study's report: its finished runs aggregated over seeds into docs/results.json and docs/results/*.png.

Every number docs/results.md and the README quote comes from here (`python -m recall.docs` writes them in):

- `cells`: per world, protocol and variant, each metric's per-seed values, mean and sample std (n - 1); joint, the
  upper bound, once per protocol of its world, scored on that protocol's classes (old = its step-0 classes);
- `contrasts`: pairs of variants compared on one metric, paired by seed (each seed owns its chain and step-0 model);
  a difference is called only when every seed agrees in sign and |mean difference| exceeds the sample std of the
  per-seed differences (`verdict`);
- `attribution`: the share of a gap (from -> to) each variant of the same world closes, per seed;
- `interactions`: what a change of world (a wider decoder, no pretraining) does to two variants, per seed;
- `chains`: each seed's pretraining (held-out top-1) and class maps (scored against the simulation's truth);
- `labels`: the replay labels' quality against the simulation's truth, per source (the runs' own statistics);
- `step0`: the step-0 models the runs start from.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from recall.atomic import write_json
from recall.data.protocol import steps
from recall.figures import save_figure
from recall.metrics import (HEADLINE, OLD, OLD_AND_ALL, OLD_NEW, SUMMARIES, derived, derived_summaries, report_metrics,
                            summarize)
from recall.report import REPLAY_BARS, plt
from recall.study import base_of, load


def study_metrics() -> tuple[str, ...]:
    """The numbers of each study cell: the report's mIoUs and every derived number of recall.metrics.SUMMARIES (a
    derived number the report shows too is named once, with the derived ones)."""
    return (*(m for m in report_metrics() if not SUMMARIES[m].derived), *(s.name for s in derived_summaries()))


def table_metrics() -> tuple[str, ...]:
    """The columns of the study's tables."""
    return (*HEADLINE, *(s.name for s in derived_summaries()))


NO_DIFFERENCE = "no difference"


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (n - 1) of per-seed values, with the text the docs quote ("0.495 ± 0.015"; one value:
    "0.495")."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values,
            "text": f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"}


def verdict(a: str, b: str, differences: list[float]) -> str:
    """The call on paired per-seed differences A - B: "A higher" (or "B higher") only when every seed agrees in sign
    and |mean| > their sample std; otherwise no difference is called. Fewer than two seeds: never called."""
    if len(differences) < 2:
        return NO_DIFFERENCE
    mean, spread = statistics.fmean(differences), statistics.stdev(differences)
    if all(d > 0 for d in differences) and mean > spread:
        return f"{a} higher"
    if all(d < 0 for d in differences) and -mean > spread:
        return f"{b} higher"
    return NO_DIFFERENCE


def paired_call(a: str, b: str, per_seed_a: list[float], per_seed_b: list[float]) -> dict:
    """A - B seed by seed (the same seeds, in the same order): the differences' mean ± sample std and the verdict on
    them, as the study calls a difference."""
    diffs = [x - y for x, y in zip(per_seed_a, per_seed_b, strict=True)]
    return {"difference": mean_std(diffs), "verdict": verdict(a, b, diffs)}


def _metrics(root: Path, key: str) -> dict:
    return json.loads((root / "study" / "runs" / key / "metrics.json").read_text())


def _joint_scores(metrics: dict, protocol: str) -> dict:
    """Joint's final IoUs scored on `protocol`'s classes: old = its step-0 classes, new = the later ones."""
    names = metrics["classes"]
    iou = [metrics["final"]["iou"].get(name) for name in names]
    iou = [float("nan") if v is None else v for v in iou]
    task = steps(protocol, len(names) - 1)
    scores = summarize(iou, task[0], [c for s in task[1:] for c in s])
    return {**scores, **derived({"miou": scores})}  # no forgetting: joint has one step


def study_cells(study: dict, root: Path = Path(".")) -> dict:
    """{world: {protocol: {variant: {"seeds": [...], metric: mean_std}}}} over the study's finished runs
    (`study/runs/<key>/metrics.json`); a run not finished is an error naming it. Joint appears under every protocol
    of its world, scored on that protocol's classes, and under "joint" with every class."""
    tables = [*study["runs"].items(), *study.get("joint", {}).items()]
    missing = [key for key, _ in tables if not (root / "study" / "runs" / key / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} study runs are not finished (e.g. {', '.join(missing[:3])}): run "
                                "`dvc --cd study repro` first")
    protocols_of: dict[str, set[str]] = {}
    for item in study["runs"].values():
        protocols_of.setdefault(item["world"], set()).add(item["protocol"])
    grouped: dict[tuple, list[dict]] = {}
    for key, item in tables:
        metrics = _metrics(root, key)
        scored = {"joint": {**metrics["final"]["miou"], **derived(metrics["final"])}}
        if item["variant"] == "joint":
            scored.update({p: _joint_scores(metrics, p) for p in protocols_of.get(item["world"], ())})
        else:
            scored = {item["protocol"]: scored["joint"]}
        for protocol, values in scored.items():
            grouped.setdefault((item["world"], protocol, item["variant"]), []).append({"seed": item["seed"], **values})
    cells: dict = {}
    for (world, protocol, variant), members in grouped.items():
        members.sort(key=lambda m: m["seed"])
        entry = {"seeds": [m["seed"] for m in members]}
        for metric in study_metrics():
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                entry[metric] = mean_std(values)
        cells.setdefault(world, {}).setdefault(protocol, {})[variant] = entry
    return cells


def paired(cell_a: dict, cell_b: dict, metric: str) -> dict[int, float]:
    """Per seed both cells ran: A - B on `metric`."""
    a = dict(zip(cell_a.get("seeds", []), cell_a.get(metric, {}).get("values", [])))
    b = dict(zip(cell_b.get("seeds", []), cell_b.get(metric, {}).get("values", [])))
    return {s: a[s] - b[s] for s in a if s in b}


def study_tables(cells: dict, variants: list[str]) -> dict:
    """One table per world and protocol: a row per variant (in the spec's order, joint last), mean ± std over
    seeds."""
    columns = ["variant", *(SUMMARIES[m].label for m in table_metrics()), "seeds"]
    out = {}
    for world, protocols in cells.items():
        for protocol, by_variant in protocols.items():
            rows = [[v, *(by_variant[v].get(m, {}).get("text") for m in table_metrics()), len(by_variant[v]["seeds"])]
                    for v in [*variants, "joint"] if v in by_variant]
            out[f"{world}_{protocol}"] = {"columns": columns, "rows": rows}
    return out


def contrasts(cells: dict, spec: list | None) -> dict | None:
    """Pairs of variants compared on one metric, where the spec lists them ({world, protocol, metric, pairs}): both
    means, the per-seed differences (paired: the same chain and step-0 model), their mean and sample std, and the
    `verdict`. Besides the table, `calls`: {world: {protocol: {metric: {"A_vs_B": {...}}}}} for the prose."""
    if not spec:
        return None
    columns = ["world", "protocol", "metric", "A", "B", "A", "B", "A - B per seed", "A - B", "verdict"]
    rows, calls = [], {}
    for group in spec:
        by_variant = cells.get(group["world"], {}).get(group["protocol"], {})
        metric = group.get("metric", OLD)
        for a, b in group["pairs"]:
            ca, cb = by_variant.get(a, {}), by_variant.get(b, {})
            if metric not in ca or metric not in cb:
                continue
            differences = paired(ca, cb, metric)
            if not differences:
                continue
            difference = mean_std(list(differences.values()))
            called = verdict(a, b, list(differences.values()))
            rows.append([group["world"], group["protocol"], metric, a, b, ca[metric]["text"], cb[metric]["text"],
                         " / ".join(f"{d:+.3f}" for d in differences.values()), difference["text"], called])
            calls.setdefault(group["world"], {}).setdefault(group["protocol"], {}).setdefault(metric, {})[
                f"{a}_vs_{b}"] = {"difference": difference, "verdict": called}
    return {"columns": columns, "rows": rows, "calls": calls}


def verdicts_across_worlds(calls: dict, base: str = "pretrained") -> dict:
    """Each contrast that another world repeats (e.g. `float_order`: the same seeds in another float order), with
    its verdict there and in `base`: whether the call survives the change. `same` counts the agreeing calls per
    world, `of` the compared ones."""
    rows, same, of = [], {}, {}
    for world, protocols in calls.items():
        if world == base:
            continue
        for protocol, metrics in protocols.items():
            for metric, pairs in metrics.items():
                for pair, call in pairs.items():
                    there = calls.get(base, {}).get(protocol, {}).get(metric, {}).get(pair)
                    if there is None:
                        continue
                    agree = there["verdict"] == call["verdict"]
                    same[world] = same.get(world, 0) + agree
                    of[world] = of.get(world, 0) + 1
                    rows.append([world, protocol, metric, pair.replace("_vs_", " vs "), there["verdict"],
                                 call["verdict"], "yes" if agree else "no"])
    return {"columns": ["world", "protocol", "metric", "A vs B", f"verdict in {base}", "verdict there", "same"],
            "rows": rows, "same": same, "of": of}


def attribution(cells: dict, spec: dict | None) -> dict | None:
    """The share of the gap from `spec["from"]` to `spec["to"]` that each variant of the same world and protocol
    closes, per metric: per seed (variant - from) / (to - from), then mean ± std over the seeds all three ran with;
    the gap itself too. A share compares runs from one step-0 model: a variant of another world is refused (a
    change of world is an interaction, see `interactions`). Besides the table: "gap" and "shares" ({variant:
    {metric: mean_std}}) for the prose to quote."""
    if not spec:
        return None
    crossing = [v for v in spec["variants"] if ":" in v]
    if crossing:
        raise ValueError(f"attribution: {crossing} come from another world; a share compares runs of one world "
                         "(list a change of world under `interactions`)")
    by_variant = cells.get(spec["world"], {}).get(spec["protocol"], {})
    metrics = HEADLINE
    columns = ["variant", *(f"{SUMMARIES[m].label} ({label})" for m in metrics for label in ("mIoU", "share"))]
    low_cell, high_cell = by_variant.get(spec["from"], {}), by_variant.get(spec["to"], {})
    gaps = {m: mean_std(list(d.values())) if (d := paired(high_cell, low_cell, m)) else None for m in metrics}
    rows, shares = [], {}
    for variant in spec["variants"]:
        row, mine = [variant], by_variant.get(variant, {})
        for metric in metrics:
            gap, gain = paired(high_cell, low_cell, metric), paired(mine, low_cell, metric)
            seeds = [s for s in gain if s in gap and gap[s] != 0]
            share = mean_std([gain[s] / gap[s] for s in seeds]) if seeds else None
            row += [mine.get(metric, {}).get("text"), share["text"] if share else None]
            shares.setdefault(variant, {})[metric] = share
        rows.append(row)
    gap_row = [f"gap: {spec['to']} - {spec['from']}"]
    for metric in metrics:
        gap_row += [gaps[metric]["text"] if gaps[metric] else None, None]
    return {"world": spec["world"], "protocol": spec["protocol"], "from": spec["from"], "to": spec["to"],
            "columns": columns, "rows": [gap_row, *rows], "gap": gaps, "shares": shares}


def interactions(cells: dict, spec: list | None) -> dict | None:
    """What a change of world does to two variants ({base, world, protocol, variants: [A, B]}), per metric and seed:
    each variant's gain (its run in `world` - its run in `base`, the same seed) and the interaction, A's gain - B's
    gain, with the `verdict` on it. Besides the table, `values`: {"A vs B in world": {metric: {...}}}."""
    if not spec:
        return None
    columns = ["change", "metric", "A", "B", "gain of A", "gain of B", "A's gain - B's", "verdict"]
    rows, values = [], {}
    for item in spec:
        base = cells.get(item["base"], {}).get(item["protocol"], {})
        changed = cells.get(item["world"], {}).get(item["protocol"], {})
        a, b = item["variants"]
        name = f"{a} vs {b} in {item['world']}"
        for metric in OLD_NEW:
            gain_a = paired(changed.get(a, {}), base.get(a, {}), metric)
            gain_b = paired(changed.get(b, {}), base.get(b, {}), metric)
            seeds = [s for s in gain_a if s in gain_b]
            if not seeds:
                continue
            difference = [gain_a[s] - gain_b[s] for s in seeds]
            entry = {"gain_a": mean_std([gain_a[s] for s in seeds]), "gain_b": mean_std([gain_b[s] for s in seeds]),
                     "interaction": mean_std(difference), "verdict": verdict(a, b, difference).replace(
                         "higher", f"gains more from {item['world']}").replace(NO_DIFFERENCE,
                                                                                 "no interaction called")}
            values.setdefault(name, {})[metric] = entry
            rows.append([f"{item['base']} -> {item['world']} ({item['protocol']})", metric, a, b,
                         entry["gain_a"]["text"], entry["gain_b"]["text"], entry["interaction"]["text"],
                         entry["verdict"]])
    return {"columns": columns, "rows": rows, "values": values}


def chains_table(study: dict, root: Path = Path(".")) -> dict:
    """Each seed's chain: the pretraining's held-out top-1 and, per class map, its score against the simulation's
    truth (correct = the look-alike or a variant of the class) and the generator classes it shares; and whether
    a chain of another float order (the same seed) made the same maps."""
    rows, picks = [], {}
    for key, item in study["chains"].items():
        directory = root / "study" / "chains" / key
        pretrain = json.loads((directory / "pretrain" / "metrics.json").read_text())
        row = {"chain": key, "seed": item["seed"], "top1": pretrain["top1"], "top5": pretrain["top5"]}
        for source in sorted({c["source"] for c in study["classmaps"].values() if c["chain"] == key}):
            check = json.loads((directory / f"{source}_mapping_check.json").read_text())
            mapping = json.loads((directory / f"{source}_mapping.json").read_text())
            truth = check.get("truth") or {}
            picks[(key, source)] = {c: _pick(m, (truth.get("per_class") or {}).get(c, {})) for c, m in mapping.items()}
            row[source] = {"correct": truth.get("correct"), "classes": truth.get("classes", check["classes"]),
                           "shared": len(check["shared"]), "kinds": {k: truth.get(k) for k in
                                                                    ("lookalike", "variant", "wrong_target",
                                                                     "distractor", "other") if k in truth}}
        rows.append(row)
    same, differing = {}, []
    for (key, source), chosen in picks.items():
        name, _, seed = key.rpartition("_s")
        main = picks.get((f"main_s{seed}", source))
        if name != "main" and main is not None:
            changed = sorted((c for c in chosen if chosen[c]["source"] != main.get(c, {}).get("source")), key=int)
            same.setdefault(name, {}).setdefault(source, {})[int(seed)] = not changed and chosen.keys() == main.keys()
            for c in changed:
                here, there = main[c], chosen[c]
                differing.append({"world": name, "seed": int(seed), "source": source, "class": here["name"],
                                  "main": here, "other": there, "margin": min(here["margin"], there["margin"])})
    columns = ["chain", "seed", "pretraining top-1", "toy-GAN map: correct", "toy-GAN map: kinds",
               "shared generator classes"]
    table = [[r["chain"], r["seed"], f"{r['top1']:.3f}",
              f"{r['toy_gan']['correct']} / {r['toy_gan']['classes']}" if "toy_gan" in r else None,
              ", ".join(f"{v} {k}" for k, v in r.get("toy_gan", {}).get("kinds", {}).items() if v),
              r.get("toy_gan", {}).get("shared")] for r in rows]
    main_rows = [r for r in rows if r["chain"].startswith("main_")]
    summary = {"top1": mean_std([r["top1"] for r in main_rows]) if main_rows else None,
               "toy_gan_correct": [r["toy_gan"]["correct"] for r in rows if "toy_gan" in r],
               "toy_gan_correct_min": min((r["toy_gan"]["correct"] for r in rows if "toy_gan" in r), default=None),
               "toy_gan_shared_max": max((r["toy_gan"]["shared"] for r in rows if "toy_gan" in r), default=None),
               "same_map_in_other_float_order": same, "classes_mapped_differently": len(differing),
               "largest_margin_of_a_differing_class": max((d["margin"] for d in differing), default=None)}
    difference_table = {"columns": ["world", "seed", "map", "class", "main chain's pick", "its top-1 margin",
                                    "other float order's pick", "its top-1 margin"],
                        "rows": [[d["world"], d["seed"], d["source"], d["class"],
                                  f"{d['main']['source']} ({d['main']['kind']})", f"{d['main']['margin']:.4f}",
                                  f"{d['other']['source']} ({d['other']['kind']})",
                                  f"{d['other']['margin']:.4f}"] for d in differing]}
    return {"columns": columns, "rows": table, "chains": rows, "summary": summary, "differing": difference_table}


def _pick(entry: dict, truth: dict) -> dict:
    """A class map's pick for one class: the generator class, its kind against the simulation's truth, and its
    top-1 margin (mean softmax of the pick minus that of the runner-up: how near the argmax was to a tie)."""
    scores = [float(candidate[2]) for candidate in entry.get("top_k", [])]
    return {"name": entry.get("name"), "source": entry["source_name"], "kind": truth.get("kind", "?"),
            "margin": scores[0] - scores[1] if len(scores) > 1 else float("nan")}


LABEL_PREFIX = "replay_labels/"


def label_tables(study: dict, root: Path = Path(".")) -> dict:
    """The replay labels' quality against the simulation's truth, from the runs' own final statistics
    (`replay_labels/...`, logged where the source knows its truth): per world, protocol and variant a row per class
    (label IoU, share of empty labels, mean ± std over seeds), and a summary row per variant averaging the step-0
    classes (labelled by the step-0 model) and the classes learnt later (labelled by helper decoders)."""
    grouped: dict[tuple, list[dict]] = {}
    for key, item in study["runs"].items():
        statistics_ = _metrics(root, key)["final"].get("statistics") or {}
        found = {k[len(LABEL_PREFIX):]: v for k, v in statistics_.items() if k.startswith(LABEL_PREFIX)}
        if found:
            grouped.setdefault((item["world"], item["protocol"], item["variant"]), []).append(found)
    tables, summary, cells = {}, [], {}
    for (world, protocol, variant), per_seed in grouped.items():
        names = sorted({k.split("/", 1)[1] for q in per_seed for k in q if k.startswith("iou/")},
                       key=lambda n: next((i for q in per_seed for i, k in enumerate(q) if k == f"iou/{n}"), 0))
        rows = []
        for name in names:
            ious = [q[f"iou/{name}"] for q in per_seed if f"iou/{name}" in q]
            empty = [q[f"empty/{name}"] for q in per_seed if f"empty/{name}" in q]
            rows.append([name, mean_std(ious)["text"], mean_std(empty)["text"], len(ious)])
        tables[f"{world}_{protocol}_{variant}"] = {"columns": ["class", "label IoU", "empty labels", "seeds"],
                                                   "rows": rows}
        cell = {}
        for group in ("step0_classes", "later_classes"):
            for key in ("iou", "empty"):
                values = [q[f"{key}_{group}"] for q in per_seed if f"{key}_{group}" in q]
                cell[f"{key}_{group}"] = mean_std(values) if values else None
        cells.setdefault(world, {}).setdefault(protocol, {})[variant] = cell
        summary.append([world, protocol, variant, *(cell[k]["text"] if cell[k] else None for k in cell),
                        len(per_seed)])
    tables["summary"] = {"columns": ["world", "protocol", "variant", "label IoU, step-0 classes",
                                     "empty labels, step-0 classes", "label IoU, later classes",
                                     "empty labels, later classes", "seeds"], "rows": summary}
    return {"tables": tables, "cells": cells}


def step0_table(study: dict, root: Path = Path(".")) -> dict:
    """The step-0 models the runs start from: per world and step-0 class count, mIoU of the step-0 classes (without
    and with background), mean ± std over the seeds (`study/step0/<world>_<base>_s<seed>/metrics.json`)."""
    world_of = {run["step0"]: run["world"] for run in study["runs"].values()}  # a step-0 model exists for its runs
    grouped: dict[tuple, list[dict]] = {}
    for key, item in study["step0"].items():
        metrics = json.loads((root / "study" / "step0" / key / "metrics.json").read_text())
        grouped.setdefault((world_of[key], base_of(item["protocol"])), []).append(metrics["final"]["miou"])
    rows = [[world, int(base), *(mean_std([m[key] for m in members])["text"] for key in OLD_AND_ALL), len(members)]
            for (world, base), members in grouped.items()]
    return {"columns": ["world", "step-0 classes", "mIoU (no bg)", "mIoU (with bg)", "seeds"], "rows": rows}


def plot_study(cells: dict, variants: list[str], out: Path) -> list[Path]:
    """Per world: final old / new / all mIoU of every variant, one panel per protocol, error bars = std over seeds;
    joint (scored on the protocol's classes) as the last bars."""
    written = []
    for world, protocols in cells.items():
        names = [p for p in protocols if p != "joint"]
        shown = [*variants, "joint"]
        counts = [sum(v in protocols[p] for v in shown) for p in names]  # panels as wide as their bars
        fig, axes = plt.subplots(1, len(names), figsize=(0.55 * sum(counts) + 2.5, 4.6), sharey=True, squeeze=False,
                                 gridspec_kw={"width_ratios": counts})
        for ax, protocol in zip(axes[0], names):
            mine = [v for v in shown if v in protocols[protocol]]
            width = 0.8 / len(REPLAY_BARS)
            for k, (key, name, colour) in enumerate(REPLAY_BARS):
                cells_k = [protocols[protocol][v].get(key) for v in mine]
                ax.bar([i + (k - 1) * width for i in range(len(mine))],
                       [c["mean"] if c else float("nan") for c in cells_k], width, label=name, color=colour,
                       yerr=[c["std"] if c else 0.0 for c in cells_k], capsize=2)
            ax.set_xticks(range(len(mine)), mine, fontsize=7, rotation=40, ha="right", rotation_mode="anchor")
            ax.set_title(f"{protocol} ({world})")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set(ylabel="final mIoU (mean ± sample std over seeds)", ylim=(0, 1))
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        fig.tight_layout()
        path = out / f"{world}.png"
        save_figure(fig, path, dpi=100, bbox_inches=None)
        written.append(path)
    return written


def write_study_report(study_file: Path, out: Path, root: Path = Path(".")) -> dict:
    """docs/results.json (cells and tables) and the study's figures under `out`."""
    study = load(study_file)
    spec = study["spec"]
    variants = list(spec["variants"])
    cells = study_cells(study, root)
    chains = chains_table(study, root)
    labels = label_tables(study, root)
    report = {"study": str(study_file), "seeds": spec["seeds"], "cells": cells, "chains": chains["summary"],
              "labels": labels["cells"],
              "tables": {**study_tables(cells, variants), "step0": step0_table(study, root),
                         "chains": {"columns": chains["columns"], "rows": chains["rows"]},
                         "chains_differing": chains["differing"],
                         **{f"labels_{k}": v for k, v in labels["tables"].items()}}}
    for name, made in (("attribution", attribution(cells, spec.get("attribution"))),
                       ("interactions", interactions(cells, spec.get("interactions"))),
                       ("contrasts", contrasts(cells, spec.get("contrasts")))):
        if made is not None:
            report["tables"][name] = made
    if "contrasts" in report["tables"]:
        report["tables"]["verdicts_across_worlds"] = verdicts_across_worlds(report["tables"]["contrasts"]["calls"])
    report["figures"] = [p.as_posix() for p in plot_study(cells, variants, out)]
    write_json(out.with_suffix(".json"), report)
    return report
