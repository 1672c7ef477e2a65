"""Propensities of the served slate: exploration and re-ranking together.

An item's logged propensity is the probability, over the serving policy's randomness, that it is in
the **final** slate, after the deterministic re-ranking rules (maturity, pinned and sponsored slots,
boosts, per-category quotas, MMR) have run on the explored ordering. The rules can pull an item from
far below the explored top k into the slate (a quota) or push a top item out (MMR), so the
exploration step's top-k probability is not the quantity to log.

Per policy:

* deterministic policies (greedy, UCB1): the slate is certain given the request and the state; every
  served item has propensity 1.
* Thompson: ``n_draws`` further independent draws of the explored scores
  (:meth:`ExplorationPolicy.draw_scores`), re-ranked one by one in the compiled kernel
  (:func:`recsvc.reranking.slate_inclusion_counts`; MMR's pairwise similarities of the pool are
  computed once per request), plus the served round itself: ``(hits_i + [i served]) / (n_draws + 1)``.
  Unbiased, and >= 1 / (n_draws + 1) for every served item.
* epsilon-greedy: ``(1 - eps) [i in the greedy round's slate] + eps * q_i``, the greedy slate exact
  and q_i the same Monte-Carlo estimate over exploring rounds only (counting the served round when it
  explored).
* pinned and sponsored slots: 1 (placed by rule, whatever the draw).
"""

from __future__ import annotations

import numpy as np

from recsvc.exploration import EpsilonGreedyPolicy, Exploration, ExplorationPolicy, ScoreDraws, ThompsonPolicy
from recsvc.reranking import SelectionPlan, slate_inclusion_counts

__all__ = ["slate_propensities"]


def slate_propensities(
    policy: ExplorationPolicy,
    scores: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    pulls: np.ndarray,
    total_pulls: float,
    k: int,
    rng: np.random.Generator,
    explored: Exploration,
    plan: SelectionPlan,
    served: np.ndarray,
    n_draws: int,
) -> np.ndarray:
    """float64[n]: P(candidate i is an organic item of the final slate), for the n candidates.

    scores..k, rng: what ``policy.explore`` was called with (k <= n); ``explored``: what it returned
    for the served round; ``plan``: :func:`recsvc.reranking.selection_plan` of the candidates' rows
    in candidate order; ``served``: candidate indices of the slate's organic items.
    Candidates outside the organic pool (reserved, too mature) get 0.
    """
    n = scores.shape[0]
    prop = np.zeros(n, np.float64)
    served = np.asarray(served, np.intp)
    if getattr(policy, "deterministic", False) or n == 0:
        prop[served] = 1.0
        return prop
    p_size = plan.categories.shape[0]
    whole = p_size == n  # the usual case: every candidate is in the organic pool (pool index = candidate)
    if plan.need >= p_size:  # every organic candidate is served, whatever the draw
        prop[plan.keep] = 1.0
        return prop
    pool = None if whole else np.flatnonzero(plan.keep)
    s = np.ascontiguousarray(scores, np.float32)
    a = np.ascontiguousarray(alpha, np.float64)
    b = np.ascontiguousarray(beta, np.float64)
    p = np.ascontiguousarray(pulls, np.float64)
    served_mask = np.zeros(n, bool)
    served_mask[served] = True
    pool_of = plan.pool_of  # candidate -> pool index
    if pool_of is None and not whole:
        pool_of = np.full(n, -1, np.intp)
        pool_of[pool] = np.arange(pool.size)

    def hits_of(draws: ScoreDraws, fixed_order: np.ndarray | None = None) -> np.ndarray:
        if whole:
            return slate_inclusion_counts(draws.top_scores, draws.top, np.arange(draws.top.size), draws.base,
                                          draws.shift, plan, fixed_order=fixed_order)
        top_pool = pool_of[draws.top]
        in_pool = top_pool >= 0
        return slate_inclusion_counts(draws.top_scores, top_pool[in_pool], np.flatnonzero(in_pool),
                                      draws.base[pool], draws.shift, plan, fixed_order=fixed_order)

    if isinstance(policy, EpsilonGreedyPolicy):
        eps = float(policy.epsilon)
        greedy = hits_of(ScoreDraws(np.empty(0, np.intp), np.empty((1, 0), np.float32), s.astype(np.float64),
                                    np.zeros(1)))
        explored_round = not np.array_equal(explored.scores, s)
        hits = hits_of(policy.draw_explore_scores(s, k, rng, n_draws))
        if explored_round:
            hits += served_mask if whole else served_mask[pool]
        q = hits / (n_draws + int(explored_round))
        prop[plan.keep] = (1.0 - eps) * greedy + eps * q
        return prop
    fixed_order = None
    if isinstance(policy, ThompsonPolicy):  # reuses the served round's layout (explore_with_prior's)
        draws = policy.draw_scores(s, a, b, p, float(total_pulls), k, rng, n_draws, served=explored)
        if explored.layout is not None and draws.top is explored.layout.top:
            if whole:
                fixed_order = explored.layout.rest_order  # the others in order (pool index = candidate)
            else:
                fixed_order = pool_of[explored.layout.rest_order]  # the others in order, as pool indices
                fixed_order = fixed_order[fixed_order >= 0]
    else:
        draws = policy.draw_scores(s, a, b, p, float(total_pulls), k, rng, n_draws)
    hits = hits_of(draws, fixed_order)
    if whole:
        hits += served_mask
        return np.divide(hits, n_draws + 1, out=hits)
    hits += served_mask[pool]
    prop[pool] = hits / (n_draws + 1)
    return prop
