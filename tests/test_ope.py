"""Off-policy estimators: known values, unbiasedness and coverage on simulated logs, and the real OBD sample."""

import numpy as np
import pytest

from recsvc.evaluation.datasets import validate_on_obd
from recsvc.evaluation.ope import (
    ActionMeanRewardModel,
    BanditLog,
    RidgeRewardModel,
    cross_fit_predict,
    direct_method,
    doubly_robust,
    effective_sample_size,
    estimate_all,
    ips,
    on_policy_estimate,
    snips,
)

from conftest import SHARED_DATA

# ---- known values --------------------------------------------------------------------------------------
# Three rounds, two actions. Target pi = 1/2 everywhere.
#   action     [0,   1,    0  ]    propensity [0.5, 0.25, 0.5]   reward [1, 0, 1]
#   w = pi/p = [1,   2,    1  ]
#   IPS   = (1*1 + 2*0 + 1*1) / 3 = 2/3
#   SNIPS = 2 / (1 + 2 + 1)       = 1/2
# With q_hat = [0.6, 0.0] in every row:
#   DM = 0.5*0.6 + 0.5*0.0 = 0.3
#   DR = 0.3 + mean(w * (r - q_hat[a])) = 0.3 + (1*0.4 + 2*0 + 1*0.4) / 3 = 0.3 + 0.8/3
TINY = BanditLog(action=[0, 1, 0], propensity=[0.5, 0.25, 0.5], reward=[1.0, 0.0, 1.0])
PI_HALF = np.full((3, 2), 0.5)
Q_TINY = np.tile([0.6, 0.0], (3, 1))


def test_estimators_known_values():
    assert ips(TINY, PI_HALF).value == pytest.approx(2 / 3)
    assert snips(TINY, PI_HALF).value == pytest.approx(1 / 2)
    assert direct_method(TINY, PI_HALF, Q_TINY).value == pytest.approx(0.3)
    assert doubly_robust(TINY, PI_HALF, Q_TINY).value == pytest.approx(0.3 + 0.8 / 3)
    # IPS terms [1, 0, 1]: sample sd = sqrt(1/3), stderr = sd / sqrt(3) = 1/3
    e = ips(TINY, PI_HALF)
    assert e.stderr == pytest.approx(1 / 3)
    assert (e.ci_low, e.ci_high) == pytest.approx((2 / 3 - 1.959964 / 3, 2 / 3 + 1.959964 / 3))
    assert e.n == 3


def test_pi_logged_gives_the_same_ips_and_snips_and_no_model_estimates():
    full = estimate_all(TINY, PI_HALF, reward_model=ActionMeanRewardModel(), n_folds=1)
    logged = estimate_all(TINY, pi_logged=[0.5, 0.5, 0.5])
    assert set(full) == {"IPS", "SNIPS", "DM", "DR"} and set(logged) == {"IPS", "SNIPS"}
    assert logged["IPS"] == full["IPS"] and logged["SNIPS"] == full["SNIPS"]
    with pytest.raises(ValueError, match=r"DM and DR need the target policy's full distribution pi\[N, A\]"):
        estimate_all(TINY, pi_logged=[0.5, 0.5, 0.5], reward_model=RidgeRewardModel())


def test_bandit_log_rejects_zero_propensity():
    with pytest.raises(ValueError, match=r"propensities must lie in \(0, 1\]"):
        BanditLog(action=[0, 1], propensity=[0.5, 0.0], reward=[1.0, 0.0])


def test_bandit_log_rejects_actions_beyond_n_actions():
    with pytest.raises(ValueError, match="action id 3 is out of range for n_actions=2"):
        BanditLog(action=[0, 3], propensity=[0.5, 0.5], reward=[1.0, 0.0], n_actions=2)


def test_target_policy_rows_must_sum_to_one():
    with pytest.raises(ValueError, match="each row of pi must sum to 1; row 1 sums to 0.5"):
        ips(TINY, [[0.5, 0.5], [0.25, 0.25], [0.5, 0.5]])
    with pytest.raises(ValueError, match="give exactly one of pi"):
        ips(TINY)


def test_ridge_without_context_recovers_per_action_means():
    rng = np.random.default_rng(0)
    action = rng.integers(0, 3, 3000)
    reward = np.array([0.1, 0.5, 0.9])[action] + rng.normal(0, 0.05, 3000)
    log = BanditLog(action=action, propensity=np.full(3000, 1 / 3), reward=reward)
    q = RidgeRewardModel(alpha=1e-3, clip=False).fit(log).predict(log, np.arange(2))
    np.testing.assert_allclose(q, [[0.1, 0.5, 0.9]] * 2, atol=0.01)


