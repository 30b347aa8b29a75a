"""The demo profile's arithmetic: with two stages at a time, the time no stage ran is the pipeline's wall time
minus the union of the stages' intervals, not minus their sum."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("demo_profile",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "demo_profile.py")
demo_profile = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo_profile)


@pytest.mark.parametrize("intervals, seconds", [
    ([], 0.0),
    ([(0.0, 2.0)], 2.0),
    ([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)], 4.0),  # overlapping, then a gap
    ([(0.0, 10.0), (2.0, 3.0)], 10.0),            # one inside another
    ([(4.0, 5.0), (0.0, 1.0), (1.0, 2.0)], 3.0),  # unsorted, touching
])
def test_covered_is_the_union_of_the_stages_intervals(intervals, seconds):
    assert demo_profile.covered(intervals) == pytest.approx(seconds)
