"""How long step 0 and joint must train: validation mIoU after 8, 16, 24 and 32 epochs (`train.epochs`).

    python benchmarks/convergence.py --encoder models/pretrain/encoder.pth [--head aspp] [--out docs/convergence.json]

Step 0 of the 15-class protocols and joint (all 20 classes) are trained from the pretrained `--encoder` for each
epoch count, one thread each, `--jobs` at a time, and scored on the validation set; with --out, the table and each
doubling's gain (of mIoU without background: the step-0 classes, or joint's 20) are written as JSON
(docs/results.md quotes it: `python -m recall.docs`), to set beside the spread of step-0 mIoU over seeds. `--head`
is the model's head (`model.head`): aspp, the toy head the study ran with (docs/convergence.json), or deeplabv2, the
authors' and the demo's (docs/convergence_deeplabv2.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recall.model import HEADS

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = (8, 16, 24, 32)
WHAT = {"step0": ["protocol=15-5", "method=ft", "last_step=0"], "joint": ["protocol=joint", "method=joint"]}


def train(what: str, epochs: int, encoder: Path, out: Path, head: str) -> dict:
    run_dir = out / f"{what}_e{epochs}"
    subprocess.run([sys.executable, "-m", "recall.stages.run", "--params", "params.yaml", *WHAT[what],
                    f"model.head={head}", f"train.epochs={epochs}", f"model.pretrained_file={encoder}",
                    f"run_dir={run_dir}", "tracking.uri=", "train.threads=1"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    miou = json.loads((run_dir / "metrics.json").read_text())["final"]["miou"]
    return {"what": what, "epochs": epochs, "old_no_bg": miou["old_no_bg"], "all": miou["all"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--head", choices=HEADS, default="aspp")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: train(*job, args.encoder.resolve(), Path(tmp), args.head),
                             [(w, e) for w in WHAT for e in EPOCHS]))
    report = {"encoder": str(args.encoder), "head": args.head, "columns": ["what", "epochs", "old (no bg)", "all"],
              "rows": [[r["what"], r["epochs"], r["old_no_bg"], r["all"]] for r in rows], "gain": {}}
    for what in WHAT:
        by_epochs = {r["epochs"]: r["old_no_bg"] for r in rows if r["what"] == what}
        report["gain"][what] = {f"{a}_to_{b}": by_epochs[b] - by_epochs[a] for a, b in ((8, 16), (16, 32), (24, 32))}
    for row in report["rows"]:
        print(f"{row[0]:>6} {row[1]:>3} epochs: old (no bg) {row[2]:.3f}, all {row[3]:.3f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
