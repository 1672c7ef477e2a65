"""Statistics for experiment reports, with nothing beyond numpy and ``math``.

scipy is a test-only dependency, so the distribution tails are implemented here
and checked against scipy in ``tests/test_experiment_stats.py``:

* normal: ``math.erfc`` (accurate in both tails); the quantile is Acklam's
  rational approximation refined by one Halley step (full double precision);
* Student t: the regularized incomplete beta function, evaluated by its
  continued fraction (modified Lentz; Numerical Recipes 3rd ed. §6.4);
* chi-square: the regularized upper incomplete gamma function, by its series or
  continued fraction (Numerical Recipes §6.2).

Tests:

* rates (CTR, conversion rate): two-proportion z-test. The test statistic uses
  the **pooled** standard error (the variance under H0: p1 = p2); the
  confidence interval uses the **unpooled** standard error (the variance at the
  estimates), as statsmodels' ``test_proportions_2indep`` / ``confint_proportions_2indep``
  ("wald") do. The two can disagree at the margin.
* means (value per user): Welch's t-test with Welch–Satterthwaite degrees of
  freedom; the CI uses the same df.
* sample ratio mismatch: chi-square goodness of fit of counts against shares.
* multiple comparisons: Holm's step-down adjustment.
* variance reduction: CUPED (Deng, Xu, Kohavi & Walker, "Improving the sensitivity of online
  controlled experiments by utilizing pre-experiment data", WSDM 2013) with each user's
  pre-experiment value of the same metric as the covariate; ratio metrics through the delta
  method's linearization (:func:`cuped_ratio_test`), means directly (:func:`cuped_mean_test`).
* sequential: the mixture sequential probability ratio test (mSPRT) of Johari,
  Koomen, Pekelis & Walsh, "Peeking at A/B tests" (KDD 2017), with a normal
  mixing distribution on the effect, on the normal approximation of the
  difference of two means/proportions. See :func:`msprt`.

Functions that take counts accept numpy arrays and broadcast (the simulations
in the tests run thousands of experiments at once); Welch and the quantiles are
scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "norm_sf",
    "norm_ppf",
    "betainc",
    "gammaincc",
    "t_sf",
    "t_isf",
    "chi2_sf",
    "ProportionTest",
    "two_proportion_ztest",
    "MeanTest",
    "welch_ttest",
    "welch_ttest_from_stats",
    "SRMTest",
    "srm_test",
    "holm",
    "CupedTest",
    "cuped_ratio_test",
    "cuped_mean_test",
    "SequentialTest",
    "msprt",
    "msprt_two_proportions",
    "msprt_clustered_ratio",
    "msprt_cuped_ratio",
    "msprt_cuped_mean",
    "SRM_ALPHA",
]

#: A sample ratio mismatch is flagged below this p-value (a stringent threshold,
#: as is customary: an SRM check runs on every report, so false alarms must be rare).
SRM_ALPHA = 1e-3

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_EPS = 1e-15
_FPMIN = 1e-300
_MAXIT = 100_000


# --------------------------------------------------------------------------- normal


def _erfc_array(x: np.ndarray) -> np.ndarray:
    return np.frompyfunc(math.erfc, 1, 1)(x).astype(np.float64)


def norm_sf(x):  # float | ndarray -> float | ndarray
    """P(Z > x) for a standard normal Z (arrays welcome)."""
    if np.ndim(x) == 0:
        return 0.5 * math.erfc(float(x) / _SQRT2)
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    ok = ~np.isnan(x)
    out[ok] = 0.5 * _erfc_array(x[ok] / _SQRT2)
    return out


_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
      3.754408661907416e00)


def norm_ppf(p: float) -> float:
    """The standard normal quantile: x with P(Z <= x) = p."""
    p = float(p)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"probability must be in [0, 1], got {p}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    p_low = 0.02425
    if p < p_low:
        q = math.sqrt(-2.0 * math.log(p))
        x = (((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    elif p <= 1.0 - p_low:
        q = p - 0.5
        r = q * q
        x = (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * q / (
            ((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0
        )
    else:
        q = math.sqrt(-2.0 * math.log1p(-p))
        x = -(((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]) / (
            (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0
        )
    # One Halley step on the exact CDF (erfc) takes the 1e-9 approximation to full precision.
    e = 0.5 * math.erfc(-x / _SQRT2) - p
    u = e * _SQRT2PI * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


# --------------------------------------------------------------------------- special functions


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
    h = d
    for m in range(1, _MAXIT + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
        c = 1.0 + aa / c
        c = c if abs(c) > _FPMIN else _FPMIN
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
        c = 1.0 + aa / c
        c = c if abs(c) > _FPMIN else _FPMIN
        de = d * c
        h *= de
        if abs(de - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _stirling_tail(z: float) -> float:
    """ln Γ(z) - [(z - 1/2) ln z - z + ln(2π)/2], for z >= 100 (error < 1e-19)."""
    z2 = z * z
    return (1.0 / 12.0 - (1.0 / 360.0 - 1.0 / (1260.0 * z2)) / z2) / z


def _log_inv_beta(a: float, b: float) -> float:
    """-ln B(a, b) = ln Γ(a+b) - ln Γ(a) - ln Γ(b), without cancellation when one argument is large.

    The naive difference of lgammas loses ~eps·lnΓ(a) absolutely (1e-8 at a = 1e6, i.e. the
    t distribution at df = 2e6); Stirling's series in the form
    ln Γ(a+b) - ln Γ(a) = (a - 1/2) log1p(b/a) + b ln(a+b) - b + tail(a+b) - tail(a) does not.
    """
    big, small = (a, b) if a >= b else (b, a)
    if big < 100.0:
        return math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    s = big + small
    ratio = (big - 0.5) * math.log1p(small / big) + small * math.log(s) - small
    return ratio + _stirling_tail(s) - _stirling_tail(big) - math.lgamma(small)


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b).

    ``y`` = 1 - x may be passed when it is known more accurately than ``1 - x``
    (it is for the t distribution), so that neither tail loses precision.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if y is None:
        y = 1.0 - x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if y < 0.5 else math.log(x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    log_front = _log_inv_beta(a, b) + a * log_x + b * log_y
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def gammaincc(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a)."""
    if a <= 0:
        raise ValueError(f"gammaincc needs a > 0, got {a}")
    if x <= 0.0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # series for P(a, x); Q = 1 - P is not small here
        ap, term = a, 1.0 / a
        total = term
        for _ in range(_MAXIT):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                return max(0.0, 1.0 - total * math.exp(log_front))
        raise ArithmeticError(f"incomplete gamma series did not converge (a={a}, x={x})")
    b = x + 1.0 - a  # continued fraction for Q (modified Lentz)
    c = 1.0 / _FPMIN
    d = 1.0 / b
    h = d
    for i in range(1, _MAXIT + 1):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
        c = b + an / c
        c = c if abs(c) > _FPMIN else _FPMIN
        de = d * c
        h *= de
        if abs(de - 1.0) < _EPS:
            return math.exp(log_front) * h
    raise ArithmeticError(f"incomplete gamma continued fraction did not converge (a={a}, x={x})")