def test_cross_fit_predicts_each_fold_from_the_other_folds():
    # Two folds, per-action means without shrinkage: a row's prediction is its action's mean in the other fold.
    log = BanditLog(action=[0, 0, 0, 0], propensity=[1.0] * 4, reward=[1.0, 2.0, 3.0, 4.0])
    q = cross_fit_predict(ActionMeanRewardModel(prior_strength=0.0), log, n_folds=2, seed=1)
    fold = np.random.default_rng(1).permutation(4) % 2
    for i in range(4):
        assert q[i, 0] == pytest.approx(log.reward[fold != fold[i]].mean())


# ---- simulated logs with known truth ------------------------------------------------------------------
N_ACTIONS, DIM = 5, 2
B = np.array([-1.0, -0.5, 0.0, 0.3, 0.6])
W = np.array([[0.8, -0.4, 0.0, 0.5, -0.7], [-0.3, 0.6, 0.4, -0.5, 0.2]])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expected_reward(x):
    return 1 / (1 + np.exp(-(B + x @ W)))  # [n, A] click probabilities


def logging_policy(x):
    # skewed towards actions 0/1 and dependent on context; 20% uniform mixing keeps every propensity >= 0.04
    zero = np.zeros(x.shape[0])
    logits = np.column_stack([2.0 + x[:, 0], 1.5 - x[:, 1], zero, zero - 1.0, x[:, 1] - 1.0])
    return 0.8 * softmax(logits) + 0.2 / N_ACTIONS


def target_policy(x):
    return softmax(2.0 * (B + x @ W))  # prefers the better actions


def simulate(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM))
    p = logging_policy(x)
    action = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    reward = (rng.random(n) < expected_reward(x)[np.arange(n), action]).astype(float)
    log = BanditLog(context=x, action=action, propensity=p[np.arange(n), action], reward=reward, n_actions=N_ACTIONS)
    return log, target_policy(x)


@pytest.fixture(scope="module")
def truth():
    # V(pi) = E_x sum_a pi(a|x) q(x, a): exact given x, Monte Carlo over 10^6 contexts (error ~2e-4)
    x = np.random.default_rng(12345).normal(size=(1_000_000, DIM))
    return float((target_policy(x) * expected_reward(x)).sum(axis=1).mean())


@pytest.fixture(scope="module")
def replications():
    """estimate_all on 40 independent simulated logs of 2,000 rounds each.

    The logging policy's value is ~0.40 and the target's ~0.68, so the estimators must correct a lot. The
    reward model (linear) is misspecified for the logistic truth: DM is biased, DR must not be.
    """
    model = RidgeRewardModel(alpha=1.0, interactions=True)
    out = []
    for seed in range(40):
        log, pi = simulate(2000, seed)
        out.append(estimate_all(log, pi, reward_model=model, n_folds=3, seed=seed))
    return out


@pytest.mark.parametrize("name", ["IPS", "SNIPS", "DR"])
def test_estimator_is_unbiased_on_simulated_logs(replications, truth, name):
    values = np.array([r[name].value for r in replications])
    spread = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean() - truth) < 4 * spread + 2e-3, (values.mean(), truth, spread)


@pytest.mark.parametrize("name", ["IPS", "SNIPS", "DR"])
def test_confidence_intervals_cover_the_truth(replications, truth, name):
    covered = np.mean([r[name].covers(truth) for r in replications])
    assert covered >= 0.85, f"{name} 95% CIs covered the truth in only {covered:.0%} of 40 logs"
    # ... and the reported standard error matches the estimator's actual spread across logs
    sd = np.std([r[name].value for r in replications], ddof=1)
    mean_se = np.mean([r[name].stderr for r in replications])
    assert 0.7 < mean_se / sd < 1.4


def test_doubly_robust_has_lower_variance_than_ips(replications):
    ips_se = np.mean([r["IPS"].stderr for r in replications])
    dr_se = np.mean([r["DR"].stderr for r in replications])
    assert dr_se < 0.8 * ips_se


