"""The ``daqkd`` command line: one module per command, each parsing its options into the typed
options of :mod:`daqkd.api`, calling the API and printing.

Input mistakes end with one ``daqkd: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import DaqkdError
from . import eval as eval_command
from . import rank, sweep, teacher, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daqkd", description="Data-Augmented Quantization-Aware Knowledge Distillation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (rank, teacher, train, eval_command, sweep):
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DaqkdError as exc:
        print(f"daqkd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
