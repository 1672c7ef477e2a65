"""CUPED (issue 17): the adjusted tests keep alpha in A/A, narrow the interval when the pre-period predicts
the metric, and the service collects each user's pre-period durably (live, replayed, snapshotted)."""

from __future__ import annotations

import json
import math
import numpy as np
import pytest

from recsvc.config import Config
from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
from recsvc.experiments import ExperimentAggregates, ExperimentSet, report
from recsvc.experiments.aggregates import DAY_MS
from recsvc.experiments.stats import (clustered_ratio_test, cuped_mean_test, cuped_ratio_test, msprt_cuped_mean,
                                      msprt_cuped_ratio, welch_ttest)

from conftest import small_config

ALPHA = 0.05
DAY0 = 20_000  # a UTC day number
T0 = DAY0 * DAY_MS


def _users(rng, n_users, lift=1.0):
    """Returning users with their own click rate: pre-period and experiment (clicks, impressions) per user."""
    rate = rng.beta(0.5, 9.5, n_users)  # mean 0.05, SD 0.067: users differ a lot, as real click rates do
    m = rng.poisson(rng.choice([0, 30], n_users, p=[0.1, 0.9]))  # pre-period impressions (10% of users new)
    x = rng.binomial(m, rate)
    n = rng.poisson(30, n_users) + 1
    y = rng.binomial(n, np.minimum(rate * lift, 1.0))
    return y, n, x, m


def test_aa_cuped_ratio_test_keeps_false_positives_at_alpha_and_reduces_variance():
    rng = np.random.default_rng(1701)
    runs, rejected, plain, reductions = 1000, 0, 0, []
    for _ in range(runs):
        c, t = _users(rng, 400), _users(rng, 400)
        cu = cuped_ratio_test(*c, *t, alpha=ALPHA)
        rejected += cu.p_value < ALPHA
        plain += clustered_ratio_test(c[0], c[1], t[0], t[1]).p_value < ALPHA
        reductions.append(cu.variance_reduction)
        # the unadjusted SE CUPED reports is the clustered test's
        assert cu.se_unadjusted == pytest.approx(clustered_ratio_test(c[0], c[1], t[0], t[1]).se, rel=1e-9)
    assert 0.033 <= rejected / runs <= 0.067, rejected / runs  # alpha within ~2.5 binomial SE
    assert 0.033 <= plain / runs <= 0.067, plain / runs
    # per-user rates spread (Beta(0.5, 9.5)) and ~30 pre-period impressions: the pre-period explains a good part
    assert np.median(reductions) > 0.3, np.median(reductions)


def test_cuped_ratio_test_narrows_the_interval_and_keeps_coverage_of_a_real_effect():
    rng = np.random.default_rng(1702)
    truth, covered, covered_plain, narrower, runs = [], 0, 0, 0, 600
    for _ in range(runs):
        c, t = _users(rng, 500), _users(rng, 500, lift=1.2)
        cu = cuped_ratio_test(*c, *t, alpha=ALPHA)
        z = clustered_ratio_test(c[0], c[1], t[0], t[1])
        truth.append((z.diff, cu.diff))
        narrower += (cu.ci_high - cu.ci_low) < (z.ci_high - z.ci_low)
        # expected difference: 0.2 E[rate] = 0.01 (impressions are independent of the rate)
        covered += cu.ci_low <= 0.01 <= cu.ci_high
        covered_plain += z.ci_low <= 0.01 <= z.ci_high
    assert narrower / runs > 0.95
    assert covered / runs >= 0.93, covered / runs
    assert covered_plain / runs >= 0.93, covered_plain / runs
    d = np.array(truth)
    assert abs(d[:, 1].mean() - 0.01) < 0.0005  # unbiased
    assert d[:, 1].std() < 0.8 * d[:, 0].std()  # and less variable


def test_aa_cuped_mean_test_keeps_false_positives_at_alpha():
    rng = np.random.default_rng(1703)
    runs, rejected, reductions = 1000, 0, []
    for _ in range(runs):
        def arm():
            spend = rng.gamma(0.5, 4.0, 300)  # each user's propensity to spend
            return rng.poisson(spend) * 1.5, rng.poisson(spend) * 1.5  # (value, pre-period value)
        (y1, x1), (y2, x2) = arm(), arm()
        cu = cuped_mean_test(y1, x1, y2, x2, ALPHA)
        rejected += cu.p_value < ALPHA
        reductions.append(cu.variance_reduction)
        assert cu.se_unadjusted == pytest.approx(welch_ttest(y1, y2).se, rel=1e-12)
    assert 0.033 <= rejected / runs <= 0.067, rejected / runs
    assert np.median(reductions) > 0.4, np.median(reductions)


