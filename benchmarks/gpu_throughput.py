"""Training images/s of the paper profile (DeepLab-v2 ResNet-101, OS 8, batch 4, crop 321) under each speed
option, as ratios against plain fp32 measured in the same run.

    python benchmarks/gpu_throughput.py [--iters 20] [--warmup 5] [--variants fp32,channels_last,bf16,fp16,compile]
    (the training loop's progress bars go to stderr: add 2>/dev/null for the table alone)

Variants: fp32 (NCHW, the reference), channels_last, bf16 and fp16 autocast (+ channels_last; fp16 with its
gradient scaler), compile (torch.compile of the channels_last bf16 model). Each runs recall's own training
loop (`recall.train.train_one_epoch`: the method hooks, the Precision object) on random batches already in
memory, so it measures the model and the options, not the data pipeline.

Without a GPU it says so and measures a small stand-in on the CPU (timm's test_resnet, crop 64, batch 16): the
ratios then only show that every option runs; their GPU values are what matter. The `plan` of `recall run
--dry-run` takes `plan.train_images_per_second` from the fp32 (or your chosen) line of a GPU run of this script.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from recall.methods import StepContext, build_method
from recall.model import ModelConfig, SegmentationModel
from recall.train import Precision, TrainConfig, make_optimizer, train_one_epoch

PAPER = dict(model=ModelConfig(backbone="resnet101", output_stride=8, head_channels=256, aspp_rates=[6, 12, 18, 24],
                               frozen_bn=True), batch=4, crop=321, classes=16)
CPU_STANDIN = dict(model=ModelConfig(), batch=16, crop=64, classes=16)

# name -> (channels_last, amp, compile)
VARIANTS = {"fp32": (False, None, False), "channels_last": (True, None, False), "bf16": (True, "bf16", False),
            "fp16": (True, "fp16", False), "compile": (True, "bf16", True)}


def measure(profile: dict, device: torch.device, variant: str, iters: int, warmup: int) -> float:
    channels_last, amp, compile_ = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = ModelConfig(**{**vars(profile["model"]), "channels_last": channels_last})
    model = SegmentationModel(cfg, [profile["classes"] - 1]).to(device)
    n = profile["batch"] * (iters + warmup)
    images = torch.randn(n, 3, profile["crop"], profile["crop"])
    targets = torch.randint(0, profile["classes"], (n, profile["crop"], profile["crop"]))
    loader = DataLoader(TensorDataset(images, targets), batch_size=profile["batch"],
                        pin_memory=device.type == "cuda")
    method, ctx = build_method("ft"), StepContext(step=0, task=[list(range(1, 16))], new_classes=[], old_classes=[])
    optimizer, scheduler = make_optimizer(list(model.parameters()), 1e-3, TrainConfig(), iters + warmup)
    net = torch.compile(model) if compile_ else model
    precision = Precision(amp, device)
    kwargs = dict(net=net, precision=precision)
    train_one_epoch(model, method, loader, optimizer, scheduler, ctx, "warm-up", iterations=warmup, **kwargs)
    _sync(device)
    start = time.perf_counter()
    train_one_epoch(model, method, loader, optimizer, scheduler, ctx, variant, iterations=iters, **kwargs)
    _sync(device)
    return iters * profile["batch"] / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if torch.cuda.is_available():
        device, profile = torch.device("cuda"), PAPER
        where = f"GPU {torch.cuda.get_device_name(0)}: the paper profile (DeepLab-v2 ResNet-101 OS 8, crop 321, batch 4)"
    else:
        device, profile = torch.device("cpu"), CPU_STANDIN
        torch.set_num_threads(2)
        where = ("NO GPU: a small CPU stand-in (test_resnet, crop 64, batch 16, 2 threads); the ratios only show "
                 "that each option runs. Run this on a GPU for the paper profile's numbers")
    print(f"torch {torch.__version__}; {where}; {args.iters} timed iterations after {args.warmup} warm-up")
    results = {}
    for variant in ["fp32", *[v for v in variants if v != "fp32"]]:
        try:
            results[variant] = measure(profile, device, variant, args.iters, args.warmup)
        except Exception as error:  # e.g. torch.compile without a C++ compiler, fp16 unsupported on a device
            print(f"{variant:>14}: failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        ratio = results[variant] / results["fp32"]
        print(f"{variant:>14}: {results[variant]:8.1f} img/s   x{ratio:.2f} vs fp32", flush=True)


if __name__ == "__main__":
    main()
