"""Exploration: bandit policies on top of the ranker, and their propensities.

The engine hands a policy the ranker's ``scores`` (float32, any real scale) for
the n retrieved candidates together with each candidate's bandit state, and gets
back an :class:`Exploration`: adjusted ``scores`` that the engine orders by
(descending; **ties go to the lower index**, i.e. a stable sort of ``-scores``,
as :func:`top_k_indices` does) and, per candidate, the ``propensity``: the
probability, over the policy's randomness, that the candidate lands in the
top ``k`` of that adjusted ordering. Re-ranking then builds the slate from the
ordering; its rules are deterministic, so the propensity stays the quantity to
log for off-policy evaluation as long as re-ranking keeps the top k.

Bandit state: Beta posteriors of an item's click rate
------------------------------------------------------
Each item carries ``alpha`` and ``beta``::

    alpha = prior_alpha + successes        beta = prior_beta + failures

(with the default prior (1, 20), a prior click rate of about 5%). The online
state keeps the evidence (successes, failures) per item and updates it one
attributed event at a time with :func:`update_evidence_row` (validated
version: :func:`update_evidence`); with a discount ``gamma`` in (0, 1], each
update first multiplies the item's old evidence by ``gamma``::

    successes <- max(0, gamma * successes + ds)
    failures  <- max(0, gamma * failures  + df)

``gamma = 1`` is the stationary posterior; ``gamma < 1`` caps the effective
sample size near ``1 / (1 - gamma)`` updates, so the posterior can follow a
drifting click rate. ``pulls`` is the number of times an item was
shown (impressions) and ``total_pulls`` their sum; only UCB1 reads them.

Policies and how they combine with the ranker
---------------------------------------------
All policies but greedy explore among the ranker's **top M** candidates
(``top_m``, ties to the lower index); the other n - M keep the ranker's order
below every top-M candidate (their scores are shifted down, differences kept),
so they only reach the slate when k > M.

``GreedyPolicy``
    Adjusted scores are the ranker's. Propensity: 1 for the top k, else 0.
``ThompsonPolicy(top_m, n_propensity_draws, temperature, discount)``
    Draws theta_i ~ Beta(alpha_i, beta_i) for the top M and scores them
    ``w_i * theta_i`` with ``w_i = exp((s_i - max s) / temperature)``: in log
    space this is ``s_i / temperature + log theta_i``, so the ranker's
    personalised score and the item's sampled click rate both count, for any
    real-valued ranker score. ``temperature=None`` scores by theta alone (the
    ranker only picks the M). Propensity: Monte-Carlo estimate of
    P(i in top k) from ``n_propensity_draws`` further independent rounds plus
    the served round itself, ``(count_i + [i served]) / (n_draws + 1)``,
    which is unbiased, sums to k, and is >= 1 / (n_draws + 1) for every
    served item (IPS weights stay finite).
``UCB1Policy(c, top_m, temperature)``
    Scores the top M by ``w_i * (mean_i + c * sqrt(log(1 + N) / (1 + n_i)))``
    with ``mean_i = alpha_i / (alpha_i + beta_i)`` (posterior mean, defined
    before any pull), ``n_i = pulls_i``, ``N = total_pulls``, and ``w_i`` as
    for Thompson. The +1s keep the bonus finite for unpulled items (they get
    the largest bonus instead of an infinite one). Deterministic, so the
    propensity is 1 for the top k and 0 otherwise.
``EpsilonGreedyPolicy(epsilon, top_m)``
    With probability 1 - epsilon serves the ranker's order; with probability
    epsilon lifts a uniformly random k-subset of the top M, in random order,
    above everything else. It ignores the bandit state: learning happens in
    the ranker, trained on the logged propensities. Exact propensity, with
    k' = min(k, M)::

        P(i in slate) = (1 - eps) [i in greedy top k]
                        + eps * k' / M [i in top M]
                        + eps [i in greedy top k but not in top M]   (only if k > M)

Every policy's propensities lie in [0, 1] and sum to min(k, n).

Compiled kernels
----------------
:func:`sample_beta_batch`, :func:`thompson_scores` and
:func:`thompson_topk_propensities` validate here and run in
``recsvc._fastpath._sampling`` without the GIL, drawing through the
Generator's bit generator with numpy's own ``random_beta``: a seeded Generator
yields exactly the draws ``rng.beta(alpha, beta)`` would. The request path's
round, :func:`explore_with_prior`, is one such call for Thompson: the Beta
prior, the top M, the served draws, the explored scores and their ordering.
"""

