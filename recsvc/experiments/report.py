"""Experiment reports: per-variant metrics, tests against the control, SRM, sequential p-values.

For every experiment in the :class:`ExperimentSet` (or the one asked for):

1. **Sample ratio mismatch** first: a chi-square goodness-of-fit test of the
   distinct users per variant against the configured shares. p < 0.001 flags
   the experiment — a broken split (a bug in assignment, logging or filtering)
   invalidates every other number, so it is shown before them.
2. Per-variant summaries: users, slates, impressions, clicks, conversions,
   value, CTR, conversion rate, value per user, coverage, exposure Gini,
   diversity, novelty.
3. Each non-control variant against the control (the first declared variant),
   on three metrics:

   * ``ctr`` = clicks / impressions and ``conversion_rate`` = conversions /
     impressions: two-proportion z-test (pooled SE for the test, unpooled SE for
     the CI; see :mod:`recsvc.experiments.stats`) with user-clustered
     (delta-method) variances, since a returning user's impressions are not
     independent; the relative lift's interval is a log-ratio interval, withheld
     below ``MIN_EVENTS_FOR_LIFT_CI`` events per arm. The report gives each arm's
     design effect (clustered ÷ binomial variance) and notes it above 2;
   * ``value_per_user``: Welch's t-test over users (users with no value count as 0).

   Each comparison is also given **CUPED-adjusted** (Deng et al. 2013): the same metric over the
   users' pre-periods (their activity in the ``experiments.cuped_pre_days`` days before their first
   exposure; see :mod:`recsvc.experiments.aggregates`) as the covariate, θ pooled over the arms; rates
   through the delta method's linearization. The report shows the adjusted difference, its CI and
   p-value (Holm-adjusted as a family of their own) beside the unadjusted ones, and the variance
   reduction achieved (1 - adjusted ÷ unadjusted variance of the difference). Decide before the
   experiment which of the two is the primary analysis; both are valid.

   Fixed-horizon p-values are Holm-adjusted across all (variant × metric)
   comparisons of the experiment — always, since there are three metrics; with
   one comparison Holm is the identity. ``significant`` uses the adjusted p.
4. **Always-valid** p-values and confidence sequences (mSPRT, Johari et al. 2017)
   for the same differences, computed over the daily cumulative series (each day
   is a look; the p-value is the running minimum), also Holm-adjusted; rates with
   the same user-clustered variances (from the series' per-user sums of squares
   and cross products), so returning users keep an A/A test at alpha here too. Unlike the
   fixed-horizon p-value these stay valid however often the report is read.
5. Warnings: too little data (impressions, users, expected events per arm),
   missing impression events, clustered impressions, SRM, variants with data
   but no definition, experiments not running.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from recsvc.evaluation.metrics import gini
from recsvc.experiments.aggregates import DAY_MS, TOTAL_FIELDS, ArmData, ExperimentAggregates
from recsvc.experiments.assignment import Experiment, ExperimentSet
from recsvc.experiments.stats import (
    SRM_ALPHA,
    cuped_mean_test,
    cuped_ratio_test,
    holm,
    msprt,
    MIN_EVENTS_FOR_LIFT_CI,
    clustered_ratio_test,
    clustered_ratio_variance,
    msprt_clustered_ratio,
    msprt_cuped_mean,
    msprt_cuped_ratio,
    srm_test,
    two_proportion_ztest,
    welch_ttest,
    welch_ttest_from_stats,
)

__all__ = [
    "DEFAULT_SEQUENTIAL_TAU",
    "METRICS",
    "ArmSummary",
    "Comparison",
    "ExperimentReport",
    "Report",
    "SRMSummary",
    "plot_report",
    "report",
    "report_to_dict",
    "report_to_text",
]

#: Metrics compared against the control, in report order.
METRICS = ("ctr", "conversion_rate", "value_per_user")
_RATE_NUMERATOR = {"ctr": "clicks", "conversion_rate": "conversions"}
#: The daily-series fields of a rate's user-level sums: Σ x_u², Σ x_u · impressions_u.
_RATE_MOMENTS = {"clicks": ("clicks_sq", "clicks_x_impressions"),
                 "conversions": ("conversions_sq", "conversions_x_impressions")}
_MIN_USERS_SEQUENTIAL = 30  # per arm, before a look at value_per_user counts

#: mSPRT mixing SD per metric, in standard deviations of one observation (an impression for
#: rates, a user for value per user); see :func:`recsvc.experiments.stats.msprt`. The confidence
#: sequence is narrowest around n ≈ 11 / tau² observations per arm and widens only
#: logarithmically after, so 0.01 suits rates (~100k impressions per arm; 0.01 SD ≈ a 4% lift on
#: a 5% CTR) and 0.03 per-user metrics (~12k users per arm).
DEFAULT_SEQUENTIAL_TAU: dict[str, float] = {"ctr": 0.01, "conversion_rate": 0.01, "value_per_user": 0.03}
_DESIGN_EFFECT_WARNING = 2.0


@dataclass(frozen=True)
class SRMSummary:
    variants: tuple[str, ...]
    users: tuple[int, ...]
    expected_shares: tuple[float, ...]
    chi2: float
    df: int
    p_value: float
    flagged: bool  # p_value < 0.001


@dataclass(frozen=True)
class ArmSummary:
    variant: str
    share: float  # configured share of users
    users: int
    slates: int
    impressions: int
    clicks: int
    conversions: int
    value: float
    ctr: float | None
    conversion_rate: float | None
    value_per_user: float | None
    clicks_per_user: float | None
    ctr_design_effect: float | None  # user-clustered variance / binomial variance of CTR
    pre_period_days: int  # CUPED pre-period length (0: not collected)
    users_with_pre_period: int  # users with any activity (impressions or value) in their pre-period
    items_covered: int  # distinct items served
    catalog_coverage: float | None  # items_covered / n_items (when n_items is known)
    exposure_gini: float | None  # over the catalog when n_items is known, else over served items
    mean_diversity: float | None
    mean_novelty: float | None


@dataclass(frozen=True)
class Comparison:
    metric: str
    variant: str
    test: str  # "clustered ratio z" | "welch t"
    control_value: float | None
    treatment_value: float | None
    diff: float | None  # treatment - control
    rel_lift: float | None  # diff / control
    rel_ci_low: float | None  # CI of the relative lift (rates: log-ratio, None below MIN_EVENTS_FOR_LIFT_CI events)
    rel_ci_high: float | None
    ci_low: float | None  # fixed-horizon CI of diff at 1 - alpha (rates: user-clustered delta-method SE)
    ci_high: float | None
    statistic: float | None  # z or t
    df: float | None  # Welch–Satterthwaite df (t-test only)
    p_value: float | None
    p_holm: float | None
    significant: bool  # p_holm < alpha
    always_valid_p: float | None
    always_valid_p_holm: float | None
    cs_low: float | None  # confidence sequence of diff at 1 - alpha
    cs_high: float | None
    sequential_significant: bool  # always_valid_p_holm < alpha
    # CUPED: the same comparison adjusted with the users' pre-period values (None when not computable)
    cuped_diff: float | None = None
    cuped_rel_lift: float | None = None  # cuped_diff / control_value
    cuped_ci_low: float | None = None
    cuped_ci_high: float | None = None
    cuped_p_value: float | None = None
    cuped_p_holm: float | None = None  # Holm over the experiment's CUPED comparisons
    cuped_significant: bool = False
    cuped_theta: float | None = None
    variance_reduction: float | None = None  # 1 - Var(adjusted diff) / Var(unadjusted diff)
    cuped_always_valid_p: float | None = None  # mSPRT on the adjusted difference at each daily look
    cuped_always_valid_p_holm: float | None = None
    cuped_cs_low: float | None = None
    cuped_cs_high: float | None = None
    cuped_sequential_significant: bool = False


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    control: str
    status: str  # "running" | "scheduled" | "ended"
    start_ms: int | None
    stop_ms: int | None
    srm: SRMSummary | None  # None with a single variant or no users
    arms: tuple[ArmSummary, ...]
    comparisons: tuple[Comparison, ...]
    looks: int  # days in the sequential series
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    generated_at_ms: int
    alpha: float
    sequential_tau: dict[str, float]  # mSPRT mixing SD per metric
    experiments: tuple[ExperimentReport, ...]

    @property
    def srm_flagged(self) -> tuple[str, ...]:
        return tuple(e.experiment for e in self.experiments if e.srm is not None and e.srm.flagged)


# --------------------------------------------------------------------------- building


def report(
    aggregates: ExperimentAggregates,
    experiments: ExperimentSet,
    *,
    now_ms: int,
    experiment: str | None = None,
    alpha: float = 0.05,
    n_items: int | None = None,
    sequential_tau: float | Mapping[str, float] | None = None,
    min_impressions: int = 1000,
    min_users: int = 100,
    min_expected_events: float = 10.0,
) -> Report:
    """Build the report of every defined experiment (or just ``experiment``).

    ``n_items`` (catalog size) enables catalog coverage and a catalog-wide exposure Gini.
    ``sequential_tau`` is the mSPRT mixing SD in per-observation standard deviations, one
    number for every metric or a per-metric mapping (default :data:`DEFAULT_SEQUENTIAL_TAU`);
    fix it before the experiment starts, like alpha.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    tau = _taus(sequential_tau)
    chosen = [experiments.get(experiment)] if experiment is not None else list(experiments)
    out = [
        _experiment_report(
            aggregates, exp, now_ms, alpha, n_items, tau, min_impressions, min_users, min_expected_events
        )
        for exp in chosen
    ]
    return Report(int(now_ms), alpha, tau, tuple(out))