# --------------------------------------------------------------------------- t and chi-square


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (real, > 0; ``inf`` is the normal)."""
    t, df = float(t), float(df)
    if math.isnan(t) or math.isnan(df) or df <= 0:
        raise ValueError(f"t_sf needs a number t and df > 0, got t={t}, df={df}")
    if math.isinf(df):
        return norm_sf(t)
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    # Two-sided tail P(|T| > |t|) = I_{df/(df+t²)}(df/2, 1/2); both x and 1-x computed directly.
    two_sided = betainc(0.5 * df, 0.5, df / (df + t2), t2 / (df + t2))
    return 0.5 * two_sided if t > 0 else 1.0 - 0.5 * two_sided


def _t_logpdf(t: float, df: float) -> float:
    return (
        math.lgamma(0.5 * (df + 1.0))
        - math.lgamma(0.5 * df)
        - 0.5 * math.log(df * math.pi)
        - 0.5 * (df + 1.0) * math.log1p(t * t / df)
    )


def t_isf(q: float, df: float) -> float:
    """The t with P(T > t) = q (the upper quantile; e.g. ``t_isf(0.025, df)`` for a 95% CI)."""
    q, df = float(q), float(df)
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_isf needs 0 < q < 1, got {q}")
    if df <= 0 or math.isnan(df):
        raise ValueError(f"t_isf needs df > 0, got {df}")
    if math.isinf(df):
        return -norm_ppf(q)
    if q > 0.5:
        return -t_isf(1.0 - q, df)
    if q == 0.5:
        return 0.0
    z = -norm_ppf(q)
    # Cornish–Fisher start (exact as df -> inf), then safeguarded Newton on log sf.
    t = z + (z**3 + z) / (4.0 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96.0 * df * df)
    lo, hi = 0.0, math.inf
    log_q = math.log(q)
    for _ in range(200):
        sf = t_sf(t, df)
        if sf <= 0.0:  # far beyond the root
            hi = t
            t = 0.5 * (lo + hi)
            continue
        if sf > q:
            lo = t
        else:
            hi = t
        g = math.log(sf) - log_q
        step = g / math.exp(_t_logpdf(t, df) - math.log(sf))  # g / (d log sf / dt) with sign folded
        new = t + step
        if not lo < new < hi:
            new = 0.5 * (lo + hi) if math.isfinite(hi) else 2.0 * max(t, 1.0)
        if abs(new - t) <= 1e-13 * max(1.0, abs(t)):
            return new
        t = new
    return t


def chi2_sf(x: float, df: float) -> float:
    """P(X > x) for a chi-square X with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"chi2_sf needs df > 0, got {df}")
    return gammaincc(0.5 * float(df), 0.5 * float(x))