from __future__ import annotations

import inspect
import math
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from recsvc._fastpath import _sampling
from recsvc._fastpath.twins import sampling as _twin

__all__ = [
    "DEFAULT_PROPENSITY_DRAWS",
    "DEFAULT_TOP_M",
    "POLICIES",
    "EpsilonGreedyPolicy",
    "Exploration",
    "ExplorationPolicy",
    "RoundLayout",
    "ScoreDraws",
    "GreedyPolicy",
    "ThompsonPolicy",
    "UCB1Policy",
    "beta_prior",
    "explore_with_prior",
    "update_evidence",
    "update_evidence_row",
    "make_policy",
    "sample_beta_batch",
    "thompson_scores",
    "thompson_topk_propensities",
    "top_k_indices",
]

DEFAULT_TOP_M = 100
DEFAULT_PROPENSITY_DRAWS = 256

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
IntP = npt.NDArray[np.intp]


# --------------------------------------------------------------------------
# Validation helpers


def _vector(x: Any, name: str, dtype: type, n: int | None = None) -> np.ndarray:
    """``x`` as a 1-D C-contiguous array of ``dtype`` (length ``n`` if given)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {n} (one per candidate)")
    return np.ascontiguousarray(arr, dtype=dtype)


def _first_bad(ok: np.ndarray) -> int:
    return int(np.flatnonzero(~ok)[0])


def _check_positive_finite(x: np.ndarray, name: str) -> None:
    # min/max propagate NaN, so two reductions cover <= 0, NaN and inf.
    if x.size and not (x.min() > 0 and x.max() < np.inf):
        i = _first_bad((x > 0) & (x < np.inf))
        raise ValueError(
            f"{name} must be positive and finite, got {name}[{i}]={float(x[i])!r}; "
            "Beta parameters are prior + counts, so check the prior and the state store"
        )


def _check_nonnegative_finite(x: np.ndarray, name: str) -> None:
    if x.size and not (x.min() >= 0 and x.max() < np.inf):
        i = _first_bad((x >= 0) & (x < np.inf))
        raise ValueError(f"{name} must be >= 0 and finite, got {name}[{i}]={float(x[i])!r}")


def _check_finite(x: np.ndarray, name: str) -> None:
    if x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
        i = _first_bad(np.isfinite(x))
        raise ValueError(f"{name} must be finite, got {name}[{i}]={float(x[i])!r}")


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            "rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng


def _count(x: Any, name: str, minimum: int) -> int:
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _output(out: Any, n: int, name: str = "out") -> F64:
    if out is None:
        return np.empty(n, dtype=np.float64)
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.ndim != 1:
        raise ValueError(f"{name} must be a 1-D float64 numpy array")
    if out.shape[0] != n:
        raise ValueError(f"{name} has length {out.shape[0]}, expected {n}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be C-contiguous and writeable")
    return out


def _beta_parameters(alpha: Any, beta: Any) -> tuple[F64, F64]:
    # Positivity and finiteness are checked by the kernel before it draws
    # anything (one C pass instead of four numpy reductions); see _run_kernel.
    a = _vector(alpha, "alpha", np.float64)
    b = _vector(beta, "beta", np.float64, a.shape[0])
    return a, b


def _run_kernel(kernel: Any, rng: np.random.Generator, a: F64, b: F64, *args: Any) -> None:
    try:
        kernel(rng, a, b, *args)
    except ValueError:
        # The kernel refused a parameter (and drew nothing): name it precisely.
        _check_positive_finite(a, "alpha")
        _check_positive_finite(b, "beta")
        raise


def _base_scores(base_scores: Any, n: int) -> F64 | None:
    if base_scores is None:
        return None
    w = _vector(base_scores, "base_scores", np.float64, n)
    _check_nonnegative_finite(w, "base_scores")
    return w


# --------------------------------------------------------------------------
# Kernels' public face


def top_k_indices(scores: npt.ArrayLike, k: int) -> IntP:
    """Indices of the ``k`` highest scores, best first; ties go to the lower index.

    The same order as a stable sort of ``-scores`` truncated to k, in O(n + k log k).
    This is the ordering rule every policy's propensities assume.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    n = s.shape[0]
    k = min(_count(k, "k", 0), n)
    if k == 0:
        return np.empty(0, dtype=np.intp)
    if k == n:
        return np.argsort(-s, kind="stable")
    idx = np.argpartition(-s, k - 1)[:k]
    kth = s[idx].min()
    if np.count_nonzero(s >= kth) == k:  # no tie straddles the k-th place
        idx.sort()
    else:
        above = np.flatnonzero(s > kth)
        ties = np.flatnonzero(s == kth)[: k - above.shape[0]]
        idx = np.concatenate((above, ties))
    # idx is in index order, so the stable sort puts ties lower index first.
    return idx[np.argsort(-s[idx], kind="stable")]


