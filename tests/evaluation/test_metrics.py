"""Report maths against scipy and hand computation."""

from __future__ import annotations

import pytest
from scipy import stats

from detot_agent.evaluation.metrics import bootstrap_ci, mcnemar_exact, paired


def test_mcnemar_by_hand():
    # 1 vs 6 discordant pairs: P(X <= 1) for Binomial(7, 0.5) = 8/128, two-sided 16/128
    assert mcnemar_exact(1, 6).p_value == pytest.approx(0.125)
    assert mcnemar_exact(0, 0).p_value == 1.0
    assert mcnemar_exact(3, 3).p_value == 1.0


@pytest.mark.parametrize(("b", "c"), [(2, 9), (10, 4), (0, 5), (17, 30), (40, 41)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    assert mcnemar_exact(b, c).p_value == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_paired_counts_only_items_both_answered():
    a = {"1": True, "2": True, "3": False, "4": True}
    b = {"1": False, "2": True, "3": True, "5": False}
    test = paired(a, b)
    assert (test.b, test.c) == (1, 1)


def test_bootstrap_interval_matches_the_binomial_it_approximates():
    # resampling 0/1 outcomes with replacement makes the resampled mean Binomial(n, p_hat) / n exactly,
    # so the percentile interval must sit at that binomial's quantiles (within one step of 1/n)
    outcomes = [True] * 14 + [False] * 6
    lo, hi = bootstrap_ci(outcomes, seed=0)
    assert lo == pytest.approx(stats.binom.ppf(0.025, 20, 0.7) / 20, abs=0.05 + 1e-9)
    assert hi == pytest.approx(stats.binom.ppf(0.975, 20, 0.7) / 20, abs=0.05 + 1e-9)
    ref = stats.bootstrap(([float(x) for x in outcomes],), lambda x, axis: x.mean(axis=axis), method="percentile",
                          n_resamples=10_000, random_state=1).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.051) and hi == pytest.approx(ref.high, abs=0.051)
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)
    assert bootstrap_ci([]) == (0.0, 0.0)