# --------------------------------------------------------------------------- tests


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


@dataclass(frozen=True)
class ProportionTest:
    """Two-proportion z-test of treatment (2) against control (1). Fields broadcast like the inputs."""

    p_control: float | np.ndarray
    p_treatment: float | np.ndarray
    diff: float | np.ndarray  # p_treatment - p_control
    rel_lift: float | np.ndarray  # diff / p_control (nan when p_control = 0)
    z: float | np.ndarray  # diff / pooled SE
    p_value: float | np.ndarray  # two-sided
    se: float | np.ndarray  # unpooled SE of diff (the CI's)
    ci_low: float | np.ndarray
    ci_high: float | np.ndarray
    rel_ci_low: float | np.ndarray  # delta-method CI of the relative lift
    rel_ci_high: float | np.ndarray


def two_proportion_ztest(x1, n1, x2, n2, alpha: float = 0.05) -> ProportionTest:
    """Two-sided z-test of p2 = p1 (pooled SE) and the Wald CI of p2 - p1 (unpooled SE).

    ``x`` are successes, ``n`` trials; arrays broadcast. Undefined results
    (n = 0, or no variance at all) are nan.
    """
    x1, n1, x2, n2 = (np.asarray(v, dtype=np.float64) for v in (x1, n1, x2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = x1 / n1, x2 / n2
        diff = p2 - p1
        pooled = (x1 + x2) / (n1 + n2)
        se0 = np.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
        z = np.where(se0 > 0, diff / se0, np.nan)
        p = 2.0 * np.asarray(norm_sf(np.abs(z)))
        se = np.sqrt(p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2)
        zc = -norm_ppf(alpha / 2.0)
        rel = np.where(p1 > 0, diff / p1, np.nan)
        # Delta method on p2/p1: Var ≈ (p2/p1)² (Var p1 / p1² + Var p2 / p2²)
        ratio = p2 / p1
        rel_se = np.abs(ratio) * np.sqrt(
            (1.0 - p1) / (n1 * p1) + np.where(p2 > 0, (1.0 - p2) / (n2 * p2), 0.0)
        )
        rel_se = np.where(p1 > 0, rel_se, np.nan)
    return ProportionTest(
        *(
            _scalar_or_array(v)
            for v in (p1, p2, diff, rel, z, p, se, diff - zc * se, diff + zc * se, rel - zc * rel_se, rel + zc * rel_se)
        )
    )


#: Below this many events (clicks or conversions) in either arm the relative-lift interval is withheld.
MIN_EVENTS_FOR_LIFT_CI = 10


@dataclass(frozen=True)
class ClusteredRatioTest:
    """Treatment (2) against control (1) on a ratio metric (events / impressions) with per-user
    (clustered, delta-method) variances: a user's impressions are not independent of each other."""

    p_control: float
    p_treatment: float
    diff: float  # p_treatment - p_control
    rel_lift: float  # diff / p_control (nan when p_control = 0)
    z: float  # diff / clustered SE
    p_value: float  # two-sided
    se: float  # clustered SE of diff
    ci_low: float
    ci_high: float
    rel_ci_low: float  # log-ratio interval of the relative lift (nan below MIN_EVENTS_FOR_LIFT_CI events)
    rel_ci_high: float
    design_effect_control: float  # clustered variance / binomial variance (nan when undefined)
    design_effect_treatment: float


def _ratio_var(x: np.ndarray, n: np.ndarray) -> tuple[float, float, float]:
    """(ratio, delta-method variance of sum x / sum n over users, binomial variance) of one arm."""
    x, n = np.asarray(x, np.float64), np.asarray(n, np.float64)
    users = x.size
    total = float(n.sum())
    if users < 2 or total <= 0:
        return math.nan, math.nan, math.nan
    r = float(x.sum()) / total
    resid = x - r * n
    var = users * float(resid @ resid) / (users - 1) / (total * total)
    return r, var, r * (1.0 - r) / total


def clustered_ratio_test(x1, n1, x2, n2, alpha: float = 0.05) -> ClusteredRatioTest:
    """z-test and CI of r2 - r1, r = sum_u x_u / sum_u n_u, with the delta-method variance over users
    (``x``/``n``: per-user events and impressions of each arm), and a log-ratio interval of r2 / r1 - 1:
    ``exp(log(r2/r1) +- z sqrt(V1/r1^2 + V2/r2^2)) - 1``, withheld (nan) while either arm has fewer than
    :data:`MIN_EVENTS_FOR_LIFT_CI` events (the delta-method interval on the ratio itself under-covered:
    83% at ~3 expected events)."""
    r1, v1, b1 = _ratio_var(x1, n1)
    r2, v2, b2 = _ratio_var(x2, n2)
    diff = r2 - r1
    se = math.sqrt(v1 + v2) if v1 + v2 >= 0 else math.nan
    zc = -norm_ppf(alpha / 2.0)
    z = diff / se if se > 0 else math.nan
    p = 2.0 * float(norm_sf(abs(z))) if not math.isnan(z) else math.nan
    rel = diff / r1 if r1 > 0 else math.nan
    e1, e2 = float(np.sum(x1)), float(np.sum(x2))
    rel_lo = rel_hi = math.nan
    if min(e1, e2) >= MIN_EVENTS_FOR_LIFT_CI and r1 > 0 and r2 > 0:
        log_se = math.sqrt(v1 / r1**2 + v2 / r2**2)
        centre = math.log(r2 / r1)
        rel_lo, rel_hi = math.expm1(centre - zc * log_se), math.expm1(centre + zc * log_se)
    return ClusteredRatioTest(
        r1, r2, diff, rel, z, p, se, diff - zc * se, diff + zc * se, rel_lo, rel_hi,
        v1 / b1 if b1 > 0 else math.nan, v2 / b2 if b2 > 0 else math.nan,
    )


@dataclass(frozen=True)
class CupedTest:
    """A CUPED-adjusted comparison of treatment (2) against control (1), beside the unadjusted one."""

    diff: float  # adjusted difference (the unadjusted minus theta times the arms' pre-period difference)
    se: float
    ci_low: float
    ci_high: float
    statistic: float  # z (ratio metrics) or Welch t (means)
    df: float  # Welch-Satterthwaite df (means; inf for ratio metrics)
    p_value: float
    theta: float  # cov(Y, X) / var(X), pooled over the arms
    se_unadjusted: float  # the same test's SE without the adjustment
    variance_reduction: float  # 1 - se² / se_unadjusted² (the share of the variance CUPED removed)


def _nan_cuped(diff: float, se_unadj: float = math.nan) -> CupedTest:
    nan = math.nan
    return CupedTest(diff, nan, nan, nan, nan, nan, nan, nan, se_unadj, nan)


def _linearized_ratio(y: np.ndarray, n: np.ndarray) -> tuple[float, np.ndarray] | None:
    """(sum y / sum n, per-user (y - r n) / mean n): the ratio's delta-method influence values, whose
    mean's variance is the ratio's (:func:`_ratio_var`)."""
    total = float(n.sum())
    if y.size < 2 or total <= 0:
        return None
    r = float(y.sum()) / total
    return r, (y - r * n) / (total / y.size)


def cuped_ratio_test(y1, n1, x1, m1, y2, n2, x2, m2, alpha: float = 0.05) -> CupedTest:
    """CUPED for a ratio metric r = sum_u y_u / sum_u n_u (CTR: clicks / impressions), per user:
    ``y``/``n`` in the experiment, ``x``/``m`` the same two counts in the user's pre-period.

    Each arm's ratio and pre-period ratio are linearized (delta method): ℓ_u = (y_u - r n_u) / n̄ and
    k_u = (x_u - r_x m_u) / m̄, so that r̂ - r ≈ mean ℓ and r̂_x - r_x ≈ mean k. With
    θ = Σ ℓk / Σ k² pooled over both arms (ℓ and k have mean 0 within each arm), the adjusted
    difference is (r₂ - r₁) - θ (r_x₂ - r_x₁), with variance Σ_arms var(ℓ - θk) / N (a z-test).
    The pre-period is independent of the arm, so the adjustment removes variance without bias.
    With no pre-period impressions in an arm there is nothing to adjust with: the result is the
    unadjusted test (θ = 0, no variance reduction)."""
    arrays = [np.asarray(v, np.float64) for v in (y1, n1, x1, m1, y2, n2, x2, m2)]
    y1, n1, x1, m1, y2, n2, x2, m2 = arrays
    a1, a2 = _linearized_ratio(y1, n1), _linearized_ratio(y2, n2)
    if a1 is None or a2 is None:
        return _nan_cuped(math.nan)
    (r1, l1), (r2, l2) = a1, a2
    diff = r2 - r1
    se_unadj = math.sqrt(float(l1.var(ddof=1)) / l1.size + float(l2.var(ddof=1)) / l2.size)
    p1, p2 = _linearized_ratio(x1, m1), _linearized_ratio(x2, m2)
    if p1 is None or p2 is None:
        k1, k2, rx1, rx2 = np.zeros_like(l1), np.zeros_like(l2), 0.0, 0.0
    else:
        (rx1, k1), (rx2, k2) = p1, p2
    kk = float(k1 @ k1 + k2 @ k2)
    theta = float(l1 @ k1 + l2 @ k2) / kk if kk > 0 else 0.0
    adj = diff - theta * (rx2 - rx1)
    e1, e2 = l1 - theta * k1, l2 - theta * k2
    var = float(e1.var(ddof=1)) / e1.size + float(e2.var(ddof=1)) / e2.size
    se = math.sqrt(var)
    if not se > 0:
        return CupedTest(adj, se, math.nan, math.nan, math.nan, math.inf, math.nan, theta, se_unadj, math.nan)
    zc = -norm_ppf(alpha / 2.0)
    z = adj / se
    p = 2.0 * float(norm_sf(abs(z)))
    vr = 1.0 - var / se_unadj**2 if se_unadj > 0 else math.nan
    return CupedTest(adj, se, adj - zc * se, adj + zc * se, z, math.inf, p, theta, se_unadj, vr)


def cuped_mean_test(y1, x1, y2, x2, alpha: float = 0.05) -> CupedTest:
    """CUPED for a mean over users (value per user): Y_adj = Y - θ (X - mean X), θ = cov(Y, X) / var(X)
    pooled over the arms (within-arm centred), then Welch's t-test on the adjusted values. ``x`` is
    each user's value in the pre-period."""
    y1, x1, y2, x2 = (np.asarray(v, np.float64) for v in (y1, x1, y2, x2))
    if y1.size < 2 or y2.size < 2:
        return _nan_cuped(float(y2.mean() - y1.mean()) if y1.size and y2.size else math.nan)
    c1, c2 = x1 - x1.mean(), x2 - x2.mean()
    kk = float(c1 @ c1 + c2 @ c2)
    theta = float((y1 - y1.mean()) @ c1 + (y2 - y2.mean()) @ c2) / kk if kk > 0 else 0.0
    centre = float(np.concatenate([x1, x2]).mean())
    w0 = welch_ttest(y1, y2, alpha)
    w = welch_ttest(y1 - theta * (x1 - centre), y2 - theta * (x2 - centre), alpha)
    vr = 1.0 - w.se**2 / w0.se**2 if w0.se > 0 and math.isfinite(w.se) else math.nan
    return CupedTest(w.diff, w.se, w.ci_low, w.ci_high, w.t, w.df, w.p_value, theta, w0.se, vr)


@dataclass(frozen=True)
class MeanTest:
    """Welch's t-test of treatment mean (2) against control mean (1)."""

    mean_control: float
    mean_treatment: float
    diff: float  # mean_treatment - mean_control
    rel_lift: float  # diff / mean_control (nan when mean_control = 0)
    t: float
    df: float  # Welch–Satterthwaite
    p_value: float  # two-sided
    se: float
    ci_low: float
    ci_high: float


def welch_ttest_from_stats(
    mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int, alpha: float = 0.05
) -> MeanTest:
    """Welch's t-test from summary statistics (``var`` = sample variance, ddof = 1).

    df = (v1/n1 + v2/n2)² / ((v1/n1)²/(n1-1) + (v2/n2)²/(n2-1)). With fewer than
    two observations in an arm, or no variance in either, p-value and CI are nan.
    """
    nan = math.nan
    rel = (mean2 - mean1) / mean1 if mean1 != 0 else nan
    diff = mean2 - mean1
    if n1 < 2 or n2 < 2:
        return MeanTest(mean1, mean2, diff, rel, nan, nan, nan, nan, nan, nan)
    a, b = var1 / n1, var2 / n2
    se2 = a + b
    if not se2 > 0:
        return MeanTest(mean1, mean2, diff, rel, nan, nan, nan, 0.0, nan, nan)
    se = math.sqrt(se2)
    df = se2 * se2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    t = diff / se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    tc = t_isf(alpha / 2.0, df)
    return MeanTest(mean1, mean2, diff, rel, t, df, p, se, diff - tc * se, diff + tc * se)


def welch_ttest(control: np.ndarray, treatment: np.ndarray, alpha: float = 0.05) -> MeanTest:
    """Welch's t-test on two samples (two-pass variances)."""
    c = np.asarray(control, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    v1 = float(c.var(ddof=1)) if c.size > 1 else math.nan
    v2 = float(t.var(ddof=1)) if t.size > 1 else math.nan
    m1 = float(c.mean()) if c.size else math.nan
    m2 = float(t.mean()) if t.size else math.nan
    return welch_ttest_from_stats(m1, v1, c.size, m2, v2, t.size, alpha)


@dataclass(frozen=True)
class SRMTest:
    """Chi-square goodness of fit of observed counts against expected shares."""

    observed: tuple[int, ...]
    expected: tuple[float, ...]
    chi2: float
    df: int
    p_value: float
    flagged: bool  # p_value < SRM_ALPHA


def srm_test(observed: Sequence[int], shares: Sequence[float], threshold: float = SRM_ALPHA) -> SRMTest:
    """Sample ratio mismatch: is ``observed`` consistent with the configured ``shares``?"""
    obs = np.asarray(observed, dtype=np.float64)
    sh = np.asarray(shares, dtype=np.float64)
    if obs.shape != sh.shape or obs.ndim != 1:
        raise ValueError("observed and shares must be 1-D and of equal length")
    if np.any(sh <= 0):
        raise ValueError("every share must be positive")
    total = float(obs.sum())
    expected = total * sh / sh.sum()
    df = obs.size - 1
    if total <= 0 or df < 1:
        return SRMTest(tuple(int(v) for v in obs), tuple(expected.tolist()), 0.0, df, 1.0, False)
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    p = chi2_sf(chi2, df)
    return SRMTest(tuple(int(v) for v in obs), tuple(expected.tolist()), chi2, df, p, p < threshold)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as the input; nan stays nan, not counted).

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)).
    Controls the family-wise error rate under any dependence.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


