"""The ``daqkd`` command line: one module per command, each parsing its options into the typed
options of :mod:`daqkd.api`, calling the API and printing.

Input mistakes end with one ``daqkd: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import DaqkdError
from ..rundir import CONFIG_FILE
from ..runtime import close_distributed, launched_by_torchrun
from . import eval as eval_command
from . import export, rank, sweep, teacher, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daqkd", description="Data-Augmented Quantization-Aware Knowledge Distillation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (rank, teacher, train, eval_command, sweep, export):
        command.add_parser(subparsers)
    return parser


def explicit_options(argv: Sequence[str] | None) -> frozenset[str]:
    """The options ``argv`` gives, as destination names, told apart from argparse's defaults by a
    second parse in which every option of every command defaults to SUPPRESS (absent if not given)."""
    parser = build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command in commands:
        for sub in command.choices.values():
            for action in sub._actions:
                action.default = argparse.SUPPRESS
            sub._defaults.clear()  # set_defaults(func=...)
    return frozenset(vars(parser.parse_args(argv))) - {"command"}


def interrupted_message(args: argparse.Namespace) -> str:
    """What a Ctrl-C leaves behind, and how to go on."""
    out = getattr(args, "out", None)
    if args.command in ("teacher", "train") and out:
        if not (Path(out) / CONFIG_FILE).is_file():  # stopped before the run was set up
            return f"interrupted before {out} held a run: run the same command again"
        launcher = "daqkd"
        if launched_by_torchrun():  # resume with the launcher's own options (nodes, rendezvous)
            world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
            launcher = (f"torchrun --nproc_per_node {world} -m daqkd" if world is not None and world == local
                        else "torchrun (the same launcher options) -m daqkd")
        return (f"interrupted: {out} keeps its last checkpoint (epoch end or --save-every step); "
                f"continue with: {launcher} {args.command} --resume --out {out}")
    if args.command == "sweep" and out:
        return (f"interrupted: {out} keeps every finished student and the others' last checkpoints; "
                "run the same command again to continue")
    return "interrupted: nothing was written"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop, a container shutdown) raised as an exception, so that it
    unwinds like Ctrl-C: open atomic writes delete their temporary files, and the command ends with
    one line saying what is kept and exit status 143 (128 + SIGTERM) instead of dying mid-write."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """Warnings about the user's data or options as one ``daqkd: warning:`` line each."""
    print(f"daqkd: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.explicit_options = explicit_options(argv)  # --resume refuses a stored option given again otherwise
    previous = warnings.showwarning
    warnings.showwarning = show_warning
    # only the main thread may set handlers (a notebook's worker thread calling main keeps the default)
    terminate = (signal.signal(signal.SIGTERM, _raise_terminated)
                 if threading.current_thread() is threading.main_thread() else None)
    try:
        return args.func(args)
    except DaqkdError as exc:
        print(f"daqkd: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `daqkd eval ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full disk, a file system gone read-only, a vanished directory
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"daqkd: error: {exc.strerror or exc}{where}: the files written before stay valid (writes are "
              "atomic); fix the cause and rerun (training runs: --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # under torchrun every process gets the signal: one of them says so
        terminated = isinstance(exc, Terminated)
        if not launched_by_torchrun() or os.environ["RANK"] == "0":
            message = interrupted_message(args)
            if terminated:
                print("daqkd: terminated (SIGTERM)" + message.removeprefix("interrupted"), file=sys.stderr)
            else:  # after the terminal's ^C, on a line of its own
                print(f"\ndaqkd: {message}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)
        warnings.showwarning = previous
        close_distributed()  # the command is over: the process owns the group torchrun made it join


if __name__ == "__main__":
    sys.exit(main())
