"""What every command shares: data/runtime options, published-weights options, the error rule."""

from __future__ import annotations

import argparse
from typing import Any

from ..data import TORCHVISION_DATASETS
from ..models import NAMED_NORMALIZATIONS


def add_data_args(parser: argparse.ArgumentParser, split: bool = True) -> None:
    """Data, seed and device options, the same for every subcommand; ``split`` offers --split
    (rank and eval read one split; training reads both)."""
    group = parser.add_argument_group("data and runtime")
    group.add_argument("--data", metavar="DIR|FILE.npz",
                       help="ImageFolder root with train/ and test/ (e.g. ../shared/data/cifar10), or a NumPy archive "
                            "with x_train, y_train, x_test, y_test (e.g. ../shared/data/cifar100/cifar100.npz)")
    group.add_argument("--dataset", choices=TORCHVISION_DATASETS, help="download through torchvision instead of --data")
    group.add_argument(
        "--data-root", default="~/.cache/daqkd", help="where --dataset downloads to (default %(default)s)"
    )
    if split:
        group.add_argument("--split", default="train", choices=("train", "test"), help="default %(default)s")
    group.add_argument("--limit-per-class", type=int, metavar="K",
                       help="first K images of each class (sorted file order; array order in archives)")
    group.add_argument("--seed", type=int, default=0, help="default %(default)s; same seed, same numbers")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")


ARCH_HELP = ("resnet20/32/44/56/110 (option-A shortcuts), resnet20b/32b/44b/56b/110b (option B), vgg8/11/13, "
             "mobilenetv2, or a torchvision model name")


def add_foreign_args(group: Any, what: str = "weights") -> None:
    """--arch and --normalize, which published weights need and daqkd checkpoints store."""
    group.add_argument("--arch", help=f"architecture of {what} without daqkd metadata: {ARCH_HELP}")
    group.add_argument("--normalize", help=f"input statistics {what} without daqkd metadata were trained with: "
                       f"{', '.join(NAMED_NORMALIZATIONS)} or m1,m2,m3:s1,s2,s3")


def add_optim_args(parser: argparse.ArgumentParser, *, lr: float, optimizer: str, aug: str | None,
                   resume: bool = True) -> None:
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=1, help="training epochs (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="images per batch (default %(default)s)")
    if aug is not None:
        g.add_argument(
            "--aug", default=aug, help="a DA name (see daqkd rank --help)"
            + (", 'auto' (the metric's pick) or 'race' (raced on --val-per-class)" if aug == "auto" else "")
        )
    g.add_argument("--optimizer", default=optimizer, choices=("sgd", "adam"),
                   help="for the model's weights (default %(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate, cosine to 0 (default %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="on the model's weights (default %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear LR warmup (default %(default)s)")
    g.add_argument("--no-amp", action="store_true",
                   help="train in float32 on CUDA (default: bf16 autocast; quantizers and evaluation are float32)")
    g.add_argument("--augment-workers", type=int, default=0, metavar="N",
                   help="augment batches ahead in N CPU worker processes, off the training step's critical path "
                        "(the same pixels; default 0: in the training process, on its device)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's forward and backward, each as one graph (CUDA graphs on "
                        "a GPU); pays off on a GPU, costs minutes of compilation on a CPU")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="evaluate on the test split every N epochs and after the last (default %(default)s)")
    g.add_argument("--train-limit-per-class", type=int, metavar="K",
                   help="first K train images of each class, the test split untouched (data-limited training; "
                        "--limit-per-class limits both)")
    g.add_argument("--val-per-class", type=int, metavar="K",
                   help="hold K images of each class out of the train split as a validation split (drawn at random "
                        "by --val-seed), evaluated with the test split; it picks RUN/best and a race's survivors")
    g.add_argument("--val-seed", type=int, metavar="S",
                   help="the seed that draws the validation images (default: --seed; a sweep's students all use "
                        "the sweep's, so they hold out the same images)")
    g.add_argument("--out", required=True, metavar="RUN", help="run directory")
    if resume:  # a sweep always resumes its students: rerunning its command continues it
        g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        g.add_argument("--stop-at-epoch", type=int, metavar="E",
                       help="stop after epoch E of the --epochs schedule (the LR still follows --epochs); "
                            "--resume goes on from there")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
