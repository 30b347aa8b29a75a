"""The docs a newcomer reads: every relative link resolves, every `recall ...` command they quote parses (and its
configuration composes), their numbers are generated from the report files, and no text cites a file the
repository does not hold."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from recall import docs
from recall.cli import COMMANDS, parse_only

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOP_DIRS = ("recall", "docs", "conf", "tests", "benchmarks", "notebooks", "study", "tune", "experiments")
CITED_PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(TOP_DIRS)})/[\w./-]+\.\w+|[A-Z][A-Z_]+\.md)\b")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target} (no such file)"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: link to {target} (no such heading)"


def quoted_commands(text: str) -> list[str]:
    """Whole `recall ...` commands of the code blocks (fenced or indented; continuation lines joined; several
    commands of one line, `a && b`, apart; variables the page exports expanded)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
    blocks += re.findall(r"^ {4}(recall (?:[^\n\\]|\\\n)*)", text, re.MULTILINE)  # indented code blocks
    variables = dict(re.findall(r'export (\w+)="([^"]*)"', re.sub(r"\\\n\s*", " ", text)))
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), line)
            for part in re.split(r"&&|;|(?<!&)&$", line.split(" #")[0]):
                if part.strip().startswith("recall "):
                    commands.append(part.strip())
    return commands


def mentioned_commands(text: str) -> list[str]:
    """The subcommand of every `recall ...` in inline code (a mention: its arguments may be left out)."""
    return [c.split()[1] for c in re.findall(r"`(recall [^`]+)`", text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_recall_commands_parse_and_compose(page):
    from recall.commands import compose

    text = page.read_text()
    assert set(mentioned_commands(text)) <= set(COMMANDS), f"{page.name} mentions a command `recall` does not have"
    for command in quoted_commands(text):
        words = shlex.split(command)[1:]
        assert words[0] in COMMANDS, f"{page.name}: `{command}`: no command {words[0]!r}"
        args = parse_only(words)
        if getattr(args, "overrides", None) and words[0] != "report":
            compose(args)  # unknown keys and group options, unparsable values fail here


def test_generated_numbers_are_current():
    assert docs.stale_pages() == [], "run `python -m recall.docs`"


def test_no_text_cites_a_file_the_repository_does_not_hold():
    texts = [*PAGES, *ROOT.glob("recall/**/*.py"), *ROOT.glob("conf/**/*.yaml"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("benchmarks/*.py"), ROOT / "dvc.yaml", ROOT / "Makefile"]
    missing = set()
    for path in texts:
        for cited in CITED_PATH.findall(path.read_text()):
            if not (ROOT / cited).exists() and not any(ch in cited for ch in "<>{}$*"):
                missing.add(f"{path.relative_to(ROOT)}: {cited}")
    assert sorted(missing) == []


def test_a_value_may_carry_its_own_format(tmp_path):
    page = ("took <!-- gen:value r.json t .1f -->?<!-- /gen --> min, <!-- gen:value r.json n .0f -->?<!-- /gen --> s, "
            "<!-- gen:value r.json t -->?<!-- /gen -->")
    (tmp_path / "r.json").write_text('{"t": 21.6810645, "n": 120.185, "s": "text"}')
    assert docs.rewrite(page, tmp_path) == page.replace("?", "21.7", 1).replace("?", "120", 1).replace("?", "21.681")
    with pytest.raises(docs.DocsError, match="not a number"):
        docs.rewrite("<!-- gen:value r.json s .1f -->?<!-- /gen -->", tmp_path)