def sample_beta_batch(
    alpha: npt.ArrayLike,
    beta: npt.ArrayLike,
    rng: np.random.Generator,
    out: F64 | None = None,
) -> F64:
    """One draw per item, ``out[i] ~ Beta(alpha[i], beta[i])``.

    Bit-identical to ``rng.beta(alpha, beta)`` for the same generator state.
    ``alpha`` and ``beta`` are 1-D, of equal length, positive and finite.
    """
    rng = _check_rng(rng)
    a, b = _beta_parameters(alpha, beta)
    res = _output(out, a.shape[0])
    _run_kernel(_sampling.sample_beta_batch, rng, a, b, res)
    return res


def thompson_scores(
    alpha: npt.ArrayLike,
    beta: npt.ArrayLike,
    rng: np.random.Generator,
    base_scores: npt.ArrayLike | None = None,
    out: F64 | None = None,
) -> F64:
    """One Thompson round: ``base_scores[i] * theta_i``, theta_i ~ Beta(alpha[i], beta[i]).

    ``base_scores`` (>= 0) weights the draws; None scores by theta alone.
    """
    rng = _check_rng(rng)
    a, b = _beta_parameters(alpha, beta)
    w = _base_scores(base_scores, a.shape[0])
    res = _output(out, a.shape[0])
    _run_kernel(_sampling.thompson_scores, rng, a, b, w, res)
    return res


def thompson_topk_propensities(
    alpha: npt.ArrayLike,
    beta: npt.ArrayLike,
    k: int,
    rng: np.random.Generator,
    base_scores: npt.ArrayLike | None = None,
    n_draws: int = DEFAULT_PROPENSITY_DRAWS,
    out: F64 | None = None,
) -> F64:
    """Monte-Carlo P(i in the top k of ``base_scores * theta``) over ``n_draws`` rounds.

    Each round draws theta_i ~ Beta(alpha[i], beta[i]) for every candidate and
    counts top-k membership (ties to the lower index); ``out[i] = count_i / n_draws``.
    The result sums to min(k, m). k >= m gives ones and k == 0 zeros, without drawing.
    """
    rng = _check_rng(rng)
    a, b = _beta_parameters(alpha, beta)
    k = _count(k, "k", 0)
    n_draws = _count(n_draws, "n_draws", 1)
    w = _base_scores(base_scores, a.shape[0])
    res = _output(out, a.shape[0])
    if any(np.may_share_memory(res, x) for x in (a, b) + ((w,) if w is not None else ())):
        raise ValueError("out must not share memory with alpha, beta or base_scores")
    _run_kernel(_sampling.thompson_topk_propensities, rng, a, b, w, k, n_draws, res)
    return res


