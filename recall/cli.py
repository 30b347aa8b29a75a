"""The `recall` command: toyworld, protocol, run, tune, classmap, pool, report, data, standin-weights,
flickr-standin."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _compose(args):
    from recall.config import compose
    return compose(args.overrides, params_file=args.params)


def cmd_toyworld(args) -> int:
    from recall.data.toyworld import generate
    cfg = _compose(args).toyworld
    summary = generate(args.out, n_train=cfg.n_train, n_val=cfg.n_val, size=cfg.size, seed=cfg.seed,
                       max_objects=cfg.max_objects)
    counts = summary["class_image_counts"]["train"]
    print(f"toy world in {args.out}: {cfg.n_train} train + {cfg.n_val} val images of {cfg.size}x{cfg.size}; "
          f"train images per class: min {min(counts.values())}, max {max(counts.values())}")
    return 0


def cmd_protocol(args) -> int:
    from recall.data.protocol import select_train_images, steps
    from recall.data.voc import image_classes, read_split
    cfg = _compose(args)
    task = steps(str(cfg.protocol.name), int(cfg.dataset.num_classes))
    root = Path(cfg.dataset.root)
    ids = read_split(root, cfg.dataset.train_split)
    classes = image_classes(root, ids, num_classes=int(cfg.dataset.num_classes), mask_dir=cfg.dataset.mask_dir,
                            progress=False)
    out = {"protocol": str(cfg.protocol.name), "setting": str(cfg.setting.name), "dataset": str(root),
           "steps": []}
    for t, new in enumerate(task):
        chosen = select_train_images(classes, task, t, str(cfg.setting.name))
        out["steps"].append({"step": t, "classes": new, "num_images": len(chosen), "images": chosen})
    json.dump(out, sys.stdout, indent=1 if args.pretty else None)
    print()
    return 0


def cmd_run(args) -> int:
    if args.dry_run:  # the plan only: nothing is trained or written
        from recall.plan import print_plan
        return print_plan(_compose(args), as_json=args.json)
    from recall import distributed
    from recall.experiment import run_protocol
    from recall.tracking import Tracker
    cfg = _compose(args)
    distributed.init_from_env(cfg.train.device)  # under torchrun: join the process group (gloo on CPU, nccl on GPUs)
    main = distributed.is_main()
    try:
        tracker = None
        if cfg.tracking.uri and main:  # rank 0 alone logs to MLflow
            tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment or str(cfg.dataset.name))
        payload = run_protocol(cfg, tracker)
    finally:
        distributed.shutdown()
    if main:
        final = payload["final"]["miou"]
        print("final: " + ", ".join(f"{k}={v:.3f}" for k, v in final.items() if v is not None))
    return 0


def cmd_tune(args) -> int:
    from recall.tune import tune
    return tune(args.overrides, params_file=args.params)


def cmd_classmap(args) -> int:
    from recall.stages.replay import class_mapping
    cfg = _compose(args)
    mapping = class_mapping(cfg)
    for c, m in mapping.items():
        print(f"{m['name']:>12} -> {m['source_name']}  (top: {', '.join(f'{n} {s:.3g}' for _, n, s in m['top_k'])})")
    print(f"mapping written to {cfg.replay.mapping}")
    return 0


def cmd_pool(args) -> int:
    from recall.stages.replay import replay_pool
    replay_pool(_compose(args))
    return 0


def cmd_standin_weights(args) -> int:
    from recall.stages.replay import standin_weights
    for name, path in standin_weights(args.out, seed=args.seed).items():
        print(f"stand-in {name}: {path}")
    return 0


def cmd_flickr_standin(args) -> int:
    from recall.replay.flickr_standin import serve
    serve(host="127.0.0.1", port=args.port, size=args.size, seed=args.seed, tag_noise=args.tag_noise,
          per_class_limit=args.per_class_limit, latency_seconds=args.latency)
    return 0


def cmd_data(args) -> int:
    from recall.data.prepare import describe, prepare
    print(describe(prepare(args.dataset, args.root, args.archive, sha256=args.sha256, downloads=args.downloads)))
    return 0


def cmd_report(args) -> int:
    from recall.report import write_report
    runs = [Path(p) for p in args.runs]
    if not runs:  # the demo pipeline's runs, as listed in the configuration
        pipeline = _compose(args).pipeline
        runs = [Path("runs") / key for key in [*pipeline.runs, *pipeline.replay_runs, "joint"]]
    write_report(runs, Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recall", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_overrides(p):
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. protocol=15-1x5 method=ft seed=1")
        p.add_argument("--params", default=None, help="take values from this params.yaml (what DVC stages do)")
        return p

    p = sub.add_parser("toyworld", help="generate the toy world in VOC layout")
    p.add_argument("out")
    p = with_overrides(p)
    p.set_defaults(func=cmd_toyworld)
    p = sub.add_parser("protocol", help="print each step's classes and training images as JSON")
    p.add_argument("name", help="task string, e.g. 15-1x5")
    with_overrides(p)
    p.add_argument("--pretty", action="store_true")
    p.set_defaults(func=cmd_protocol)
    p = with_overrides(sub.add_parser("run", help="run (or resume) a protocol"))
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (dataset, steps, iterations, replay pool, checkpoints reused, compute "
                        "estimate) without training or writing anything")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.set_defaults(func=cmd_run)
    p = with_overrides(sub.add_parser(
        "tune", help="run (or continue) an Optuna study of RECALL's replay ratio, thresholds and lr",
        description="Optuna study over tune.space (conf/tune/): every trial runs the protocol from tune.step0 with "
                    "sampled values and may be pruned after each step. tune.n_trials = trials to ADD in this "
                    "invocation: re-running continues the study in tune.storage; several workers may run at once "
                    "(give each train.threads=1). e.g. recall tune protocol=15-1x5 method=recall replay=toy_gan "
                    "tune=r_tau tune.step0=models/step0/15-overlapped"))
    p.set_defaults(func=cmd_tune)
    p = with_overrides(sub.add_parser("classmap", help="map target classes to a generator's source classes"))
    p.set_defaults(func=cmd_classmap)
    p = with_overrides(sub.add_parser("pool", help="build (or resume) the replay pool of replay.name"))
    p.set_defaults(func=cmd_pool)
    p = sub.add_parser("standin-weights", help="write the demo's tiny random BigGAN and ImageNet classifier")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_standin_weights)
    p = sub.add_parser("flickr-standin", help="serve the local Flickr stand-in on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--size", type=int, default=64, help="photo side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag-noise", type=float, default=0.15, help="share of results not showing the queried class")
    p.add_argument("--per-class-limit", type=int, default=1000, help="results per query")
    p.add_argument("--latency", type=float, default=0.0, help="seconds of delay per photo (a slow network)")
    p.set_defaults(func=cmd_flickr_standin)
    p = sub.add_parser("report", help="tables and figures from finished run directories")
    p.add_argument("runs", nargs="*", help="run directories (default: the pipeline's runs)")
    p.add_argument("--out", default="reports")
    p.add_argument("--params", default=None)
    p.set_defaults(overrides=[])
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("data", help="real datasets: check or prepare Pascal VOC 2012, SBD (train_aug) or ADE20K")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="without --archive, check ROOT; with it, fetch, verify and extract into ROOT",
                        description="Check that ROOT holds the prepared dataset (VOC layout), or build it from the "
                                    "official archive: a file, an extracted directory or an http(s) URL (downloaded "
                                    "with resume, SHA-256 checked). sbd needs voc prepared in the same ROOT first.")
    p.add_argument("dataset", choices=["voc", "sbd", "ade20k"])
    p.add_argument("--root", required=True, help="the dataset root, e.g. data/voc (conf/dataset/*.yaml: root)")
    p.add_argument("--archive", nargs="+", default=[], metavar="FILE_OR_URL",
                   help="the archive; several values are alternatives (mirrors), tried in order")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (default: the official one)")
    p.add_argument("--downloads", default=None, help="where URLs are downloaded to (default: ROOT/../downloads)")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Hydra overrides may also follow options (`recall toyworld OUT --params params.yaml toyworld.n_train=500`)
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "protocol":
        args.overrides = [f"protocol={args.name}", *args.overrides]
    from hydra.errors import OverrideParseException

    from recall.config import strip_password
    try:
        return args.func(args)
    except OverrideParseException as err:  # e.g. a list value holding "=" without quotes
        print(f"recall: error: cannot parse an override: {strip_password(str(err))} "
              "(quote list items: 'key=[\"a=1\"]')", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        from recall.data.protocol import ProtocolError
        from recall.data.voc import DatasetError
        from recall.replay.pool import ReplayError
        if isinstance(err, (ProtocolError, DatasetError, ReplayError, FileNotFoundError)) or type(err) is ValueError:
            print(f"recall: error: {strip_password(str(err))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
