"""Rank correlations and disagreement tests of a finished sweep, restricted to a subset of its candidates.

A sweep's report correlates every candidate's figures (score, teacher accuracy under the DA, the
variance baseline) with the students' mean final top-1. Issue 29 also asks how they do within one
family, e.g. the candidates without CutMix, where the score's order is the reverse of teacher
accuracy's. This reads ``results.json`` (no training, no data) and prints one table row per figure,
with exact permutation p-values up to 10 candidates (daqkd.stats), then one JSON line.

    python benchmarks/subset_correlation.py benchmarks/results/cifar100-resnet56-w4a4-16/results.json \
        --without cutmix
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from daqkd.stats import disagreement_test, rank_correlation

FIGURES = (("score", "lower", "metric score (centroid CE - CMI)"),
           ("teacher_accuracy", "higher", "teacher accuracy under the DA"),
           ("variance", "lower", "variance (Wang et al. 2022)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a sweep's results.json")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--without", metavar="PART", help="keep the candidates whose name has no '+'-part PART")
    group.add_argument("--with", dest="with_part", metavar="PART", help="keep the candidates that have PART")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        rows = [r for r in results["candidates"] if r.get("candidate") and r.get("top1") is not None]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"subset_correlation: error: {args.results} is not a sweep's results.json ({err})", file=sys.stderr)
        return 2
    part = args.without or args.with_part
    keep = [r for r in rows if (part in r["name"].split("+")) == (args.with_part is not None)]
    if len(keep) < 3:
        print(f"subset_correlation: error: {len(keep)} trained candidates match; at least 3 are needed",
              file=sys.stderr)
        return 2
    names = [r["name"] for r in keep]
    top1 = [r["top1"] for r in keep]
    print(f"{len(keep)} candidates: {', '.join(names)}")
    out: dict = {"candidates": names, "correlation": {}, "disagreement": {}}
    print("| figure | better | Spearman rho | p | Kendall tau | p | p-values |")
    print("|---|---|---|---|---|---|---|")
    for key, better, label in FIGURES:
        corr = rank_correlation([r[key] for r in keep], top1)
        out["correlation"][key] = corr.__dict__ if corr else None
        if corr:
            print(f"| {label} | {better} | {corr.spearman:+.3f} | {corr.spearman_p:.3g} | {corr.kendall:+.3f}"
                  f" | {corr.kendall_p:.3g} | {corr.p_method} |")
    for key, better, label in FIGURES[1:]:
        test = disagreement_test([r["score"] for r in keep], "lower", [r[key] for r in keep], better, top1)
        out["disagreement"][key] = {"pairs": test.pairs, "with_score": test.sides_with_a, "share": test.share,
                                    "p": test.p, "p_method": test.p_method}
        share = "-" if test.share is None else f"{test.share:.0%}"
        p = "-" if test.p is None else f"{test.p:.3g}"
        print(f"score vs {label}: {test.pairs} pairs disagree, students side with the score in "
              f"{test.sides_with_a:g} ({share}), p {p} ({test.p_method})")
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