def update_evidence(
    successes: F64,
    failures: F64,
    rows: npt.ArrayLike,
    d_successes: npt.ArrayLike,
    d_failures: npt.ArrayLike,
    gamma: float,
) -> None:
    """Update items' bandit evidence in place, one event at a time, with discounting.

    For each ``(row, ds, df)`` in order (see :func:`update_evidence_row`)::

        successes[row] = max(0, gamma * successes[row] + ds)
        failures[row]  = max(0, gamma * failures[row]  + df)

    The posterior is ``Beta(prior_alpha + successes, prior_beta + failures)``.
    ``successes``/``failures`` are float64 arrays (modified in place); counts
    may be fractional and negative (a negative count takes back evidence, e.g.
    a failure that became a success); ``gamma`` is in (0, 1] (1: no forgetting).
    This is the rule the online state applies to every attributed event.
    """
    for arr, name in ((successes, "successes"), (failures, "failures")):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float64 or arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D float64 numpy array (it is updated in place)")
        if not arr.flags.writeable:
            raise ValueError(f"{name} must be writeable (it is updated in place)")
    n = successes.shape[0]
    if failures.shape[0] != n:
        raise ValueError(f"failures has length {failures.shape[0]}, expected {n} (same as successes)")
    r = np.asarray(rows)
    if r.dtype.kind not in "iu":
        raise TypeError(f"rows must be an integer array, got dtype {r.dtype}")
    if r.ndim != 1:
        raise ValueError(f"rows must be 1-D, got shape {r.shape}")
    s = _vector(d_successes, "d_successes", np.float64, r.shape[0])
    f = _vector(d_failures, "d_failures", np.float64, r.shape[0])
    for v, name in ((s, "d_successes"), (f, "d_failures")):
        if not np.isfinite(v).all():
            raise ValueError(f"{name} must be finite")
    g = float(gamma)
    if not 0.0 < g <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    if r.shape[0] and (r.min() < 0 or r.max() >= n):
        bad = int(r[(r < 0) | (r >= n)][0])
        raise ValueError(f"rows must index the {n} items, got row {bad}")
    for row, ds, df in zip(r.tolist(), s.tolist(), f.tolist()):
        update_evidence_row(successes, failures, row, ds, df, g)


def update_evidence_row(successes: F64, failures: F64, row: int, ds: float, df: float, gamma: float) -> None:
    """One event of :func:`update_evidence`, unvalidated (the online state's per-event call)."""
    if gamma < 1.0:
        successes[row] *= gamma
        failures[row] *= gamma
    successes[row] = max(0.0, successes[row] + ds)
    failures[row] = max(0.0, failures[row] + df)


# --------------------------------------------------------------------------
# Policies


@dataclass(frozen=True, slots=True)
class Exploration:
    """What a policy returns for one request.

    scores: float32[n], the adjusted scores the engine orders by (descending,
        ties to the lower index).
    propensity: float64[n], P(candidate in the top k of that ordering).
    """

    scores: F32
    propensity: F64
    #: what :func:`explore_with_prior`'s compiled call worked out beside the scores (None otherwise)
    layout: RoundLayout | None = None


@dataclass(frozen=True, slots=True)
class RoundLayout:
    """A Thompson round's layout, for the request's later steps (so none of them sorts or selects again).

    top:        intp[M], the top M candidates (index order): ``ThompsonPolicy.draw_scores`` draws them
    rest_base:  float64[n], 0 on the top M, ``s - max(rest) - 1`` on the others (``ScoreDraws.base``)
    order:      intp[n], ``np.argsort(-scores, kind="stable")`` of the explored scores
    rest_order: intp[n - M], the others by ``rest_base`` descending, ties to the lower index: the order the
                final slate's propensity rounds walk them in (``slate_inclusion_counts``)
    """

    top: IntP
    rest_base: F64
    order: IntP
    rest_order: IntP


@dataclass(frozen=True, slots=True)
class ScoreDraws:
    """D independent draws of a policy's explored scores over n candidates, stored compactly.

    Draw d: candidate ``top[j]`` scores ``top_scores[d, j]`` (float32[D, M]); every other candidate i
    scores ``float32(base[i] + shift[d])`` (base float64[n], shift float64[D]), so the others keep
    one order in every draw.
    """

    top: IntP
    top_scores: F32
    base: F64
    shift: F64

    def dense(self) -> F32:
        """The draws as float32[D, n] (tests, small inputs)."""
        out = (self.base[None, :] + self.shift[:, None]).astype(np.float32)
        out[:, self.top] = self.top_scores
        return out