def test_bootstrap_interval_agrees_with_normal_interval_on_a_large_log():
    log, pi = simulate(5000, 99)
    normal = snips(log, pi)
    boot = snips(log, pi, n_bootstrap=400, seed=3)
    assert boot.value == normal.value
    assert boot.stderr == pytest.approx(normal.stderr, rel=0.2)
    assert boot.ci_low == pytest.approx(normal.ci_low, abs=0.5 * normal.stderr)
    assert boot.ci_high == pytest.approx(normal.ci_high, abs=0.5 * normal.stderr)


def test_effective_sample_size():
    assert effective_sample_size([1, 1, 1, 1]) == 4.0
    assert effective_sample_size([4, 0, 0, 0]) == 1.0


# ---- real data: Open Bandit Dataset sample ------------------------------------------------------------


@pytest.fixture(scope="module")
def obd_report():
    if not (SHARED_DATA / "obd-men" / "bts" / "men.csv").is_file():
        pytest.skip(f"OBD sample not found under {SHARED_DATA / 'obd-men'} (expected ../shared/data next to the repo)")
    return validate_on_obd(SHARED_DATA / "obd-men")


def test_obd_random_log_ctr(obd_report):
    truth = obd_report["random_ctr"]
    assert obd_report["n_random"] == 10_000 and obd_report["clicks_random"] == 46
    assert truth.value == pytest.approx(0.0046)
    assert truth.ci_low < truth.value < truth.ci_high


@pytest.mark.parametrize("name", ["IPS", "SNIPS", "DR"])
def test_obd_estimates_of_the_random_policy_agree_with_its_own_log(obd_report, name):
    """Estimated from the Thompson-sampling log, the uniform policy's CTR must match the random log's CTR
    within 3 combined standard errors (both sides are noisy: ~50-70 clicks each)."""
    est, truth = obd_report["estimates"][name], obd_report["random_ctr"]
    combined = float(np.hypot(est.stderr, truth.stderr))
    assert abs(obd_report["relative_error"][name]) < 3 * combined / truth.value
    assert abs(obd_report["z"][name]) < 3
    # the estimate is pulled away from the logging policy's own (higher) CTR towards the random one
    assert abs(est.value - truth.value) < abs(obd_report["bts_ctr"].value - truth.value) + 2 * est.stderr


def test_obd_importance_weights_average_to_one(obd_report):
    assert obd_report["weight_mean"].covers(1.0)
    assert obd_report["effective_sample_size"] > 100


def test_on_policy_estimate_is_a_mean_with_a_normal_interval():
    e = on_policy_estimate([0, 1, 0, 1])
    assert e.value == 0.5 and e.stderr == pytest.approx(np.sqrt(1 / 3) / 2)


def test_weight_diagnostics_warn_when_a_handful_of_rows_carry_the_estimate():
    """Regression (issue 17): the OBD women campaign gave ESS 2 of 10,000 rows and IPS +62% with no warning."""
    from recsvc.evaluation.ope import weight_diagnostics

    w = np.full(10_000, 0.1)
    w[:2] = 2_000.0  # two rows dominate
    d = weight_diagnostics(w)
    assert d.ess < 10 and d.largest_weights[:2] == (2_000.0, 2_000.0)
    assert len(d.warnings) == 2
    assert "effective sample size" in d.warnings[0] and "largest weights carry" in d.warnings[1]
    calm = weight_diagnostics(np.random.default_rng(0).uniform(0.5, 1.5, 10_000))
    assert calm.warnings == () and calm.ess_share > 0.9 and abs(calm.mean_weight - 1) < 0.01


def test_clip_level_clips_heavy_tails_only():
    from recsvc.evaluation.ope import BanditLog, clip_level, clipped_ips, ips

    rng = np.random.default_rng(1)
    n = 20_000
    light = rng.uniform(0.5, 1.5, n)
    assert clip_level(light) > light.max()  # light tails: nothing is clipped
    heavy = np.where(rng.random(n) < 0.001, 5_000.0, 1.0)
    c = clip_level(heavy)
    assert c < 5_000.0
    # clipped IPS: smaller standard error than IPS, and its bias is bounded by mean(max(w - c, 0))
    prop = 1.0 / heavy
    log = BanditLog(action=np.zeros(n, np.int64), reward=rng.binomial(1, 0.05, n).astype(float),
                    propensity=np.clip(prop, 1e-9, 1.0), n_actions=1)
    plain = ips(log, pi_logged=np.ones(n))
    clipped, level = clipped_ips(log, pi_logged=np.ones(n))
    assert level == c and clipped.stderr < plain.stderr
