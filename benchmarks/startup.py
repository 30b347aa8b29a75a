"""Process start and import time of `recall run` vs `python -c "import torch"`, in one run.

    python benchmarks/startup.py [--repeats 5]

Every DVC stage pays a fresh Python process: this measures what a run stage imports before it trains
(`recall.experiment`, `recall.tracking` and `recall.config`: torch, torchvision, timm, MLflow, Hydra) against
importing torch alone, the floor any stage pays. The ratio is printed; goal: <= 2.5 (today torchvision's models,
which `import torchvision` always loads, and MLflow cost about as much as torch itself).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def best_of(command: list[str], repeats: int) -> float:
    times = []
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch_only = best_of([sys.executable, "-c", "import torch"], args.repeats)
    run_imports = best_of([sys.executable, "-c", "import recall.experiment, recall.tracking, recall.config"],
                          args.repeats)
    print(f"process start + imports (best of {args.repeats}):")
    print(f"  python -c 'import torch'                                      {torch_only:6.2f} s")
    print(f"  python -c 'import recall.experiment, recall.tracking, ...'    {run_imports:6.2f} s")
    print(f"  ratio recall run stage / import torch: {run_imports / torch_only:.2f} (goal <= 2.5)")


if __name__ == "__main__":
    main()