class ExplorationPolicy(ABC):
    """One interface for every policy: ``explore`` validates, ``_explore`` decides.

    ``_explore`` receives validated contiguous arrays (scores float32, the rest
    float64, all finite, n >= 1), ``alpha``/``beta`` > 0, and 0 <= k <= n.
    """

    name: ClassVar[str]

    def explore(
        self,
        scores: npt.ArrayLike,
        alpha: npt.ArrayLike,
        beta: npt.ArrayLike,
        pulls: npt.ArrayLike,
        total_pulls: float,
        k: int,
        rng: np.random.Generator,
        with_propensity: bool = True,
    ) -> Exploration:
        """``with_propensity=False`` skips the (top-k) propensity estimate where it costs draws
        (Thompson; ``propensity`` is then all zeros): the request path logs the final slate's
        propensities instead (:mod:`recsvc.slate_propensity`)."""
        rng = _check_rng(rng)
        s = _vector(scores, "scores", np.float32)
        n = s.shape[0]
        _check_finite(s, "scores")
        a = _vector(alpha, "alpha", np.float64, n)
        b = _vector(beta, "beta", np.float64, n)
        _check_positive_finite(a, "alpha")
        _check_positive_finite(b, "beta")
        p = _vector(pulls, "pulls", np.float64, n)
        _check_nonnegative_finite(p, "pulls")
        total = float(total_pulls)
        if not 0.0 <= total < math.inf:
            raise ValueError(f"total_pulls must be >= 0 and finite, got {total_pulls!r}")
        k = _count(k, "k", 0)
        if n == 0:
            return Exploration(np.empty(0, np.float32), np.empty(0, np.float64))
        if not with_propensity and isinstance(self, ThompsonPolicy):
            return self._explore(s, a, b, p, total, min(k, n), rng, with_propensity=False)
        return self._explore(s, a, b, p, total, min(k, n), rng)

    def draw_scores(
        self,
        scores: F32,
        alpha: F64,
        beta: F64,
        pulls: F64,
        total_pulls: float,
        k: int,
        rng: np.random.Generator,
        n_draws: int,
    ) -> ScoreDraws:
        """``n_draws`` independent copies of ``explore(...).scores``.

        Inputs as ``_explore`` receives them (validated, 0 <= k <= n). The final slate's propensities
        (:mod:`recsvc.slate_propensity`) re-run the re-ranking on each draw. This default calls
        ``_explore`` once per draw; policies override it with a vectorised draw from the same distribution.
        """
        n = scores.shape[0]
        out = np.empty((n_draws, n), dtype=np.float32)
        for d in range(n_draws):
            out[d] = self._explore(scores, alpha, beta, pulls, total_pulls, k, rng).scores
        return ScoreDraws(np.arange(n, dtype=np.intp), out, np.zeros(n), np.zeros(n_draws))

    @abstractmethod
    def _explore(
        self,
        scores: F32,
        alpha: F64,
        beta: F64,
        pulls: F64,
        total_pulls: float,
        k: int,
        rng: np.random.Generator,
    ) -> Exploration: ...


def _check_top_m(top_m: Any) -> None:
    _count(top_m, "top_m", 1)


def _check_temperature(temperature: float | None) -> None:
    if temperature is not None and not 0.0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be positive and finite (or None), got {temperature!r}")


def _weights(top_scores: F32, temperature: float | None) -> F64 | None:
    """w_i = exp((s_i - max s) / T) in (0, 1], or None (no weighting)."""
    if temperature is None:
        return None
    s = top_scores.astype(np.float64)
    return np.exp((s - s.max()) / temperature)


def _deterministic_propensity(adjusted: F32, k: int) -> F64:
    prop = np.zeros(adjusted.shape[0], dtype=np.float64)
    prop[top_k_indices(adjusted, k)] = 1.0
    return prop


def _rank_top_m(scores: F32, top: IntP, top_adjusted: F64) -> F32:
    """Adjusted scores: ``top_adjusted`` on the top-M rows; the other rows keep
    the ranker's order and differences, shifted to end 1 below the lowest top-M score."""
    adjusted = np.empty(scores.shape[0], dtype=np.float64)
    adjusted[top] = top_adjusted
    if top.shape[0] < scores.shape[0]:
        rest = np.ones(scores.shape[0], dtype=bool)
        rest[top] = False
        s_rest = scores[rest].astype(np.float64)
        adjusted[rest] = s_rest - s_rest.max() + (top_adjusted.min() - 1.0)
    return adjusted.astype(np.float32)