def _taus(sequential_tau: float | Mapping[str, float] | None) -> dict[str, float]:
    if sequential_tau is None:
        taus = dict(DEFAULT_SEQUENTIAL_TAU)
    elif isinstance(sequential_tau, Mapping):
        unknown = set(sequential_tau) - set(METRICS)
        if unknown:
            raise ValueError(f"sequential_tau: unknown metric(s) {sorted(unknown)}; metrics are {', '.join(METRICS)}")
        taus = {**DEFAULT_SEQUENTIAL_TAU, **{k: float(v) for k, v in sequential_tau.items()}}
    else:
        taus = {m: float(sequential_tau) for m in METRICS}
    for m, t in taus.items():
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"sequential_tau[{m!r}] must be a positive number, got {t}")
    return taus


def _experiment_report(
    aggregates: ExperimentAggregates,
    exp: Experiment,
    now_ms: int,
    alpha: float,
    n_items: int | None,
    tau: dict[str, float],
    min_impressions: int,
    min_users: int,
    min_expected_events: float,
) -> ExperimentReport:
    warnings: list[str] = []
    names = [v.name for v in exp.variants]
    data = {v: aggregates.arm_data(exp.name, v) for v in names}
    for extra in aggregates.variants(exp.name):
        if extra not in data:
            warnings.append(f"variant {extra!r} has data but is no longer defined; it is left out")

    if exp.start_ms is not None and now_ms < exp.start_ms:
        status = "scheduled"
    elif exp.stop_ms is not None and now_ms >= exp.stop_ms:
        status = "ended"
    else:
        status = "running"

    # 1. SRM
    users = [int(data[v].totals["users"]) for v in names]
    srm = None
    if len(names) > 1 and sum(users) > 0:
        t = srm_test(users, exp.shares)
        srm = SRMSummary(tuple(names), tuple(users), exp.shares, t.chi2, t.df, t.p_value, t.flagged)
        if t.flagged:
            warnings.insert(
                0,
                f"SAMPLE RATIO MISMATCH (p = {t.p_value:.2g} < {SRM_ALPHA:g}): users per variant do not match "
                "the configured split; find the cause before trusting any result",
            )

    # 2. arms
    arms = tuple(_arm_summary(data[v.name], v.share, n_items) for v in exp.variants)

    # 3 + 4. comparisons
    days, aligned = _aligned([data[v] for v in names])
    control = names[0]
    rows: list[dict[str, Any]] = []
    for j, variant in enumerate(names[1:], start=1):
        c, t = data[control], data[variant]
        for metric in METRICS:
            rows.append(_compare(metric, variant, c, t, aligned[0], aligned[j], alpha, tau[metric]))
    p_holm = holm([_nan(r["p_value"]) for r in rows])
    av_holm = holm([_nan(r["always_valid_p"]) for r in rows])
    cuped_holm = holm([_nan(r.get("cuped_p_value")) for r in rows])
    cuped_av_holm = holm([_nan(r.get("cuped_always_valid_p")) for r in rows])
    comparisons = tuple(
        Comparison(
            **r,
            p_holm=_none(p_holm[i]),
            significant=bool(p_holm[i] < alpha),
            always_valid_p_holm=_none(av_holm[i]),
            sequential_significant=bool(av_holm[i] < alpha),
            cuped_p_holm=_none(cuped_holm[i]),
            cuped_significant=bool(cuped_holm[i] < alpha),
            cuped_always_valid_p_holm=_none(cuped_av_holm[i]),
            cuped_sequential_significant=bool(cuped_av_holm[i] < alpha),
        )
        for i, r in enumerate(rows)
    )

    # 5. warnings
    if status != "running":
        warnings.append(f"experiment is {status} (not assigning users now)")
    total_impr = sum(a.impressions for a in arms)
    pooled_ctr = sum(a.clicks for a in arms) / total_impr if total_impr else 0.0
    pooled_cvr = sum(a.conversions for a in arms) / total_impr if total_impr else 0.0
    if total_impr == 0 and any(a.slates for a in arms):
        warnings.append("no impression events recorded: rates need callers to send IMPRESSION feedback")
    for a in arms:
        low = []
        if a.users < min_users:
            low.append(f"{a.users} users < {min_users}")
        if a.impressions < min_impressions:
            low.append(f"{a.impressions} impressions < {min_impressions}")
        if a.impressions and a.impressions * pooled_ctr < min_expected_events:
            low.append(f"{a.impressions * pooled_ctr:.1f} expected clicks < {min_expected_events:g}")
        if a.impressions and pooled_cvr > 0 and a.impressions * pooled_cvr < min_expected_events:
            low.append(f"{a.impressions * pooled_cvr:.1f} expected conversions < {min_expected_events:g}")
        if low:
            warnings.append(f"too little data in {a.variant!r} for reliable tests: " + "; ".join(low))
        if a.clicks > a.impressions or a.conversions > a.impressions:
            warnings.append(
                f"{a.variant!r} has more clicks or conversions than impressions: impression feedback is "
                "incomplete and its rates are not proportions"
            )
        if a.ctr_design_effect is not None and a.ctr_design_effect > _DESIGN_EFFECT_WARNING:
            warnings.append(
                f"{a.variant!r}: clicks cluster by user (CTR design effect {a.ctr_design_effect:.1f}): "
                f"{a.impressions:,} impressions weigh like about {a.impressions / a.ctr_design_effect:,.0f} "
                "independent ones; every test and interval here uses user-clustered variances"
            )
    return ExperimentReport(
        exp.name, control, status, exp.start_ms, exp.stop_ms, srm, arms, comparisons, int(days.size), tuple(warnings)
    )


