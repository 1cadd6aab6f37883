"""The sweep's statistics against enumerations written out here and hand-computed intervals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from daqkd.stats import all_permutations, disagreement_test, friedman_test, paired_gain, rank_correlation


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


def test_beyond_ten_items_p_values_are_seeded_monte_carlo_permutations() -> None:
    rng = np.random.default_rng(0)
    x = list(rng.random(16))
    y = list(np.asarray(x) + 2 * rng.random(16))
    corr = rank_correlation(x, y)
    assert corr.p_method == "Monte Carlo permutation, 100,000 shuffles, seed 0"
    assert corr.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert rank_correlation(x, y).spearman_p == corr.spearman_p  # seeded: the same p every time
    # a naive Monte Carlo reference with scipy's statistics (2,000 shuffles): within 4 standard errors
    ref = np.random.default_rng(1)
    perms = [ref.permutation(y) for _ in range(2000)]
    naive_rho = np.mean([abs(stats.spearmanr(x, p).statistic) >= abs(corr.spearman) - 1e-12 for p in perms])
    naive_tau = np.mean([abs(stats.kendalltau(x, p).statistic) >= abs(corr.kendall) - 1e-12 for p in perms])
    for mine, naive in ((corr.spearman_p, naive_rho), (corr.kendall_p, naive_tau)):
        assert abs(mine - naive) < 4 * math.sqrt(max(naive * (1 - naive), 1e-3) / 2000)
    assert 0.0 < corr.spearman_p < 1.0 and corr.spearman_p != pytest.approx(stats.spearmanr(x, y).pvalue, rel=1e-6)


def test_monte_carlo_p_agrees_with_the_exact_p() -> None:
    x = [0.31, 0.12, 0.55, 0.47, 0.9, 0.26, 0.74, 0.68]
    y = [60.1, 59.0, 61.2, 60.4, 62.0, 60.3, 60.0, 61.9]
    exact = rank_correlation(x, y)
    sampled = rank_correlation(x, y, exact_max_n=0, draws=20_000, seed=3)
    assert exact.p_method == "exact permutation" and sampled.p_method.startswith("Monte Carlo")
    for e, m in ((exact.spearman_p, sampled.spearman_p), (exact.kendall_p, sampled.kendall_p)):
        assert abs(e - m) < 4 * math.sqrt(e * (1 - e) / 20_000) + 1e-4


def naive_disagreement(a, a_better, b, b_better, outcome):
    """The disagreement share and its exact two-sided p by brute force over itertools.permutations."""
    def prefers(values, better, i, j):  # +1: i preferred, -1: j, 0: tie
        d = int(values[i] > values[j]) - int(values[i] < values[j])
        return -d if better == "lower" else d

    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
             if prefers(a, a_better, i, j) * prefers(b, b_better, i, j) < 0]

    def share(out):
        total = 0.0
        for i, j in pairs:
            s = prefers(out, "higher", i, j) * prefers(a, a_better, i, j)
            total += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
        return total / len(pairs)

    observed = share(outcome)
    perms = list(itertools.permutations(outcome))
    hits = sum(abs(share(p) - 0.5) >= abs(observed - 0.5) - 1e-12 for p in perms)
    return len(pairs), observed, hits / len(perms)


def test_disagreement_by_hand() -> None:
    # score (lower better) prefers 0 > 1 > 2 > 3; teacher accuracy (higher better) 2 > 0 > 1 > 3.
    # They disagree on the pairs (0, 2) and (1, 2) only.
    score, accuracy = [1.0, 2.0, 3.0, 4.0], [0.9, 0.8, 0.95, 0.7]
    result = disagreement_test(score, "lower", accuracy, "higher", [70.0, 68.0, 65.0, 50.0])
    assert (result.pairs, result.sides_with_a, result.share) == (2, 2.0, 1.0)
    assert sorted(result.pair_list) == [(0, 2, 1), (1, 2, 1)]
    # both pairs side the same way iff item 2 is the lowest (1/3) or the highest (1/3) of items 0, 1, 2
    assert result.p == pytest.approx(2 / 3) and result.p_method == "exact permutation"
    split = disagreement_test(score, "lower", accuracy, "higher", [70.0, 60.0, 65.0, 50.0])
    assert (split.share, split.p) == (0.5, 1.0)  # one pair each way: chance exactly
    tie = disagreement_test(score, "lower", accuracy, "higher", [70.0, 65.0, 65.0, 50.0])
    assert tie.sides_with_a == 1.5 and tie.share == 0.75 and (1, 2, 0) in tie.pair_list
    agree = disagreement_test(score, "lower", [0.9, 0.8, 0.7, 0.6], "higher", [1.0, 2.0, 3.0, 4.0])
    assert (agree.pairs, agree.share, agree.p) == (0, None, None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_disagreement_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = [float(v) for v in rng.random(7)], [float(v) for v in rng.random(7)]
    outcome = list(np.round(rng.normal(60, 1, 7), 1))
    outcome[3] = outcome[5]  # a tie in the outcome
    result = disagreement_test(a, "lower", b, "higher", outcome)
    pairs, share, p = naive_disagreement(a, "lower", b, "higher", outcome)
    assert (result.pairs, result.share) == (pairs, pytest.approx(share)) and result.p == pytest.approx(p)
    sampled = disagreement_test(a, "lower", b, "higher", outcome, exact_max_n=0, draws=20_000, seed=5)
    assert sampled.p_method == "Monte Carlo permutation, 20,000 shuffles, seed 5"
    assert abs(sampled.p - p) < 4 * math.sqrt(p * (1 - p) / 20_000) + 1e-4


def test_disagreement_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        disagreement_test([1.0, 2.0], "lower", [1.0], "higher", [1.0, 2.0])
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        disagreement_test([1.0, 2.0], "smaller", [1.0, 2.0], "higher", [1.0, 2.0])


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