@dataclass(frozen=True)
class GreedyPolicy(ExplorationPolicy):
    """No exploration: the ranker's order, propensity 1 for the top k."""

    name: ClassVar[str] = "greedy"
    #: Same input, same ordering: every served item has propensity 1.
    deterministic: ClassVar[bool] = True

    def _explore(self, scores, alpha, beta, pulls, total_pulls, k, rng) -> Exploration:
        adjusted = scores.copy()
        return Exploration(adjusted, _deterministic_propensity(adjusted, k))


@dataclass(frozen=True)
class ThompsonPolicy(ExplorationPolicy):
    """Thompson sampling over the ranker's top M; see the module docstring.

    ``discount`` is not used when sampling: it is this variant's gamma for
    :func:`update_evidence`, kept here so one policy config describes the arm.
    """

    name: ClassVar[str] = "thompson"
    #: Same input, same ordering: every served item has propensity 1.
    deterministic: ClassVar[bool] = False
    top_m: int = DEFAULT_TOP_M
    n_propensity_draws: int = DEFAULT_PROPENSITY_DRAWS
    temperature: float | None = 1.0
    discount: float = 1.0

    def __post_init__(self) -> None:
        _check_top_m(self.top_m)
        _count(self.n_propensity_draws, "n_propensity_draws", 1)
        _check_temperature(self.temperature)
        if not 0.0 < float(self.discount) <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount!r}")

    def _explore(self, scores, alpha, beta, pulls, total_pulls, k, rng, with_propensity=True) -> Exploration:
        n = scores.shape[0]
        m = min(self.top_m, n)
        # In index order, so the kernel's ties (lower position first) agree
        # with the engine's (lower index first).
        top = np.sort(top_k_indices(scores, m))
        a, b = alpha[top], beta[top]
        w = _weights(scores[top], self.temperature)
        ts = np.empty(m, dtype=np.float64)
        _sampling.thompson_scores(rng, a, b, w, ts)  # the served round
        adjusted = _rank_top_m(scores, top, ts)
        if not with_propensity:
            return Exploration(adjusted, np.zeros(n, dtype=np.float64))
        if k >= m:
            return Exploration(adjusted, _deterministic_propensity(adjusted, k))
        draws = self.n_propensity_draws
        p_top = np.empty(m, dtype=np.float64)
        _sampling.thompson_topk_propensities(rng, a, b, w, k, draws, p_top)
        counts = p_top * draws
        counts[top_k_indices(adjusted[top], k)] += 1.0  # the served round counts too
        propensity = np.zeros(n, dtype=np.float64)
        propensity[top] = counts / (draws + 1)
        return Exploration(adjusted, propensity)

    def draw_scores(self, scores, alpha, beta, pulls, total_pulls, k, rng, n_draws,
                    served: Exploration | None = None) -> ScoreDraws:
        """``served``: the request's own round from :func:`explore_with_prior`; its top M and base are
        reused (the same ``scores``, so the same values)."""
        n = scores.shape[0]
        m = min(self.top_m, n)
        if (served is not None and served.layout is not None and self.temperature is None
                and served.layout.top.shape[0] == m):
            ts = np.empty((n_draws, m), dtype=np.float32)
            shift = np.empty(n_draws, dtype=np.float64)
            top = served.layout.top
            _sampling.thompson_score_draws(rng, alpha[top], beta[top], None, ts, shift)
            return ScoreDraws(top, ts, served.layout.rest_base, shift)
        top = np.sort(top_k_indices(scores, m))
        # in the order thompson_topk_propensities draws (row-major, one round per row), weighted
        ts = np.empty((n_draws, m), dtype=np.float32)
        shift = np.empty(n_draws, dtype=np.float64)
        _sampling.thompson_score_draws(rng, np.ascontiguousarray(alpha[top], np.float64),
                                       np.ascontiguousarray(beta[top], np.float64),
                                       _weights(scores[top], self.temperature), ts, shift)
        # as _rank_top_m: the rest keep the ranker's order, ending 1 below the draw's lowest top-M score
        base = np.zeros(n, dtype=np.float64)
        if m < n:
            rest = np.ones(n, dtype=bool)
            rest[top] = False
            s_rest = scores[rest].astype(np.float64)
            base[rest] = s_rest - s_rest.max() - 1.0
        return ScoreDraws(top, ts, base, shift)


