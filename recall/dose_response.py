"""How good must replay be to beat distillation? The dose-response of study/spec.yaml's `dose_response` section.

RECALL replays the toy GAN at several render shifts (`replay.source.render_shift`: 0 draws each class in the toy
world's own style, 1 the toy ImageNet's look-alike of the study's toy_gan, 2 twice as far), one variant per level;
everything else (the toy ImageNet, hence the encoder and the class map, the step-0 models, the schedule) is the same
at every level. Each run is scored against the simulation's truth by its own statistics: its replay labels' IoU
against the generator's true masks, on the step-0 classes (labelled by the step-0 model) and on the classes learnt
later (by the helper decoders). MiB and RECALL without replay are the reference lines; web replay and the oracle
labels are points on the same axes.

`records` hold every seed's numbers as records[protocol][line][seed]; a line is `recall_shift<level>` for a level,
the point's or the reference's name otherwise. `summary` adds mean ± sample std per cell and the study's paired
verdict of every level and point against each reference; `figure` plots final mIoU against the measured label IoU
(what label evaluation achieved, not the knob), `levels_figure` what the levels look like. The study's stage
(`python -m recall.stages.dose_response`) and `benchmarks/dose_response.py` both write this report.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from recall.atomic import write_bytes
from recall.errors import UserError
from recall.metrics import HEADLINE, OLD, OLD_AND_ALL, OLD_NEW, SUMMARIES
from recall.study_report import mean_std, paired_call

METRICS = HEADLINE  # old classes without background, new, all
NEW = OLD_NEW[1]
CALLED = OLD_AND_ALL  # the metrics each level is called on against each reference
LABELS = ("iou_step0_classes", "iou_later_classes", "empty_step0_classes", "empty_later_classes")
REFERENCES = ("mib", "no_replay")
POINTS = {"web": "web replay", "oracle": "oracle labels (shift 1.0)"}


def level_line(level: float) -> str:
    """The record name of a level's line."""
    return f"recall_shift{float(level)}"


