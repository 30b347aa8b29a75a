"""The mutation score of the core, from the results `make mutants` left in `mutants/`.

    python benchmarks/mutation_report.py [--out docs/mutation.json]
    python benchmarks/mutation_report.py --scope [all | PATTERN ...]   # the names `make mutants` runs

The core is SCOPE below: metrics, the protocol, label evaluation, the methods and their replay stream, and the
runner's data flow (which images and targets reach a step's training, how replay batches join them, what is
evaluated and scored). The runner's bookkeeping (resume, config checks, run names, step-0 adoption) and the
optimiser/precision plumbing are mutated (pyproject's `only_mutate` takes whole files) but not run: the
process-level tests check them.

Every mutant of the core takes about 7 hours on 2 cores (each runs the in-process tests that reach its function,
and the runner's functions are reached by whole protocol runs), so `make mutants` runs a sample: every function's
mutants numbered ...1 (1, 11, 21, ...), about one in eight, fixed before any result was seen. mutmut numbers a
function's mutants in source order, so the sample spreads over every function and kind of change; every function
has its first mutant in it (so small functions weigh a little more than in the whole: the interval is the
sample's). `make mutants MUTANTS=all` runs them all; this report then scores all of them.

Reads mutmut's result files (`mutants/**/*.py.meta`: each mutant's exit code) and prints, per module, the
mutants, how many the tests killed, survived, reached no test or timed out, and the score (killed / mutants),
with a 95% (Wilson) interval when it comes from the sample. Every survivor is joined with its explanation from
docs/mutation_survivors.yaml (why no test can tell it from the original); a survivor without one is listed as
UNEXPLAINED and the command exits 1, as does a mutant of the sample not checked (an interrupted run). With --out
the tables are written as JSON for docs/testing.md (`python -m recall.docs`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from collections import Counter
from pathlib import Path

import yaml
from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]
EXPLANATIONS = ROOT / "docs" / "mutation_survivors.yaml"
_RUN = "recall.experiment.xǁProtocolRunǁ"
SCOPE = ["recall.metrics.*", "recall.data.protocol.*", "recall.labeling.*", "recall.methods.*",
         "recall.replay.stream.*",
         *(f"{_RUN}{f}__mutmut_*" for f in ("_dataset_kwargs", "classes_of", "train_ids", "check_no_earlier_images",
                                            "train_loader", "loader_options", "eval_loader", "context", "model_for",
                                            "train_extra_model", "evaluate", "result")),
         *(f"recall.train.x_{f}__mutmut_*" for f in ("blend", "iters_per_class", "step_iterations",
                                                       "train_one_epoch"))]
SAMPLE = "1"  # the sample: mutants whose number ends in this digit
FINAL = ("killed", "survived", "no tests", "timeout", "segfault", "caught by type check")  # results, not states


def patterns(sample: bool = True) -> list[str]:
    """The mutant-name patterns of the core (of its sample), for `mutmut run`."""
    return [p + SAMPLE if sample else p for p in SCOPE]


def in_scope(name: str, sample: bool = False) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns(sample))


def results(mutants: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} of the core's mutants, from mutmut's result files."""
    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        scoped = {name: status_by_exit_code[code] for name, code in codes.items() if in_scope(name)}
        if scoped:
            out[str(meta.relative_to(mutants)).removesuffix(".meta")] = scoped
    return out