def _arm_summary(d: ArmData, share: float, n_items: int | None) -> ArmSummary:
    t = d.totals
    users, impr = int(t["users"]), int(t["impressions"])
    clicks, conv = int(t["clicks"]), int(t["conversions"])
    exposure = d.exposure
    if n_items is not None and n_items > exposure.size:
        exposure = np.concatenate([exposure, np.zeros(n_items - exposure.size, np.int64)])
    return ArmSummary(
        variant=d.variant,
        share=share,
        users=users,
        slates=int(t["slates"]),
        impressions=impr,
        clicks=clicks,
        conversions=conv,
        value=float(t["value"]),
        ctr=clicks / impr if impr else None,
        conversion_rate=conv / impr if impr else None,
        value_per_user=float(t["value"]) / users if users else None,
        clicks_per_user=clicks / users if users else None,
        ctr_design_effect=_design_effect(d.per_user["clicks"], d.per_user["impressions"]),
        pre_period_days=int(d.pre_days),
        users_with_pre_period=int(((d.per_user["pre_impressions"] > 0) | (d.per_user["pre_value"] != 0)).sum()),
        items_covered=int(d.exposure.size),
        catalog_coverage=d.exposure.size / n_items if n_items else None,
        exposure_gini=_none(gini(exposure)),
        mean_diversity=t["diversity_sum"] / t["diversity_n"] if t["diversity_n"] else None,
        mean_novelty=t["novelty_sum"] / t["novelty_n"] if t["novelty_n"] else None,
    )


