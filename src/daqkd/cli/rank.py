"""`daqkd rank`: rank candidate DAs for a teacher without training, print the table and verdict."""

from __future__ import annotations

import argparse
from typing import Any

from ..api import RankOptions, rank_augmentations
from ..augment import known_names
from ..augment.base import SMALL_IMAGE_MAX
from ..metric import SCORES
from ..rank import COMPILE_AUTO_MIN_IMAGES, VARIANCE_PROTOCOLS
from ..runtime import is_main_process
from .common import add_data_args, add_foreign_args


def add_parser(subparsers: Any) -> None:
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
    r.add_argument("--batch-size", type=int, default=256, help="images per batch (default %(default)s)")
    r.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help=f"torch.compile the teacher (auto: on above {COMPILE_AUTO_MIN_IMAGES:,} forwards)")
    r.add_argument("--out", metavar="FILE", help="write the report as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_rank)


def cmd_rank(args: argparse.Namespace) -> int:
    options = RankOptions.from_namespace(args)
    main = is_main_process()
    progress = None if options.no_progress or not main else ProgressBars()
    try:
        report = rank_augmentations(options, progress)
    finally:
        if progress is not None:
            progress.close()
    if main:
        print(format_table(report))
        if options.out:
            print(f"wrote {options.out}")
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
