"""The request path: one Recommend, from a query and its resolved config to a slate. Pure reads.

``RequestPath.recommend(query, assignment)`` runs validate -> user profile -> stage 1 retrieval ->
stage 2 ranking -> exploration -> stage 3 re-ranking and returns the response together with the
:class:`~recsvc.state.records.ServedSlate` to record; recording it (state, aggregates, log) is the
feedback path's job. It reads the online state only through
:class:`~recsvc.state.interface.OnlineStateReader` and every setting from the assignment's config —
the experiment variant's, never the base one. Candidates stay numpy arrays until the response is built.

Each stage is timed; when the request's deadline cannot cover a stage, the stage is shortened or
skipped (ranking falls back to retrieval order, MMR to quotas) and the response is marked ``degraded``.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from recsvc.catalog import Catalog
from recsvc.catalog_writer import validated_embedding
from recsvc.config import Config, RerankingConfig
from recsvc.errors import ECHO_CHARS, FailedPrecondition, InvalidArgument, echo
from recsvc.messages import RecommendQuery, Recommendation, SlateItem
from recsvc.retrieval.ann import AnnIndex
from recsvc.retrieval.candidates import SOURCE_NAMES, Candidates
from recsvc.retrieval.kernels import sorted_distinct
from recsvc.retrieval.sources import Retriever, RowFilter
from recsvc.state.interface import OnlineStateReader
from recsvc.state.records import ServedSlate

#: Re-ranking rules a request may set for itself (``RecommendQuery.rerank``).
REQUEST_RULES = frozenset({"max_per_category", "mmr_lambda", "freshness_boost", "long_tail_boost", "pinned",
                           "sponsored_items", "sponsored_positions"})


class RankerCache:
    """Loaded ranker models by weights file, shared by every variant that names the same file."""

    def __init__(self) -> None:
        self._rankers: dict[str, Any] = {}

    def get(self, path: Path | None) -> Any:
        from recsvc.ranking import Ranker

        key = str(path) if path is not None else ""
        ranker = self._rankers.get(key)
        if ranker is None:
            try:
                ranker = Ranker.load(path) if path is not None else Ranker.default()
            except (OSError, ValueError) as exc:
                raise FailedPrecondition(f"ranker weights {key or '(default)'} cannot be loaded: {exc}") from None
            self._rankers[key] = ranker
        return ranker

    def reload(self) -> list[str]:
        """Reload every weights file from disk, all or nothing; returns the files (``""`` = the default)."""
        from recsvc.ranking import Ranker

        fresh = {}
        for key in list(self._rankers) or [""]:
            try:
                fresh[key] = Ranker.load(Path(key)) if key else Ranker.default()
            except (OSError, ValueError) as exc:
                # all or nothing: keep serving with the weights already loaded
                raise FailedPrecondition(f"reload refused, {key or '(default)'}: {exc}") from None
        self._rankers = fresh
        return sorted(fresh)


class RequestPath:
    """Serves Recommend over one catalog, index and online-state reader."""

    def __init__(self, catalog: Catalog, ann: AnnIndex, state: OnlineStateReader, retriever: Retriever,
                 seed: int | None) -> None:
        self.catalog = catalog
        self.ann = ann
        self.state = state
        self.retriever = retriever
        self.rankers = RankerCache()
        self._policies: dict[tuple, Any] = {}
        self._local = threading.local()
        self._seed_seq = np.random.SeedSequence(seed)
        self._seed_lock = threading.Lock()
        self._stage_ewma_us = {"candidates": 2000.0, "ranking": 500.0, "reranking": 500.0}

    # -- per-thread randomness, cached policies ------------------------------------------------------
    def _thread_rng(self, slot: str) -> np.random.Generator:
        """This thread's generator in ``slot``, spawned from the seed sequence on its first use."""
        rng = getattr(self._local, slot, None)
        if rng is None:
            with self._seed_lock:
                child = self._seed_seq.spawn(1)[0]
            rng = np.random.default_rng(child)
            setattr(self._local, slot, rng)
        return rng

    def _rng(self) -> np.random.Generator:
        """The serving generator."""
        return self._thread_rng("rng")

    def _propensity_rng(self) -> np.random.Generator:
        """A second per-thread generator, for Monte-Carlo propensity draws that must not move the serving one."""
        return self._thread_rng("prop_rng")

    def _target_rng(self) -> np.random.Generator:
        """A third per-thread generator, for the main policy's propensities on random-slice requests: they
        move neither the serving stream nor the slice's own draws (created on a thread's first slice request)."""
        return self._thread_rng("target_rng")

    def policy(self, cfg: Config) -> Any:
        from recsvc.exploration import make_policy

        e = cfg.exploration
        key = (e.policy, e.epsilon, e.ucb_c, e.top_m, e.propensity_draws)
        pol = self._policies.get(key)
        if pol is None:
            params: dict[str, Any] = {}
            if e.policy == "thompson":
                params = {"top_m": e.top_m, "n_propensity_draws": e.propensity_draws, "temperature": None}
            elif e.policy == "epsilon_greedy":
                params = {"epsilon": e.epsilon, "top_m": e.top_m}
            elif e.policy == "ucb1":
                params = {"c": e.ucb_c, "top_m": e.top_m, "temperature": None}
            pol = self._policies[key] = make_policy(e.policy, **params)
        return pol

    # -- one request ------------------------------------------------------------------------------------
    def resolve_n(self, q: RecommendQuery, cfg: Config) -> int:
        """The slate size: the query's, or the (variant's) default; validated against the (variant's) maximum."""
        r = cfg.recommend
        if q.n < 0:
            raise InvalidArgument(f"n must be >= 0 (0 means the default {r.default_n}), got {q.n}")
        n = q.n or r.default_n
        if n > r.max_n:
            raise InvalidArgument(f"n must be at most {r.max_n}, got {n}")
        return n

    def candidates(self, q: RecommendQuery, cfg: Config, now_ms: int, n: int | None = None,
                   n_candidates: int | None = None) -> tuple[Candidates, RowFilter, np.ndarray | None]:
        """Stage 1 for a query: (candidates, the request's filter, the user vector or None)."""
        user_id = q.user_id
        history = self.state.history(user_id)
        user_vec = self.user_vector(user_id, q.user_embedding, cfg, history)
        flt = self.row_filter(q, history, cfg)
        recent_rows, recent_w = self.recent(history, cfg)
        cands = self.retriever.candidates(user_vec, recent_rows, recent_w, flt, now_ms,
                                          n_min=self.resolve_n(q, cfg) if n is None else n,
                                          cfg=cfg.retrieval, n_candidates=n_candidates)
        return cands, flt, user_vec

    def recommend(self, q: RecommendQuery, cfg: Config, variant: str, arms: Sequence[tuple[str, str]],
                  now: int) -> tuple[Recommendation, ServedSlate]:
        t_start = time.perf_counter_ns()
        user_id = q.user_id or ""
        if not user_id.strip():
            raise InvalidArgument("user_id is required")
        n = self.resolve_n(q, cfg)
        if q.max_maturity < 0:
            raise InvalidArgument(f"filter.max_maturity must be >= 0, got {q.max_maturity}")
        rules = request_rules(cfg.reranking, q.rerank, cfg.recommend.max_n)
        b = cfg.budgets
        # The time the request waited before reaching us counts against the configured budget (a caller's
        # deadline in budget_ms already counts it).
        budget_ms = b.total_ms - (q.queued_ms if q.queued_ms > 0 else 0.0)  # (NaN: not > 0)
        if q.budget_ms > 0:
            budget_ms = min(q.budget_ms, budget_ms)
        deadline_ns = t_start + int(budget_ms * 1e6)
        degraded = False
        request_id = uuid.uuid4().hex
        random_slice = _in_random_slice(request_id, cfg.exploration.random_share)
        reasons: list[str] = []  # why degraded (metrics)

        history = self.state.history(user_id)
        user_vec = self.user_vector(user_id, q.user_embedding, cfg, history)
        flt = self.row_filter(q, history, cfg)

        # -- stage 1: retrieval
        t0 = time.perf_counter_ns()
        n_cand = cfg.retrieval.n_candidates
        if min(deadline_ns - t0, b.candidates_ms * 1e6) < 2 * self._stage_ewma_us["candidates"] * 1e3:
            n_cand, degraded = max(n, min(n_cand, 200)), True
            reasons.append("candidates_cut")
        recent_rows, recent_w = self.recent(history, cfg)
        cands = self.retriever.candidates(user_vec, recent_rows, recent_w, flt, now, n_min=n,
                                          cfg=cfg.retrieval, n_candidates=n_cand)
        t1 = time.perf_counter_ns()

        # -- stage 2: ranking (skipped when the deadline cannot cover it)
        from recsvc.ranking import ALL_FEATURES, gather_features

        ranker = self.rankers.get(cfg.ranking.model_path)
        succ, fail = self.state.bandit_evidence(cands.rows)  # (ranking's features and exploration's prior)
        features = None
        left = deadline_ns - t1
        if len(cands) == 0:
            scores = np.empty(0, np.float32)
        elif (left < 2 * (self._stage_ewma_us["ranking"] + self._stage_ewma_us["reranking"]) * 1e3
              or b.ranking_ms * 1e6 < 2 * self._stage_ewma_us["ranking"] * 1e3):
            scores = _retrieval_order_scores(cands)
            degraded = True
            reasons.append("ranking_skipped")
        else:
            inputs = self.feature_inputs(user_vec, cands, history, q.context, now, cfg,
                                         extended=ranker.uses_extended, evidence=(succ, fail))
            features = gather_features(inputs, cfg.ranking.freshness_half_life_days)
            scores = ranker.score_gathered(features)
        t2 = time.perf_counter_ns()

        # -- exploration
        from recsvc.exploration import Exploration, beta_prior, explore_with_prior

        # The ranker's click probability is each candidate's prior mean; the
        # item's own clicks and skips move it (see README, "Exploration").
        kappa = cfg.exploration.prior_strength
        policy = self.policy(cfg)
        rng, total_pulls, k_explore = self._rng(), float(self.state.total_impressions()), min(n, len(cands))
        main_rules, target_prop = rules, None  # outside the slice: what the request would have been served with
        if random_slice:
            # uniformly at random from the eligible candidates: random scores, and below only the hard
            # rules (filters, maturity, pinned and sponsored slots); a generator of its own
            explored = Exploration(self._propensity_rng().random(len(cands)).astype(np.float32),
                                   np.zeros(len(cands)))
            alpha, beta, pulls = beta_prior(scores, succ, fail, kappa)
            rules = rules.model_copy(update={"max_per_category": 0, "mmr_lambda": 0.0, "freshness_boost": 0.0,
                                             "long_tail_boost": 0.0})
        else:
            # prior, draws and explored scores (Thompson: one compiled call)
            explored, alpha, beta, pulls = explore_with_prior(policy, scores, succ, fail, kappa, total_pulls,
                                                              k_explore, rng)
        order = explored.layout.order if explored.layout is not None else np.argsort(-explored.scores, kind="stable")
        t3 = time.perf_counter_ns()

        # -- stage 3: re-ranking
        rerank_late = min(deadline_ns - t3, b.reranking_ms * 1e6) < 2 * self._stage_ewma_us["reranking"] * 1e3
        if rerank_late and rules.mmr_lambda > 0:
            rules = rules.model_copy(update={"mmr_lambda": 0.0})
            degraded = True
            reasons.append("mmr_skipped")
        # one plan of the candidates (organic pool, reserved slots, boosts, categories) for the served round's
        # re-ranking, the propensity rounds and the random slice's p; not for a deterministic policy's MMR
        # slate, which re-ranks with rerank and has no propensity rounds (the plan's pairwise similarities
        # would be work for nothing)
        plan = None
        if len(cands) and (rules.mmr_lambda == 0 or random_slice or not policy.deterministic):
            plan = self._selection_plan(cands.rows, n, rules, flt, now, cfg)
        slate = self._rerank_in_order(plan, cands.rows, explored.scores, order, n, rules, flt, now, cfg)
        t4 = time.perf_counter_ns()

        # -- propensities of the final slate (exploration and re-ranking together; see slate_propensity)
        # (no pinned or sponsored item: every slate item is an organic, ranked candidate)
        no_reserved = not rules.pinned and not rules.sponsored_items
        organic_ci = order[slate.pool_index] if no_reserved else _organic_candidates(slate, order)
        if random_slice and len(cands):
            # exact: each of the pool's eligible items fills one of the `need` organic slots with equal chance
            final_prop = np.zeros(len(cands))
            pool_size = int(plan.keep.sum())
            final_prop[plan.keep] = min(1.0, plan.need / pool_size) if pool_size else 1.0
            if rerank_late:
                main_rules = main_rules.model_copy(update={"mmr_lambda": 0.0})  # as the main path would have
            target_prop = self._main_policy_propensities(policy, scores, alpha, beta, pulls, total_pulls, k_explore,
                                                         cands, n, main_rules, flt, now, cfg)
        elif policy.deterministic or len(cands) == 0:
            final_prop = None
        else:
            from recsvc.exploration import ThompsonPolicy
            from recsvc.slate_propensity import slate_propensities

            # Where Thompson's top-k estimate drew from the serving generator (k < M), its Monte-Carlo
            # rounds still do: the same Beta draws in the same order, so the stream, and every later
            # slate, is what it was. Otherwise (and for epsilon-greedy) a generator of their own, so
            # estimating a propensity never changes what is served.
            serving_stream = isinstance(policy, ThompsonPolicy) and k_explore < min(policy.top_m, len(cands))
            final_prop = slate_propensities(
                policy, scores, alpha, beta, pulls, total_pulls, k_explore,
                rng if serving_stream else self._propensity_rng(), explored, plan, organic_ci,
                _propensity_draws(policy, cfg))
        t4b = time.perf_counter_ns()

        # -- response and the served-slate record: each per-item column gathered once, then listed
        cat = self.catalog
        floor = cfg.exploration.min_propensity
        ranked = None if no_reserved else slate.pool_index >= 0  # a pinned or sponsored item may not be a candidate
        all_ranked = no_reserved or bool(ranked.all())  # (the usual slate: every item a candidate)
        if all_ranked:  # slate position -> candidate index
            cand_of = at = organic_ci if no_reserved else order[slate.pool_index]
        else:
            cand_of = np.full(slate.rows.size, -1, np.intp)  # slate position -> candidate index (-1: none)
            cand_of[ranked] = order[slate.pool_index[ranked]]
            at = np.where(ranked, cand_of, 0) if len(cands) else cand_of[:0]  # (a valid index where there is none)
        ci_l, rows_l, scores_l = cand_of.tolist(), slate.rows.tolist(), slate.scores.tolist()
        sponsored_l, pinned_l = slate.sponsored.tolist(), slate.pinned.tolist()
        category_l = cat.categories[slate.rows].tolist()
        sources_l = cands.source_names_at(at)
        prop_l = final_prop[at].tolist() if final_prop is not None else None
        target_l = target_prop[at].tolist() if random_slice and target_prop is not None and len(cands) else None
        if no_reserved:  # every item an organic candidate, ranked: its floored estimate (1: a deterministic policy)
            props_out = ([min(max(p, floor), 1.0) for p in prop_l] if prop_l is not None
                         else [1.0] * len(rows_l))
            ids, names = cat.item_ids, cat.category_names
            items = [SlateItem(ids[row], score, names[c], sources, pos, p, False) for pos, (row, score, c, sources, p)
                     in enumerate(zip(rows_l, scores_l, category_l, sources_l, props_out))]
            target_out = [min(t, 1.0) for t in target_l] if target_l is not None else []
            if q.debug:
                for item, ci in zip(items, ci_l):
                    item.debug = self._debug(ci, scores, explored, alpha, beta, cands)
        else:
            items: list[SlateItem] = []
            props_out, target_out = [], []
            for pos, (row, ci) in enumerate(zip(rows_l, ci_l)):
                if sponsored_l[pos] or ci < 0:
                    propensity, sources = 1.0, []
                elif pinned_l[pos] or prop_l is None:
                    # a pinned slot, or a deterministic policy: retrieval, ranking and re-ranking are
                    # deterministic given the request and the state, so the item is served for certain
                    propensity, sources = 1.0, sources_l[pos]
                else:
                    propensity, sources = max(prop_l[pos], floor), sources_l[pos]
                # a pinned or sponsored item that was not a candidate was placed, not ranked: score 0
                item = SlateItem(cat.item_ids[row], scores_l[pos] if ci >= 0 else 0.0,
                                 cat.category_names[category_l[pos]], sources, pos, min(propensity, 1.0),
                                 sponsored_l[pos])
                if q.debug and ci >= 0:
                    item.debug = self._debug(ci, scores, explored, alpha, beta, cands)
                items.append(item)
                props_out.append(item.propensity)
                if random_slice:  # the main policy places pinned and sponsored items by the same rules
                    reserved_slot = sponsored_l[pos] or pinned_l[pos] or ci < 0
                    target_out.append(1.0 if reserved_slot else min(target_l[pos], 1.0))
        feat, feat_names = b"", []
        if features is not None and slate.rows.size:
            if all_ranked:
                block = features[cand_of]
            else:
                block = np.zeros((cand_of.size, features.shape[1]), np.float32)
                block[ranked] = features[cand_of[ranked]]
            feat, feat_names = block.tobytes(), list(ALL_FEATURES[: features.shape[1]])
        served = ServedSlate(request_id, user_id, variant, [tuple(a) for a in arms], rows_l, props_out,
                             now, feat, feat_names, random_slice=random_slice,
                             random_p=self._random_p(cands.rows, slate, rules, flt, plan),
                             target_propensities=target_out)
        t5 = time.perf_counter_ns()

        self._observe("candidates", t1 - t0)
        if features is not None:
            self._observe("ranking", t2 - t1)
        self._observe("reranking", t4 - t3)
        timings = {"candidates_us": (t1 - t0) // 1000, "ranking_us": (t2 - t1) // 1000,
                   "exploration_us": (t3 - t2 + t4b - t4) // 1000, "reranking_us": (t4 - t3) // 1000,
                   "total_us": (t5 - t_start) // 1000}
        return Recommendation(request_id, items, variant, timings, degraded, reasons, random_slice), served

    @staticmethod
    def _debug(ci: int, scores, explored, alpha, beta, cands: Candidates) -> dict[str, float]:
        """A ranked item's debug fields (``RecommendQuery.debug``): its scores, bandit prior and source scores."""
        debug = {"ranker_score": float(scores[ci]), "explored_score": float(explored.scores[ci]),
                 "bandit_alpha": float(alpha[ci]), "bandit_beta": float(beta[ci])}
        for s, name in enumerate(SOURCE_NAMES):
            if cands.sources[ci] >> s & 1:
                debug[f"source_{name}"] = float(cands.source_scores[ci, s])
        return debug

    def _observe(self, stage: str, ns: int) -> None:
        old = self._stage_ewma_us[stage]
        self._stage_ewma_us[stage] = 0.9 * old + 0.1 * ns / 1000.0

    # -- the user and the request's filters --------------------------------------------------------------
    def user_vector(self, user_id: str, given: Sequence[float] | None, cfg: Config,
                    history: list[tuple[int, int]] | None = None) -> np.ndarray | None:
        """The query's embedding (validated, normalised for a cosine index) or one derived from the
        user's history (recency-weighted with the variant's ``history_half_life``), or None."""
        cat = self.catalog
        if given is not None and len(given) > 0:
            return validated_embedding(given, cat.dim, "user_embedding", cat.normalize, dtype=np.float32)
        vec = self._history_profile(self.state.history(user_id) if history is None else history, cfg)
        if vec is None:
            return None
        norm = float(np.linalg.norm(vec))
        return (vec / norm).astype(np.float32) if norm > 0 else None

    @staticmethod
    def recent(history: list[tuple[int, int]], cfg: Config) -> tuple[list[int], list[float]]:
        """The user's distinct recent items, newest first, with recency weights (co-occurrence seeds)."""
        rows, weights, seen = [], [], set()
        h = cfg.retrieval.history_half_life
        for i, (row, _) in enumerate(reversed(history)):
            if row in seen:
                continue
            seen.add(row)
            rows.append(row)
            weights.append(0.5 ** (i / h))
            if len(rows) >= cfg.retrieval.cooccurrence_window:
                break
        return rows, weights

    def row_filter(self, q: RecommendQuery, history: list[tuple[int, int]], cfg: Config) -> RowFilter:
        """The query's filters as catalog codes, with the service ceiling and the consumed items."""
        cat = self.catalog
        allowed = self._category_mask(q.allowed_categories)
        if allowed is not None and not allowed.any():
            raise InvalidArgument(
                f"filter.allowed_categories: none of {echo(list(q.allowed_categories))} is a category of "
                f"this catalog (it has {cat.n_categories}, e.g. {echo(cat.category_names[:3])})")
        blocked = self._category_mask(q.blocked_categories)
        max_mat = cfg.reranking.max_maturity
        if q.max_maturity > 0:
            max_mat = min(max_mat, q.max_maturity)
        row_of = cat.row_of
        excl = [r for r in (row_of.get(i) for i in q.exclude_item_ids) if r is not None]
        if cfg.retrieval.exclude_consumed:
            excl.extend(r for r, _ in history)
        return RowFilter(allowed, blocked, max_mat, sorted_distinct(np.asarray(excl, np.int32)))

    def _category_mask(self, names: Sequence[str]) -> np.ndarray | None:
        """bool[n_categories]: which codes the names denote (unknown names denote none); None for no names."""
        if not names:
            return None
        cat = self.catalog
        mask = np.zeros(max(cat.n_categories, 1), bool)
        for name in names:
            code = cat.category_code.get(name)
            if code is not None:
                mask[code] = True
        return mask

    # -- ranking and re-ranking inputs ----------------------------------------------------------------------
    def feature_inputs(self, user_vec, cands: Candidates, history, context, now_ms, cfg: Config,
                       extended: bool = False, evidence: tuple[np.ndarray, np.ndarray] | None = None):
        """The ranking stage's inputs; ``extended``: with what the extended features need (a ranker
        that uses them); ``evidence``: the candidates' ``state.bandit_evidence``, when the caller has it."""
        from recsvc.ranking import FeatureInputs

        cat = self.catalog
        affinity = np.zeros(max(cat.n_categories, 1), np.float32)
        if history:
            codes = cat.categories[np.fromiter((r for r, _ in history), np.int64, len(history))]
            affinity[: cat.n_categories] = np.bincount(codes, minlength=cat.n_categories)[: cat.n_categories]
            affinity /= affinity.sum()
        # Popularity and bandit evidence change with time and feedback, so they are read for the candidate
        # rows only and passed in candidate order (by_candidate); the kernel reads the catalog's columns
        # (embeddings, creation times, categories) at the candidates' rows, no copy of them per request.
        rows = cands.rows
        e = cfg.exploration
        succ, fail = self.state.bandit_evidence(rows) if evidence is None else evidence
        embeddings, categories, _, created = cat.columns()  # one consistent set of arrays
        return FeatureInputs(
            user_vec=user_vec if user_vec is not None else np.zeros(cat.dim, np.float32),
            embeddings=embeddings,
            rows=rows,
            log_popularity=self.state.log_popularity(rows, now_ms),
            created_at_ms=created,
            now_ms=now_ms,
            categories=categories,
            category_affinity=affinity,
            bandit_alpha=e.prior_alpha + succ,
            bandit_beta=e.prior_beta + fail,
            source_scores=cands.source_scores,
            context=dict(context),
            sources=cands.sources,
            extended=self._extended_inputs(cands, history, cfg) if extended else None,
            by_candidate=True,
        )

    def _main_policy_propensities(self, policy, scores, alpha, beta, pulls, total_pulls: float, k: int,
                                  cands: Candidates, n: int, rules, flt: RowFilter, now_ms: int,
                                  cfg: Config) -> np.ndarray:
        """float64[n_candidates]: P(candidate i is an organic item of the slate the MAIN policy would serve for
        this request) — the variant's exploration and re-ranking rules, on the same candidates and scores — for
        a random-slice request, whose log then prices the main policy exactly (``recsvc ope --validate``).

        One round of the main policy is drawn and re-ranked as the main path would (:meth:`_target_rng`, so
        nothing served changes), then :func:`~recsvc.slate_propensity.slate_propensities` takes it as its
        "served" round: ``(hits_i + [i in that round]) / (D + 1)`` averages D + 1 independent rounds, unbiased
        for the main policy's inclusion probability (0 possible); deterministic policies give 1 for the items of
        the slate they would serve and 0 for the rest."""
        from recsvc.slate_propensity import slate_propensities

        rng = self._target_rng()
        s = scores.astype(np.float32)
        explored = policy.explore(s, alpha, beta, pulls, total_pulls, k, rng, with_propensity=False)
        order = np.argsort(-explored.scores, kind="stable")
        plan = None  # (as recommend: no plan for a deterministic policy's MMR slate)
        if rules.mmr_lambda == 0 or not policy.deterministic:
            plan = self._selection_plan(cands.rows, n, rules, flt, now_ms, cfg)
        slate = self._rerank_in_order(plan, cands.rows, explored.scores, order, n, rules, flt, now_ms, cfg)
        organic_ci = _organic_candidates(slate, order)
        if policy.deterministic:
            prop = np.zeros(len(cands))
            prop[organic_ci] = 1.0
            return prop
        return slate_propensities(policy, s, alpha, beta, pulls, total_pulls, k, rng, explored, plan, organic_ci,
                                  _propensity_draws(policy, cfg))

    def _random_p(self, rows, slate, rules, flt: RowFilter, plan) -> float | None:
        """What the random slice would give each eligible item of this request: need / eligible pool (the organic
        pool of the slate's re-ranking: candidates within the maturity ceiling, reserved out — ``plan``'s pool,
        when the slate was re-ranked with one)."""
        if rows.size == 0:
            return None
        reserved = slate.sponsored | slate.pinned
        if plan is not None:
            pool = plan.categories.shape[0]  # (one pool item per kept candidate)
        else:
            ceiling = min(int(rules.max_maturity), int(flt.max_maturity))
            keep = self.catalog.maturity[rows] <= ceiling
            if reserved.any():
                keep &= ~np.isin(rows, slate.rows[reserved])
            pool = int(keep.sum())
        need = len(slate) - int(np.count_nonzero(reserved))
        return min(1.0, need / pool) if pool else None

    def _selection_plan(self, rows, n, rules, flt: RowFilter, now_ms, cfg: Config):
        from recsvc.reranking import selection_plan

        cat = self.catalog
        embeddings, categories, maturity, created = cat.columns()
        size = categories.shape[0]
        pct = self.state.popularity_percentile(now_ms, size) if rules.long_tail_boost > 0 else _zeros_f32(size)

        def eligible(row: int) -> bool:
            return bool(flt.eligible(cat, np.asarray([row], np.int32))[0])

        return selection_plan(
            rows.astype(np.int32), n, rules, embeddings=embeddings, categories=categories, maturity=maturity,
            created_at_ms=created, now_ms=now_ms, popularity_percentile=pct, row_of=cat.row_of.get,
            eligible=eligible, max_maturity=flt.max_maturity,
            freshness_half_life_days=cfg.ranking.freshness_half_life_days, distinct_rows=True,  # candidates
        )

    def _extended_inputs(self, cands: Candidates, history, cfg: Config):
        """Co-occurrence counts with the user's recent items, their embeddings, interaction counts, the
        history profile (the user vector the history alone gives, also when the request brought one)."""
        from recsvc.ranking import RECENT_SIMILARITY_ITEMS, ExtendedInputs

        state = self.state
        recent_rows, recent_w = self.recent(history, cfg)
        recent = np.asarray(recent_rows, np.int64)
        nb_rows, nb_counts, nb_owner = state.neighbour_counts(recent_rows)
        return ExtendedInputs(
            item_rows=cands.rows,
            item_counts=state.interaction_counts(cands.rows).astype(np.float32),
            recent_weights=np.asarray(recent_w, np.float32),
            recent_counts=state.interaction_counts(recent).astype(np.float32),
            neighbour_rows=nb_rows,
            neighbour_counts=nb_counts.astype(np.float32),
            neighbour_owner=nb_owner,
            recent_embeddings=self.catalog.embeddings[recent[:RECENT_SIMILARITY_ITEMS]],
            user_interactions=float(len(history)),
            profile=self._history_profile(history, cfg),
        )

    def _history_profile(self, history, cfg: Config) -> np.ndarray | None:
        """The recency-weighted sum of the history's embeddings (``history_half_life``), or None."""
        if not history:
            return None
        rows = np.fromiter((r for r, _ in history), np.int64, len(history))
        w = 0.5 ** (np.arange(rows.size)[::-1] / cfg.retrieval.history_half_life)
        return (w[:, None] * self.catalog.embeddings[rows]).sum(axis=0)

    def _rerank_in_order(self, plan, rows, scores, order, n, rules, flt: RowFilter, now_ms, cfg: Config):
        """The slate of the candidates ``rows`` with explored ``scores`` (candidate order) taken in ``order``:
        from ``plan`` (their selection plan under ``rules``) when it re-ranks by quotas, else :meth:`_rerank`."""
        if plan is not None and plan.lam == 0:
            from recsvc.reranking import rerank_planned

            return rerank_planned(plan, rows[order], scores[order], order)
        return self._rerank(rows[order], scores[order], n, rules, flt, now_ms, cfg)

    def _rerank(self, rows, scores, n, rules, flt: RowFilter, now_ms, cfg: Config):
        from recsvc.reranking import rerank

        cat = self.catalog
        embeddings, categories, maturity, created = cat.columns()  # one consistent set of arrays
        size = categories.shape[0]
        pct = self.state.popularity_percentile(now_ms, size) if rules.long_tail_boost > 0 else _zeros_f32(size)

        def eligible(row: int) -> bool:
            return bool(flt.eligible(cat, np.asarray([row], np.int32))[0])

        return rerank(
            rows.astype(np.int32), scores.astype(np.float32), n, rules, embeddings=embeddings,
            categories=categories, maturity=maturity, created_at_ms=created, now_ms=now_ms,
            popularity_percentile=pct, row_of=cat.row_of.get, eligible=eligible,
            max_maturity=flt.max_maturity, freshness_half_life_days=cfg.ranking.freshness_half_life_days,
            distinct_rows=True,  # candidates (in any order) hold each row once
        )


def request_rules(configured: RerankingConfig, overrides: Mapping[str, Any], max_n: int) -> RerankingConfig:
    """The (variant's) re-ranking rules with the request's own on top, validated (positions below ``max_n``)."""
    if not overrides:
        return configured
    from pydantic import ValidationError

    unknown = set(overrides) - REQUEST_RULES
    if unknown:
        raise InvalidArgument(f"rerank: unknown rule(s) {echo(sorted(map(str, unknown)))}; "
                              f"known: {sorted(REQUEST_RULES)}")
    try:
        rules = type(configured).model_validate({**configured.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidArgument(f"rerank.{_rule_key(err['loc'])}: {err['msg']}") from None
    errors = rules.position_errors(max_n)
    if errors:
        key, msg = errors[0]
        raise InvalidArgument(f"rerank.{_rule_key(key.split('.', 1))}: {msg}")
    return rules


def _in_random_slice(request_id: str, share: float) -> bool:
    """Whether a request is in the random-exposure slice: a hash of its id, like experiment assignment."""
    if share <= 0:
        return False
    from recsvc.experiments.assignment import N_BUCKETS, bucket_of

    return bucket_of("recsvc-random-slice", request_id) < round(share * N_BUCKETS)


def _rule_key(loc: Sequence[Any]) -> str:
    """A rule's key for a message; a caller's item id in it is quoted cut to size."""
    return ".".join(str(p) if len(str(p)) <= ECHO_CHARS else echo(str(p)) for p in loc)


_ZEROS: dict[int, np.ndarray] = {}


def _zeros_f32(n: int) -> np.ndarray:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = np.zeros(n, np.float32)
        z.setflags(write=False)
    return z


def _retrieval_order_scores(c: Candidates) -> np.ndarray:
    """Degraded ranking: the best normalised source score of each candidate."""
    s = c.source_scores
    peak = np.maximum(s.max(axis=0), 1e-6)
    return (s / peak).max(axis=1).astype(np.float32)


def _organic_candidates(slate, order: np.ndarray) -> np.ndarray:
    """Candidate indices of a slate's organic items (not pinned, not sponsored, ranked); ``order`` maps the
    re-ranked pool back to candidates."""
    reserved = slate.sponsored | slate.pinned
    return order[slate.pool_index[(~reserved) & (slate.pool_index >= 0)]]


def _propensity_draws(policy: Any, cfg: Config) -> int:
    """Monte-Carlo rounds of a final-slate propensity estimate: Thompson's own setting, else the config's."""
    from recsvc.exploration import ThompsonPolicy

    return policy.n_propensity_draws if isinstance(policy, ThompsonPolicy) else cfg.exploration.propensity_draws