def _design_effect(clicks: np.ndarray, impressions: np.ndarray) -> float | None:
    """Delta-method (user-clustered) variance of the CTR ratio over its binomial variance."""
    n_total = impressions.sum()
    users = int((impressions > 0).sum())
    if users < 2 or n_total <= 0:
        return None
    r = clicks.sum() / n_total
    if not 0 < r < 1:
        return None
    resid = clicks - r * impressions
    var_clustered = users * float((resid**2).sum()) / (users - 1) / (n_total * n_total)
    return var_clustered / (r * (1 - r) / n_total)


def _aligned(arms: list[ArmData]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """The arms' cumulative daily series on the union of their days (carried forward)."""
    days = np.unique(np.concatenate([a.days for a in arms])) if arms else np.zeros(0, np.int64)
    out = []
    for a in arms:
        if a.days.size == 0:  # an arm nobody has reached yet
            out.append({f: np.zeros(days.size, np.float64) for f in TOTAL_FIELDS})
            continue
        idx = np.searchsorted(a.days, days, side="right") - 1
        out.append({f: np.where(idx >= 0, a.daily[f][np.maximum(idx, 0)], 0.0) for f in TOTAL_FIELDS})
    return days, out


def _compare(
    metric: str,
    variant: str,
    c: ArmData,
    t: ArmData,
    c_daily: dict[str, np.ndarray],
    t_daily: dict[str, np.ndarray],
    alpha: float,
    tau: float,
) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        metric=metric, variant=variant, control_value=None, treatment_value=None, diff=None, rel_lift=None,
        rel_ci_low=None, rel_ci_high=None, ci_low=None, ci_high=None, statistic=None, df=None, p_value=None, always_valid_p=None,
        cs_low=None, cs_high=None,
    )
    if metric in _RATE_NUMERATOR:
        num = _RATE_NUMERATOR[metric]
        row["test"] = "clustered ratio z"
        x1, n1, x2, n2 = c.totals[num], c.totals["impressions"], t.totals[num], t.totals["impressions"]
        if n1 > 0 and n2 > 0 and x1 <= n1 and x2 <= n2 and min(c.per_user[num].size, t.per_user[num].size) >= 2:
            # per-user sums: a returning user's impressions are correlated, so the variance is the
            # delta method's over users (an A/A with returning users keeps false positives at alpha)
            z = clustered_ratio_test(c.per_user[num], c.per_user["impressions"], t.per_user[num],
                                     t.per_user["impressions"], alpha)
            row.update(
                control_value=z.p_control, treatment_value=z.p_treatment, diff=z.diff, rel_lift=_none(z.rel_lift),
                rel_ci_low=_none(z.rel_ci_low), rel_ci_high=_none(z.rel_ci_high),
                ci_low=_none(z.ci_low), ci_high=_none(z.ci_high), statistic=_none(z.z), p_value=_none(z.p_value),
            )
            pre = "pre_" + num
            row.update(_cuped_fields(cuped_ratio_test(
                c.per_user[num], c.per_user["impressions"], c.per_user[pre], c.per_user["pre_impressions"],
                t.per_user[num], t.per_user["impressions"], t.per_user[pre], t.per_user["pre_impressions"],
                alpha), z.p_control))
            if c_daily[num].size:
                s = msprt_clustered_ratio(_rate_sums(c_daily, num), _rate_sums(t_daily, num), tau=tau, alpha=alpha,
                                          min_users=_MIN_USERS_SEQUENTIAL)
                row.update(_sequential_fields(s))
                s = msprt_cuped_ratio(_cuped_rate_sums(c_daily, num), _cuped_rate_sums(t_daily, num), tau=tau,
                                      alpha=alpha, min_users=_MIN_USERS_SEQUENTIAL)
                row.update(_sequential_fields(s, "cuped_"))
    else:
        row["test"] = "welch t"
        v1, v2 = c.per_user["value"], t.per_user["value"]
        if v1.size and v2.size:
            w = welch_ttest(v1, v2, alpha)
            row.update(
                control_value=w.mean_control, treatment_value=w.mean_treatment, diff=w.diff, rel_lift=_none(w.rel_lift),
                ci_low=_none(w.ci_low), ci_high=_none(w.ci_high), statistic=_none(w.t), df=_none(w.df),
                p_value=_none(w.p_value),
            )
            row.update(_cuped_fields(cuped_mean_test(v1, c.per_user["pre_value"], v2, t.per_user["pre_value"], alpha),
                                     w.mean_control))
            s = _msprt_means(c_daily, t_daily, tau, alpha)
            if s is not None:
                row.update(_sequential_fields(s))
            if c_daily["users"].size:
                s = msprt_cuped_mean(_cuped_value_sums(c_daily), _cuped_value_sums(t_daily), tau=tau, alpha=alpha,
                                     min_users=_MIN_USERS_SEQUENTIAL)
                row.update(_sequential_fields(s, "cuped_"))
    return row


