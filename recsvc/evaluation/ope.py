"""Off-policy evaluation: the value of a target policy estimated from another policy's bandit log.

Setting. Each logged round ``i`` has a context ``x_i`` (optional), the action ``a_i`` the logging policy
chose with probability ``p_i`` (its *propensity*), an optional slot ``position_i`` and a reward ``r_i``.
The target policy ``pi`` is given either as its full action distribution for each logged context,
``pi: float[N, A]`` with ``pi[i, a] = pi(a | x_i)``, or only as ``pi_logged: float[N]`` with
``pi_logged[i] = pi(a_i | x_i)``. The estimand is ``V(pi) = E_x E_{a ~ pi(.|x)} E[r | x, a]`` over the
log's context distribution. Slate logs that have one row per (impression, position) — such as the Open
Bandit Dataset — are evaluated position-wise: the position is part of the context and ``p_i``, ``pi`` are
the probabilities of the action *at that position*.

Estimators (every one returns an :class:`Estimate` with a normal-approximation confidence interval, or a
percentile-bootstrap one when ``n_bootstrap > 0``). With importance weights ``w_i = pi(a_i|x_i) / p_i``:

- **IPS**: ``mean_i w_i r_i``. Unbiased when ``p_i > 0`` wherever ``pi`` puts mass; high variance when the
  weights are large.
- **SNIPS**: ``sum_i w_i r_i / sum_i w_i``. Slightly biased (O(1/N)), usually much lower variance; its
  standard error uses the delta method.
- **DM** (direct method): ``mean_i sum_a pi(a|x_i) q(x_i, a)`` with a fitted reward model ``q``. Low variance
  but biased as far as the model is wrong; its standard error is conditional on the fitted model (it ignores
  the model's own estimation error), so its CI is too narrow and is given for reference only.
- **DR** (doubly robust): ``mean_i [sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i))]``. Unbiased if either
  the propensities or the model are right; lower variance than IPS when the model is decent.
  ``q`` is *cross-fitted*: the log is split into K folds and each row is predicted by a model fitted on the
  other folds, so the model never sees the reward it corrects.

- **Clipped IPS / DR-clip**: the weights capped at ``c`` (:func:`clip_level`).
- **Switch-DR** (Wang, Agarwal & Dudík, "Optimal and adaptive off-policy evaluation in contextual
  bandits", ICML 2017): DR where the weight is at most ``tau``, the model alone where it is larger —
  ``mean_i [sum_a pi(a|x_i) q(x_i, a) + 1{w_i <= tau} w_i (r_i - q(x_i, a_i))]``; ``tau`` is the smaller
  of the clip level and their smallest-estimated-MSE rule (:func:`switch_threshold`).

DM and DR need the full distribution ``pi``; with only ``pi_logged`` you get IPS and SNIPS.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np

__all__ = [
    "WeightDiagnostics",
    "clip_level",
    "clipped_ips",
    "doubly_robust_clipped",
    "switch_threshold",
    "switch_doubly_robust",
    "weight_diagnostics",
    "BanditLog",
    "Estimate",
    "RewardModel",
    "RidgeRewardModel",
    "ActionMeanRewardModel",
    "importance_weights",
    "effective_sample_size",
    "cross_fit_predict",
    "ips",
    "snips",
    "direct_method",
    "doubly_robust",
    "on_policy_estimate",
    "estimate_all",
]


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class BanditLog:
    """A logged bandit feedback data set, one row per decision (per slot for slate logs).

    Arrays are coerced on construction: ``action`` and ``position`` to int64, the rest to float64.
    ``n_actions=0`` (the default) means ``action.max() + 1``. ``feature_names`` optionally names context columns.
    """

    action: np.ndarray  # int64[N], in 0..n_actions-1
    reward: np.ndarray  # float64[N]
    propensity: np.ndarray  # float64[N], logging policy's probability of the logged action, in (0, 1]
    context: np.ndarray | None = None  # float64[N, D]
    position: np.ndarray | None = None  # int64[N]
    n_actions: int = 0
    feature_names: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        action = np.asarray(self.action)
        if action.ndim != 1:
            raise ValueError(f"action must be 1-D, got shape {action.shape}")
        n = action.shape[0]
        if n == 0:
            raise ValueError("a bandit log needs at least one row")
        if not np.issubdtype(action.dtype, np.integer):
            raise TypeError(f"action must hold integer action ids, got dtype {action.dtype}")
        action = action.astype(np.int64, copy=False)
        if action.min() < 0:
            raise ValueError(f"action ids must be non-negative, got {action.min()}")
        n_actions = int(self.n_actions) if self.n_actions else int(action.max()) + 1
        if action.max() >= n_actions:
            raise ValueError(f"action id {action.max()} is out of range for n_actions={n_actions}")
        reward = _vector(self.reward, "reward", n)
        propensity = _vector(self.propensity, "propensity", n)
        if not ((propensity > 0) & (propensity <= 1)).all():
            raise ValueError(
                f"propensities must lie in (0, 1], got values in [{propensity.min()}, {propensity.max()}]; "
                "a zero propensity means the logging policy could not have taken the logged action"
            )
        context = self.context
        if context is not None:
            context = np.asarray(context, dtype=np.float64)
            if context.ndim != 2 or context.shape[0] != n:
                raise ValueError(f"context must be 2-D [{n}, D], got shape {context.shape}")
            if not np.isfinite(context).all():
                raise ValueError("context holds NaN or infinite values")
        position = self.position
        if position is not None:
            position = np.asarray(position)
            if position.shape != (n,) or not np.issubdtype(position.dtype, np.integer):
                raise ValueError(
                    f"position must be an integer array of shape ({n},), got {position.dtype} {position.shape}"
                )
            position = position.astype(np.int64, copy=False)
        if self.feature_names is not None and (context is None or len(self.feature_names) != context.shape[1]):
            raise ValueError("feature_names must name every context column")
        for name, value in (
            ("action", action),
            ("reward", reward),
            ("propensity", propensity),
            ("context", context),
            ("position", position),
            ("n_actions", n_actions),
        ):
            object.__setattr__(self, name, value)

    @property
    def n(self) -> int:
        return int(self.action.shape[0])

    def take(self, rows: Any) -> BanditLog:
        """The sub-log of the given rows (indices or boolean mask)."""
        return BanditLog(
            action=self.action[rows],
            reward=self.reward[rows],
            propensity=self.propensity[rows],
            context=None if self.context is None else self.context[rows],
            position=None if self.position is None else self.position[rows],
            n_actions=self.n_actions,
            feature_names=self.feature_names,
        )


def _vector(x: Any, name: str, n: int) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return v


@dataclass(frozen=True)
class Estimate:
    """A policy-value estimate with its standard error and a two-sided confidence interval."""

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    def covers(self, x: float) -> bool:
        return self.ci_low <= x <= self.ci_high


# --------------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------------


class RewardModel(Protocol):
    """Predicts the expected reward of every action for given rows of a log."""

    def fit(self, log: BanditLog, rows: np.ndarray | None = None) -> RewardModel: ...

    def predict(self, log: BanditLog, rows: np.ndarray | None = None) -> np.ndarray:
        """``float64[n_rows, n_actions]``."""
        ...


class RidgeRewardModel:
    """Linear reward model ``q(x, a)`` fitted by closed-form ridge regression.

    Features of a (row, action) pair: ``[1, onehot(a), z, z (x) onehot(a) if interactions]`` where ``z`` is
    the context plus a one-hot of the position (when the log has positions and ``use_position``). Without
    a context this is a shrunken per-action mean (plus position effects). The ridge penalty ``alpha`` applies
    to every coefficient but the intercept. The normal equations are accumulated over row chunks, so the
    dense design matrix is never materialised whole. Predictions are clipped to the observed reward range
    (``clip=True``), which keeps a linear model of click probabilities inside [0, 1].
    """

    def __init__(
        self, alpha: float = 1.0, *, interactions: bool = False, use_position: bool = True, clip: bool = True
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self.interactions = interactions
        self.use_position = use_position
        self.clip = clip
        self.coef_: np.ndarray | None = None
        self.position_levels_: np.ndarray | None = None

    def _z(self, log: BanditLog, rows: np.ndarray) -> np.ndarray:
        parts = []
        if log.context is not None:
            parts.append(log.context[rows])
        if self.position_levels_ is not None and log.position is not None:
            levels = self.position_levels_
            parts.append((log.position[rows][:, None] == levels[None, :]).astype(np.float64))
        if not parts:
            return np.zeros((rows.shape[0], 0))
        return np.concatenate(parts, axis=1)

    def _design(self, z: np.ndarray, action: np.ndarray, n_actions: int) -> np.ndarray:
        n, d = z.shape
        onehot = np.zeros((n, n_actions))
        onehot[np.arange(n), action] = 1.0
        blocks = [np.ones((n, 1)), onehot, z]
        if self.interactions and d:
            inter = np.zeros((n, d, n_actions))
            inter[np.arange(n), :, action] = z
            blocks.append(inter.reshape(n, d * n_actions))
        return np.concatenate(blocks, axis=1)

    def fit(self, log: BanditLog, rows: np.ndarray | None = None) -> RidgeRewardModel:
        rows = np.arange(log.n) if rows is None else np.asarray(rows)
        if rows.size == 0:
            raise ValueError("cannot fit a reward model on zero rows")
        a = log.n_actions
        # Position columns from the whole log's positions, so every cross-fitting fold has the same layout.
        use_pos = self.use_position and log.position is not None
        self.position_levels_ = np.unique(log.position) if use_pos else None
        gram = None
        rhs = None
        for start in range(0, rows.shape[0], 4096):
            r = rows[start : start + 4096]
            phi = self._design(self._z(log, r), log.action[r], a)
            g, b = phi.T @ phi, phi.T @ log.reward[r]
            gram, rhs = (g, b) if gram is None or rhs is None else (gram + g, rhs + b)
        assert gram is not None and rhs is not None  # rows is not empty
        penalty = np.full(gram.shape[0], self.alpha)
        penalty[0] = 0.0
        self.coef_ = np.linalg.solve(gram + np.diag(penalty), rhs)
        self.n_actions_ = a
        self.z_dim_ = self._z(log, rows[:1]).shape[1]
        self.reward_range_ = (float(log.reward[rows].min()), float(log.reward[rows].max()))
        return self

    def predict(self, log: BanditLog, rows: np.ndarray | None = None) -> np.ndarray:
        if self.coef_ is None:
            raise RuntimeError("RidgeRewardModel.predict called before fit")
        rows = np.arange(log.n) if rows is None else np.asarray(rows)
        a, d = self.n_actions_, self.z_dim_
        z = self._z(log, rows)
        if z.shape[1] != d:
            raise ValueError(f"the model was fitted with {d} context features but the log has {z.shape[1]}")
        c = self.coef_
        q = c[0] + c[1 : 1 + a][None, :] + (z @ c[1 + a : 1 + a + d])[:, None]
        if self.interactions and d:
            q = q + z @ c[1 + a + d :].reshape(d, a)
        return np.clip(q, *self.reward_range_) if self.clip else q


class ActionMeanRewardModel:
    """Per-action mean reward, shrunk towards the global mean: ``(sum_a + m * mean) / (n_a + m)``.

    Ignores context and position; the fallback when nothing better is known. ``prior_strength`` is ``m``.
    """

    def __init__(self, prior_strength: float = 1.0) -> None:
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be non-negative, got {prior_strength}")
        self.prior_strength = float(prior_strength)
        self.means_: np.ndarray | None = None

    def fit(self, log: BanditLog, rows: np.ndarray | None = None) -> ActionMeanRewardModel:
        rows = np.arange(log.n) if rows is None else np.asarray(rows)
        if rows.size == 0:
            raise ValueError("cannot fit a reward model on zero rows")
        a, r = log.action[rows], log.reward[rows]
        sums = np.bincount(a, weights=r, minlength=log.n_actions)
        counts = np.bincount(a, minlength=log.n_actions)
        m = self.prior_strength
        with np.errstate(invalid="ignore", divide="ignore"):  # m == 0 and an unseen action: global mean
            self.means_ = np.where(counts + m > 0, (sums + m * r.mean()) / (counts + m), r.mean())
        return self

    def predict(self, log: BanditLog, rows: np.ndarray | None = None) -> np.ndarray:
        if self.means_ is None:
            raise RuntimeError("ActionMeanRewardModel.predict called before fit")
        n = log.n if rows is None else np.asarray(rows).shape[0]
        return np.broadcast_to(self.means_, (n, self.means_.shape[0])).copy()


def cross_fit_predict(model: RewardModel, log: BanditLog, *, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """``float64[N, A]`` out-of-fold predictions: each row from a copy of ``model`` fitted on the other folds.

    Folds are a random partition (fixed by ``seed``). ``n_folds=1`` fits and predicts in-sample.
    """
    if n_folds < 1 or n_folds > log.n:
        raise ValueError(f"n_folds must be between 1 and the number of rows ({log.n}), got {n_folds}")
    if n_folds == 1:
        return copy.deepcopy(model).fit(log).predict(log)
    fold = np.random.default_rng(seed).permutation(log.n) % n_folds
    q = np.empty((log.n, log.n_actions))
    for f in range(n_folds):
        test = np.flatnonzero(fold == f)
        train = np.flatnonzero(fold != f)
        q[test] = copy.deepcopy(model).fit(log, train).predict(log, test)
    return q


# --------------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------------


def _target(log: BanditLog, pi: Any, pi_logged: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """Validate the target policy; return (pi or None, pi_logged)."""
    if (pi is None) == (pi_logged is None):
        raise ValueError("give exactly one of pi (float[N, A]) and pi_logged (float[N])")
    if pi is not None:
        p = np.asarray(pi, dtype=np.float64)
        if p.shape != (log.n, log.n_actions):
            raise ValueError(f"pi must have shape (n_rows, n_actions) = ({log.n}, {log.n_actions}), got {p.shape}")
        if not (np.isfinite(p).all() and p.min() >= 0):
            raise ValueError("pi must hold finite non-negative probabilities")
        row_sums = p.sum(axis=1)
        if not np.allclose(row_sums, 1.0, atol=1e-6):
            i = int(np.argmax(np.abs(row_sums - 1.0)))
            raise ValueError(f"each row of pi must sum to 1; row {i} sums to {row_sums[i]}")
        return p, p[np.arange(log.n), log.action]
    pl = _vector(pi_logged, "pi_logged", log.n)
    if pl.min() < 0 or pl.max() > 1:
        raise ValueError(f"pi_logged must lie in [0, 1], got values in [{pl.min()}, {pl.max()}]")
    return None, pl


def importance_weights(log: BanditLog, pi: Any = None, *, pi_logged: Any = None) -> np.ndarray:
    """``w_i = pi(a_i | x_i) / p_i`` for every logged row."""
    _, pl = _target(log, pi, pi_logged)
    return pl / log.propensity


def effective_sample_size(weights: Any) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of importance weights."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / (w**2).sum())


#: Diagnostics warn when the effective sample size is below this share of the rows ...
ESS_WARNING_SHARE = 0.01
#: ... or when the largest ``TOP_WEIGHTS`` weights carry more than this share of the total weight.
TOP_WEIGHTS = 5
TOP_WEIGHT_WARNING_SHARE = 0.5


@dataclass(frozen=True)
class WeightDiagnostics:
    """How far an off-policy estimate can be trusted, from its importance weights alone."""

    n: int
    ess: float  # Kish's effective sample size (sum w)^2 / sum w^2
    ess_share: float  # ess / n
    max_weight: float
    largest_weights: tuple[float, ...]  # the TOP_WEIGHTS largest, descending
    largest_share: float  # their share of sum w
    mean_weight: float  # E[w] = 1 when the target's support is covered and the propensities are right
    warnings: tuple[str, ...]


def weight_diagnostics(weights: Any) -> WeightDiagnostics:
    """ESS, the largest weights and plain warnings: ESS below ``ESS_WARNING_SHARE`` of the rows, or the
    ``TOP_WEIGHTS`` largest weights carrying more than ``TOP_WEIGHT_WARNING_SHARE`` of the weight."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    n = w.size
    total = float(w.sum())
    if n == 0 or total <= 0:
        return WeightDiagnostics(n, 0.0, 0.0, 0.0, (), 0.0, float("nan"),
                                 ("no positive importance weight: the target never picks a logged action",))
    ess = effective_sample_size(w)
    top = np.sort(w)[::-1][:TOP_WEIGHTS]
    share = float(top.sum() / total)
    warnings = []
    if ess < ESS_WARNING_SHARE * n:
        warnings.append(f"effective sample size {ess:.1f} of {n} rows ({ess / n:.2%}) is below "
                        f"{ESS_WARNING_SHARE:.0%}: the estimate rests on a few rows; do not trust it")
    if share > TOP_WEIGHT_WARNING_SHARE:
        warnings.append(f"the {top.size} largest weights carry {share:.0%} of the total weight "
                        f"(largest {top[0]:.3g}): a handful of rows decide the estimate")
    return WeightDiagnostics(n, ess, ess / n, float(top[0]), tuple(map(float, top)), share, float(w.mean()),
                             tuple(warnings))


