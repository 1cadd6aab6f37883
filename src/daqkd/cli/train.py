"""`daqkd train`: QAT + KD of a low-bit student from a teacher."""

from __future__ import annotations

import argparse
from typing import Any

from ..api import StudentOptions, train_student
from ..distill import LOSSES
from ..models import NAMED_NORMALIZATIONS
from ..quant import QUANTIZERS
from ..rundir import BEST_FILE
from ..runtime import is_main_process
from .common import add_data_args, add_optim_args

DEFAULTS = StudentOptions()


def add_parser(subparsers: Any) -> None:
    s = subparsers.add_parser("train", help="QAT + KD of a low-bit student from a teacher")
    add_data_args(s, split=False)
    add_student_args(s)
    add_optim_args(s, lr=DEFAULTS.lr, optimizer=DEFAULTS.optimizer, aug=DEFAULTS.aug)
    s.set_defaults(func=cmd_train)


def add_student_args(s: argparse.ArgumentParser, resume: bool = True) -> None:
    """The student's options, shared by `daqkd train` and `daqkd sweep` (which has no --resume)."""
    s.add_argument("--teacher", metavar="RUN|FILE",
                   help="a daqkd teacher run or checkpoint, or published weights (with --normalize, and --teacher-arch "
                        "or --arch); required, except with " + ("--resume" if resume else "--report-only"))
    s.add_argument("--arch", help="student architecture (default: the teacher's; it then starts from its weights)")
    s.add_argument("--teacher-arch", help="architecture of published --teacher weights (default: --arch)")
    s.add_argument(
        "--normalize",
        help="input statistics of published --teacher weights ("
        + ", ".join(NAMED_NORMALIZATIONS)
        + " or m1,m2,m3:s1,s2,s3); the student uses the teacher's",
    )
    s.add_argument("--init", metavar="RUN|FILE", help="student weights when the architectures differ")
    s.add_argument("--method", default="ewgs", choices=sorted(QUANTIZERS), help="QAT method (default %(default)s)")
    s.add_argument("--w-bits", type=int, default=2, help="weight bits, 1-8 or 32 (default %(default)s)")
    s.add_argument("--a-bits", type=int, default=2, help="activation bits, 1-8 or 32 (default %(default)s)")
    s.add_argument("--per-channel", action="store_true", help="one weight scale or interval per output channel")
    s.add_argument("--first-last", default="fp", help="fp, same, or a bit width (e.g. 8)")
    s.add_argument("--ewgs-delta", default="hessian",
                   help="EWGS's gradient-scaling delta: 'hessian' (the paper's and authors' code: 0 for 10 epochs, "
                        "then from the Hessian every 10 epochs), or a fixed number (0: straight-through)")
    s.add_argument("--ewgs-delta-every", type=int, default=10, metavar="EPOCHS",
                   help="epochs between Hessian estimates of EWGS's delta (the authors' update_every; "
                        "default %(default)s)")
    s.add_argument("--ewgs-hessian-batches", type=int, default=3, metavar="N",
                   help="training batches per Hessian estimate (the authors' 3; default %(default)s)")
    s.add_argument("--ewgs-hessian-probes", type=int, default=4, metavar="N",
                   help="Hutchinson probes per batch, shared by all layers (default %(default)s; "
                        "benchmarks/RESULTS.md measures the noise)")
    s.add_argument("--residual-bits", type=int, default=32, metavar="BITS",
                   help="also fake-quantize the residual stream (stem output, residual branches, shortcuts, block "
                        "outputs) at this many bits with LSQ, so that `daqkd export --integer` runs the whole ResNet "
                        "in integer kernels (e.g. 8; default %(default)s: full precision, as the paper)")
    s.add_argument("--kd", default="kd", choices=sorted(LOSSES), help="distillation loss (default %(default)s)")
    s.add_argument("--gamma", type=float, default=1.0, help="CE weight")
    s.add_argument("--alpha", type=float, default=2.0, help="KD weight")
    s.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default %(default)s)")
    s.add_argument("--beta", type=float,
                   help="weight of a feature KD term (--kd at: default 1000, sp: 3000, as in RepDistiller)")
    s.add_argument("--kd-layers", metavar="NAMES",
                   help="comma-separated module names a feature KD loss compares (default: at every residual "
                        "stage, sp the last; e.g. layer1,layer2,layer3)")
    s.add_argument("--augs", default="all", help="candidates for --aug auto or race")
    s.add_argument("--rungs", default="1/9,1/3,1", metavar="SHARES",
                   help="a race's decision points as shares of --epochs, increasing to 1 (default %(default)s)")
    s.add_argument("--keep", default="1/3", metavar="SHARE",
                   help="share of a race's DAs that go on at each rung, by validation top-1 (default %(default)s)")
    s.add_argument("--quant-lr", type=float, default=1e-5,
                   help="Adam learning rate of the quantizers' parameters (EWGS, LSQ; PACT's alpha takes --lr) "
                        "(default %(default)s)")


def cmd_train(args: argparse.Namespace) -> int:
    trainer = train_student(StudentOptions.from_namespace(args))
    if is_main_process():
        print(f"best {trainer.selection_split} top-1 {trainer.best_top1:.2f}% -> {trainer.run_dir / BEST_FILE}")
    return 0