def _rate_sums(daily: dict[str, np.ndarray], num: str) -> dict[str, np.ndarray]:
    """The user-level sums of a rate over the daily series, as :func:`msprt_clustered_ratio` takes them."""
    sq, cross = _RATE_MOMENTS[num]
    return {"x": daily[num], "n": daily["impressions"], "xx": daily[sq], "nn": daily["impressions_sq"],
            "xn": daily[cross], "users": daily["users"]}


def _cuped_fields(cu, control_value: float) -> dict[str, float | None]:
    """The CUPED columns of a comparison (None where undefined)."""
    if not math.isfinite(cu.p_value):
        return {}
    return dict(
        cuped_diff=_none(cu.diff),
        cuped_rel_lift=_none(cu.diff / control_value) if control_value else None,
        cuped_ci_low=_none(cu.ci_low), cuped_ci_high=_none(cu.ci_high), cuped_p_value=_none(cu.p_value),
        cuped_theta=_none(cu.theta), variance_reduction=_none(cu.variance_reduction),
    )


def _sequential_fields(s, prefix: str = "") -> dict[str, float | None]:
    """The latest look of a sequential test."""
    return {f"{prefix}always_valid_p": _none(s.p_value[-1]), f"{prefix}cs_low": _none(s.cs_low[-1]),
            f"{prefix}cs_high": _none(s.cs_high[-1])}


#: The daily-series fields of a rate's CUPED sums (see msprt_cuped_ratio): y, x, yy, yn, xx, xm, yx, ym, nx.
_CUPED_RATE_FIELDS = {
    "clicks": ("clicks", "pre_clicks", "clicks_sq", "clicks_x_impressions", "pre_clicks_sq",
               "pre_clicks_x_pre_impressions", "clicks_x_pre_clicks", "clicks_x_pre_impressions",
               "impressions_x_pre_clicks"),
    "conversions": ("conversions", "pre_conversions", "conversions_sq", "conversions_x_impressions",
                    "pre_conversions_sq", "pre_conversions_x_pre_impressions", "conversions_x_pre_conversions",
                    "conversions_x_pre_impressions", "impressions_x_pre_conversions"),
}


def _cuped_rate_sums(daily: dict[str, np.ndarray], num: str) -> dict[str, np.ndarray]:
    y, x, yy, yn, xx, xm, yx, ym, nx = (daily[f] for f in _CUPED_RATE_FIELDS[num])
    return {"users": daily["users"], "y": y, "n": daily["impressions"], "x": x, "m": daily["pre_impressions"],
            "yy": yy, "nn": daily["impressions_sq"], "yn": yn, "xx": xx, "mm": daily["pre_impressions_sq"],
            "xm": xm, "yx": yx, "ym": ym, "nx": nx, "nm": daily["impressions_x_pre_impressions"]}


def _cuped_value_sums(daily: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"users": daily["users"], "y": daily["value"], "yy": daily["value_sq"], "x": daily["pre_value"],
            "xx": daily["pre_value_sq"], "yx": daily["value_x_pre_value"]}


