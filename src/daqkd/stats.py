"""The statistics behind a sweep's verdict: rank correlations with exact permutation p-values and
paired confidence intervals.

A sweep compares few items (8-16 DAs, 1-5 seeds), where asymptotic p-values are off (for the
CPU sweep's Spearman rho of -0.857 over 8 DAs the t approximation gives p = 0.0065, the exact
permutation p is 0.011). So:

- :func:`rank_correlation`: Spearman's rho and Kendall's tau-b (scipy's definitions, ties
  averaged), with the two-sided permutation p-value P(|T*| >= |T|) over *all* n! pairings when
  n <= ``EXACT_MAX_N`` (10! = 3.6 million, a few seconds), and over ``PERMUTATION_DRAWS`` seeded
  Monte Carlo shuffles beyond (the paper's 16 candidates). Written by
  hand because ``scipy.stats.permutation_test`` materializes the whole null distribution of every
  resampled array at once (22 GB for n = 8 here); this one streams the permutations in chunks.
- :func:`disagreement_test`: in the pairs of items that two rankings order oppositely, the share
  where an outcome sides with the first; the direct test of "a metric adds something beyond a
  control", with its permutation p.
- :func:`paired_gain`: the mean of per-seed paired differences with its Student-t 95 % interval.
- :func:`friedman_test`: whether k DAs differ at all over b seeds (Friedman 1937; seeds as blocks,
  ranks within each seed), with the permutation p-value over within-seed shuffles: exact when
  (k!)^(b-1) pairings are few (2 seeds of up to 10 DAs), Monte Carlo beyond. scipy's
  ``friedmanchisquare`` gives only the chi^2 approximation, poor for 2-3 seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

EXACT_MAX_N = 10
PERMUTATION_DRAWS = 100_000  # Monte Carlo shuffles beyond EXACT_MAX_N
PERMUTATION_SEED = 0
_CHUNK = 400_000  # permutations scored at once: ~32 MB of float64 for n = 10
_EPS = 1e-12  # statistics equal up to float rounding count as "as extreme"


@dataclass
class Correlation:
    """Rank correlation of two paired samples; ``p_method`` says how the p-values were found."""

    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    n: int
    p_method: str  # "exact permutation", "Monte Carlo permutation, N shuffles, seed S" or "constant sample"


@lru_cache(maxsize=4)
def all_permutations(n: int) -> np.ndarray:
    """Every permutation of range(n) as an (n!, n) int8 array (36 MB for n = 10)."""
    perms = np.zeros((1, 1), dtype=np.int8)
    for k in range(1, n):
        # insert element k at each of the k + 1 positions of every permutation of range(k)
        blocks = [np.concatenate([perms[:, :pos], np.full((len(perms), 1), k, np.int8), perms[:, pos:]], axis=1)
                  for pos in range(k + 1)]
        perms = np.concatenate(blocks)
    return perms if n > 0 else np.zeros((1, 0), dtype=np.int8)


def _spearman_numerators(rank_x: np.ndarray, rank_y_perm: np.ndarray) -> np.ndarray:
    """Sum of centred-rank products per row: Spearman's rho up to a permutation-invariant factor."""
    return rank_y_perm @ (rank_x - rank_x.mean())


