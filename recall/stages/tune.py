"""`recall tune`: run (or continue) an Optuna study of a method's hyper-parameters (conf/tune/).

Every trial runs the protocol from tune.step0 with sampled values and may be pruned after each step.
tune.n_trials = trials to ADD in this invocation: re-running continues the study in tune.storage; several workers
may run at once (give each train.threads=1). e.g. recall tune protocol=15-1x5 method=recall replay=toy_gan
tune=r_tau tune.step0=models/step0/15-overlapped
"""

from __future__ import annotations

import sys

from recall.commands import script, with_overrides


def add_arguments(parser) -> None:
    with_overrides(parser)


def main(args) -> int:
    from recall.tune import tune

    return tune(args.overrides, params_file=args.params)


if __name__ == "__main__":
    sys.exit(script(__name__))
