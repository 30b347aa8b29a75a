"""The code dependencies of the DVC stages, generated from their import closures (never kept by hand).

A stage's `deps:` in dvc.yaml (and tune/dvc.yaml, study/dvc.yaml) carry a marker line

        # code of recall.stages.run (generated: python -m recall.pipeline)

followed by the source files that running that module may execute (``recall.provenance.import_closure``), a
directory standing for all of its files when every one of them is in the closure. `python -m recall.pipeline`
rewrites those lines; `python -m recall.pipeline --check` (and a test) fails when one is out of date, so editing
any module a stage imports makes `dvc status` report the stage as changed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from recall.generated import rewrite_lists
from recall.provenance import PACKAGE_DIR, import_closure

ROOT = PACKAGE_DIR.parent
# each pipeline file and what its deps put before a path from the top: the study is a DVC project of its own
# (study/.dvc), whose stages name the top's files as `../<path>`
DVC_FILES = {"dvc.yaml": "", "tune/dvc.yaml": "", "study/dvc.yaml": "../"}
MARKER = re.compile(r"^(?P<indent>\s*)# code of (?P<entry>[\w.]+) \(generated: python -m recall\.pipeline\)\s*$")


def _sources(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*.py") if "__pycache__" not in p.parts}


def code_deps(entry: str) -> list[str]:
    """The deps lines of module `entry`: its import closure, relative to the repository root, a directory replacing
    its files when all of them are in the closure."""
    closure = set(import_closure(entry))
    deps: list[Path] = []

    def walk(directory: Path) -> None:
        if _sources(directory) <= closure:
            deps.append(directory)
            return
        for path in sorted(directory.iterdir()):
            if path.is_dir() and _sources(path) & closure:
                walk(path)
            elif path in closure:
                deps.append(path)

    walk(PACKAGE_DIR)
    return [p.relative_to(ROOT).as_posix() for p in deps]


def rewrite(text: str, top: str = "") -> str:
    """`text` (a dvc.yaml) with every marker's code deps regenerated; the lines after a marker that name files under
    recall/ are replaced. ``top``: what the file's deps put before a path from the top (DVC_FILES)."""
    return rewrite_lists(text, lambda line: (found := MARKER.match(line)) and found["entry"], f"{top}recall",
                         lambda entry: [f"{top}{path}" for path in code_deps(entry)])


def stale_files(root: Path = ROOT) -> list[Path]:
    """The dvc.yaml files whose generated code deps are out of date."""
    return [root / name for name, top in DVC_FILES.items()
            if (root / name).is_file() and rewrite((root / name).read_text(), top) != (root / name).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a dvc.yaml is out of date")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: code deps out of date; run `python -m recall.pipeline`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(rewrite(path.read_text(), DVC_FILES[path.relative_to(ROOT).as_posix()]))
        print(f"{path.relative_to(ROOT)}: code deps regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