def _mean_var(daily: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, s, ss = daily["users"], daily["value"], daily["value_sq"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / n
        var = np.maximum(ss - s * s / n, 0.0) / (n - 1)
    return n, mean, var


def _msprt_means(c_daily, t_daily, tau: float, alpha: float):
    n1, m1, v1 = _mean_var(c_daily)
    n2, m2, v2 = _mean_var(t_daily)
    if n1.size == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        var = v1 / n1 + v2 / n2
        c = 1.0 / n1 + 1.0 / n2
    usable = (np.minimum(n1, n2) >= _MIN_USERS_SEQUENTIAL) & (v1 > 0) & (v2 > 0)
    return msprt(m2 - m1, var, var, c, tau=tau, alpha=alpha, usable=usable)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- output


def report_to_dict(rep: Report) -> dict[str, Any]:
    """A JSON-safe dict (non-finite numbers become None)."""
    return _json_safe(dataclasses.asdict(rep)) | {"srm_flagged": list(rep.srm_flagged)}


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _fmt_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _diff(metric: str, x: float | None, signed: bool = True) -> str:
    if x is None:
        return "n/a"
    if metric in _RATE_NUMERATOR:
        return f"{100 * x:{'+' if signed else ''}.3f}pp"
    return f"{x:{'+' if signed else ''}.4g}"


def _interval(metric: str, lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return "n/a"
    return f"[{_diff(metric, lo)}, {_diff(metric, hi)}]"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header)] + [line(r) for r in rows]


def report_to_text(rep: Report) -> str:
    """A readable report; sample ratio mismatches come first, before any result."""
    level = 100 * (1 - rep.alpha)
    lines = [
        f"Experiment report — {_fmt_time(rep.generated_at_ms)} — alpha {rep.alpha:g} "
        "(fixed-horizon and always-valid p-values Holm-adjusted per experiment; mSPRT tau "
        + ", ".join(f"{m} {t:g}" for m, t in rep.sequential_tau.items())
        + ")",
    ]
    if not rep.experiments:
        lines.append("")
        lines.append("No experiments defined.")
    flagged = rep.srm_flagged
    if flagged:
        bar = "!" * 78
        lines += [
            "",
            bar,
            f"!!! SAMPLE RATIO MISMATCH in {len(flagged)} experiment(s): {', '.join(flagged)}",
            "!!! The user split does not match the configured weights. Results of these experiments are",
            "!!! not trustworthy until the cause (assignment, logging, filtering, bots) is found.",
            bar,
        ]
    for e in rep.experiments:
        lines += ["", f"=== {e.experiment} — {e.status} — control: {e.control} — "
                      f"{_fmt_time(e.start_ms)} → {_fmt_time(e.stop_ms)} — {e.looks} daily looks ==="]
        if e.srm is None:
            lines.append("  SRM check: n/a (single variant or no users yet)")
        else:
            srm = e.srm
            split = " / ".join(
                f"{v} {u:,} ({_pct(s, 1)} expected)" for v, u, s in zip(srm.variants, srm.users, srm.expected_shares)
            )
            test = f"chi2 = {srm.chi2:.2f}, df = {srm.df}, p = {_p(srm.p_value)}"
            if srm.flagged:
                lines.append(f"  !!! SRM: {split}: {test} < {SRM_ALPHA:g}  !!!")
            else:
                lines.append(f"  SRM check: ok ({test}): {split}")
        lines.append("")
        header = ["variant", "users", "slates", "impr.", "clicks", "CTR", "conv.", "conv.rate", "value/user",
                  "items", "coverage", "gini", "diversity", "novelty"]
        rows = [
            [a.variant, f"{a.users:,}", f"{a.slates:,}", f"{a.impressions:,}", f"{a.clicks:,}", _pct(a.ctr),
             f"{a.conversions:,}", _pct(a.conversion_rate), _num(a.value_per_user), f"{a.items_covered:,}",
             _pct(a.catalog_coverage, 1), _num(a.exposure_gini, ".3f"), _num(a.mean_diversity, ".3f"),
             _num(a.mean_novelty, ".3f")]
            for a in e.arms
        ]
        lines += _table(header, rows)
        if e.comparisons:
            lines.append("")
            header = ["metric", "variant", "control", "treatment", "diff", "lift", f"lift {level:g}% CI", f"{level:g}% CI",
                      "p", "p Holm", "AV p", "AV p Holm", f"{level:g}% conf. sequence", ""]
            rows = []
            for c in e.comparisons:
                fmt = _pct if c.metric in _RATE_NUMERATOR else _num
                mark = "*" if c.significant else ""
                mark += "†" if c.sequential_significant else ""
                rows.append([c.metric, c.variant, fmt(c.control_value), fmt(c.treatment_value), _diff(c.metric, c.diff),
                             _pct(c.rel_lift, 1) if c.rel_lift is not None else "n/a",
                             (f"[{_pct(c.rel_ci_low, 1)}, {_pct(c.rel_ci_high, 1)}]" if c.rel_ci_low is not None
                              else "n/a"),
                             _interval(c.metric, c.ci_low, c.ci_high), _p(c.p_value), _p(c.p_holm),
                             _p(c.always_valid_p), _p(c.always_valid_p_holm),
                             _interval(c.metric, c.cs_low, c.cs_high), mark])
            lines += _table(header, rows)
            lines.append(f"  * Holm-adjusted p < {rep.alpha:g}: valid for ONE look at a horizon fixed in advance")
            lines.append(f"  rates: user-clustered (delta-method) SEs; lift CI: log-ratio, n/a below "
                         f"{MIN_EVENTS_FOR_LIFT_CI} events per arm")
            lines.append(f"  † always-valid (AV, mSPRT) Holm-adjusted p < {rep.alpha:g}: valid however often the "
                         "report is read; so is the confidence sequence (per comparison, not Holm-adjusted)")
            pre_days = max((a.pre_period_days for a in e.arms), default=0)
            with_pre = sum(a.users_with_pre_period for a in e.arms)
            users = sum(a.users for a in e.arms)
            lines.append("")
            if pre_days:
                lines.append(f"  CUPED (Deng et al. 2013): adjusted with each user's value in the {pre_days} days before "
                             f"their first exposure ({with_pre:,} of {users:,} users had pre-period activity)")
            else:
                lines.append("  CUPED: no pre-period collected (experiments.cuped_pre_days = 0): adjusted = unadjusted")
            header = ["metric", "variant", "diff", "CUPED diff", "CUPED lift", f"{level:g}% CI", f"CUPED {level:g}% CI",
                      "p", "CUPED p", "CUPED p Holm", "theta", "var. reduction", "CUPED AV p Holm",
                      f"CUPED {level:g}% conf. sequence", ""]
            rows = []
            for c in e.comparisons:
                if c.p_value is None and c.cuped_p_value is None:
                    continue  # nothing to compare (e.g. no conversions in either arm)
                rows.append([c.metric, c.variant, _diff(c.metric, c.diff), _diff(c.metric, c.cuped_diff),
                             _pct(c.cuped_rel_lift, 1), _interval(c.metric, c.ci_low, c.ci_high),
                             _interval(c.metric, c.cuped_ci_low, c.cuped_ci_high), _p(c.p_value), _p(c.cuped_p_value),
                             _p(c.cuped_p_holm), _num(c.cuped_theta, ".3g"), _pct(c.variance_reduction, 1),
                             _p(c.cuped_always_valid_p_holm), _interval(c.metric, c.cuped_cs_low, c.cuped_cs_high),
                             ("*" if c.cuped_significant else "") + ("†" if c.cuped_sequential_significant else "")])
            lines += _table(header, rows)
            lines.append(f"  * CUPED Holm-adjusted p < {rep.alpha:g} (fixed horizon); † CUPED always-valid (mSPRT on the "
                         f"adjusted difference at each daily look) Holm-adjusted p < {rep.alpha:g}; var. reduction = "
                         "1 - Var(CUPED diff) / Var(diff): the share of the variance the pre-period explained")
        if e.warnings:
            lines.append("")
            lines.append("  warnings:")
            lines += [f"   - {w}" for w in e.warnings]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot


def plot_report(
    aggregates: ExperimentAggregates,
    experiment: str,
    metric: str,
    path: str | Path,
    *,
    experiments: ExperimentSet | None = None,
    alpha: float = 0.05,
    sequential_tau: float | None = None,
) -> Path:
    """Write a PNG of ``metric`` per day (cumulative) per variant with confidence sequences.

    Top panel: each variant's cumulative metric with its always-valid
    (1 - alpha) confidence sequence. Bottom panel (when ``experiments`` is
    given, so the control is known): each variant minus the control, with the
    confidence sequence (solid band) and the fixed-horizon CI of each day
    (dashed), which is only valid at a single pre-planned look. Needs
    matplotlib (optional; imported only here).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    tau = _taus(sequential_tau)[metric]
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot_report needs matplotlib, an optional dependency: pip install matplotlib"
        ) from None
    if experiments is not None:
        names = [v.name for v in experiments.get(experiment).variants]
    else:
        names = aggregates.variants(experiment)
    if not names:
        raise ValueError(f"no data for experiment {experiment!r}")
    data = [aggregates.arm_data(experiment, v) for v in names]
    days, aligned = _aligned(data)
    if days.size == 0:
        raise ValueError(f"no data for experiment {experiment!r}")
    dates = [datetime.fromtimestamp(int(d) * DAY_MS / 1000, tz=timezone.utc) for d in days]

    fig = Figure(figsize=(9, 7 if experiments is not None else 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if experiments is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    scale = 100.0 if metric in _RATE_NUMERATOR else 1.0
    unit = " (%)" if scale == 100.0 else ""
    arms = [_arm_sequence(metric, series, tau, alpha) for series in aligned]
    diffs = ([_diff_sequence(metric, aligned[0], aligned[j], tau, alpha) for j in range(1, len(names))]
             if experiments is not None else [])
    pct = f"{100 * (1 - alpha):g}%"
    if days.size < FEW_LOOKS:
        # A line through one or two points shows no band and stretches the date axis over years: bars per
        # look, each with its interval, read at a glance.
        labels = [d.strftime("%Y-%m-%d") for d in dates]
        x = np.arange(days.size, dtype=float)
        width = 0.8 / max(len(names), 1)
        ax = axes[0]
        for k, (name, (est, lo, hi)) in enumerate(zip(names, arms)):
            pos = x - 0.4 + width * (k + 0.5)
            ax.bar(pos, est * scale, width * 0.9, label=name, alpha=0.8)
            ax.errorbar(pos, est * scale, yerr=_yerr(est, lo, hi, scale), fmt="none", ecolor="black", capsize=4)
        ax.set_title(f"{experiment}: {metric} so far ({days.size} daily look{'s' if days.size > 1 else ''})\n"
                     f"bars: estimate; whiskers: {pct} confidence sequence", fontsize=10)
        ax.set_ylabel(metric + unit)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        if diffs:
            ax = axes[1]
            ax.axhline(0.0, color="black", lw=0.8)
            width = 0.8 / max(len(diffs), 1)
            for k, (name, (diff, lo, hi, ci_lo, ci_hi)) in enumerate(zip(names[1:], diffs)):
                pos = x - 0.4 + width * (k + 0.5)
                ax.bar(pos, diff * scale, width * 0.9, label=f"{name} − {names[0]}", alpha=0.8)
                ax.errorbar(pos, diff * scale, yerr=_yerr(diff, lo, hi, scale), fmt="none", ecolor="black",
                            capsize=4)
            ax.set_title(f"lift vs {names[0]}; whiskers: {pct} confidence sequence (valid at every look)\n"
                         "a whisker clear of 0 is a significant difference", fontsize=10)
            ax.set_ylabel("lift" + (" (percentage points)" if scale == 100.0 else ""))
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        axes[-1].set_xticks(x, labels)
        axes[-1].set_xlim(-0.6, days.size - 0.4)
    else:
        ax = axes[0]
        for name, (est, lo, hi) in zip(names, arms):
            (line,) = ax.plot(dates, est * scale, marker="o", ms=3, label=name)
            ax.fill_between(dates, lo * scale, hi * scale, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(f"{experiment}: {metric}, cumulative, with {pct} confidence sequences")
        ax.set_ylabel(metric + unit)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        if diffs:
            ax = axes[1]
            ax.axhline(0.0, color="black", lw=0.8)
            for name, (diff, lo, hi, ci_lo, ci_hi) in zip(names[1:], diffs):
                (line,) = ax.plot(dates, diff * scale, marker="o", ms=3, label=f"{name} − {names[0]}")
                ax.fill_between(dates, lo * scale, hi * scale, color=line.get_color(), alpha=0.15, lw=0)
                ax.plot(dates, ci_lo * scale, ls="--", lw=0.8, color=line.get_color())
                ax.plot(dates, ci_hi * scale, ls="--", lw=0.8, color=line.get_color())
            ax.set_title(f"cumulative lift vs {names[0]}; band: {pct} confidence sequence (valid at every look)\n"
                         "dashed: fixed-horizon CI (valid at one planned look only); clear of 0 = significant",
                         fontsize=10)
            ax.set_ylabel("lift" + (" (percentage points)" if scale == 100.0 else ""))
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        half_day = timedelta(hours=12)
        axes[-1].set_xlim(dates[0] - half_day, dates[-1] + half_day)
        import matplotlib.dates as mdates

        axes[-1].xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


#: Fewer daily looks than this are drawn as bars with intervals instead of lines with bands.
FEW_LOOKS = 3


def _yerr(est: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: float) -> np.ndarray:
    """Whisker lengths below and above ``est`` (0 where the interval is unknown)."""
    below = np.nan_to_num((est - lo) * scale, nan=0.0, posinf=0.0, neginf=0.0)
    above = np.nan_to_num((hi - est) * scale, nan=0.0, posinf=0.0, neginf=0.0)
    return np.vstack([np.maximum(below, 0.0), np.maximum(above, 0.0)])


def _finite(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, np.nan)


def _arm_sequence(metric: str, d: dict[str, np.ndarray], tau: float, alpha: float):
    """One arm's cumulative estimate and its one-sample confidence sequence (msprt with c = 1/n)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric in _RATE_NUMERATOR:
            n = d["impressions"]
            est = d[_RATE_NUMERATOR[metric]] / n
            var = clustered_ratio_variance(**_rate_sums(d, _RATE_NUMERATOR[metric]))  # returning users: clustered
            usable = (n * est >= 5) & (n * (1 - est) >= 5) & (d["users"] >= _MIN_USERS_SEQUENTIAL)
        else:
            n, est, v = _mean_var(d)
            var = v / n
            usable = n >= _MIN_USERS_SEQUENTIAL
        s = msprt(est, var, var, 1.0 / n, tau=tau, alpha=alpha, usable=usable)
    lo, hi = _finite(s.cs_low), _finite(s.cs_high)
    if metric in _RATE_NUMERATOR:  # a rate's interval never leaves [0, 1]
        lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    return _finite(est), lo, hi


def _diff_sequence(metric: str, c: dict[str, np.ndarray], t: dict[str, np.ndarray], tau: float, alpha: float):
    if metric in _RATE_NUMERATOR:
        num = _RATE_NUMERATOR[metric]
        s = msprt_clustered_ratio(_rate_sums(c, num), _rate_sums(t, num), tau=tau, alpha=alpha,
                                  min_users=_MIN_USERS_SEQUENTIAL)
        z = two_proportion_ztest(c[num], c["impressions"], t[num], t["impressions"], alpha)
        diff, ci_lo, ci_hi = np.asarray(z.diff), np.asarray(z.ci_low), np.asarray(z.ci_high)
    else:
        n1, m1, v1 = _mean_var(c)
        n2, m2, v2 = _mean_var(t)
        s = _msprt_means(c, t, tau, alpha)
        diff = m2 - m1
        ci_lo, ci_hi = np.full(diff.shape, np.nan), np.full(diff.shape, np.nan)
        for k in range(diff.size):
            if n1[k] >= 2 and n2[k] >= 2:
                w = welch_ttest_from_stats(m1[k], v1[k], int(n1[k]), m2[k], v2[k], int(n2[k]), alpha)
                ci_lo[k], ci_hi[k] = w.ci_low, w.ci_high
    return _finite(diff), _finite(s.cs_low), _finite(s.cs_high), _finite(ci_lo), _finite(ci_hi)