def _kendall_numerators(
    sign_x: np.ndarray, rank_y_perm: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Sum over pairs i < j of sign(x_i - x_j) sign(y_i - y_j) per row (tau-b's numerator).

    rank_y_perm holds ranks (halves for ties): doubled they are small integers, so the pairs are
    compared in int8 column by column, ~40x faster than float sign matrices for n = 10.
    """
    codes = np.asfortranarray(np.rint(2 * rank_y_perm).astype(np.int8))
    total = np.zeros(len(codes), dtype=np.int16)
    for s, i, j in zip(sign_x.astype(int), *pairs):
        if s:
            total += s * np.sign(codes[:, i] - codes[:, j]).astype(np.int16)
    return total


@lru_cache(maxsize=8)
def _null_numerators(ranks_x: tuple[float, ...], ranks_y: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted |numerators| of Spearman and Kendall over all n! pairings of two rank multisets.

    Pairing x with every permutation of y gives the same set of pairings whatever the order of
    either sample, so the null distribution depends on the two multisets alone and is cached: the
    controls of one sweep share it (same students, same tie pattern).
    """
    rank_x, rank_y = np.asarray(ranks_x), np.asarray(ranks_y)
    pairs = np.triu_indices(len(rank_x), k=1)
    sign_x = np.sign(rank_x[pairs[0]] - rank_x[pairs[1]])
    perms = all_permutations(len(rank_x))
    spearman, kendall = [], []
    for start in range(0, len(perms), _CHUNK):
        idx = perms[start:start + _CHUNK]
        spearman.append(np.abs(_spearman_numerators(rank_x, rank_y[idx])))
        kendall.append(np.abs(_kendall_numerators(sign_x, rank_y[idx], pairs)))
    return np.sort(np.concatenate(spearman)), np.sort(np.concatenate(kendall))


def exact_p_values(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Two-sided exact permutation p-values of Spearman's rho and Kendall's tau-b.

    Pairs x with every permutation of y; the denominators of both statistics do not change under
    permutation, so the numerators are compared: p = #{|T*| >= |T|} / n!.
    """
    from scipy.stats import rankdata

    rank_x, rank_y = rankdata(x), rankdata(y)
    pairs = np.triu_indices(len(x), k=1)
    sign_x = np.sign(rank_x[pairs[0]] - rank_x[pairs[1]])
    observed_s = abs(float(_spearman_numerators(rank_x, rank_y[None, :])[0]))
    observed_k = abs(float(_kendall_numerators(sign_x, rank_y[None, :], pairs)[0]))
    null_s, null_k = _null_numerators(tuple(sorted(rank_x)), tuple(sorted(rank_y)))
    total = len(null_s)
    extreme_s = total - int(np.searchsorted(null_s, observed_s - _EPS, side="left"))
    extreme_k = total - int(np.searchsorted(null_k, observed_k - _EPS, side="left"))
    return extreme_s / total, extreme_k / total


def monte_carlo_p_values(x: np.ndarray, y: np.ndarray, draws: int = PERMUTATION_DRAWS,
                         seed: int = PERMUTATION_SEED) -> tuple[float, float]:
    """Two-sided permutation p-values of Spearman's rho and Kendall's tau-b from ``draws`` shuffles
    of y (numpy's generator seeded with ``seed``): p = (hits + 1) / (draws + 1), which counts the
    observed pairing among the draws and so is never 0 (Phipson & Smyth 2010)."""
    from scipy.stats import rankdata

    rank_x, rank_y = rankdata(x), rankdata(y)
    pairs = np.triu_indices(len(x), k=1)
    sign_x = np.sign(rank_x[pairs[0]] - rank_x[pairs[1]])
    observed_s = abs(float(_spearman_numerators(rank_x, rank_y[None, :])[0]))
    observed_k = abs(float(_kendall_numerators(sign_x, rank_y[None, :], pairs)[0]))
    rng = np.random.default_rng(seed)
    hits_s = hits_k = done = 0
    chunk = max(_CHUNK // max(len(x), 1), 1)
    while done < draws:
        n = min(chunk, draws - done)
        shuffled = rng.permuted(np.broadcast_to(rank_y, (n, len(rank_y))), axis=1)
        hits_s += int((np.abs(_spearman_numerators(rank_x, shuffled)) >= observed_s - _EPS).sum())
        hits_k += int((np.abs(_kendall_numerators(sign_x, shuffled, pairs)) >= observed_k - _EPS).sum())
        done += n
    return (hits_s + 1) / (draws + 1), (hits_k + 1) / (draws + 1)


def rank_correlation(x: list[float], y: list[float], exact_max_n: int = EXACT_MAX_N,
                     draws: int = PERMUTATION_DRAWS, seed: int = PERMUTATION_SEED) -> Correlation | None:
    """Spearman and Kendall between x and y with two-sided permutation p-values; None below 3 pairs.

    Exact over all n! pairings for n <= ``exact_max_n``, ``draws`` seeded Monte Carlo shuffles
    beyond (the asymptotic formulas are off at 10-20 items). A constant sample has no rank
    correlation: NaN statistic and p = 1.
    """
    from scipy import stats

    n = len(x)
    if n != len(y):
        raise ValueError("x and y must have the same length")
    if n < 3:
        return None
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Correlation(math.nan, 1.0, math.nan, 1.0, n, "constant sample")
    rho = float(stats.spearmanr(xa, ya).statistic)
    tau = float(stats.kendalltau(xa, ya).statistic)
    if n <= exact_max_n:
        p_rho, p_tau = exact_p_values(xa, ya)
        return Correlation(rho, p_rho, tau, p_tau, n, "exact permutation")
    p_rho, p_tau = monte_carlo_p_values(xa, ya, draws, seed)
    return Correlation(rho, p_rho, tau, p_tau, n, f"Monte Carlo permutation, {draws:,} shuffles, seed {seed}")


@dataclass
class Disagreement:
    """Where two rankings A and B of the same items order a pair oppositely, whom does the outcome
    follow? pairs: the number of such pairs (items tied in A or in B never disagree); sides_with_a:
    those in which the outcome prefers what A prefers, an outcome tie counting one half; share:
    sides_with_a / pairs (0.5 is chance); p: two-sided permutation p of |share - 1/2| with the
    outcomes shuffled over the items; p_method as in :class:`Correlation`; pair_list: (the item A
    prefers, the item B prefers, +1 / 0 / -1 as the outcome sides with A, ties, B)."""

    pairs: int
    sides_with_a: float
    share: float | None
    p: float | None
    p_method: str
    pair_list: list[tuple[int, int, int]]


def _preferences(values: np.ndarray, better: str) -> np.ndarray:
    """(n, n) matrix of +1 where item i is preferred to item j, -1 where j is, 0 for ties."""
    diff = np.sign(values[:, None] - values[None, :])
    return -diff if better == "lower" else diff


def disagreement_test(a: list[float], a_better: str, b: list[float], b_better: str, outcome: list[float],
                      exact_max_n: int = EXACT_MAX_N, draws: int = PERMUTATION_DRAWS,
                      seed: int = PERMUTATION_SEED) -> Disagreement:
    """The pairs (i, j) that ranking A (its figures ``a``, lower or higher better) and ranking B
    order oppositely, and the share of them in which ``outcome`` (higher is better, e.g. mean
    student top-1) sides with A.

    Under the null that outcomes do not depend on the items, every shuffle of the outcomes over the
    items is as likely, and each disagreeing pair then goes either way with chance 1/2 (pairs share
    items, so they are not independent, which a binomial test would assume); the p-value is
    P(|share* - 1/2| >= |share - 1/2|) over all n! shuffles for n <= ``exact_max_n``, else over
    ``draws`` seeded Monte Carlo shuffles ((hits + 1) / (draws + 1)). No pair: share and p None.
    """
    n = len(a)
    if not (len(b) == len(outcome) == n):
        raise ValueError("a, b and outcome must have the same length")
    for name, better in (("a_better", a_better), ("b_better", b_better)):
        if better not in ("lower", "higher"):
            raise ValueError(f"{name} must be 'lower' or 'higher', got {better!r}")
    pref_a = _preferences(np.asarray(a, dtype=np.float64), a_better)
    pref_b = _preferences(np.asarray(b, dtype=np.float64), b_better)
    rows, cols = np.nonzero(np.triu((pref_a * pref_b) < 0, k=1))
    if len(rows) == 0:
        return Disagreement(0, 0.0, None, None, "no disagreeing pair", [])
    sign_a = pref_a[rows, cols]  # +1: A prefers the row item
    values = np.asarray(outcome, dtype=np.float64)

    def sides(outcomes: np.ndarray) -> np.ndarray:
        """Per row of outcomes (m, n): the count of pairs siding with A, ties counted 1/2, doubled."""
        agree = np.sign(outcomes[:, rows] - outcomes[:, cols]) * sign_a
        return (agree + 1).sum(axis=1)  # 2 per pair with A, 1 per tie, 0 per pair with B

    observed = float(sides(values[None, :])[0])
    total = 2.0 * len(rows)
    distance = abs(observed - total / 2)
    if n <= exact_max_n:
        perms = all_permutations(n)
        hits = sum(int((np.abs(sides(values[perms[i:i + _CHUNK]]) - total / 2) >= distance - _EPS).sum())
                   for i in range(0, len(perms), _CHUNK))
        p, method = hits / len(perms), "exact permutation"
    else:
        rng = np.random.default_rng(seed)
        hits = done = 0
        chunk = max(_CHUNK // max(len(rows), 1), 1)
        while done < draws:
            m = min(chunk, draws - done)
            shuffled = rng.permuted(np.broadcast_to(values, (m, n)), axis=1)
            hits += int((np.abs(sides(shuffled) - total / 2) >= distance - _EPS).sum())
            done += m
        p, method = (hits + 1) / (draws + 1), f"Monte Carlo permutation, {draws:,} shuffles, seed {seed}"
    with_a = observed / 2
    outcome_sign = np.sign(values[rows] - values[cols]) * sign_a
    pair_list = [(int(r) if s > 0 else int(c), int(c) if s > 0 else int(r), int(o))
                 for r, c, s, o in zip(rows, cols, sign_a, outcome_sign)]
    return Disagreement(len(rows), with_a, with_a / len(rows), float(p), method, pair_list)


@dataclass
class Gain:
    """A paired difference over seeds: mean, Student-t 95 % interval (None below 2 seeds)."""

    mean: float
    ci95: tuple[float, float] | None
    seeds: int
    differences: list[float]

    @property
    def interval_contains_zero(self) -> bool:
        return self.ci95 is None or self.ci95[0] <= 0.0 <= self.ci95[1]


def paired_gain(differences: list[float]) -> Gain | None:
    """Mean of per-seed differences with the 95 % t interval mean +- t_{0.975, n-1} sd / sqrt(n)."""
    from scipy import stats

    n = len(differences)
    if n == 0:
        return None
    mean = float(np.mean(differences))
    if n < 2:
        return Gain(mean, None, n, list(differences))
    half = float(stats.t.ppf(0.975, n - 1)) * float(np.std(differences, ddof=1)) / math.sqrt(n)
    return Gain(mean, (mean - half, mean + half), n, list(differences))


FRIEDMAN_EXACT_MAX = 4_000_000  # within-seed pairings enumerated at most (10! = 3.6 million: 2 seeds x 10 DAs)
FRIEDMAN_DRAWS = 100_000  # Monte Carlo shuffles beyond


@dataclass
class Friedman:
    """Friedman's test that k treatments (DAs) do not differ, over b blocks (seeds).

    statistic: chi^2_F = 12 / (b k (k + 1)) sum_j R_j^2 - 3 b (k + 1) with R_j the rank sum of
    treatment j over the blocks, divided by scipy's ties correction; df = k - 1. p: the permutation
    p-value P(chi^2* >= chi^2) under within-block shuffles of the ranks (``p_method``: "exact
    permutation" or "Monte Carlo permutation, N draws"); asymptotic_p: the chi^2(k - 1)
    approximation, for comparison."""

    statistic: float
    df: int
    p: float
    p_method: str
    asymptotic_p: float
    blocks: int
    treatments: int


def _rank_sum_spread(sums: np.ndarray, blocks: int, treatments: int) -> np.ndarray:
    """sum_j (R_j - b (k + 1) / 2)^2 per row of rank sums (..., k): chi^2_F up to a factor that
    within-block shuffles do not change, so it orders the null distribution as chi^2_F does."""
    return np.square(sums - blocks * (treatments + 1) / 2).sum(axis=-1)


def friedman_test(table: list[list[float]] | np.ndarray, exact_max: int = FRIEDMAN_EXACT_MAX,
                  draws: int = FRIEDMAN_DRAWS, seed: int = 0) -> Friedman | None:
    """Friedman's test on a (blocks, treatments) table, e.g. student top-1 of every DA (columns) at
    every seed (rows); None below 2 blocks or 3 treatments, or if no block has two distinct values.

    Under the null every block's ranks are exchangeable. Shuffling all blocks by the same
    permutation only relabels the treatments, so fixing block 0 and enumerating the (k!)^(b-1)
    arrangements of the others is exact; beyond ``exact_max`` arrangements (or k > 10), ``draws``
    shuffles from numpy's generator seeded with ``seed`` give p = (hits + 1) / (draws + 1)."""
    from scipy import stats

    values = np.asarray(table, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError("table must be (blocks, treatments)")
    blocks, treatments = values.shape
    if blocks < 2 or treatments < 3 or all(np.ptp(row) == 0 for row in values):
        return None
    ranks = stats.rankdata(values, axis=1)
    result = stats.friedmanchisquare(*values.T)
    observed = float(_rank_sum_spread(ranks.sum(axis=0), blocks, treatments))
    arrangements = math.factorial(treatments) ** (blocks - 1) if treatments <= EXACT_MAX_N else math.inf
    if arrangements <= exact_max:
        perms = all_permutations(treatments)
        count = len(perms)
        hits = 0
        for start in range(0, int(arrangements), _CHUNK):
            index = np.arange(start, min(start + _CHUNK, int(arrangements)), dtype=np.int64)
            sums = np.broadcast_to(ranks[0], (len(index), treatments)).copy()
            for block in range(1, blocks):  # mixed-radix digits: one permutation index per block
                index, digit = np.divmod(index, count)
                sums += ranks[block][perms[digit]]
            hits += int((_rank_sum_spread(sums, blocks, treatments) >= observed - _EPS).sum())
        p, method = hits / arrangements, "exact permutation"
    else:
        rng = np.random.default_rng(seed)
        hits, done = 0, 0
        while done < draws:
            n = min(_CHUNK // max(blocks * treatments // 10, 1), draws - done)
            shuffled = rng.permuted(np.broadcast_to(ranks[1:], (n, blocks - 1, treatments)), axis=2)
            sums = ranks[0] + shuffled.sum(axis=1)
            hits += int((_rank_sum_spread(sums, blocks, treatments) >= observed - _EPS).sum())
            done += n
        p, method = (hits + 1) / (draws + 1), f"Monte Carlo permutation, {draws:,} draws"
    return Friedman(float(result.statistic), treatments - 1, float(p), method, float(result.pvalue), blocks,
                    treatments)