@dataclass(frozen=True)
class UCB1Policy(ExplorationPolicy):
    """Optimism in the face of uncertainty over the ranker's top M; see the module docstring."""

    name: ClassVar[str] = "ucb1"
    #: Same input, same ordering: every served item has propensity 1.
    deterministic: ClassVar[bool] = True
    c: float = 1.0
    top_m: int = DEFAULT_TOP_M
    temperature: float | None = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.c) < math.inf:
            raise ValueError(f"c must be >= 0 and finite, got {self.c!r}")
        _check_top_m(self.top_m)
        _check_temperature(self.temperature)

    def _explore(self, scores, alpha, beta, pulls, total_pulls, k, rng) -> Exploration:
        m = min(self.top_m, scores.shape[0])
        top = top_k_indices(scores, m)
        a, b = alpha[top], beta[top]
        ucb = a / (a + b) + self.c * np.sqrt(math.log1p(total_pulls) / (1.0 + pulls[top]))
        w = _weights(scores[top], self.temperature)
        if w is not None:
            ucb *= w
        adjusted = _rank_top_m(scores, top, ucb)
        return Exploration(adjusted, _deterministic_propensity(adjusted, k))


@dataclass(frozen=True)
class EpsilonGreedyPolicy(ExplorationPolicy):
    """Greedy, except with probability epsilon a uniform random k-subset of the top M."""

    name: ClassVar[str] = "epsilon_greedy"
    #: Same input, same ordering: every served item has propensity 1.
    deterministic: ClassVar[bool] = False
    epsilon: float = 0.05
    top_m: int = DEFAULT_TOP_M

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.epsilon) <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon!r}")
        _check_top_m(self.top_m)

    def _explore(self, scores, alpha, beta, pulls, total_pulls, k, rng) -> Exploration:
        n = scores.shape[0]
        m = min(self.top_m, n)
        eps = float(self.epsilon)
        greedy = top_k_indices(scores, k)  # best first, so greedy[:m] is inside the top M
        top = top_k_indices(scores, m)
        k_top = min(k, m)
        propensity = np.zeros(n, dtype=np.float64)
        propensity[greedy] = 1.0 - eps
        propensity[top] += eps * k_top / m
        propensity[greedy[m:]] += eps  # k > M: the slate always continues in ranker order
        adjusted = scores.copy()
        if k_top > 0 and rng.random() < eps:
            chosen = top[rng.choice(m, size=k_top, replace=False)]
            s_max = float(scores.max())
            step = max(1.0, abs(s_max)) * 2.0**-10  # well above float32 resolution
            adjusted[chosen] = s_max + step * np.arange(k_top, 0, -1, dtype=np.float64)
        return Exploration(adjusted, propensity)

    def draw_explore_scores(self, scores: F32, k: int, rng: np.random.Generator, n_draws: int) -> ScoreDraws:
        """``n_draws`` copies of the scores of an exploring round (the epsilon branch)."""
        n = scores.shape[0]
        m = min(self.top_m, n)
        k_top = min(k, m)
        top = top_k_indices(scores, m)
        out = np.tile(scores[top], (n_draws, 1))
        if k_top > 0:
            # a uniformly random ordered k-subset of the top M per draw (as rng.choice without replacement)
            chosen = np.argsort(rng.random((n_draws, m)), axis=1)[:, :k_top]
            s_max = float(scores.max())
            step = max(1.0, abs(s_max)) * 2.0**-10
            lifted = (s_max + step * np.arange(k_top, 0, -1, dtype=np.float64)).astype(np.float32)
            np.put_along_axis(out, chosen, np.broadcast_to(lifted, chosen.shape), axis=1)
        return ScoreDraws(top, out, scores.astype(np.float64), np.zeros(n_draws))

    def draw_scores(self, scores, alpha, beta, pulls, total_pulls, k, rng, n_draws) -> ScoreDraws:
        draws = self.draw_explore_scores(scores, k, rng, n_draws)
        greedy = rng.random(n_draws) >= float(self.epsilon)
        draws.top_scores[greedy] = scores[draws.top]
        return draws