def test_cuped_without_pre_period_is_the_unadjusted_test():
    rng = np.random.default_rng(5)
    y, n, _, _ = _users(rng, 200)
    y2, n2, _, _ = _users(rng, 200)
    zeros = np.zeros(200)
    cu = cuped_ratio_test(y, n, zeros, zeros, y2, n2, zeros, zeros)
    z = clustered_ratio_test(y, n, y2, n2)
    assert cu.theta == 0.0 and cu.variance_reduction == pytest.approx(0.0, abs=1e-12)
    assert (cu.diff, cu.p_value) == pytest.approx((z.diff, z.p_value), rel=1e-9)
    m = cuped_mean_test(y * 1.0, zeros, y2 * 1.0, zeros)
    assert m.p_value == pytest.approx(welch_ttest(y, y2).p_value, rel=1e-12)


def test_cuped_known_values_for_a_mean():
    # y = x + arm effect exactly: theta = 1 and the adjusted difference is the effect with no variance left
    x1, x2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 9.0])
    cu = cuped_mean_test(x1 + 0.5, x1, x2 + 1.5, x2)
    assert cu.theta == pytest.approx(1.0)
    assert cu.diff == pytest.approx(1.0)  # the unadjusted difference is 1 + (5.25 - 2.5) = 3.75
    assert cu.se == pytest.approx(0.0, abs=1e-12) and cu.variance_reduction == pytest.approx(1.0)


# --------------------------------------------------------------------------- A/A through aggregates and report


EXP = {"experiment": [{"name": "ab", "salt": "cuped-aa",
                       "variant": [{"name": "control", "weight": 1}, {"name": "treatment", "weight": 1}]}]}


def _aa_aggregates(rng, n_users=600, days=7, pre_days=14, lift=1.0):
    """Users with their own click rate click in a pre-period (no experiment), then are exposed and return
    every day of the experiment; aggregates fed as the feedback path feeds them."""
    from recsvc.experiments import bucket_of

    agg = ExperimentAggregates()
    rate = rng.beta(0.5, 9.5, n_users)
    for u in range(n_users):
        uid = f"u{u}"
        for d in range(pre_days):  # pre-period: not in the experiment (no arms), activity only
            t = T0 - (pre_days - d) * DAY_MS + 3600_000
            k = rng.poisson(2.0)
            clicks = rng.binomial(k, rate[u])
            for _ in range(k):
                agg.record_activity(uid, ("impression",), 0.0, t, pre_days)
            for _ in range(clicks):
                agg.record_activity(uid, ("click",), 0.0, t, pre_days)
    for d in range(days):
        for u in range(n_users):
            uid = f"u{u}"
            arms = [("ab", "control" if bucket_of("cuped-aa", uid) < 5000 else "treatment")]
            t = T0 + d * DAY_MS + 7200_000 + u
            agg.record_served(arms, uid, np.arange(3), t, pre_days=pre_days)
            k = rng.poisson(2.0) + 1
            r = rate[u] * (lift if arms[0][1] == "treatment" else 1.0)
            for _ in range(k):
                agg.record_event(arms, uid, "impression", 0.0, t + 1)
            for _ in range(rng.binomial(k, min(r, 1.0))):
                agg.record_event(arms, uid, "click", 0.0, t + 2)
    return agg


def test_aa_report_keeps_alpha_with_cuped_and_with_the_sequential_test():
    rng = np.random.default_rng(1704)
    exps = ExperimentSet.from_dict(EXP, Config())
    runs, fixed, cuped, sequential, cuped_sequential, reductions = 120, 0, 0, 0, 0, []
    for _ in range(runs):
        agg = _aa_aggregates(rng, n_users=300, days=5)
        rep = report(agg, exps, now_ms=T0 + 6 * DAY_MS, min_impressions=0, min_users=0)
        ctr = next(c for c in rep.experiments[0].comparisons if c.metric == "ctr")
        fixed += ctr.p_value < ALPHA
        cuped += ctr.cuped_p_value < ALPHA
        sequential += ctr.always_valid_p < ALPHA
        cuped_sequential += ctr.cuped_always_valid_p < ALPHA
        reductions.append(ctr.variance_reduction)
    # 120 runs: a rate of 0.05 gives at most 13 rejections with probability 0.99
    assert max(fixed, cuped, sequential, cuped_sequential) <= 13, (fixed, cuped, sequential, cuped_sequential)
    assert np.median(reductions) > 0.2, np.median(reductions)


