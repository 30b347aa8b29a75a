"""The study's dose-response stage: RECALL at every render shift of the toy GAN against MiB and no replay, scored by
the replay labels' measured IoU (study/spec.yaml's `dose_response` section) -> a JSON report, its figure and a sheet
of what the levels look like (`recall.dose_response`)."""

from __future__ import annotations

import sys
from pathlib import Path

from recall.commands import script


def add_arguments(parser) -> None:
    parser.add_argument("--study", default="study/spec.yaml", help="the study's spec (default: %(default)s)")
    parser.add_argument("--out", default="docs/dose_response.json", help="the report (default: %(default)s); its "
                        "figure is <out>.png and the levels' sheet <out>_levels.png")
    parser.set_defaults(overrides=[], params=None)


def main(args) -> int:
    from recall.atomic import write_json
    from recall.dose_response import figure, levels_figure, study_report
    from recall.study import load

    out = Path(args.out)
    report, pools = study_report(load(Path(args.study)))
    figure(report, out.with_suffix(".png"))
    levels_figure(pools, out.with_name(f"{out.stem}_levels.png"))
    write_json(out, report, indent=1)  # last: the figures it describes are written
    for row in report["table"]["rows"]:
        print(" | ".join(str(v) for v in row))
    print(f"{out}: {len(report['table']['rows'])} lines over {len(report['seeds'])} seeds; figure "
          f"{out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
