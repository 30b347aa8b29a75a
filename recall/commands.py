"""How a command runs, for `recall <command>` and for the stage scripts DVC calls (`python -m recall.stages.run`).

A command is a module with ``add_arguments(parser)`` and ``main(args) -> int``. Its arguments end in Hydra
overrides (``key=value``, ``group=option``), which may also follow options (``recall toyworld OUT --params
params.yaml toyworld.n_train=500``). A mistake in what the user gave ends in one line, ``recall: error: ...``, and
exit status 2, with no traceback: a ``UserError`` (or plain ``ValueError``), a missing file, a run that diverged
(``recall.errors.Diverged``), or a configuration Hydra cannot compose (unknown key or group option, unparsable
override). Ctrl-C ends in one line and exit status 130.

This module imports nothing heavy: a command's module keeps torch, Hydra and MLflow inside ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

PROG = "recall"


def with_overrides(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The common tail of a command that composes the configuration: Hydra overrides and ``--params``."""
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. protocol=15-1x5 method=ft seed=1")
    parser.add_argument("--params", default=None, help="take values from this params.yaml (what DVC stages do)")
    return parser


def compose(args: argparse.Namespace):
    """The configuration of a command: conf/ composed with its overrides (and params.yaml with ``--params``)."""
    from recall.config import compose as compose_config

    return compose_config(args.overrides, params_file=args.params)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words after the options are overrides too."""
    args, extra = parser.parse_known_args(list(argv))
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def user_error(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug (which keeps its traceback)."""
    from recall.errors import Diverged, UserError

    if isinstance(error, (UserError, FileNotFoundError, Diverged)) or type(error) is ValueError:
        return str(error)
    module = type(error).__module__ or ""
    if module.startswith(("hydra", "omegaconf")):
        from recall.config import config_error_message

        return config_error_message(error)
    return None


INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def execute(main, args: argparse.Namespace) -> int:
    """Run a command's ``main``; a user error becomes one line on stderr and status 2, Ctrl-C one line and 130. A
    DVC stage's command dies with the process that started it (recall.processes)."""
    from recall.processes import die_with_parent, in_stage

    from recall import interrupts

    if in_stage():
        die_with_parent()
    previous = interrupts.install()  # a Ctrl-C that library code swallows is raised again by the training loop
    try:
        return main(args)
    except KeyboardInterrupt:
        interrupts.handled()
        print(f"{PROG}: interrupted (Ctrl-C); run the same command again to resume", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # noqa: BLE001 - sorted into user errors (one line) and bugs (re-raised)
        message = user_error(error)
        if message is None:
            raise
        from recall.config import strip_password

        print(f"{PROG}: error: {strip_password(message)}", file=sys.stderr)  # a URL's password never shown
        return 2
    finally:
        interrupts.uninstall(previous)


def command_parser(module, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (module.__doc__ or "").strip())
    module.add_arguments(parser)
    return parser


def script(module_name: str, argv: Sequence[str] | None = None) -> int:
    """``python -m <module>``: parse the command line for that module and run it (a stage's ``__main__``)."""
    module = importlib.import_module(module_name)
    parser = command_parser(module, f"python -m {module_name}")
    return execute(module.main, parse(parser, sys.argv[1:] if argv is None else argv))