# --------------------------------------------------------------------------- sequential


@dataclass(frozen=True)
class SequentialTest:
    """Always-valid inference over a sequence of looks (last axis)."""

    p_value: np.ndarray  # always-valid p-value after each look (running minimum)
    cs_low: np.ndarray  # confidence sequence (running intersection)
    cs_high: np.ndarray


def msprt(
    diff,
    var_null,
    var_alt,
    c,
    tau: float = 0.01,
    alpha: float = 0.05,
    usable=True,
) -> SequentialTest:
    """Normal-mixture SPRT for a difference of two means, evaluated at each look.

    Johari et al. (2017): with the estimate θ̂ ~ N(θ, V) and a N(0, τ²) mixture on θ,
    the mixture likelihood ratio against θ = 0 is

        Λ = sqrt(V / (V + τ²)) · exp( τ² θ̂² / (2 V (V + τ²)) ).

    Its running maximum is an e-process; ``p = min(1, min_k 1/Λ_k)`` is a p-value
    valid at any (data-dependent) stopping time, and inverting Λ(θ̂ - θ) < 1/α
    gives the confidence sequence

        θ̂ ± sqrt( V (V + τ²)/τ² · (2 log(1/α) + log((V + τ²)/V)) ),

    intersected over looks.

    The mixing SD is set on the standardized scale: τ² = ``tau``² · σ², with
    σ² = V / c the per-observation variance and c = 1/n1 + 1/n2, so the ratio
    r = V/(V + τ²) = c/(c + tau²) depends only on the sample sizes. ``tau`` is the
    anticipated effect in standard deviations of one observation (0.01 ≈ a 5%
    relative lift on a 5% CTR); the guarantee holds for any fixed ``tau``, which
    only trades early power for late power. σ² is a plug-in estimate (the normal
    approximation, as in the paper's binary-data experiments): ``var_null`` (the
    pooled variance of θ̂ under H0) for the p-value and ``var_alt`` (unpooled)
    for the confidence sequence.

    Arguments are arrays over looks on the last axis (cumulative statistics).
    Looks where ``usable`` is false (too little data for the normal
    approximation: a plug-in variance from a handful of events could exclude
    the truth and the running intersection would never recover) and looks with
    undefined statistics contribute p = 1 and an unbounded interval.
    """
    diff, var_null, var_alt, c = (np.asarray(v, dtype=np.float64) for v in (diff, var_null, var_alt, c))
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    with np.errstate(divide="ignore", invalid="ignore"):
        r = c / (c + tau * tau)
        z2 = diff * diff / var_null
        log_inv_lambda = -0.5 * np.log(r) - 0.5 * z2 * (1.0 - r)
        usable = np.asarray(usable, dtype=bool) & (var_null > 0) & np.isfinite(log_inv_lambda)
        p_look = np.where(usable, np.exp(np.minimum(log_inv_lambda, 0.0)), 1.0)
        half = np.sqrt(var_alt * (2.0 * math.log(1.0 / alpha) - np.log(r)) / (1.0 - r))
        ok = usable & (var_alt > 0) & np.isfinite(half) & np.isfinite(diff)
        lo = np.where(ok, diff - half, -np.inf)
        hi = np.where(ok, diff + half, np.inf)
    p_value = np.minimum.accumulate(np.minimum(p_look, 1.0), axis=-1)
    return SequentialTest(p_value, np.maximum.accumulate(lo, axis=-1), np.minimum.accumulate(hi, axis=-1))


