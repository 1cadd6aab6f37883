"""`daqkd teacher`: train or fine-tune a full-precision model."""

from __future__ import annotations

import argparse
from typing import Any

from ..api import TeacherOptions, train_teacher
from ..models import NAMED_NORMALIZATIONS
from ..rundir import BEST_FILE
from ..runtime import is_main_process
from .common import ARCH_HELP, add_data_args, add_optim_args

DEFAULTS = TeacherOptions()


def add_parser(subparsers: Any) -> None:
    t = subparsers.add_parser("teacher", help="train or fine-tune a full-precision model")
    add_data_args(t, split=False)
    t.add_argument("--arch", help=ARCH_HELP + " (required, except with --resume)")
    t.add_argument(
        "--init",
        metavar="RUN|FILE",
        help="start from these weights (fine-tuning): a daqkd run or checkpoint, "
        "or published weights (then --normalize names their statistics)",
    )
    t.add_argument("--normalize", help="input statistics: " + ", ".join(NAMED_NORMALIZATIONS) + " or m1,m2,m3:s1,s2,s3 "
                   "(default: from a daqkd --init, else the data's own)")
    t.add_argument("--label-smoothing", type=float, default=0.0,
                   help="epsilon of the CE term's label smoothing (default %(default)s)")
    add_optim_args(t, lr=DEFAULTS.lr, optimizer=DEFAULTS.optimizer, aug=DEFAULTS.aug)
    t.set_defaults(func=cmd_teacher)



def cmd_teacher(args: argparse.Namespace) -> int:
    trainer = train_teacher(TeacherOptions.from_namespace(args))
    if is_main_process():
        print(f"best {trainer.selection_split} top-1 {trainer.best_top1:.2f}% -> {trainer.run_dir / BEST_FILE}")
    return 0
