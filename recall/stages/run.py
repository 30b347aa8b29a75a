"""`recall run`: run (or resume) a protocol, or print its plan with --dry-run. DVC's run stages call it.

    recall run protocol=15-1x5 method=recall replay=toy_gan seed=0
    python -m recall.stages.run --params params.yaml protocol=15-5 method=mib step0=models/step0/15-overlapped ...
"""

from __future__ import annotations

import sys

from recall.commands import compose, script, with_overrides


def add_arguments(parser) -> None:
    with_overrides(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (dataset, steps, iterations, replay pool, checkpoints reused, compute "
                             "estimate) without training or writing anything")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")


def main(args) -> int:
    cfg = compose(args)
    if args.dry_run:  # the plan only: nothing is trained or written
        from recall.plan import print_plan
        return print_plan(cfg, as_json=args.json)
    from recall import distributed
    from recall.experiment import run_protocol

    distributed.init_from_env(cfg.train.device)  # under torchrun: join the process group (gloo on CPU, nccl on GPUs)
    main_process = distributed.is_main()
    try:
        tracker = None
        if cfg.tracking.uri and main_process:  # rank 0 alone logs to MLflow
            from recall.tracking import Tracker
            tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment or str(cfg.dataset.name))
        payload = run_protocol(cfg, tracker)
    finally:
        distributed.shutdown()
    if main_process:
        final = payload["final"]["miou"]
        print("final: " + ", ".join(f"{k}={v:.3f}" for k, v in final.items() if v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(script(__name__))