def test_report_shows_adjusted_and_unadjusted_effects_and_the_variance_reduction():
    rng = np.random.default_rng(1705)
    agg = _aa_aggregates(rng, n_users=800, days=5, lift=1.25)
    rep = report(agg, ExperimentSet.from_dict(EXP, Config()), now_ms=T0 + 6 * DAY_MS, min_impressions=0, min_users=0)
    e = rep.experiments[0]
    ctr = next(c for c in e.comparisons if c.metric == "ctr")
    assert ctr.cuped_diff is not None and ctr.variance_reduction > 0.2
    assert (ctr.cuped_ci_high - ctr.cuped_ci_low) < (ctr.ci_high - ctr.ci_low)
    assert all(a.pre_period_days == 14 and a.users_with_pre_period > 0.9 * a.users for a in e.arms)
    from recsvc.experiments import report_to_text

    text = report_to_text(rep)
    assert "CUPED (Deng et al. 2013): adjusted with each user's value in the 14 days before their first exposure" in text
    assert "var. reduction" in text


# --------------------------------------------------------------------------- collection


def test_pre_period_is_the_whole_days_before_the_first_exposure():
    agg = ExperimentAggregates()
    arms = [("ab", "control")]
    agg.record_activity("a", ("impression", "click"), 0.0, T0 - 20 * DAY_MS, 14)  # outside the window
    agg.record_activity("a", ("impression",), 0.0, T0 - 14 * DAY_MS, 14)  # first day of the window
    agg.record_activity("a", ("impression", "click"), 0.0, T0 - 1, 14)  # last millisecond of the window
    agg.record_activity("a", ("conversion",), 2.5, T0 - DAY_MS + 5, 14)
    agg.record_activity("a", ("impression", "click"), 0.0, T0 + 10, 14)  # the exposure's day: left out
    agg.record_served(arms, "a", np.arange(2), T0 + 20, pre_days=14)
    agg.record_activity("a", ("impression",), 0.0, T0 - 5 * DAY_MS, 14)  # late: after the first exposure
    agg.record_served(arms, "a", np.arange(2), T0 + 30, pre_days=14)
    agg.record_served(arms, "b", np.arange(2), T0 + 40, pre_days=14)  # no activity at all
    pu = agg.arm_data("ab", "control").per_user
    assert pu["pre_impressions"].tolist() == [2, 0]
    assert pu["pre_clicks"].tolist() == [1, 0]
    assert pu["pre_conversions"].tolist() == [1, 0]
    assert pu["pre_value"].tolist() == [2.5, 0.0]
    assert agg.arm_data("ab", "control").pre_days == 14


def test_activity_older_than_the_window_is_pruned():
    agg = ExperimentAggregates()
    agg.record_activity("old", ("click",), 0.0, T0, 3)
    agg.record_activity("new", ("click",), 0.0, T0 + 3 * DAY_MS, 3)
    assert agg.activity_users() == 2
    agg.record_activity("new", ("click",), 0.0, T0 + 4 * DAY_MS, 3)  # a new day: "old" is 4 days back
    assert agg.activity_users() == 1
    agg.record_activity("ancient", ("click",), 0.0, T0, 3)  # stamped beyond the window: ignored
    assert agg.activity_users() == 1
    agg.record_activity("x", ("click",), 0.0, T0 + 4 * DAY_MS, 0)  # pre_days 0: nothing kept
    assert agg.activity_users() == 1