def scored(run_dir: Path) -> dict:
    """A finished run's final mIoU (old without background, new, all) and its replay labels' scores against the
    truth (those it has)."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())["final"]
    stats = metrics.get("statistics") or {}
    return {**{m: metrics["miou"][m] for m in METRICS},
            **{k: stats[f"replay_labels/{k}"] for k in LABELS if f"replay_labels/{k}" in stats}}


def summary(records: dict, seeds: list[int], shifts: list[float], protocols: list[str]) -> dict:
    """Mean ± sample std per protocol and line (each level, each point, each reference), paired verdicts of every
    level and point against each reference, and tables for the docs."""
    cells, verdicts, rows = {}, {}, []
    compared = {level_line(s): str(float(s)) for s in shifts}
    compared.update({name: label for name, label in POINTS.items() if all(name in records[p] for p in protocols)})
    for protocol in protocols:
        lines = {**{f"shift {float(s)}": level_line(s) for s in shifts},
                 **{compared[n]: n for n in POINTS if n in compared}, **{r: r for r in REFERENCES}}
        cell = {}
        for label, name in lines.items():
            per_seed = [records[protocol][name][str(seed)] for seed in seeds]
            cell[name] = {k: mean_std([p[k] for p in per_seed]) for k in (*METRICS, *LABELS)
                          if all(k in p for p in per_seed)}
            c = cell[name]
            rows.append([protocol, label, *(c[m]["text"] for m in METRICS),
                         c["iou_step0_classes"]["text"] if "iou_step0_classes" in c else "–",
                         c["iou_later_classes"]["text"] if "iou_later_classes" in c else "–", len(seeds)])
        for name in compared:
            for reference in REFERENCES:
                for metric in METRICS:
                    verdicts.setdefault(protocol, {}).setdefault(f"{name}_vs_{reference}", {})[metric] = paired_call(
                        name, reference, *([records[protocol][n][str(seed)][metric] for seed in seeds]
                                           for n in (name, reference)))
        cells[protocol] = cell
    calls = [[protocol, label, *(f"{c['verdict']} ({c['difference']['text']})" for c in
                                 (verdicts[protocol][f"{name}_vs_{r}"][m] for r in REFERENCES
                                  for m in CALLED))]
             for protocol in protocols for name, label in compared.items()]
    return {"cells": cells, "contrasts": verdicts,
            "table": {"columns": ["protocol", "replay", *(SUMMARIES[m].label for m in METRICS),
                                  "label IoU, step-0 classes", "label IoU, later classes", "seeds"], "rows": rows},
            "calls": {"columns": ["protocol", "RECALL's replay (render shift)",
                                  *(f"RECALL - {r.replace('_', ' ')}, {SUMMARIES[m].label}" for r in REFERENCES
                                    for m in CALLED)],
                      "rows": calls}}


def figure(report: dict, path: Path) -> None:
    """Final mIoU of the step-0 classes (top) and of the classes learnt later (bottom) against the replay labels'
    measured IoU on the step-0 classes (what label evaluation achieved, not the shift knob), per protocol: the levels
    as one line (each labelled with its shift, error bars the seeds' sample std on both axes), web replay and oracle
    labels as points, MiB and no replay as bands (mean ± sample std)."""
    from recall.figures import pyplot, save_figure

    plt = pyplot()
    shifts, protocols = report["shifts"], report["protocols"]
    fig, axes = plt.subplots(2, len(protocols), figsize=(5.4 * len(protocols), 7.6), squeeze=False)
    x_key = "iou_step0_classes"
    for col, protocol in enumerate(protocols):
        cell = report["cells"][protocol]
        for row, (metric, what) in enumerate(((OLD, "step-0 classes"), (NEW, "classes learnt later"))):
            ax = axes[row][col]
            for name, colour in (("mib", "tab:orange"), ("no_replay", "tab:grey")):
                m = cell[name][metric]
                ax.axhline(m["mean"], color=colour, lw=1.5, label=f"{name.replace('_', ' ')} (± std)")
                ax.axhspan(m["mean"] - m["std"], m["mean"] + m["std"], color=colour, alpha=0.18)
            levels = [cell[level_line(s)] for s in shifts]
            ax.errorbar([c[x_key]["mean"] for c in levels], [c[metric]["mean"] for c in levels],
                        xerr=[c[x_key]["std"] for c in levels], yerr=[c[metric]["std"] for c in levels],
                        color="tab:blue", marker="o", capsize=3, label="RECALL, toy GAN at a render shift")
            for s, c in zip(shifts, levels):
                ax.annotate(f"{s:g}", (c[x_key]["mean"], c[metric]["mean"]), textcoords="offset points",
                            xytext=(4, 5), fontsize=7, color="tab:blue")
            for name, marker, colour in (("web", "s", "tab:green"), ("oracle", "*", "tab:red")):
                c = cell.get(name, {})
                if x_key in c:
                    ax.errorbar(c[x_key]["mean"], c[metric]["mean"], xerr=c[x_key]["std"], yerr=c[metric]["std"],
                                color=colour, marker=marker, ms=8, capsize=3, ls="none",
                                label=f"RECALL, {POINTS[name]}")
            ax.set(xlabel="replay label IoU against the truth, step-0 classes (measured)",
                   ylabel=f"final mIoU, {what}")
            if row == 0:
                ax.set_title(f"{protocol} ({len(report['seeds'])} seeds; numbers: the render shift)")
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches=None)


def levels_figure(pools: dict[float, Path], path: Path, classes: int = 6) -> None:
    """What the levels look like: the first pool image of the first `classes` classes (columns) at every level
    (rows), from one seed's pools ({level: pool directory}); the masks and backgrounds are the same in every row, only
    the rendering moves."""
    from PIL import Image, ImageDraw

    shifts = list(pools)
    manifest = [json.loads(line) for line in (pools[shifts[0]] / "manifest.jsonl").open()]
    first = {}
    for record in manifest:
        first.setdefault(record["target_class"], record)
    picked = [first[c] for c in sorted(first)[:classes]]
    size, label = 64, 84
    sheet = Image.new("RGB", (label + size * len(picked), size * len(shifts) + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for col, record in enumerate(picked):
        draw.text((label + size * col + 2, 1), record["target_name"][:10], fill="black")
    for row, shift in enumerate(shifts):
        draw.text((2, 14 + size * row + size // 2 - 5), f"shift {shift}", fill="black")
        images = pools[shift] / "images"
        for col, record in enumerate(picked):
            image = next(images.glob(f"{record['id']}.*"), None)
            if image is None:
                raise UserError(f"{images}: no image {record['id']} of its manifest; rebuild the pool (`dvc repro` "
                                "its pool stage)")
            sheet.paste(Image.open(image).convert("RGB").resize((size, size)), (label + size * col, 14 + size * row))
    out = io.BytesIO()
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(out, format="PNG")
    write_bytes(path, out.getvalue())


def study_report(study: dict, root: Path = Path(".")) -> tuple[dict, dict[float, Path]]:
    """The dose-response of a loaded study (`recall.study.load`): its `dose_response` section's runs, scored and
    summarised, and the first seed's pool of every level (for `levels_figure`). A run not finished is an error
    naming it."""
    from recall.study import world_of

    spec = study["spec"]
    section = spec.get("dose_response")
    if not section:
        raise UserError("the study spec has no dose_response section (world, protocols, levels, references, points)")
    world, protocols, seeds = section["world"], list(section["protocols"]), list(spec["seeds"])
    levels = {float(level): variant for level, variant in section["levels"].items()}
    lines = {**{level_line(level): v for level, v in levels.items()}, **section["references"], **section["points"]}
    if set(section["references"]) != set(REFERENCES) or not set(section["points"]) <= set(POINTS):
        raise UserError(f"dose_response: references {sorted(section['references'])}, points "
                        f"{sorted(section['points'])}: the references are exactly {list(REFERENCES)}, the points "
                        f"some of {list(POINTS)}")
    for level, variant in levels.items():  # a level's runs render at that level (toy_gan's default: 1.0)
        overrides = dict(o.split("=", 1) for o in study["runs"][f"{world}_{protocols[0]}_{variant}_s{seeds[0]}"][
            "overrides"].split() if "=" in o)
        rendered = float(overrides.get("replay.source.render_shift", 1.0))
        if rendered != level:
            raise UserError(f"dose_response: level {level} names variant {variant}, whose pool renders at "
                            f"{rendered}: pair each level with the variant that replays it")
    records: dict = {}
    for protocol in protocols:
        for name, variant in lines.items():
            for seed in seeds:
                key = f"{world}_{protocol}_{variant}_s{seed}"
                if key not in study["runs"]:
                    raise UserError(f"dose_response: the study runs no {key} (variant {variant} in world {world} on "
                                    f"{protocol}, seed {seed}); add it to the variants or drop it from the section")
                run_dir = root / "study" / "runs" / key
                if not (run_dir / "metrics.json").is_file():
                    raise UserError(f"{run_dir}: not finished (no metrics.json); run `dvc --cd study repro`")
                records.setdefault(protocol, {}).setdefault(name, {})[str(seed)] = scored(run_dir)
    class_map = {}
    for seed in seeds:
        chain = study["runs"][f"{world}_{protocols[0]}_{levels[min(levels)]}_s{seed}"]["chain"]
        check = root / "study" / "chains" / chain / f"{section.get('source', 'toy_gan')}_mapping_check.json"
        truth = json.loads(check.read_text())["truth"]
        class_map[str(seed)] = {"correct": truth["correct"], "classes": truth["classes"]}
    shifts = sorted(levels)
    report = {"seeds": seeds, "shifts": shifts, "protocols": protocols, "world": world,
              "chain": world_of(world, spec["worlds"][world], spec.get("setting", "overlapped"))["chain"],
              "runs": {name: variant for name, variant in lines.items()},
              "class_map": class_map,
              "class_map_correct": {"fewest": min(m["correct"] for m in class_map.values()),
                                    "classes": max(m["classes"] for m in class_map.values())},
              "records": records, **summary(records, seeds, shifts, protocols)}
    pools = {level: root / study["runs"][f"{world}_{protocols[0]}_{levels[level]}_s{seeds[0]}"]["pool"]
             for level in shifts}
    return report, pools
