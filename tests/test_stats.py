"""The sweep's statistics against enumerations written out here and hand-computed intervals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from daqkd.stats import all_permutations, friedman_test, paired_gain, rank_correlation


def enumerated_p(x: list[float], y: list[float]) -> tuple[float, float]:
    """Two-sided permutation p-values by brute force: scipy's rho and tau for each of the n! pairings."""
    rho_obs = abs(stats.spearmanr(x, y).statistic)
    tau_obs = abs(stats.kendalltau(x, y).statistic)
    rho_hits = tau_hits = total = 0
    for perm in itertools.permutations(y):
        total += 1
        rho_hits += abs(stats.spearmanr(x, perm).statistic) >= rho_obs - 1e-12
        tau_hits += abs(stats.kendalltau(x, perm).statistic) >= tau_obs - 1e-12
    return rho_hits / total, tau_hits / total


def test_perfect_order_of_five_has_p_two_in_120() -> None:
    # only the identity and the reversal reach |rho| = 1 (and |tau| = 1) among the 5! = 120 pairings
    corr = rank_correlation([0.1, 0.2, 0.3, 0.4, 0.5], [60.0, 61.0, 62.5, 63.0, 64.0])
    assert (corr.spearman, corr.kendall) == (pytest.approx(1.0), pytest.approx(1.0))
    assert corr.spearman_p == pytest.approx(2 / 120) and corr.kendall_p == pytest.approx(2 / 120)
    assert corr.p_method == "exact permutation" and corr.n == 5


@pytest.mark.parametrize("x, y", [
    ([0.3, 0.1, 0.4, 0.2, 0.5], [61.0, 64.0, 60.5, 62.0, 63.0]),
    ([0.3, 0.1, 0.4, 0.2, 0.5], [61.0, 64.0, 61.0, 62.0, 63.0]),  # a tie in accuracy
    ([0.3, 0.3, 0.4, 0.2, 0.5], [61.0, 64.0, 61.0, 62.0, 63.0]),  # ties on both sides
])
def test_exact_p_equals_brute_force_enumeration_n5(x: list[float], y: list[float]) -> None:
    corr = rank_correlation(x, y)
    rho_p, tau_p = enumerated_p(x, y)
    assert corr.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert corr.kendall == pytest.approx(stats.kendalltau(x, y).statistic)
    assert corr.spearman_p == pytest.approx(rho_p, abs=1e-12)
    assert corr.kendall_p == pytest.approx(tau_p, abs=1e-12)


def test_cpu_sweep_case_exact_p_differs_from_asymptotic() -> None:
    # the ranks of the committed CPU sweep (8 DAs): rho -0.857, asymptotic p 0.0065, exact 0.0107
    score = [1, 2, 3, 4, 5, 6, 7, 8]
    top1 = [8, 7, 4, 6, 5, 1, 3, 2]
    corr = rank_correlation(score, top1)
    assert corr.spearman == pytest.approx(-6 / 7)
    assert corr.spearman_p == pytest.approx(432 / 40320)  # 432 of the 8! pairings have |rho| >= 6/7
    assert stats.spearmanr(score, top1).pvalue == pytest.approx(0.0065, abs=1e-4)


def test_beyond_ten_items_p_values_are_asymptotic() -> None:
    rng = np.random.default_rng(0)
    x = list(rng.random(11))
    y = list(np.asarray(x) + rng.random(11))
    corr = rank_correlation(x, y)
    assert corr.p_method == "asymptotic"
    assert corr.spearman_p == pytest.approx(stats.spearmanr(x, y).pvalue)
    assert corr.kendall_p == pytest.approx(stats.kendalltau(x, y).pvalue)