def test_snapshot_round_trips_the_activity_and_pre_periods_and_reads_version_1():
    rng = np.random.default_rng(3)
    agg = _aa_aggregates(rng, n_users=40, days=2)
    agg.record_activity("late", ("impression",), 1.5, T0 + 2 * DAY_MS, 14)
    restored = ExperimentAggregates.from_dict(json.loads(json.dumps(agg.to_dict(), allow_nan=False)))
    assert restored.to_dict() == agg.to_dict()
    restored.record_served([("ab", "control")], "late", np.arange(1), T0 + 3 * DAY_MS, pre_days=14)
    row = list(restored.arm_data("ab", "control").per_user["pre_value"])
    assert row[-1] == 1.5
    old = agg.to_dict()
    old["version"] = 1
    del old["activity"]
    from recsvc.experiments.aggregates import _V2_TOTAL_FIELDS

    for a in old["arms"]:
        for f in ("pre_impressions", "pre_clicks", "pre_conversions", "pre_value"):
            del a["per_user"][f]
        for f in _V2_TOTAL_FIELDS:
            del a["totals"][f]
            del a["daily"][f]
    v1 = ExperimentAggregates.from_dict(old)
    assert v1.arm_data("ab", "control").per_user["pre_impressions"].sum() == 0
    assert v1.arm_data("ab", "control").totals["clicks_x_pre_clicks"] == 0
    assert v1.activity_users() == 0


EXPERIMENTS_TOML = """
[[experiment]]
name = "policy"
salt = "policy-test"
start = {start}

  [[experiment.variant]]
  name = "control"
  weight = 1

  [[experiment.variant]]
  name = "treatment"
  weight = 1
"""


def test_engine_collects_pre_periods_from_feedback_before_the_start_and_replays_them(tmp_path):
    """Users active before the experiment starts (served and clicking with no experiment) carry their
    pre-period into the arm at first exposure; a restart (log replay) and a snapshot give the same values."""
    from conftest import NOW_MS, FakeClock

    t0 = NOW_MS // DAY_MS * DAY_MS
    start = t0 + 3 * DAY_MS
    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS_TOML.format(start=start))
    cfg = small_config(tmp_path, experiments={"file": str(path), "cuped_pre_days": 7})
    clock = FakeClock(t0)
    eng = Engine.from_config(cfg, clock=clock)

    def visit(user, day, clicks):
        clock.now_ms = t0 + day * DAY_MS + 3600_000
        rec = eng.recommend(RecommendQuery(user_id=user, n=3))
        ev = [FeedbackEventIn(f"{user}-{day}-i{i.position}", user, i.item_id, "impression", request_id=rec.request_id)
              for i in rec.items]
        ev += [FeedbackEventIn(f"{user}-{day}-c{k}", user, rec.items[k].item_id, "click", request_id=rec.request_id)
               for k in range(clicks)]
        eng.feedback(ev)
        return rec

    for d in range(3):  # before the start: no arms
        assert visit("keen", d, 2).variant == ""
        visit("casual", d, 0)
    visit("keen", 3, 1)  # first exposures (the start day)
    visit("casual", 3, 0)
    visit("newcomer", 3, 0)

    def pre(engine):
        out = {}
        for a in engine.aggregates.to_dict()["arms"]:
            for i, u in enumerate(a["users"]):
                out[u] = (a["per_user"]["pre_impressions"][i], a["per_user"]["pre_clicks"][i])
        return out

    before = pre(eng)
    assert before == {"keen": (9, 6), "casual": (9, 0), "newcomer": (0, 0)}
    eng.close(snapshot=False)
    replayed = Engine.from_config(cfg, clock=clock)
    assert pre(replayed) == before
    replayed.close(snapshot=True)
    from_snapshot = Engine.from_config(cfg, clock=clock)
    assert pre(from_snapshot) == before
    from_snapshot.close(snapshot=False)


# --------------------------------------------------------------------------- CUPED in the always-valid test


def _ratio_sums(y, n, x, m):
    y, n, x, m = (np.asarray(v, np.float64) for v in (y, n, x, m))
    return {"users": [y.size], "y": [y.sum()], "n": [n.sum()], "x": [x.sum()], "m": [m.sum()], "yy": [y @ y],
            "nn": [n @ n], "yn": [y @ n], "xx": [x @ x], "mm": [m @ m], "xm": [x @ m], "yx": [y @ x], "ym": [y @ m],
            "nx": [n @ x], "nm": [n @ m]}


def _half_width(var, c, tau=0.01, alpha=ALPHA):
    r = c / (c + tau * tau)
    return math.sqrt(var * (2 * math.log(1 / alpha) - math.log(r)) / (1 - r))