def wilson(killed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion killed / n."""
    if n == 0:
        return math.nan, math.nan
    p = killed / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def report(by_module: dict[str, dict[str, str]], explanations: list[dict]) -> dict:
    """Whole if every mutant of the core was checked, else its sample (which must then be checked whole)."""
    whole = all(status in FINAL for statuses in by_module.values() for status in statuses.values())
    why = {name: group for group in explanations for name in group["mutants"]}
    rows, survivors, unexplained, not_checked, total = [], {}, [], [], Counter()
    for module, statuses in by_module.items():
        chosen = {name: s for name, s in statuses.items() if whole or in_scope(name, sample=True)}
        counts = Counter(chosen.values())
        total.update(counts)
        rows.append(_row(module, counts, len(statuses)))
        for name, status in chosen.items():
            if status == "survived":
                if name in why:
                    survivors.setdefault(id(why[name]), (why[name], []))[1].append(name)
                else:
                    unexplained.append(name)
            elif status not in FINAL:  # not checked, interrupted, suspicious, skipped: not a result
                not_checked.append(name)
    rows.append(_row("all", total, sum(len(s) for s in by_module.values())))
    total = Counter({k: v for k, v in total.items() if k in FINAL})
    survivor_rows = [[", ".join(_short(n) for n in names), group["change"], group["why"]]
                     for group, names in survivors.values()]
    checked = sum(total.values())
    low, high = wilson(total["killed"], checked) if not whole else (None, None)  # (exact when whole)
    return {"modules": {"columns": ["module", "mutants", "run", "killed", "survived", "no test", "timeout",
                                    "score"], "rows": rows},
            "survivors": {"columns": ["mutants", "change", "why it survives"], "rows": survivor_rows},
            "whole": whole, "score": total["killed"] / checked if checked else None, "score_low": low,
            "score_high": high, "mutants": sum(len(s) for s in by_module.values()), "run": checked,
            "killed": total["killed"], "survived": total["survived"], "unexplained": unexplained,
            "not_checked": len(not_checked)}


def _row(module: str, counts: Counter, mutants: int) -> list[str]:
    n = sum(v for k, v in counts.items() if k in FINAL)
    return [module, str(mutants), str(n), str(counts["killed"]), str(counts["survived"]), str(counts["no tests"]),
            str(counts["timeout"]), f"{counts['killed'] / n:.1%}" if n else ""]


def _short(name: str) -> str:
    """recall.methods.replay.xǁReplayMethodǁensure_labels__mutmut_54 -> ReplayMethod.ensure_labels 54."""
    where, number = name.rsplit("__mutmut_", 1)
    function = where.split(".x", 1)[1] if ".x" in where else where
    return f"`{function.strip('_ǁ').replace('ǁ', '.')}` {number}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants", help="mutmut's directory (default: mutants/)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here (e.g. docs/mutation.json)")
    parser.add_argument("--scope", nargs="*", metavar="all|PATTERN",
                        help="print the mutant-name patterns to run, one a line: the core's sample (no argument), "
                             "every mutant of the core (all), or the patterns given")
    args = parser.parse_args(argv)
    if args.scope is not None:
        print("\n".join(patterns(sample=True) if not args.scope else
                        patterns(sample=False) if args.scope == ["all"] else args.scope))
        return 0
    if not args.mutants.is_dir():
        print(f"{args.mutants}: no mutmut results; run `make mutants` first", file=sys.stderr)
        return 2
    by_module = results(args.mutants)
    if not by_module:
        print(f"{args.mutants}: no mutant of the core (patterns: --scope); run `make mutants`", file=sys.stderr)
        return 2
    result = report(by_module, yaml.safe_load(EXPLANATIONS.read_text()))
    table = result["modules"]
    width = [max(len(c) for c in col) for col in zip(table["columns"], *table["rows"])]
    for row in [table["columns"], *table["rows"]]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, width))))
    what = "every mutant of the core" if result["whole"] else (
        f"the sample (numbers ending in {SAMPLE}): 95% interval {result['score_low']:.1%}-{result['score_high']:.1%}")
    print(f"\n{what}; {result['survived']} survivors, {len(result['unexplained'])} of them unexplained")
    for name in result["unexplained"]:
        print(f"  UNEXPLAINED {name} (mutmut show {name}; explain it in {EXPLANATIONS.relative_to(ROOT)})")
    if result["not_checked"]:
        print(f"{result['not_checked']} mutants of the sample not checked: an interrupted run; run `make mutants`")
    failed = bool(result["unexplained"] or result["not_checked"])
    if args.out and not failed:  # an incomplete or unexplained run never replaces the published report
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