def clip_level(weights: Any) -> float:
    """The clip level of :func:`clipped_ips` and :func:`doubly_robust_clipped`, by a stated rule:
    truncated importance sampling's ``c = sqrt(n) * mean(w)`` (Ionides 2008): the estimate stays
    consistent, its variance is bounded by ``c * mean(w) / n``-order terms, and weights below c (every
    weight when the tails are light) are left alone."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size == 0:
        return math.inf
    return float(math.sqrt(w.size) * w.mean())


def clipped_ips(
    log: BanditLog,
    pi: Any = None,
    *,
    pi_logged: Any = None,
    clip: float | None = None,
    confidence: float = 0.95,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> tuple[Estimate, float]:
    """(``mean_i min(w_i, c) r_i``, c): IPS with weights clipped at ``clip`` (default: :func:`clip_level`).
    Biased down by at most ``mean(max(w - c, 0))`` times the largest reward."""
    w = importance_weights(log, pi, pi_logged=pi_logged)
    r = log.reward
    c = clip_level(w) if clip is None else float(clip)
    return _ratio_estimate(np.minimum(w, c) * r, None, confidence=confidence, n_bootstrap=n_bootstrap,
                           seed=seed), c


def doubly_robust_clipped(
    log: BanditLog, pi: Any, q_hat: Any, *, clip: float | None = None, confidence: float = 0.95,
    n_bootstrap: int = 0, seed: int = 0,
) -> tuple[Estimate, float]:
    """(DR with weights clipped at c, c): ``mean_i [sum_a pi q_hat + min(w_i, c)(r_i - q_hat[i, a_i])]``;
    c by :func:`clip_level` on the weights (the reward model absorbs what clipping drops)."""
    p, pl = _target(log, pi, None)
    q = _check_q(log, q_hat)
    w = pl / log.propensity
    c = clip_level(w) if clip is None else float(clip)
    rows = np.arange(log.n)
    terms = (p * q).sum(axis=1) + np.minimum(w, c) * (log.reward - q[rows, log.action])
    return _ratio_estimate(terms, None, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed), c


def switch_threshold(weights: Any, residuals: Any, dm_terms: Any) -> float:
    """Switch-DR's threshold, by a stated rule: the smaller of

    * the clip level of IPS-clip and DR-clip, ``sqrt(n) * mean(w)`` (:func:`clip_level`): no weight above
      it enters the estimate, whatever the rewards say, and
    * Wang et al.'s (2017, §4.2) estimated-MSE minimiser over ``tau`` in the weights' quantiles
      {50, 75, 90, 95, 99, 99.9}%, the clip level and the largest weight:

        MSE(tau) = var_i(T_i(tau)) / n + bias(tau)^2,   T_i(tau) = dm_i + 1{w_i <= tau} w_i res_i,
        bias(tau) = mean_i 1{w_i > tau} w_i res_i   (the DR correction switching drops; DR is unbiased),

      ties to the larger ``tau``.

    The MSE rule alone is fooled exactly where switching matters: a few rows with huge weights and
    residuals of one sign (no click on a rare action) make the dropped correction look like bias, and it
    keeps DR (on simulated logs with weights of 250 it kept DR in 14 of 40, with DR's error); the clip
    level alone keeps DR's error on the Open Bandit women's campaign (+73%), where the MSE rule switches
    1% of the rows and lands at -2% (benchmarks/README.md). Both levels grow with n, so switch-DR tends
    to DR on large, well-covered logs. ``residuals`` = r_i - q(x_i, a_i), ``dm_terms`` = sum_a pi(a|x_i)
    q(x_i, a)."""
    w = np.asarray(weights, np.float64).ravel()
    res = np.asarray(residuals, np.float64).ravel()
    dm = np.asarray(dm_terms, np.float64).ravel()
    if not w.size == res.size == dm.size:
        raise ValueError("weights, residuals and dm_terms must have the same length")
    if w.size < 2:
        return math.inf
    clip = clip_level(w)
    grid = np.unique(np.r_[np.quantile(w, [0.5, 0.75, 0.9, 0.95, 0.99, 0.999]), clip, w.max()])
    best, best_mse = math.inf, math.inf
    for tau in grid[::-1]:  # largest first: ties keep the larger tau
        keep = w <= tau
        terms = dm + np.where(keep, w * res, 0.0)
        bias = float(np.where(keep, 0.0, w * res).mean())
        mse = float(terms.var(ddof=1)) / w.size + bias * bias
        if mse < best_mse:
            best, best_mse = float(tau), mse
    return min(best, clip)


def switch_doubly_robust(
    log: BanditLog, pi: Any, q_hat: Any, *, tau: float | None = None, confidence: float = 0.95,
    n_bootstrap: int = 0, seed: int = 0,
) -> tuple[Estimate, float]:
    """(Switch-DR, tau): ``mean_i [sum_a pi(a|x_i) q_hat[i, a] + 1{w_i <= tau} w_i (r_i - q_hat[i, a_i])]``;
    rows whose weight exceeds ``tau`` rely on the reward model alone. ``tau`` by :func:`switch_threshold`
    unless given (``inf`` is DR). The interval is conditional on ``tau`` and the model, like DR-clip's."""
    p, pl = _target(log, pi, None)
    q = _check_q(log, q_hat)
    w = pl / log.propensity
    rows = np.arange(log.n)
    res = log.reward - q[rows, log.action]
    dm = (p * q).sum(axis=1)
    t = switch_threshold(w, res, dm) if tau is None else float(tau)
    terms = dm + np.where(w <= t, w * res, 0.0)
    return _ratio_estimate(terms, None, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed), t


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _ratio_estimate(
    num: np.ndarray,
    den: np.ndarray | None,
    *,
    confidence: float,
    n_bootstrap: int,
    seed: int,
) -> Estimate:
    """``sum(num) / sum(den)`` (``den=None`` means a plain mean) with a normal or bootstrap interval.

    Normal: the standard error of a mean, or for a ratio the delta method on the linearised terms
    ``(num_i - V den_i) / mean(den)``. Bootstrap: resample rows ``n_bootstrap`` times; the CI is the
    percentile interval and the stderr the bootstrap standard deviation.
    """
    n = num.shape[0]
    value = float(num.mean()) if den is None else float(num.sum() / den.sum())
    terms = num - value if den is None else (num - value * den) / den.mean()
    stderr = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    if n_bootstrap <= 0:
        half = _z(confidence) * stderr
        return Estimate(value, stderr, value - half, value + half, n)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_bootstrap)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        s = num[idx].sum(axis=1)
        stats[start : start + b] = s / n if den is None else s / den[idx].sum(axis=1)
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(value, float(stats.std(ddof=1)), float(lo), float(hi), n)