def test_sequential_cuped_ratio_at_a_look_is_the_fixed_horizon_adjustment():
    """From the running sums alone, the always-valid test's adjusted difference and variance at a look are
    cuped_ratio_test's on the per-user values: its confidence sequence is centred on the same difference."""
    rng = np.random.default_rng(21)
    c, t = _users(rng, 700), _users(rng, 700, lift=1.1)
    fixed = cuped_ratio_test(*c, *t)
    seq = msprt_cuped_ratio(_ratio_sums(*c), _ratio_sums(*t), tau=0.01)
    half = _half_width(fixed.se**2, 1 / c[1].sum() + 1 / t[1].sum())
    assert seq.cs_low[-1] == pytest.approx(fixed.diff - half, rel=1e-9)
    assert seq.cs_high[-1] == pytest.approx(fixed.diff + half, rel=1e-9)


def test_sequential_cuped_mean_at_a_look_is_the_fixed_horizon_adjustment():
    rng = np.random.default_rng(22)
    spend1, spend2 = rng.gamma(0.5, 4.0, 400), rng.gamma(0.5, 4.0, 450)
    y1, x1, y2, x2 = rng.poisson(spend1) * 1.0, rng.poisson(spend1) * 1.0, rng.poisson(spend2) * 1.2, rng.poisson(spend2)
    fixed = cuped_mean_test(y1, x1, y2, x2)

    def sums(y, x):
        return {"users": [y.size], "y": [y.sum()], "yy": [y @ y], "x": [x.sum()], "xx": [x @ x], "yx": [y @ x]}

    seq = msprt_cuped_mean(sums(y1, x1), sums(y2, x2), tau=0.03)
    half = _half_width(fixed.se**2, 1 / 400 + 1 / 450, tau=0.03)
    assert seq.cs_low[-1] == pytest.approx(fixed.diff - half, rel=1e-9)
    assert seq.cs_high[-1] == pytest.approx(fixed.diff + half, rel=1e-9)


def test_aggregates_keep_the_running_sums_the_sequential_cuped_test_needs():
    agg = _aa_aggregates(np.random.default_rng(23), n_users=60, days=3)
    d = agg.arm_data("ab", "control")
    pu, t = d.per_user, d.totals
    y, n, x, m = pu["clicks"], pu["impressions"], pu["pre_clicks"], pu["pre_impressions"]
    expected = {"pre_clicks": x.sum(), "pre_impressions": m.sum(), "pre_clicks_sq": x @ x, "pre_impressions_sq": m @ m,
                "pre_clicks_x_pre_impressions": x @ m, "clicks_x_pre_clicks": y @ x, "clicks_x_pre_impressions": y @ m,
                "impressions_x_pre_clicks": n @ x, "impressions_x_pre_impressions": n @ m}
    for field, value in expected.items():
        assert t[field] == pytest.approx(value), field
        assert d.daily[field][-1] == pytest.approx(value), field


def test_report_gives_the_always_valid_cuped_comparison():
    rng = np.random.default_rng(24)
    agg = _aa_aggregates(rng, n_users=800, days=5, lift=1.3)
    rep = report(agg, ExperimentSet.from_dict(EXP, Config()), now_ms=T0 + 6 * DAY_MS, min_impressions=0, min_users=0)
    ctr = next(c for c in rep.experiments[0].comparisons if c.metric == "ctr")
    assert ctr.cuped_cs_low <= ctr.cuped_diff <= ctr.cuped_cs_high
    # narrower than the unadjusted always-valid sequence, as the fixed-horizon interval is
    assert ctr.cuped_cs_high - ctr.cuped_cs_low < ctr.cs_high - ctr.cs_low


def test_cuped_pre_days_needs_a_restart_and_is_validated():
    from recsvc.config import reloaded

    running = Config()
    assert running.experiments.cuped_pre_days == 14
    cfg, applied, restart = reloaded(running, running.with_overrides({"experiments": {"cuped_pre_days": 3}}))
    assert cfg.experiments.cuped_pre_days == 14 and restart == ["experiments.cuped_pre_days"] and applied == []
    with pytest.raises(ValueError, match="cuped_pre_days"):
        Config().with_overrides({"experiments": {"cuped_pre_days": -1}})
