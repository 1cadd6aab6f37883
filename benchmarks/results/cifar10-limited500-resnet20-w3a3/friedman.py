"""Section 6, item 4 of README.md: the seed spread per DA against the gaps between DAs, and an
exploratory Friedman test (seeds as blocks, added after the plan) of whether the 9 DAs differ at all.

Run from this directory: python friedman.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

from scipy import stats


def friedman_statistic(table: list[list[float]]) -> float:
    """Friedman's chi^2 of a (blocks x treatments) table without ties correction."""
    blocks, treatments = len(table), len(table[0])
    ranks = [stats.rankdata(row) for row in table]
    sums = [sum(r[j] for r in ranks) for j in range(treatments)]
    return 12 / (blocks * treatments * (treatments + 1)) * sum(x * x for x in sums) - 3 * blocks * (treatments + 1)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    results = json.loads((folder / "results.json").read_text())
    by_da: dict[str, dict[int, float]] = {}
    for run in results["runs"]:
        by_da.setdefault(run["aug"], {})[run["seed"]] = run["top1"]
    seeds = sorted({s for runs in by_da.values() for s in runs})
    complete = {k: v for k, v in by_da.items() if all(s in v for s in seeds)}
    means = {k: statistics.fmean(v.values()) for k, v in complete.items()}
    spreads = {k: statistics.stdev(v.values()) for k, v in complete.items()}
    print(f"seeds {seeds}; DAs with every seed: {len(complete)}")
    for name in sorted(means, key=means.get, reverse=True):
        per_seed = " ".join(f"{complete[name][s]:.2f}" for s in seeds)
        print(f"  {name:30s} mean {means[name]:.2f}  sd {spreads[name]:.2f}  ({per_seed})")
    print(f"range of DA means {max(means.values()) - min(means.values()):.2f}; seed sd median "
          f"{statistics.median(spreads.values()):.2f}, mean {statistics.fmean(spreads.values()):.2f}")
    names = sorted(complete)
    table = [[complete[k][s] for k in names] for s in seeds]
    asymptotic = stats.friedmanchisquare(*[[complete[k][s] for s in seeds] for k in names])
    observed = friedman_statistic(table)
    draws, rng = 20_000, random.Random(0)
    hits = sum(friedman_statistic([rng.sample(row, len(row)) for row in table]) >= observed - 1e-12
               for _ in range(draws))
    print(f"Friedman over {len(names)} DAs x {len(seeds)} seeds: chi2 {asymptotic.statistic:.2f} "
          f"({len(names) - 1} df), asymptotic p {asymptotic.pvalue:.3f}; permutation p {(hits + 1) / (draws + 1):.4f} "
          f"({draws} within-seed shuffles, random.Random(0), {hits} at least as large)")


if __name__ == "__main__":
    main()
