"""The ``daqkd`` command line.

Subcommands share the data and runtime options (``--data``/``--dataset``, ``--split``,
``--limit-per-class``, ``--seed``, ``--device``). Input mistakes end with one
``daqkd: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import __version__
from .augment import known_names, parse_candidates
from .augment.base import SMALL_IMAGE_MAX
from .checkpoint import load_model, write_json_atomic
from .data import TORCHVISION_DATASETS, load_data
from .errors import DaqkdError
from .metric import SCORES
from .models import NAMED_NORMALIZATIONS
from .rank import (
    COMPILE_AUTO_MIN_IMAGES,
    VARIANCE_PROTOCOLS,
    RankConfig,
    compile_pays,
    effective_group_size,
    rank_candidates,
    variance_passes,
)
from .runtime import init_distributed, is_main_process, select_device


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


def add_rank_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rank", help="rank data augmentations for a teacher, without training",
        description="Pass the split through the teacher once per candidate DA and rank the candidates by "
                    "score = centroid_ce - cmi_weight * cmi (lower is better), beside the variance baseline.",
    )
    add_data_args(p)
    model = p.add_argument_group("teacher")
    model.add_argument("--weights", required=True, metavar="RUN|FILE",
                       help="a daqkd run or checkpoint, or published weights (.th/.pt/.pth weights only, .safetensors)")
    add_foreign_args(model)
    model.add_argument(
        "--crop-size", type=int, default=224, help=f"input size for images larger than {SMALL_IMAGE_MAX} px"
    )
    r = p.add_argument_group("ranking")
    r.add_argument("--augs", default="all", help="comma-separated candidates, or 'all' (the paper's 16); known: "
                   + ", ".join(known_names()))
    r.add_argument("--score", default="paper", choices=SCORES,
                   help="paper: centroid_ce - w*cmi (default); sample: per-sample ce - w*cmi; authors: the authors' "
                        "computation (centroids from a second pass, per-sample KL; reproduces their selections)")
    r.add_argument("--controls", default="basic", choices=("basic", "all"),
                   help="basic: teacher accuracy, centroid CE, CMI, sample score and variance beside the score "
                        "(free); all: also the authors' computation (a second pass per candidate)")
    r.add_argument("--cmi-weight", type=float, default=1.0, help="w in the score (default %(default)s)")
    r.add_argument("--repeats", type=int, default=1, help="passes with fresh random draws; reports standard errors")
    r.add_argument("--variance-group", type=int, default=1000, help="samples per group of the variance baseline")
    r.add_argument("--variance-paired", action="store_true",
                   help="groups also hold the plain crop+flip view of the same images")
    r.add_argument("--variance-protocol", default="single", choices=VARIANCE_PROTOCOLS,
                   help="single: the groups of the scored pass (default); wang: Wang et al.'s protocol, paired views "
                        "and extra passes with fresh draws until at least 1,000 groups")
    r.add_argument("--mix-group", type=int, default=8,
                   help="CutMix candidates draw one box and lambda per this many images (default %(default)s; "
                        "0: one per batch, as in training)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help=f"torch.compile the teacher (auto: on above {COMPILE_AUTO_MIN_IMAGES:,} forwards)")
    r.add_argument("--out", metavar="FILE", help="write the report as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_rank)


def cmd_rank(args: argparse.Namespace) -> int:
    augs = parse_candidates(args.augs)
    for name, value, low in (("--repeats", args.repeats, 1), ("--batch-size", args.batch_size, 1),
                             ("--variance-group", args.variance_group, 1), ("--mix-group", args.mix_group, 0)):
        if value < low:
            raise DaqkdError(f"{name} must be at least {low}, got {value}")
    init_distributed()
    device = select_device(args.device)
    torch.manual_seed(args.seed)
    data = load_data(args.data, args.dataset, args.split, args.limit_per_class, args.data_root)
    model, info = load_model(args.weights, arch=args.arch, normalize=args.normalize, num_classes=data.num_classes)
    teacher = {k: info[k] for k in ("arch", "weights", "normalize", "quant")}
    config = RankConfig(
        augs=augs, batch_size=args.batch_size, seed=args.seed, repeats=args.repeats,
        cmi_weight=args.cmi_weight, score=args.score, variance_group=args.variance_group,
        variance_paired=args.variance_paired, authors=args.controls == "all",
        variance_protocol=args.variance_protocol, mix_group=args.mix_group,
    )
    passes = 1 + config.computes_authors + variance_passes(
        config, len(data), effective_group_size(config.variance_group, len(data)))
    forwards = len(data) * len(augs) * args.repeats * passes * (2 if config.paired else 1)
    compiled = args.compile == "on" or (args.compile == "auto" and compile_pays(forwards))
    main = is_main_process()
    if main:
        print(f"daqkd rank: {len(data):,} {args.split} images, {data.num_classes} classes from {data.source}; "
              f"teacher {teacher['arch']} on {device}{' (compiled)' if compiled else ''}; "
              f"{len(augs)} candidates x {args.repeats * passes} pass(es)", flush=True)
    progress = None if args.no_progress or not main else ProgressBars()
    report = rank_candidates(model, data, config, device, compiled, progress, args.crop_size)
    if progress is not None:
        progress.close()
    report["split"] = args.split
    report["teacher"] = teacher
    report["data"] = data.source
    report["device"] = str(device)
    if main:
        print(format_table(report))
        if args.out:
            write_json_atomic(args.out, report)
            print(f"wrote {args.out}")
    return 0


class ProgressBars:
    """One tqdm bar per candidate pass."""

    def __init__(self) -> None:
        self.bar = None
        self.key: tuple[str, int] | None = None

    def __call__(self, name: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.n >= self.bar.total or self.key != (name, total) or done < self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=f"{name:<28}", unit="img", leave=False, dynamic_ncols=True)
            self.key = (name, total)
        self.bar.update(min(done, total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: float | None, se: float | None = None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f"±{se:.{digits}f}" if se is not None else "")


def format_table(report: dict[str, Any]) -> str:
    """The ranking as an aligned text table (best first) with its controls, and what each control picks."""
    authors = any("authors_score" in c for c in report["candidates"])
    header = ["rank", "candidate", "score", "centroid_ce", "cmi", "sample", *(["authors"] if authors else []),
              "variance", "groups", "var.rank", "acc", "img/s"]
    rows = []
    for c in report["candidates"]:
        rows.append([
            str(c["rank"]), c["name"], _fmt(c["score"], c.get("score_se")),
            _fmt(c["centroid_ce"], c.get("centroid_ce_se")), _fmt(c["cmi"], c.get("cmi_se")),
            _fmt(c["sample_score"], c.get("sample_score_se")),
            *([_fmt(c["authors_score"], c.get("authors_score_se"))] if authors else []),
            _fmt(c["variance"], c.get("variance_se"), 5), str(c.get("variance_groups", "")),
            str(c["variance_rank"]), _fmt(100 * c["accuracy"], None, 2), f"{c['images_per_s']:.0f}",
        ])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 1 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 1 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    cfg = report["config"]
    formula = {"paper": "centroid_ce - {w} * cmi", "sample": "ce - {w} * cmi",
               "authors": "ce - {w} * authors' cmi"}[cfg["score"]].format(w=f"{cfg['cmi_weight']:g}")
    lines.append(f"selected: {report['selected']}  (score = {formula}, lower is better; sample = ce - cmi; "
                 f"± jackknife standard errors; variance from groups of {report['variance_group']})")
    if report.get("stability"):
        lines.append(f"verdict: {report['stability']['text']}")
    controls = report.get("controls")
    if controls:
        picks = controls["picks"]
        named = {"teacher_accuracy": "teacher accuracy", "centroid_ce": "centroid CE alone", "cmi": "CMI alone",
                 "sample_score": "sample score", "variance": "variance", "authors_score": "authors' score"}
        lines.append("controls pick: " + ", ".join(f"{label} {picks[k]}" for k, label in named.items() if k in picks))
        rho = controls["score_vs_teacher_accuracy_spearman"]
        same = picks["score"] == picks["teacher_accuracy"]
        lines.append(
            f"the score's pick {'equals' if same else 'differs from'} the teacher-accuracy pick; the CMI term "
            f"{'did not change' if picks['score'] == picks['score_without_cmi'] else 'changed'} the pick"
            + (f"; Spearman(score, teacher accuracy) {rho:+.2f} (-1: the same order)" if rho is not None else "")
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daqkd", description="Data-Augmented Quantization-Aware Knowledge Distillation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_rank_parser(subparsers)
    from .cli_sweep import add_parser as add_sweep_parser
    from .cli_train import add_parsers

    add_parsers(subparsers, add_data_args)
    add_sweep_parser(subparsers, add_data_args)
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
