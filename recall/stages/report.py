"""`recall report`: tables and figures from finished run directories (DVC's report stage)."""

from __future__ import annotations

import sys
from pathlib import Path

from recall.commands import compose, script


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="*", help="run directories (default: the pipeline's runs)")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--params", default=None)
    parser.add_argument("--study", default=None, help="a study's params.yaml (study/spec.yaml): aggregate its runs "
                        "over seeds into <out>.json and <out>/*.png, then rewrite the numbers the docs quote")
    parser.set_defaults(overrides=[])


def main(args) -> int:
    if args.study:
        from recall import docs
        from recall.study_report import write_study_report

        write_study_report(Path(args.study), Path(args.out))
        return docs.main([])
    from recall.report import write_report

    runs = [Path(p) for p in args.runs]
    if not runs:  # the demo pipeline's runs, as listed in the configuration
        pipeline = compose(args).pipeline
        runs = [Path("runs") / key for key in [*pipeline.runs, *pipeline.replay_runs, "joint"]]
    write_report(runs, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
