"""What a run stage imports when its modules load: torch, numpy and Hydra, not the heavy libraries it uses later
(timm, which imports torchvision with its model zoo and torch._dynamo; MLflow with pandas and scipy; matplotlib).
Each is imported inside the functions that use it (benchmarks/startup.py times the difference; this is not timed)."""

from __future__ import annotations

import subprocess
import sys

from recall.pipeline import ROOT

ENTRY_MODULES = ("recall.stages.run", "recall.experiment", "recall.tracking", "recall.config", "recall.model",
                 "recall.figures", "recall.data.voc", "recall.replay.pool")
LAZY = ("mlflow", "timm", "torchvision", "torch._dynamo", "matplotlib", "pandas", "scipy")


def test_importing_the_run_stage_loads_none_of_the_heavy_libraries() -> None:
    code = (f"import sys, {', '.join(ENTRY_MODULES)}; "
            f"print(' '.join(m for m in {LAZY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300,
                            cwd=ROOT).stdout.split()
    assert loaded == [], f"imported when the run stage's modules load: {loaded}"


def test_the_lazy_imports_load_them_where_they_are_used() -> None:
    code = ("import sys; from pathlib import Path; import torch\n"
            "from recall.figures import pyplot\n"
            "from recall.model import _freeze_bn\n"
            "from recall.tracking import source_tags\n"
            "assert pyplot().get_backend().lower() == 'agg' and 'matplotlib' in sys.modules\n"
            "frozen = _freeze_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))\n"
            "assert type(frozen[0]).__name__ == 'FrozenBatchNorm2d' and 'torchvision' in sys.modules\n"
            "assert source_tags('recall run')['mlflow.source.type'] == 'LOCAL' and 'mlflow' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT)