def msprt_two_proportions(
    x1, n1, x2, n2, tau: float = 0.01, alpha: float = 0.05, min_expected: float = 5.0
) -> SequentialTest:
    """:func:`msprt` for p2 - p1 from cumulative counts at each look (last axis).

    A look is used once each arm expects at least ``min_expected`` successes and
    failures at the pooled rate (the usual rule for the normal approximation).
    """
    x1, n1, x2, n2 = (np.asarray(v, dtype=np.float64) for v in (x1, n1, x2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = x1 / n1, x2 / n2
        c = 1.0 / n1 + 1.0 / n2
        pooled = (x1 + x2) / (n1 + n2)
        var_null = pooled * (1.0 - pooled) * c
        var_alt = p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2
        n_min = np.minimum(n1, n2)
        usable = (n_min * pooled >= min_expected) & (n_min * (1.0 - pooled) >= min_expected)
    return msprt(p2 - p1, var_null, var_alt, c, tau=tau, alpha=alpha, usable=usable)


def clustered_ratio_variance(x, n, xx, nn, xn, users, rate=None):
    """The delta-method (user-clustered) variance of ``x / n`` from running sums over users —
    Σx, Σn, Σx², Σn², Σxn and the number of users (arrays broadcast, e.g. over daily looks):
    ``N / (N - 1) · Σ_u (x_u - r n_u)² / n²`` with ``r`` = ``rate`` (default: x / n itself; pass the
    pooled rate for the variance under H0). Matches :func:`clustered_ratio_test`'s."""
    x, n, xx, nn, xn, users = (np.asarray(v, dtype=np.float64) for v in (x, n, xx, nn, xn, users))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = x / n if rate is None else np.asarray(rate, dtype=np.float64)
        resid_sq = np.maximum(xx - 2.0 * r * xn + r * r * nn, 0.0)
        return np.where(users > 1, users / (users - 1.0) * resid_sq / (n * n), np.nan)


def msprt_clustered_ratio(
    control, treatment, tau: float = 0.01, alpha: float = 0.05, min_expected: float = 5.0, min_users: int = 30
) -> SequentialTest:
    """:func:`msprt` for r2 - r1 of a ratio metric (events / impressions) with user-clustered variances.

    ``control`` and ``treatment`` map ``"x"``, ``"n"``, ``"xx"``, ``"nn"``, ``"xn"``, ``"users"`` to the
    cumulative sums over users at each look (last axis): events, impressions, Σ events_u², Σ impressions_u²,
    Σ events_u · impressions_u, users. A returning user's impressions are correlated, so the variance of
    each arm's ratio is the delta method's over users (:func:`clustered_ratio_variance`): at the pooled rate
    for the p-value (H0), at each arm's own for the confidence sequence. The mixing scale stays on
    impressions (``c = 1/n1 + 1/n2``, so ``tau`` means what it means in :func:`msprt_two_proportions`).
    A look is used once each arm expects ``min_expected`` events and non-events at the pooled rate and has
    ``min_users`` users (a clustered variance from a handful of users is itself too noisy to plug in).
    """
    a = {k: np.asarray(control[k], dtype=np.float64) for k in ("x", "n", "xx", "nn", "xn", "users")}
    b = {k: np.asarray(treatment[k], dtype=np.float64) for k in ("x", "n", "xx", "nn", "xn", "users")}
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = a["x"] / a["n"], b["x"] / b["n"]
        pooled = (a["x"] + b["x"]) / (a["n"] + b["n"])
        var_null = (clustered_ratio_variance(**a, rate=pooled) + clustered_ratio_variance(**b, rate=pooled))
        var_alt = clustered_ratio_variance(**a) + clustered_ratio_variance(**b)
        c = 1.0 / a["n"] + 1.0 / b["n"]
        n_min = np.minimum(a["n"], b["n"])
        usable = ((n_min * pooled >= min_expected) & (n_min * (1.0 - pooled) >= min_expected)
                  & (np.minimum(a["users"], b["users"]) >= min_users))
    return msprt(p2 - p1, var_null, var_alt, c, tau=tau, alpha=alpha, usable=usable)


def _cuped_ratio_moments(a: dict[str, np.ndarray]):
    """Per arm, from running sums over users: (r, r_x, Σℓℓ, Σℓk, Σkk, users) of the linearised ratio ℓ and
    pre-period ratio k of :func:`cuped_ratio_test` (r_x = 0, Σℓk = Σkk = 0 without pre-period impressions)."""
    users, y, n, x, m = a["users"], a["y"], a["n"], a["x"], a["m"]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = y / n
        n_bar = n / users
        ll = (a["yy"] - 2.0 * r * a["yn"] + r * r * a["nn"]) / (n_bar * n_bar)
        has_pre = m > 0
        rx = np.where(has_pre, x / np.where(has_pre, m, 1.0), 0.0)
        m_bar = np.where(has_pre, m / users, 1.0)
        lk = np.where(has_pre, (a["yx"] - rx * a["ym"] - r * a["nx"] + r * rx * a["nm"]) / (n_bar * m_bar), 0.0)
        kk = np.where(has_pre, (a["xx"] - 2.0 * rx * a["xm"] + rx * rx * a["mm"]) / (m_bar * m_bar), 0.0)
    return r, rx, ll, lk, kk, users


def msprt_cuped_ratio(
    control, treatment, tau: float = 0.01, alpha: float = 0.05, min_expected: float = 5.0, min_users: int = 30
) -> SequentialTest:
    """:func:`msprt` on the CUPED-adjusted difference of a ratio metric at each look (last axis).

    ``control`` / ``treatment`` map to cumulative sums over users at each look: ``users``; ``y``, ``n`` (events,
    impressions); ``x``, ``m`` (the same in the users' pre-periods); ``yy``, ``nn``, ``yn``, ``xx``, ``mm``,
    ``xm``, ``yx``, ``ym``, ``nx``, ``nm`` (Σ of the products over users). At each look θ, the adjusted
    difference and its variance are :func:`cuped_ratio_test`'s (the same linearisation, from the sums), so
    the last look reproduces the fixed-horizon adjusted difference; the variance is the adjusted one under
    both hypotheses (the adjustment is not defined at a pooled rate). Looks are used as in
    :func:`msprt_clustered_ratio`."""
    a = {k: np.asarray(v, dtype=np.float64) for k, v in control.items()}
    b = {k: np.asarray(v, dtype=np.float64) for k, v in treatment.items()}
    r1, rx1, ll1, lk1, kk1, u1 = _cuped_ratio_moments(a)
    r2, rx2, ll2, lk2, kk2, u2 = _cuped_ratio_moments(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        both = (a["m"] > 0) & (b["m"] > 0)
        kk = kk1 + kk2
        theta = np.where(both & (kk > 0), (lk1 + lk2) / np.where(kk > 0, kk, 1.0), 0.0)
        diff = (r2 - r1) - theta * (rx2 - rx1)
        var = ((ll1 - 2 * theta * lk1 + theta**2 * kk1) / (u1 * (u1 - 1))
               + (ll2 - 2 * theta * lk2 + theta**2 * kk2) / (u2 * (u2 - 1)))
        var = np.maximum(var, 0.0)
        c = 1.0 / a["n"] + 1.0 / b["n"]
        pooled = (a["y"] + b["y"]) / (a["n"] + b["n"])
        n_min = np.minimum(a["n"], b["n"])
        usable = ((n_min * pooled >= min_expected) & (n_min * (1.0 - pooled) >= min_expected)
                  & (np.minimum(u1, u2) >= min_users))
    return msprt(diff, var, var, c, tau=tau, alpha=alpha, usable=usable)


def msprt_cuped_mean(control, treatment, tau: float = 0.03, alpha: float = 0.05, min_users: int = 30) -> SequentialTest:
    """:func:`msprt` on the CUPED-adjusted difference of a per-user mean at each look: ``users``, ``y``, ``yy``
    (Σ value, Σ value²), ``x``, ``xx`` (the same for the pre-period value) and ``yx`` (Σ value · pre value);
    θ pooled over the arms (within-arm centred), as :func:`cuped_mean_test`."""
    a = {k: np.asarray(v, dtype=np.float64) for k, v in control.items()}
    b = {k: np.asarray(v, dtype=np.float64) for k, v in treatment.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        def centred(d):
            u = d["users"]
            return (u, d["y"] / u, d["x"] / u, d["yy"] - d["y"] ** 2 / u, d["yx"] - d["y"] * d["x"] / u,
                    np.maximum(d["xx"] - d["x"] ** 2 / u, 0.0))
        u1, my1, mx1, syy1, syx1, sxx1 = centred(a)
        u2, my2, mx2, syy2, syx2, sxx2 = centred(b)
        sxx = sxx1 + sxx2
        theta = np.where(sxx > 0, (syx1 + syx2) / np.where(sxx > 0, sxx, 1.0), 0.0)
        diff = (my2 - my1) - theta * (mx2 - mx1)
        v1 = np.maximum(syy1 - 2 * theta * syx1 + theta**2 * sxx1, 0.0) / (u1 - 1)
        v2 = np.maximum(syy2 - 2 * theta * syx2 + theta**2 * sxx2, 0.0) / (u2 - 1)
        var = v1 / u1 + v2 / u2
        c = 1.0 / u1 + 1.0 / u2
        usable = (np.minimum(u1, u2) >= min_users) & (v1 > 0) & (v2 > 0)
    return msprt(diff, var, var, c, tau=tau, alpha=alpha, usable=usable)
