"""The papers' published numbers beside the testbed's: does the toy world reproduce what the papers report?

    python -m recall.papers            # writes docs/paper_comparison.json (the docs quote it)
    python -m recall.papers --check    # exit 1 when that file is not what the two inputs give

Inputs: `docs/papers.json`, every published number with its source (a paper's table, read where the authors publish
it), and `docs/results.json`, the study's report. Output: the published table, the testbed's cells of the matching
protocols, MiB's retained share of joint training's old-class mIoU in both, and each ordering the papers report,
checked on the testbed with the study's paired rule (recall.study_report.contrasts: every seed agrees in sign and
the mean difference exceeds its sample std).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recall.atomic import write_json
from recall.metrics import HEADLINE, OLD, SUMMARIES
from recall.study_report import contrasts, mean_std

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ROOT / "docs" / "papers.json"
RESULTS = ROOT / "docs" / "results.json"
OUT = ROOT / "docs" / "paper_comparison.json"

WORLD = "pretrained"  # the study's main world: encoders pretrained as the papers' are
COUNTERPART = {"15-5": "15-5", "15-1": "15-1x5", "10-1": "10-1x10"}  # VOC protocol -> the toy world's
TESTBED_VARIANTS = ("ft", "lwf", "mib", "recall_toy_gan", "recall_web", "joint")
RECALL_CLAIM = "RECALL's abstract: it outperforms the state of the art (its table not read)"
# The orderings the papers report, each as (VOC protocol, A, B): "A keeps more of the old classes than B". The
# paper's side is read from the MiB table's old classes (1-15, no background: the testbed's old_no_bg); RECALL's
# from its abstract, as its table is not quoted (docs/papers.json, "not_read").
ORDERINGS = (("15-5", "mib", "ft"), ("15-5", "recall_toy_gan", "mib"), ("15-5", "recall_web", "mib"),
             ("15-1", "mib", "lwf"), ("15-1", "lwf", "ft"), ("15-1", "recall_toy_gan", "mib"),
             ("15-1", "recall_web", "mib"))


def published(papers: dict) -> dict:
    columns = ["VOC protocol", "method", "source", "old", "new", "all"]
    rows = [[r["protocol"], r["method"], f"{r['source']} ({papers['sources'][r['source']]['old'] or 'all only'})",
             *("–" if r[k] is None else f"{r[k]:.2f}" for k in ("old", "new", "all"))]
            for r in papers["voc_overlapped"]]
    return {"columns": columns, "rows": rows}


def _published_old(papers: dict, protocol: str, method: str, source: str = "mib") -> float | None:
    row = next((r for r in papers["voc_overlapped"]
                if (r["protocol"], r["method"], r["source"]) == (protocol, method, source)), None)
    return None if row is None else row["old"]


def testbed(cells: dict) -> dict:
    columns = ["toy protocol", "variant", *(SUMMARIES[m].label for m in HEADLINE), "seeds"]
    rows = []
    for voc, toy in COUNTERPART.items():
        by_variant = cells.get(WORLD, {}).get(toy, {})
        rows += [[toy, v, *(by_variant[v].get(m, {}).get("text", "–") for m in HEADLINE),
                  len(by_variant[v]["seeds"])] for v in TESTBED_VARIANTS if v in by_variant]
    return {"columns": columns, "rows": rows}


def retained(papers: dict, cells: dict) -> dict:
    """MiB's old-class mIoU as a share of joint training's, in the paper (MiB's Table 1) and on the testbed (per
    seed: MiB over the same seed's joint, scored on the protocol's old classes)."""
    values, rows = {}, []
    for voc, toy in COUNTERPART.items():
        mib, joint = _published_old(papers, voc, "mib"), _published_old(papers, voc, "joint")
        paper = None if mib is None or joint is None else mib / joint
        by_variant = cells.get(WORLD, {}).get(toy, {})
        ours = None
        if OLD in by_variant.get("mib", {}) and OLD in by_variant.get("joint", {}):
            joint_of = dict(zip(by_variant["joint"]["seeds"], by_variant["joint"][OLD]["values"]))
            per_seed = zip(by_variant["mib"]["seeds"], by_variant["mib"][OLD]["values"])
            shares = [m / joint_of[s] for s, m in per_seed if s in joint_of]
            ours = mean_std(shares) if shares else None
        values[voc] = {"toy": toy, "paper": paper, "testbed": ours}
        rows.append([f"{voc} / {toy}", "–" if paper is None else f"{paper:.3f}",
                     "not run" if ours is None else ours["text"]])
    return {"columns": ["protocol (VOC / toy)", "paper (MiB, Table 1)", "testbed (3 seeds)"], "rows": rows,
            "values": values}


def orderings(papers: dict, cells: dict) -> dict:
    spec = [{"world": WORLD, "protocol": COUNTERPART[voc], "metric": OLD, "pairs": [[a, b]]}
            for voc, a, b in ORDERINGS]
    calls = (contrasts(cells, spec) or {"calls": {}})["calls"].get(WORLD, {})
    rows, holds = [], {}
    for voc, a, b in ORDERINGS:
        if a.startswith("recall"):
            paper, source = f"{a} higher", RECALL_CLAIM
        else:
            old_a, old_b = _published_old(papers, voc, a), _published_old(papers, voc, b)
            if old_a is None or old_b is None:
                paper, source = "not read", "–"
            else:
                paper = f"{a} higher" if old_a > old_b else f"{b} higher" if old_b > old_a else "equal"
                source = f"MiB Table 1: {old_a:.1f} vs {old_b:.1f}"
        call = calls.get(COUNTERPART[voc], {}).get(OLD, {}).get(f"{a}_vs_{b}")
        ours = "not run" if call is None else call["verdict"]
        held = None if call is None or paper == "not read" else ours == paper
        holds.setdefault(voc, {})[f"{a}_vs_{b}"] = {"paper": paper, "testbed": ours,
                                                     "difference": call and call["difference"], "holds": held}
        rows.append([f"{voc} / {COUNTERPART[voc]}", f"{a} vs {b}", paper, source, ours,
                     "–" if call is None else call["difference"]["text"],
                     "–" if held is None else "yes" if held else "no"])
    return {"columns": ["protocol (VOC / toy)", "old classes", "paper", "paper's source", "testbed",
                        "A - B (testbed)", "holds"], "rows": rows, "calls": holds}


def comparison(papers: dict, results: dict) -> dict:
    cells = results["cells"]
    return {"published": published(papers), "testbed": testbed(cells), "retained": retained(papers, cells),
            "orderings": orderings(papers, cells)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/paper_comparison.json is stale")
    args = parser.parse_args(argv)
    data = comparison(json.loads(PAPERS.read_text()), json.loads(RESULTS.read_text()))
    if args.check:
        current = OUT.is_file() and json.loads(OUT.read_text()) == json.loads(json.dumps(data))
        print(f"{OUT.relative_to(ROOT)}: {'current' if current else 'stale: run python -m recall.papers'}")
        return 0 if current else 1
    write_json(OUT, data)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
