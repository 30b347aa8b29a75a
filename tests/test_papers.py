"""The papers' numbers beside the testbed's (recall/papers.py): the comparison file is current, the retained share
and the orderings are what a hand computation gives, and every published number names its source."""

from __future__ import annotations

import json

import pytest

from recall import papers


def _cell(seeds, values):
    return {"seeds": seeds, "old_no_bg": {"values": values, "text": "x"}}


def test_the_comparison_in_the_docs_is_current() -> None:
    assert papers.main(["--check"]) == 0, "run python -m recall.papers"


def test_every_published_number_names_a_source_that_says_what_old_covers() -> None:
    data = json.loads(papers.PAPERS.read_text())
    for row in data["voc_overlapped"]:
        source = data["sources"][row["source"]]
        assert source["cite"] and source["where"]
        assert all(row[k] is None or 0.0 <= row[k] <= 100.0 for k in ("old", "new", "all"))
        assert row["old"] is None or source["old"], f"{row}: its source must say which classes 'old' averages"


def test_retained_share_and_orderings_by_hand() -> None:
    published = {"sources": {"mib": {"old": "1-15"}},
                 "voc_overlapped": [{"protocol": "15-1", "method": m, "source": "mib", "old": old, "new": 0, "all": 0}
                                    for m, old in (("mib", 35.1), ("joint", 79.1), ("lwf", 1.0), ("ft", 0.2))]}
    cells = {"pretrained": {"15-1x5": {"mib": _cell([0, 1, 2], [0.70, 0.72, 0.74]),
                                       "joint": _cell([0, 1, 2], [0.80, 0.80, 0.74]),
                                       "lwf": _cell([0, 1, 2], [0.10, 0.30, 0.20]),
                                       "ft": _cell([0, 1, 2], [0.0, 0.0, 0.0]),
                                       "recall_toy_gan": _cell([0, 1, 2], [0.71, 0.74, 0.75]),
                                       "recall_web": _cell([0, 1, 2], [0.60, 0.80, 0.70])}}}
    retained = papers.retained(published, cells)["values"]["15-1"]
    assert retained["paper"] == pytest.approx(35.1 / 79.1)
    assert retained["testbed"]["values"] == pytest.approx([0.70 / 0.80, 0.72 / 0.80, 1.0])  # per seed, paired
    calls = papers.orderings(published, cells)["calls"]["15-1"]
    assert (calls["mib_vs_lwf"]["paper"], calls["mib_vs_lwf"]["testbed"]) == ("mib higher", "mib higher")
    assert calls["mib_vs_lwf"]["holds"] is True
    assert calls["lwf_vs_ft"]["holds"] is True  # +0.10 / +0.30 / +0.20: mean 0.2 > its std 0.1
    # RECALL above MiB in every seed (+0.01, +0.02, +0.01): the paper's claim holds on these numbers
    toy_gan = calls["recall_toy_gan_vs_mib"]
    assert toy_gan["testbed"] == "recall_toy_gan higher" and toy_gan["holds"] is True
    # web: -0.10 / +0.08 / -0.04, signs disagree: no difference, so the claim does not hold
    assert calls["recall_web_vs_mib"]["testbed"] == "no difference" and calls["recall_web_vs_mib"]["holds"] is False
    assert "15-5" in papers.orderings(published, cells)["calls"]  # a protocol not run is reported as such
    assert papers.orderings(published, {"pretrained": {}})["calls"]["15-1"]["mib_vs_lwf"]["testbed"] == "not run"