def beta_prior(scores: F32, successes: F64, failures: F64, prior_strength: float) -> tuple[F64, F64, F64]:
    """``(alpha, beta, pulls)``: the ranker's click probability ``p = clip(scores, 1e-4, 1 - 1e-4)`` as each
    candidate's prior mean with ``prior_strength`` pseudo-counts, moved by the item's own clicks and skips."""
    p = np.clip(scores.astype(np.float64), 1e-4, 1.0 - 1e-4)
    return (prior_strength * p + successes, prior_strength * (1.0 - p) + failures, successes + failures)


def explore_with_prior(
    policy: ExplorationPolicy,
    scores: npt.ArrayLike,
    successes: npt.ArrayLike,
    failures: npt.ArrayLike,
    prior_strength: float,
    total_pulls: float,
    k: int,
    rng: np.random.Generator,
    *,
    use_native: bool = True,
) -> tuple[Exploration, F64, F64, F64]:
    """The request's exploration round with the ranker's click probability as each candidate's prior mean:
    ``(explored, alpha, beta, pulls)`` with ``p = clip(scores, 1e-4, 1 - 1e-4)``,
    ``alpha = prior_strength * p + successes``, ``beta = prior_strength * (1 - p) + failures``,
    ``pulls = successes + failures``, and ``explored = policy.explore(scores, alpha, beta, pulls, total_pulls,
    k, rng, with_propensity=False)``.

    Thompson without a temperature (the request path's) runs it all in one compiled call
    (``_sampling.thompson_explore``: prior, top M, the served draws, the explored scores, without the GIL) and
    keeps the round's :class:`RoundLayout` in ``explored`` (the top M, the rest's base, the ordering); the
    same values and the same draws as the numpy steps (``use_native=False`` runs its twin)."""
    given = np.asarray(scores)
    s = _vector(given, "scores", np.float32)
    n = s.shape[0]
    succ = _vector(successes, "successes", np.float64, n)
    fail = _vector(failures, "failures", np.float64, n)
    kappa = float(prior_strength)
    # (the kernel takes the prior from float32 scores: other dtypes take the numpy steps)
    if n and given.dtype == np.float32 and isinstance(policy, ThompsonPolicy) and policy.temperature is None:
        rng = _check_rng(rng)
        total = float(total_pulls)
        if not 0.0 <= total < math.inf:
            raise ValueError(f"total_pulls must be >= 0 and finite, got {total_pulls!r}")
        _count(k, "k", 0)
        m = min(policy.top_m, n)
        alpha, beta, pulls, base = (np.empty(n, np.float64) for _ in range(4))
        top, theta, adjusted = np.empty(m, np.intp), np.empty(m, np.float64), np.empty(n, np.float32)
        order, rest_order = np.empty(n, np.intp), np.empty(n - m, np.intp)
        (_sampling if use_native else _twin).thompson_explore(rng, s, succ, fail, kappa, alpha, beta, pulls, top,
                                                              theta, adjusted, base, order, rest_order)
        layout = RoundLayout(top, base, order, rest_order)
        return Exploration(adjusted, np.zeros(n, np.float64), layout), alpha, beta, pulls
    alpha, beta, pulls = beta_prior(given, succ, fail, kappa)
    return policy.explore(s, alpha, beta, pulls, total_pulls, k, rng, with_propensity=False), alpha, beta, pulls


POLICIES: dict[str, type[ExplorationPolicy]] = {
    cls.name: cls for cls in (GreedyPolicy, ThompsonPolicy, UCB1Policy, EpsilonGreedyPolicy)
}


def make_policy(name: str, **params: Any) -> ExplorationPolicy:
    """Build a policy by name: "greedy", "thompson", "ucb1" or "epsilon_greedy"."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown exploration policy {name!r}; valid choices: {', '.join(sorted(POLICIES))}"
        )
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"exploration policy {name!r} got unknown parameter(s) {unknown}; "
            f"it accepts: {', '.join(accepted) or 'no parameters'}"
        )
    return cls(**params)
