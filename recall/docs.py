"""Numbers in the docs come from report files, never from a keyboard: `python -m recall.docs` rewrites every
generated block of README.md and docs/*.md from the JSON the reports wrote (`--check`: exit 1 if one is stale).

A block is written in the page as

    <!-- gen:table FILE KEY -->            a table: FILE's KEY holds {"columns": [...], "rows": [[...], ...]}
    ...                                    or a flat {row: {column: number}} mapping (e.g. reports/summary.json
    <!-- /gen -->                          with KEY "."); numbers are shown with 3 decimals
    <!-- gen:value FILE KEY -->0.612<!-- /gen -->      one value (text or number) inline
    <!-- gen:value FILE KEY .1f -->21.7<!-- /gen -->    a number in a format of its own (Python's format spec)

where FILE is relative to the repository root and KEY a path into the JSON, its parts separated by "/".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- gen:(?P<kind>table|value) (?P<file>\S+) (?P<key>\S+)(?: (?P<format>[^\s>]+))? -->)"
                   r"(?P<body>.*?)(<!-- /gen -->)",
                   re.S)


class DocsError(ValueError):
    pass


def lookup(data, key: str):
    node = data
    for part in [] if key == "." else key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise DocsError(f"no {key!r} in the report (missing part {part!r})")
        node = node[part]
    return node


def cell(value, spec: str | None = None) -> str:
    if value is None:
        return "–"
    if spec is not None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DocsError(f"format {spec!r} asked of {value!r}, which is not a number")
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(node) -> str:
    if "columns" in node and "rows" in node:
        columns, rows = node["columns"], node["rows"]
    else:  # a flat mapping: one row per key
        columns = ["", *dict.fromkeys(c for values in node.values() for c in values)]
        rows = [[name, *(values.get(c) for c in columns[1:])] for name, values in node.items()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rewrite(text: str, root: Path = ROOT) -> str:
    reports: dict[str, object] = {}

    def fill(match: re.Match) -> str:
        file = match["file"]
        if file not in reports:
            path = root / file
            if not path.is_file():
                raise DocsError(f"{file}: the report this page quotes is missing (run the stage that writes it)")
            reports[file] = json.loads(path.read_text())
        node = lookup(reports[file], match["key"])
        body = f"\n{table(node)}\n" if match["kind"] == "table" else cell(node, match["format"])
        return match.group(1) + body + match.group(7)

    return BLOCK.sub(fill, text)


def pages(root: Path = ROOT) -> list[Path]:
    return sorted(p for pattern in PAGES for p in root.glob(pattern))


def stale_pages(root: Path = ROOT) -> list[Path]:
    return [p for p in pages(root) if rewrite(p.read_text(), root) != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's generated numbers are stale")
    args = parser.parse_args(argv)
    try:
        stale = stale_pages()
    except DocsError as error:
        print(f"recall docs: error: {error}", file=sys.stderr)
        return 2
    for page in stale:
        if args.check:
            print(f"{page.relative_to(ROOT)}: generated numbers are stale; run `python -m recall.docs`", file=sys.stderr)
        else:
            page.write_text(rewrite(page.read_text()))
            print(f"{page.relative_to(ROOT)}: generated numbers rewritten")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
