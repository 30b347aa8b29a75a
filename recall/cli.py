"""The `recall` command. Each subcommand is a module with `add_arguments(parser)` and `main(args)`; only the chosen
one is imported. The DVC stages run the same modules as scripts (`python -m recall.stages.run ...`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from recall.commands import PROG, command_parser, execute, parse

# name -> (module, one-line help). The simulations (toy world, stand-ins) are commands too: named here, never
# imported by the product.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("recall.stages.run", "run (or resume) a protocol; --dry-run prints its plan"),
    "pretrain": ("recall.stages.pretrain", "pretrain the backbone as a classifier (the toy world's ImageNet)"),
    "protocol": ("recall.stages.protocol", "print each step's classes and training images as JSON"),
    "classmap": ("recall.stages.classmap", "map target classes to a generator's source classes"),
    "pool": ("recall.stages.pool", "build (or resume) the replay pool of replay.name"),
    "select": ("recall.stages.select", "RECALL+'s selection of a replay pool's images (a new pool)"),
    "tune": ("recall.stages.tune", "run (or continue) an Optuna study of a method's hyper-parameters"),
    "report": ("recall.stages.report", "tables and figures from finished run directories"),
    "data": ("recall.data.prepare", "real datasets: check or prepare Pascal VOC 2012, SBD (train_aug) or ADE20K"),
    "toyworld": ("recall.sim.toyworld", "generate the toy world in VOC layout (simulation)"),
    "standin-weights": ("recall.sim.standin_weights",
                        "write the demo's tiny random BigGAN and ImageNet classifier (simulation)"),
    "flickr-standin": ("recall.sim.flickr_standin", "serve the local Flickr stand-in on 127.0.0.1 (simulation)"),
}


def overview() -> argparse.ArgumentParser:
    """`recall --help`: the commands and their help, without importing any of them."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text)
    return parser


def parse_only(argv: Sequence[str]):
    """The parsed arguments of `recall ARGV...` (the command's module in `.module`), without running it."""
    argv = list(argv)
    if not argv or argv[0] not in COMMANDS:
        overview().parse_args(argv)  # prints help, or the usage error with the commands, and exits
        raise SystemExit(2)
    module_name, text = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = command_parser(module, f"{PROG} {argv[0]}", description=(module.__doc__ or text).strip())
    args = parse(parser, argv[1:])
    args.module = module
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_only(sys.argv[1:] if argv is None else argv)
    return execute(args.module.main, args)


if __name__ == "__main__":
    sys.exit(main())
