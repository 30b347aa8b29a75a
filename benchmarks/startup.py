"""Process start and import time of `recall run` vs `python -c "import torch"`, in one run.

    python benchmarks/startup.py [--repeats 5]

Every DVC stage pays a fresh Python process: this measures what a run stage imports before it starts
(`recall.experiment`, `recall.tracking` and `recall.config`: torch, Hydra; timm, torchvision, MLflow and matplotlib
are imported where they are used) against importing torch alone, the floor any stage pays. The ratio is printed;
goal: <= 2.5. A second line adds the libraries a run then loads before its first step anyway (timm, which imports
torchvision, its model zoo and torch._dynamo, to build the model; MLflow when tracking.uri is set): the lazy
imports move their cost there, they do not remove it from a run stage that builds a model and logs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


COMMANDS = {"torch": "import torch",
            "run stage": "import recall.experiment, recall.tracking, recall.config",
            "first step": "import recall.experiment, recall.tracking, recall.config, timm, mlflow"}


def best_of(codes: list[str], repeats: int) -> list[float]:
    """The best wall time of `python -c code` for each code, run in turns (a load that comes and goes on a shared
    machine then weighs on every command alike)."""
    times: list[list[float]] = [[] for _ in codes]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for _ in range(repeats):
        for code, measured in zip(codes, times):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
            measured.append(time.perf_counter() - start)
    return [min(measured) for measured in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch_only, run_imports, first_step = best_of(list(COMMANDS.values()), args.repeats)
    print(f"process start + imports (best of {args.repeats}):")
    print(f"  python -c 'import torch'                                      {torch_only:6.2f} s")
    print(f"  python -c 'import recall.experiment, recall.tracking, ...'    {run_imports:6.2f} s")
    print(f"  ... + timm, mlflow (loaded before a tracked run's first step) {first_step:6.2f} s")
    print(f"  ratio recall run stage / import torch: {run_imports / torch_only:.2f} (goal <= 2.5)")
    print(f"  ratio with what a tracked run loads before its first step / import torch: {first_step / torch_only:.2f}")


if __name__ == "__main__":
    main()
