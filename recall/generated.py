"""Lists in a dvc.yaml that a command writes, each below a marker comment line.

    deps:
      # code of recall.stages.run (generated: python -m recall.pipeline)
      - recall/...

`python -m recall.pipeline` writes the code deps this way, `python -m recall.study` the dose-response's inputs.
"""

from __future__ import annotations

from collections.abc import Callable


def rewrite_lists(text: str, marker: Callable[[str], str | None], prefix: str,
                  items: Callable[[str], list[str]]) -> str:
    """`text` with the list below every marker line regenerated: after a line for which `marker` returns a key, the
    `- <prefix>...` lines at the marker's indent are replaced by one `- <item>` line for each of `items(key)`."""
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        out.append(lines[i])
        key = marker(lines[i])
        i += 1
        if key is None:
            continue
        item = lines[i - 1][:len(lines[i - 1]) - len(lines[i - 1].lstrip())] + "- "
        while i < len(lines) and lines[i].startswith(item + prefix):
            i += 1
        out.extend(f"{item}{entry}\n" for entry in items(key))
    return "".join(out)