def test_degenerate_inputs() -> None:
    assert rank_correlation([1.0, 2.0], [3.0, 4.0]) is None
    flat = rank_correlation([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert math.isnan(flat.spearman) and flat.spearman_p == 1.0
    with pytest.raises(ValueError):
        rank_correlation([1.0, 2.0, 3.0], [1.0, 2.0])


def test_all_permutations_are_distinct_and_complete() -> None:
    perms = all_permutations(5)
    assert perms.shape == (120, 5)
    assert len({tuple(p) for p in perms.tolist()}) == 120
    assert (np.sort(perms, axis=1) == np.arange(5)).all()


def test_paired_gain_interval_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    gain = paired_gain([1.0, 2.0, 3.0])
    assert gain.mean == pytest.approx(2.0)
    assert gain.ci95 == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    assert gain.seeds == 3 and gain.interval_contains_zero
    # 1.0, 1.2, 1.4: sd 0.2 -> half-width 4.302653 * 0.2 / sqrt(3) = 0.496828, clear of 0
    clear = paired_gain([1.0, 1.2, 1.4])
    assert clear.ci95[0] == pytest.approx(1.2 - 0.496828, abs=1e-6) and not clear.interval_contains_zero
    # two seeds: t(0.975, 1) = 12.706205; differences 0.2, 0.4: sd 0.141421 -> half-width 1.270620
    two = paired_gain([0.2, 0.4])
    assert two.ci95 == (pytest.approx(0.3 - 1.270620, abs=1e-6), pytest.approx(0.3 + 1.270620, abs=1e-6))
    assert two.interval_contains_zero
    one = paired_gain([0.5])
    assert one.ci95 is None and one.interval_contains_zero
    assert paired_gain([]) is None


def enumerated_friedman_p(table: list[list[float]]) -> float:
    """P(chi^2* >= chi^2) by brute force: scipy's statistic over every arrangement of every block."""
    observed = stats.friedmanchisquare(*np.asarray(table).T).statistic
    hits = total = 0
    for rows in itertools.product(*[list(itertools.permutations(row)) for row in table]):
        total += 1
        hits += stats.friedmanchisquare(*np.asarray(rows).T).statistic >= observed - 1e-9
    return hits / total


@pytest.mark.parametrize("table", [
    [[70.1, 70.5, 69.3, 69.0], [69.9, 70.7, 69.5, 69.4]],  # 2 seeds x 4 DAs
    [[1.0, 2.0, 2.0, 3.0], [3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.0]],  # ties within seeds
    [[0.3, 0.1, 0.2], [0.2, 0.1, 0.3], [0.1, 0.3, 0.2]],
])
def test_friedman_exact_p_equals_brute_force_enumeration(table: list[list[float]]) -> None:
    result = friedman_test(table)
    assert result.p_method == "exact permutation" and result.p == pytest.approx(enumerated_friedman_p(table))
    reference = stats.friedmanchisquare(*np.asarray(table).T)
    assert (result.statistic, result.asymptotic_p) == (pytest.approx(reference.statistic),
                                                        pytest.approx(reference.pvalue))
    assert (result.df, result.blocks, result.treatments) == (len(table[0]) - 1, len(table), len(table[0]))


def test_friedman_by_hand_and_monte_carlo() -> None:
    # 2 seeds ordering 4 DAs the same way: R = (2, 4, 6, 8), chi^2 = 12 / (2 * 4 * 5) * 120 - 3 * 2 * 5 = 6;
    # block 0 fixed, only the identity of the 4! = 24 arrangements of block 1 reaches it: p = 1 / 24
    same = friedman_test([[1, 2, 3, 4], [10, 20, 30, 40]])
    assert (same.statistic, same.p) == (pytest.approx(6.0), pytest.approx(1 / 24))
    table = [[70.1, 70.5, 69.3, 69.0, 69.6], [69.9, 70.7, 69.5, 69.4, 69.2], [70.3, 70.2, 69.1, 69.5, 69.8]]
    exact = friedman_test(table)
    sampled = friedman_test(table, exact_max=10, draws=40_000, seed=3)
    assert sampled.p_method == "Monte Carlo permutation, 40,000 draws"
    assert sampled.p == pytest.approx(exact.p, abs=0.006)  # 3 binomial SEs at p ~ 0.03
    assert friedman_test(table, exact_max=10, draws=40_000, seed=3) == sampled  # seeded
    assert friedman_test([[1, 2, 3]]) is None and friedman_test([[1, 2], [2, 1]]) is None
    assert friedman_test([[1, 1, 1], [2, 2, 2]]) is None  # no seed tells the DAs apart
