"""recsvc.experiments.stats against scipy, and the error rates of the tests by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from recsvc.experiments.stats import (
    betainc,
    chi2_sf,
    gammaincc,
    holm,
    msprt,
    msprt_two_proportions,
    norm_ppf,
    norm_sf,
    srm_test,
    t_isf,
    t_sf,
    two_proportion_ztest,
    welch_ttest,
    welch_ttest_from_stats,
)

DFS = [1, 2, 3, 4.5, 10, 29, 100, 250, 1e3, 1e4, 1e5, 1e6, 3e7]


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("x", [-8.0, -3.0, -1.0, 0.0, 0.3, 1.96, 5.0, 12.0, 37.0])
def test_norm_sf_matches_scipy(x):
    assert norm_sf(x) == pytest.approx(stats.norm.sf(x), rel=1e-11, abs=0)


def test_norm_sf_broadcasts_and_keeps_nan():
    x = np.array([[0.0, 1.0], [np.nan, -2.0]])
    out = norm_sf(x)
    assert out.shape == (2, 2) and np.isnan(out[1, 0])
    np.testing.assert_allclose(out[[0, 0, 1], [0, 1, 1]], stats.norm.sf([0.0, 1.0, -2.0]), rtol=1e-13)


@pytest.mark.parametrize("p", [1e-300, 1e-20, 1e-6, 0.01, 0.02425, 0.025, 0.3, 0.5, 0.8, 0.975, 0.999])
def test_norm_ppf_matches_scipy(p):
    assert norm_ppf(p) == pytest.approx(stats.norm.ppf(p), rel=1e-12, abs=1e-14)


def test_norm_ppf_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\], got 1.5"):
        norm_ppf(1.5)


@pytest.mark.parametrize("df", DFS)
def test_t_sf_matches_scipy(df):
    ts = np.array([-3.0, -0.5, 0.0, 0.01, 0.7, 1.0, 1.96, 2.5, 4.0, 7.0, 15.0, 40.0])
    ours = np.array([t_sf(t, df) for t in ts])
    ref = stats.t.sf(ts, df)
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize("df", DFS)
@pytest.mark.parametrize("q", [0.45, 0.05, 0.025, 0.005, 1e-6, 1e-12])
def test_t_isf_matches_scipy(df, q):
    assert t_isf(q, df) == pytest.approx(stats.t.isf(q, df), rel=1e-8)


def test_t_at_infinite_df_is_normal():
    assert t_sf(1.5, math.inf) == pytest.approx(stats.norm.sf(1.5), rel=1e-14)
    assert t_isf(0.025, math.inf) == pytest.approx(1.959963984540054, rel=1e-14)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 20, 99, 1000])
def test_chi2_sf_matches_scipy(df):
    xs = np.array([0.0, 0.01, 0.5, 1.0, df - 1.0, df + 0.0, 2.0 * df, 3.0 * df + 30, 10.0 * df + 200])
    xs = xs[xs >= 0]
    ours = np.array([chi2_sf(x, df) for x in xs])
    np.testing.assert_allclose(ours, stats.chi2.sf(xs, df), rtol=1e-9, atol=1e-300)


def test_betainc_and_gammaincc_match_scipy_on_a_random_grid():
    rng = np.random.default_rng(7)
    a, b = 10 ** rng.uniform(-1, 5, 400), 10 ** rng.uniform(-1, 5, 400)
    x = rng.uniform(0, 1, 400)
    ours = np.array([betainc(*args) for args in zip(a, b, x)])
    ref = special.betainc(a, b, x)
    keep = ref > 1e-280
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-8)
    g_a, g_x = 10 ** rng.uniform(-1, 3, 300), 10 ** rng.uniform(-2, 3.5, 300)
    ours_g = np.array([gammaincc(*args) for args in zip(g_a, g_x)])
    ref_g = special.gammaincc(g_a, g_x)
    keep = ref_g > 1e-280
    np.testing.assert_allclose(ours_g[keep], ref_g[keep], rtol=1e-8, atol=1e-15)


# --------------------------------------------------------------------------- tests on known examples


def _ztest_reference(x1, n1, x2, n2, alpha=0.05):
    """The textbook two-proportion z-test (statsmodels' proportions_ztest) and Wald CI, via scipy."""
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    z = (p2 - p1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    zc = stats.norm.isf(alpha / 2)
    return z, 2 * stats.norm.sf(abs(z)), (p2 - p1 - zc * se, p2 - p1 + zc * se)


@pytest.mark.parametrize(
    "x1, n1, x2, n2",
    [(120, 2400, 150, 2500), (5000, 100_000, 5150, 100_000), (3, 40, 9, 38), (980, 1000, 940, 1000)],
)
def test_two_proportion_ztest_matches_reference(x1, n1, x2, n2):
    res = two_proportion_ztest(x1, n1, x2, n2)
    z, p, (lo, hi) = _ztest_reference(x1, n1, x2, n2)
    assert res.z == pytest.approx(z, rel=1e-12)
    assert res.p_value == pytest.approx(p, rel=1e-10)
    assert (res.ci_low, res.ci_high) == pytest.approx((lo, hi), rel=1e-12)
    assert res.diff == pytest.approx(x2 / n2 - x1 / n1)
    assert res.rel_lift == pytest.approx((x2 / n2) / (x1 / n1) - 1)


def test_two_proportion_ztest_broadcasts_and_is_nan_without_data():
    res = two_proportion_ztest([10, 0], [100, 0], [20, 5], [100, 50])
    assert res.p_value.shape == (2,)
    assert res.p_value[0] == pytest.approx(_ztest_reference(10, 100, 20, 100)[1])
    assert np.isnan(res.p_value[1]) and np.isnan(res.diff[1])


def test_welch_matches_scipy_ttest_ind_unequal_var():
    rng = np.random.default_rng(3)
    a = rng.exponential(2.0, 400)
    b = rng.exponential(2.3, 250) + rng.normal(0, 0.5, 250)
    ours = welch_ttest(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.df == pytest.approx(ref.df, rel=1e-12)
    ci = ref.confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_welch_from_summary_statistics_on_a_textbook_example():
    # means 20.0 vs 22.5, sd 4 vs 6, n 30 vs 25 — scipy's ttest_ind_from_stats is the reference.
    ours = welch_ttest_from_stats(20.0, 16.0, 30, 22.5, 36.0, 25)
    ref = stats.ttest_ind_from_stats(22.5, 6.0, 25, 20.0, 4.0, 30, equal_var=False)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_welch_is_undefined_without_variance_or_with_one_observation():
    assert math.isnan(welch_ttest([1.0, 1.0, 1.0], [1.0, 1.0]).p_value)
    assert math.isnan(welch_ttest([1.0], [1.0, 2.0, 3.0]).p_value)


def test_srm_chisquare_matches_scipy_chisquare():
    observed, shares = [5120, 2480, 2400], [0.5, 0.25, 0.25]
    res = srm_test(observed, shares)
    ref = stats.chisquare(observed, np.sum(observed) * np.array(shares))
    assert res.chi2 == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.df == 2


def test_srm_detects_a_planted_52_48_split_and_passes_a_fair_one():
    rng = np.random.default_rng(11)
    n = 20_000
    planted = rng.binomial(n, 0.52)
    fair = rng.binomial(n, 0.50)
    assert srm_test([planted, n - planted], [0.5, 0.5]).flagged
    res = srm_test([fair, n - fair], [0.5, 0.5])
    assert not res.flagged and res.p_value > 0.01


def _holm_reference(p):
    """Holm (1979), written the long way."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def test_holm_known_values_and_reference():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(5)
    for _ in range(50):
        p = rng.uniform(0, 0.2, rng.integers(1, 12)).tolist()
        np.testing.assert_allclose(holm(p), _holm_reference(p), rtol=1e-15)


def test_holm_ignores_nan_and_single_p_is_unchanged():
    out = holm([0.02, math.nan, 0.04])
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.04, 0.04])
    assert holm([0.03])[0] == 0.03


# --------------------------------------------------------------------------- mSPRT


def test_msprt_matches_the_mixture_likelihood_ratio_of_johari_et_al():
    # One look: Λ = sqrt(V/(V+τ²)) exp(τ²θ̂²/(2V(V+τ²))), with τ² = tau²·V/c.
    x1, n1, x2, n2, tau = 500, 10_000, 580, 10_000, 0.02
    p1, p2, pooled = x1 / n1, x2 / n2, (x1 + x2) / (n1 + n2)
    c = 1 / n1 + 1 / n2
    v = pooled * (1 - pooled) * c
    tau2 = tau * tau * v / c
    theta = p2 - p1
    lam = math.sqrt(v / (v + tau2)) * math.exp(tau2 * theta**2 / (2 * v * (v + tau2)))
    res = msprt_two_proportions([x1], [n1], [x2], [n2], tau=tau)
    assert res.p_value[0] == pytest.approx(min(1.0, 1 / lam), rel=1e-12)
    v_alt = p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2
    tau2_alt = tau * tau * v_alt / c
    half = math.sqrt(v_alt * (v_alt + tau2_alt) / tau2_alt * (2 * math.log(20) + math.log((v_alt + tau2_alt) / v_alt)))
    assert (res.cs_low[0], res.cs_high[0]) == pytest.approx((theta - half, theta + half), rel=1e-12)


def test_msprt_p_value_is_a_running_minimum_and_the_sequence_only_shrinks():
    rng = np.random.default_rng(2)
    n = np.cumsum(np.full(20, 3000))
    x1 = np.cumsum(rng.binomial(3000, 0.05, 20))
    x2 = np.cumsum(rng.binomial(3000, 0.056, 20))
    res = msprt_two_proportions(x1, n, x2, n)
    assert np.all(np.diff(res.p_value) <= 0)
    assert np.all(np.diff(res.cs_low) >= 0) and np.all(np.diff(res.cs_high) <= 0)


def test_msprt_skips_looks_without_enough_data():
    res = msprt_two_proportions([0, 1, 400], [10, 20, 8000], [0, 2, 480], [10, 20, 8000])
    assert res.p_value[0] == 1.0 and res.p_value[1] == 1.0
    assert np.isinf(res.cs_low[1]) and np.isinf(res.cs_high[1])
    assert res.p_value[2] < 1.0


def test_msprt_validates_its_parameters():
    with pytest.raises(ValueError, match="tau must be positive, got 0"):
        msprt([0.1], [1.0], [1.0], [0.1], tau=0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.5"):
        msprt([0.1], [1.0], [1.0], [0.1], alpha=1.5)


# --------------------------------------------------------------------------- error rates by simulation

N_SIM = 1000
ALPHA = 0.05


def _daily_counts(rng, p_control, p_treatment, looks, per_day):
    """Cumulative clicks and impressions of N_SIM experiments over daily looks: (N_SIM, looks)."""
    n = np.cumsum(np.full((N_SIM, looks), per_day), axis=1)
    x1 = np.cumsum(rng.binomial(per_day, p_control, (N_SIM, looks)), axis=1)
    x2 = np.cumsum(rng.binomial(per_day, p_treatment, (N_SIM, looks)), axis=1)
    return x1, n, x2, n


def test_aa_fixed_horizon_z_test_keeps_the_false_positive_rate_near_alpha():
    rng = np.random.default_rng(20260101)
    x1 = rng.binomial(20_000, 0.05, 400)
    x2 = rng.binomial(20_000, 0.05, 400)
    fpr = float(np.mean(two_proportion_ztest(x1, 20_000, x2, 20_000).p_value < ALPHA))
    assert 0.02 <= fpr <= 0.09, fpr


def test_aa_welch_keeps_the_false_positive_rate_near_alpha():
    rng = np.random.default_rng(20260102)
    values = rng.exponential(3.0, (400, 2, 300)) * (rng.uniform(size=(400, 2, 300)) < 0.3)  # zero-inflated
    fpr = np.mean([welch_ttest(v[0], v[1]).p_value < ALPHA for v in values])
    assert 0.02 <= fpr <= 0.09, fpr


def test_daily_peeking_inflates_the_naive_z_test_but_not_the_always_valid_p_value():
    rng = np.random.default_rng(20260103)
    x1, n1, x2, n2 = _daily_counts(rng, 0.05, 0.05, looks=30, per_day=2000)
    naive = two_proportion_ztest(x1, n1, x2, n2).p_value  # (N_SIM, 30): one test per look
    naive_fpr = float(np.mean((naive < ALPHA).any(axis=1)))
    always_valid = msprt_two_proportions(x1, n1, x2, n2, tau=0.01, alpha=ALPHA)
    msprt_fpr = float(np.mean(always_valid.p_value[:, -1] < ALPHA))
    # 30 looks: the naive rate is several times alpha (≈0.25-0.3); mSPRT stays below alpha.
    assert naive_fpr > 0.15, naive_fpr
    assert msprt_fpr <= ALPHA + 0.015, msprt_fpr
    # The confidence sequence (running intersection) holds the true difference 0 at every look.
    cs_misses = float(np.mean((always_valid.cs_low[:, -1] > 0) | (always_valid.cs_high[:, -1] < 0)))
    assert cs_misses <= ALPHA + 0.015, cs_misses


def test_always_valid_confidence_sequence_covers_a_true_nonzero_effect():
    rng = np.random.default_rng(20260104)
    x1, n1, x2, n2 = _daily_counts(rng, 0.05, 0.055, looks=30, per_day=2000)
    res = msprt_two_proportions(x1, n1, x2, n2, alpha=ALPHA)
    misses = float(np.mean((res.cs_low[:, -1] > 0.005) | (res.cs_high[:, -1] < 0.005)))
    assert misses <= ALPHA + 0.015, misses
    # ...and the always-valid test still has power against a 20% lift.
    y1, m1, y2, m2 = _daily_counts(rng, 0.05, 0.06, looks=30, per_day=2000)
    power = float(np.mean(msprt_two_proportions(y1, m1, y2, m2, alpha=ALPHA).p_value[:, -1] < ALPHA))
    assert power > 0.8, power


def test_aa_with_returning_users_keeps_false_positives_at_alpha():
    """Regression (issue 17): at a design effect ~1.5 (users return, each with their own click rate) the
    per-impression z-test rejected ~10% of A/A tests at alpha = 0.05; the user-clustered test keeps alpha."""
    import numpy as np

    from recsvc.experiments.stats import clustered_ratio_test, two_proportion_ztest

    rng = np.random.default_rng(17)

    def arm():
        n = rng.poisson(10, 1500) + 1
        return rng.binomial(n, rng.beta(1.0, 19.0, n.size)), n

    runs, clustered, naive, deff = 800, 0, 0, []
    for _ in range(runs):
        (x1, n1), (x2, n2) = arm(), arm()
        t = clustered_ratio_test(x1, n1, x2, n2)
        clustered += t.p_value < 0.05
        naive += two_proportion_ztest(x1.sum(), n1.sum(), x2.sum(), n2.sum()).p_value < 0.05
        deff.append(t.design_effect_control)
    assert 1.3 < np.mean(deff) < 1.7
    assert 0.03 <= clustered / runs <= 0.072, clustered / runs  # alpha within ~2.5 binomial SE
    assert naive / runs > 0.08  # what the naive test did


def test_relative_lift_interval_holds_coverage_or_is_withheld():
    """Regression (issue 17): the delta-method lift interval covered 83% at ~3 expected events. The
    log-ratio interval is withheld below MIN_EVENTS_FOR_LIFT_CI events and covers >= 93% above."""
    import math

    import numpy as np

    from recsvc.experiments.stats import MIN_EVENTS_FOR_LIFT_CI, clustered_ratio_test

    rng = np.random.default_rng(3)
    for users, rate in ((300, 0.01), (1000, 0.01), (1000, 0.03)):
        shown = covered = 0
        for _ in range(1500):
            x1, x2 = rng.binomial(1, rate, users), rng.binomial(1, rate * 1.2, users)
            t = clustered_ratio_test(x1, np.ones(users), x2, np.ones(users))
            if min(x1.sum(), x2.sum()) < MIN_EVENTS_FOR_LIFT_CI:
                assert math.isnan(t.rel_ci_low)
                continue
            shown += 1
            covered += t.rel_ci_low <= 0.2 <= t.rel_ci_high
        if shown > 200:
            assert covered / shown >= 0.93, (users, rate, covered / shown)