def ips(
    log: BanditLog,
    pi: Any = None,
    *,
    pi_logged: Any = None,
    confidence: float = 0.95,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> Estimate:
    """Inverse propensity scoring: ``mean_i w_i r_i``."""
    w = importance_weights(log, pi, pi_logged=pi_logged)
    return _ratio_estimate(w * log.reward, None, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)


def snips(
    log: BanditLog,
    pi: Any = None,
    *,
    pi_logged: Any = None,
    confidence: float = 0.95,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> Estimate:
    """Self-normalised IPS: ``sum_i w_i r_i / sum_i w_i`` (delta-method standard error)."""
    w = importance_weights(log, pi, pi_logged=pi_logged)
    return _ratio_estimate(w * log.reward, w, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)


def _check_q(log: BanditLog, q_hat: Any) -> np.ndarray:
    q = np.asarray(q_hat, dtype=np.float64)
    if q.shape != (log.n, log.n_actions):
        raise ValueError(f"q_hat must have shape ({log.n}, {log.n_actions}), got {q.shape}")
    return q


def direct_method(
    log: BanditLog, pi: Any, q_hat: Any, *, confidence: float = 0.95, n_bootstrap: int = 0, seed: int = 0
) -> Estimate:
    """``mean_i sum_a pi(a|x_i) q_hat[i, a]``; the interval ignores the reward model's own error."""
    p, _ = _target(log, pi, None)
    q = _check_q(log, q_hat)
    dm = (p * q).sum(axis=1)
    return _ratio_estimate(dm, None, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)


def doubly_robust(
    log: BanditLog, pi: Any, q_hat: Any, *, confidence: float = 0.95, n_bootstrap: int = 0, seed: int = 0
) -> Estimate:
    """``mean_i [sum_a pi(a|x_i) q_hat[i, a] + w_i (r_i - q_hat[i, a_i])]``; pass cross-fitted ``q_hat``."""
    p, pl = _target(log, pi, None)
    q = _check_q(log, q_hat)
    w = pl / log.propensity
    rows = np.arange(log.n)
    terms = (p * q).sum(axis=1) + w * (log.reward - q[rows, log.action])
    return _ratio_estimate(terms, None, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)


def on_policy_estimate(reward: Any, *, confidence: float = 0.95, n_bootstrap: int = 0, seed: int = 0) -> Estimate:
    """The mean reward of a log collected by the policy itself (e.g. an A/B arm), with its interval."""
    r = np.asarray(reward, dtype=np.float64).ravel()
    if r.size == 0:
        raise ValueError("reward is empty")
    return _ratio_estimate(r, None, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)


def estimate_all(
    log: BanditLog,
    pi: Any = None,
    *,
    pi_logged: Any = None,
    reward_model: RewardModel | None = None,
    n_folds: int = 5,
    confidence: float = 0.95,
    n_bootstrap: int = 0,
    seed: int = 0,
    clipped: bool = False,
) -> dict[str, Estimate]:
    """Every estimator the inputs allow: ``{"IPS", "SNIPS"}`` always, plus ``{"DM", "DR"}`` when ``pi`` is given;
    ``clipped=True`` adds ``"IPS-clip"`` (and ``"DR-clip"`` and ``"Switch-DR"`` with ``pi``), clip level by
    :func:`clip_level`, switch threshold by :func:`switch_threshold`.

    ``reward_model`` (default :class:`RidgeRewardModel`) is cross-fitted over ``n_folds`` folds for DM and DR.
    """
    p, pl = _target(log, pi, pi_logged)
    kw = dict(confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
    out = {"IPS": ips(log, pi_logged=pl, **kw), "SNIPS": snips(log, pi_logged=pl, **kw)}
    if clipped:
        out["IPS-clip"] = clipped_ips(log, pi_logged=pl, **kw)[0]
    if p is None:
        if reward_model is not None:
            raise ValueError("DM and DR need the target policy's full distribution pi[N, A], not only pi_logged")
        return out
    q = cross_fit_predict(reward_model or RidgeRewardModel(), log, n_folds=n_folds, seed=seed)
    out["DM"] = direct_method(log, p, q, **kw)
    out["DR"] = doubly_robust(log, p, q, **kw)
    if clipped:
        out["DR-clip"] = doubly_robust_clipped(log, p, q, **kw)[0]
        out["Switch-DR"] = switch_doubly_robust(log, p, q, **kw)[0]
    return out
