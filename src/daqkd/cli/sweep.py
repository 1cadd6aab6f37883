"""`daqkd sweep`: rank once, train a student per candidate DA and seed, report whether the ranking
predicted them (the work is :func:`daqkd.sweep`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..api import SweepOptions, run_sweep
from .common import add_data_args, add_optim_args
from .train import add_student_args

DEFAULTS = SweepOptions()


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a student per candidate DA and test whether the ranking predicts accuracy",
        description="Rank --augs once with the teacher, train one student per candidate and seed "
                    "(the options of `daqkd train`), and write results.json, report.md and scatter.png.")
    add_data_args(p, split=False)
    add_student_args(p, resume=False)
    add_optim_args(p, lr=DEFAULTS.lr, optimizer=DEFAULTS.optimizer, aug=None, resume=False)
    p.add_argument("--seeds", type=int, default=1, help="students per DA, seeds --seed .. --seed+S-1")
    p.add_argument("--default", metavar="DA",
                   help="the DA also trained for comparison, candidate or not (default: none, plain crop + flip)")
    p.add_argument("--controls", default="basic", choices=("basic", "all"),
                   help="all: the ranking also computes the authors' variant (a second teacher pass per candidate), "
                        "which the report then correlates with the students like every other control")
    p.add_argument("--race", action="store_true",
                   help="successive halving instead of a full sweep: at each of --rungs, only the best --keep of the "
                        "DAs by validation top-1 (--val-per-class) go on; writes race.json and race.md")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.json, report.md and scatter.png from what --out holds; trains nothing")
    p.add_argument("--jobs", type=int,
                   help="students trained at once, each in its own process logging to RUN/train.log "
                        "(a small student leaves a large GPU mostly idle; default: one per --devices entry, else 1)")
    p.add_argument("--devices", metavar="LIST",
                   help="place the students round-robin on these devices, e.g. 0,1,2,3 (CUDA indices) or "
                        "cuda:0,cuda:1; --jobs may be a multiple of their number")
    p.add_argument("--shard", metavar="K/N",
                   help="train only every N-th student from the K-th: one sweep per node, all with the same --out "
                        "on a shared file system and K = 0..N-1")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    run_sweep(SweepOptions.from_namespace(args))
    return 0
