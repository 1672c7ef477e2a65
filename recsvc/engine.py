"""The recommendation pipeline for one request, and the in-process API.

``Engine`` has the same operations as the gRPC service (recommend, feedback,
upsert_items, delete_items, experiment_report) on plain Python types; the gRPC
servicer is a thin adapter over it, and teams that embed recsvc call it
directly. It knows nothing about protobuf.

One request: validate -> experiment assignment -> user profile -> stage 1
retrieval -> stage 2 ranking -> exploration -> stage 3 re-ranking -> served-slate
log -> response. Candidates stay numpy arrays until the response is built. Each
stage is timed; when the request's deadline cannot cover a stage, the stage is
shortened or skipped (ranking falls back to retrieval order, MMR to quotas) and
the response is marked ``degraded``.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from recsvc.catalog import Catalog, CatalogError, ItemRecord, demo_catalog
from recsvc.config import Config
from recsvc.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from recsvc.retrieval.ann import AnnIndex
from recsvc.retrieval.candidates import SOURCE_NAMES, Candidates
from recsvc.retrieval.sources import Retriever, RowFilter
from recsvc.state.online import (
    CLICK,
    CONVERSION,
    EVENT_TYPE_NAMES,
    IMPRESSION,
    OnlineState,
    ServedSlate,
)
from recsvc.state.store import LocalStateStore, MemoryStateStore, StateStore

log = logging.getLogger("recsvc.engine")

DAY_MS = 86_400_000
EVENT_TYPES = {"impression": IMPRESSION, "click": CLICK, "conversion": CONVERSION,
               IMPRESSION: IMPRESSION, CLICK: CLICK, CONVERSION: CONVERSION}


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# -- plain request/response types ----------------------------------------------------
@dataclass
class RecommendQuery:
    user_id: str
    n: int = 0
    user_embedding: Sequence[float] | None = None
    context: Mapping[str, str] = field(default_factory=dict)
    exclude_item_ids: Sequence[str] = ()
    allowed_categories: Sequence[str] = ()
    blocked_categories: Sequence[str] = ()
    max_maturity: int = 0
    debug: bool = False
    #: Time budget for this call in ms (0: the configured budget). The gRPC
    #: layer passes the caller's deadline here.
    budget_ms: float = 0.0
    #: Per-request re-ranking rules (keys of ``RerankingConfig``: max_per_category,
    #: mmr_lambda, freshness_boost, long_tail_boost, pinned, sponsored_items,
    #: sponsored_positions), applied on top of the configured/variant rules.
    rerank: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class SlateItem:
    item_id: str
    score: float
    category: str
    sources: list[str]
    position: int
    propensity: float
    sponsored: bool = False
    debug: dict[str, float] = field(default_factory=dict)


@dataclass
class Recommendation:
    request_id: str
    items: list[SlateItem]
    variant: str
    timings_us: dict[str, int]
    degraded: bool


@dataclass
class FeedbackEventIn:
    event_id: str
    user_id: str
    item_id: str
    type: int | str
    request_id: str = ""
    value: float = 0.0
    timestamp_ms: int = 0


@dataclass
class RejectedEvent:
    index: int
    event_id: str
    reason: str


@dataclass
class FeedbackResult:
    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]


@dataclass
class ItemIn:
    item_id: str
    embedding: Sequence[float]
    category: str = ""
    maturity: int = 0
    created_at_ms: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)


# -- the engine ---------------------------------------------------------------------
class Engine:
    """The whole pipeline over one catalog, one online state and one store."""

    def __init__(
        self,
        cfg: Config,
        catalog: Catalog,
        ann: AnnIndex,
        store: StateStore | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        experiments: Any = None,
        catalog_diverged: bool = False,
    ) -> None:
        from recsvc import experiments as experiments_mod

        self.cfg = cfg
        self.catalog = catalog
        self.ann = ann
        self.store: StateStore = store if store is not None else MemoryStateStore()
        self.clock = clock
        self.state = OnlineState(cfg, catalog.capacity, now_ms=clock())
        self.retriever = Retriever(catalog, ann, self.state, cfg.retrieval)
        self.experiments = (experiments if experiments is not None
                            else experiments_mod.ExperimentSet.empty(cfg))
        self.aggregates = experiments_mod.ExperimentAggregates()
        self._rankers: dict[str, Any] = {}
        self._policies: dict[tuple, Any] = {}
        self._ingest_lock = threading.Lock()
        self._local = threading.local()
        self._seed_seq = np.random.SeedSequence(cfg.exploration.seed)
        self._seed_lock = threading.Lock()
        self._events_since_snapshot = 0
        # True once the live catalog differs from the base catalog files: every
        # snapshot must then carry the catalog (the base would lose the changes).
        self.catalog_diverged = catalog_diverged
        # Served slates enter the state, the aggregates and the log together, so
        # a snapshot never sees one without the other (no double count on replay).
        self._served_lock = threading.Lock()
        self._snapshot_thread: threading.Thread | None = None
        self._stage_ewma_us = {"candidates": 2000.0, "ranking": 500.0, "reranking": 500.0}
        self._pop_pct: tuple[float, np.ndarray] | None = None
        self._closed = False
        self._recover()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, progress: bool = False,
                    clock: Callable[[], int] = wall_clock_ms) -> "Engine":
        """Load (or build once and cache) the catalog and index; recover state."""
        state_dir = Path(cfg.state.dir).expanduser()
        store = LocalStateStore(state_dir, fsync=cfg.state.fsync == "batch")
        try:
            return cls._from_store(cfg, store, progress, clock)
        except BaseException:
            store.close()
            raise

    @classmethod
    def _from_store(cls, cfg: Config, store: LocalStateStore, progress: bool,
                    clock: Callable[[], int]) -> "Engine":
        from recsvc.experiments import ExperimentSet

        snap_lsn, snap_dir = store.latest_snapshot()
        diverged = snap_dir is not None and (snap_dir / "catalog" / "items.jsonl").exists()
        if diverged:
            # The catalog as it was at the last snapshot, live changes included.
            catalog = Catalog.load(snap_dir / "catalog", normalize=cfg.index.space == "cosine")
            ann = AnnIndex.load(snap_dir / "catalog", catalog.dim, cfg.index, catalog.version,
                                alive=catalog.alive[: catalog.n_rows])
            if ann is None:
                ann = AnnIndex.build(catalog.embeddings[: catalog.n_rows], catalog.alive_rows(),
                                     cfg.index, progress=progress)
        else:
            catalog, ann = load_catalog_and_index(cfg, progress=progress)
        experiments = (ExperimentSet.load(cfg.experiments.file, cfg)
                       if cfg.experiments.file is not None else None)
        return cls(cfg, catalog, ann, store=store, clock=clock, experiments=experiments,
                   catalog_diverged=diverged)

    def _recover(self) -> None:
        """Seed popularity; load the last snapshot; replay the log after it."""
        now = self.clock()
        rows = self.catalog.alive_rows()
        self.state.seed_popularity(rows, self.catalog.base_popularity[rows], now)
        snap_lsn, snap_dir = self.store.latest_snapshot()
        if snap_dir is not None:
            self.state.read(snap_dir)
            agg_path = snap_dir / "experiments.json"
            if agg_path.exists():
                import json

                self.aggregates = type(self.aggregates).from_dict(json.loads(agg_path.read_text()))
        replayed = 0
        touched: set[int] = set()
        for rec in self.store.replay(snap_lsn):
            try:
                self._apply_record(rec, touched)
            except (InvalidArgument, CatalogError, KeyError, ValueError) as exc:
                # A record that cannot apply must not keep the service down; it
                # was validated before it was logged, so this is worth a loud log.
                log.error("skipping log record lsn %s (%s): %s", rec.get("lsn"), rec.get("t"), exc)
            self.state.applied_lsn = int(rec["lsn"])
            replayed += 1
        if touched:
            self.state.refresh_popular(np.fromiter(touched, np.int32, len(touched)))
        if replayed:
            log.info("replayed %d log records after snapshot lsn %d", replayed, snap_lsn)
        self._events_since_snapshot = replayed
        referenced = [self.state.top_popular, np.fromiter(self.state.cooc.keys(), np.int64, len(self.state.cooc))]
        highest = max((int(a.max()) for a in referenced if a.size), default=-1)
        if highest >= self.catalog.n_rows:
            raise RuntimeError(
                f"the online state refers to catalog row {highest} but the catalog has {self.catalog.n_rows} "
                "rows: the state directory belongs to another catalog; point state.dir elsewhere")

    def _apply_record(self, rec: dict[str, Any], touched: set[int]) -> None:
        t = rec["t"]
        if t == "fb":
            for ev in rec["e"]:
                self.state.apply_event(ev)
                self._record_experiment_event(ev)
                touched.add(int(ev["row"]))
        elif t == "served":
            slate = ServedSlate.from_record(rec)
            self.state.remember_served(slate)
            self._record_served_aggregates(slate, rec.get("div"), rec.get("nov"))
        elif t == "upsert":
            self._apply_upsert([_item_from_record(x) for x in rec["items"]])
        elif t == "delete":
            self._apply_delete(rec["ids"])

    # -- helpers ----------------------------------------------------------------------
    def _rng(self) -> np.random.Generator:
        rng = getattr(self._local, "rng", None)
        if rng is None:
            with self._seed_lock:
                child = self._seed_seq.spawn(1)[0]
            rng = self._local.rng = np.random.default_rng(child)
        return rng

    def ranker(self, path: Path | None) -> Any:
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

    def reload_ranker(self) -> list[str]:
        """Reload every ranker weights file from disk (SIGHUP / admin)."""
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

    def policy(self, cfg: Config) -> Any:
        from recsvc.exploration import make_policy

        e = cfg.exploration
        key = (e.policy, e.epsilon, e.ucb_c, e.top_m, e.propensity_draws)
        pol = self._policies.get(key)
        if pol is None:
            params: dict[str, Any] = {}
            if e.policy == "thompson":
                params = {"top_m": e.top_m, "n_propensity_draws": e.propensity_draws,
                          "temperature": None}
            elif e.policy == "epsilon_greedy":
                params = {"epsilon": e.epsilon, "top_m": e.top_m}
            elif e.policy == "ucb1":
                params = {"c": e.ucb_c, "top_m": e.top_m, "temperature": None}
            pol = self._policies[key] = make_policy(e.policy, **params)
        return pol

    def _popularity_percentile(self, now_ms: int) -> np.ndarray:
        cached = self._pop_pct
        if cached is not None and now_ms - cached[0] < 10_000 and cached[1].size >= self.catalog.capacity:
            return cached[1]
        pop = self.state.popularity_acc[: self.catalog.capacity]
        pct = np.empty(self.catalog.capacity, np.float32)
        order = np.argsort(pop, kind="stable")
        pct[order] = np.linspace(0.0, 1.0, order.size, dtype=np.float32) if order.size > 1 else 0.0
        self._pop_pct = (now_ms, pct)
        return pct

    # -- Recommend --------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run the pipeline once (unlogged) so the first real request pays no set-up
        (lazy indexes, imports, kernel first calls)."""
        user = "\x00warm-up"
        rec = self.recommend(RecommendQuery(user_id=user, n=self.cfg.recommend.default_n), _record=False)
        if rec.items:
            vec = self.catalog.embeddings[self.catalog.row_of[rec.items[0].item_id]]
            self.recommend(RecommendQuery(user_id=user, user_embedding=vec.tolist()), _record=False)

    def recommend(self, q: RecommendQuery, _record: bool = True) -> Recommendation:
        if self._closed:
            raise Unavailable("the engine is shutting down")
        t_start = time.perf_counter_ns()
        now = self.clock()
        user_id = q.user_id or ""
        if not user_id.strip():
            raise InvalidArgument("user_id is required")
        if q.n < 0:
            raise InvalidArgument(f"n must be >= 0 (0 means the default {self.cfg.recommend.default_n}), got {q.n}")
        n = q.n or self.cfg.recommend.default_n
        if n > self.cfg.recommend.max_n:
            raise InvalidArgument(f"n must be at most {self.cfg.recommend.max_n}, got {n}")
        if q.max_maturity < 0:
            raise InvalidArgument(f"filter.max_maturity must be >= 0, got {q.max_maturity}")

        assignment = self.experiments.assign(user_id, now)
        cfg: Config = assignment.config
        budget_ms = cfg.budgets.total_ms if q.budget_ms <= 0 else min(q.budget_ms, cfg.budgets.total_ms)
        deadline_ns = t_start + int(budget_ms * 1e6)
        degraded = False

        user_vec = self._user_vector(user_id, q.user_embedding)
        history = self.state.history(user_id)
        flt = self._row_filter(q, history, cfg)

        # -- stage 1: retrieval
        t0 = time.perf_counter_ns()
        n_cand = cfg.retrieval.n_candidates
        b = cfg.budgets
        if min(deadline_ns - t0, b.candidates_ms * 1e6) < 2 * self._stage_ewma_us["candidates"] * 1e3:
            n_cand, degraded = max(n, min(n_cand, 200)), True
        recent_rows, recent_w = self._recent(history, cfg)
        cands = self.retriever.candidates(user_vec, recent_rows, recent_w, flt, now, n_min=n,
                                          shares=cfg.retrieval.shares, n_candidates=n_cand)
        t1 = time.perf_counter_ns()

        # -- stage 2: ranking (skipped when the deadline cannot cover it)
        from recsvc.ranking import FEATURE_NAMES, gather_features

        ranker = self.ranker(cfg.ranking.model_path)
        features = None
        left = deadline_ns - t1
        if len(cands) == 0:
            scores = np.empty(0, np.float32)
        elif (left < 2 * (self._stage_ewma_us["ranking"] + self._stage_ewma_us["reranking"]) * 1e3
              or b.ranking_ms * 1e6 < 2 * self._stage_ewma_us["ranking"] * 1e3):
            scores = _retrieval_order_scores(cands)
            degraded = True
        else:
            inputs = self._feature_inputs(user_vec, cands, user_id, history, q.context, now)
            features = gather_features(inputs, cfg.ranking.freshness_half_life_days)
            scores = ranker.score_gathered(features)
        t2 = time.perf_counter_ns()

        # -- exploration
        # The ranker's click probability is each candidate's prior mean; the
        # item's own clicks and skips move it (see README, "Exploration").
        succ, fail = self.state.successes[cands.rows], self.state.failures[cands.rows]
        p = np.clip(scores.astype(np.float64), 1e-4, 1.0 - 1e-4)
        kappa = cfg.exploration.prior_strength
        alpha, beta, pulls = kappa * p + succ, kappa * (1.0 - p) + fail, succ + fail
        policy = self.policy(cfg)
        explored = policy.explore(
            scores.astype(np.float32), alpha, beta, pulls, float(self.state.total_impressions),
            min(n, len(cands)), self._rng())
        order = np.argsort(-explored.scores, kind="stable")
        t3 = time.perf_counter_ns()

        # -- stage 3: re-ranking
        rules = self._request_rules(cfg, q.rerank)
        if (min(deadline_ns - t3, b.reranking_ms * 1e6) < 2 * self._stage_ewma_us["reranking"] * 1e3
                and rules.mmr_lambda > 0):
            rules = rules.model_copy(update={"mmr_lambda": 0.0})
            degraded = True
        slate = self._rerank(cands.rows[order], explored.scores[order], n, rules, flt, now, cfg)
        t4 = time.perf_counter_ns()

        # -- response, served-slate log
        request_id = uuid.uuid4().hex
        pool_of_row = order  # pool index -> candidate index
        items: list[SlateItem] = []
        rows_out, props_out = [], []
        floor = cfg.exploration.min_propensity
        for pos in range(slate.rows.size):
            row = int(slate.rows[pos])
            pi = int(slate.pool_index[pos])
            ci = int(pool_of_row[pi]) if pi >= 0 else -1
            if slate.sponsored[pos] or ci < 0:
                propensity, sources = 1.0, []
            elif policy.deterministic:
                # retrieval, ranking and re-ranking are deterministic given the
                # request and the state, so the slate is certain
                propensity, sources = 1.0, cands.source_names(ci)
            else:
                propensity = max(float(explored.propensity[ci]), floor)
                sources = cands.source_names(ci)
            item = SlateItem(
                item_id=self.catalog.item_ids[row],
                score=float(slate.scores[pos]),
                category=self.catalog.category_names[self.catalog.categories[row]],
                sources=sources,
                position=pos,
                propensity=min(propensity, 1.0),
                sponsored=bool(slate.sponsored[pos]),
            )
            if q.debug and ci >= 0:
                item.debug = {"ranker_score": float(scores[ci]), "explored_score": float(explored.scores[ci]),
                              "bandit_alpha": float(alpha[ci]), "bandit_beta": float(beta[ci])}
                for s, name in enumerate(SOURCE_NAMES):
                    if cands.sources[ci] >> s & 1:
                        item.debug[f"source_{name}"] = float(cands.source_scores[ci, s])
            items.append(item)
            rows_out.append(row)
            props_out.append(item.propensity)
        feat_b64, feat_names = "", []
        if features is not None and slate.rows.size:
            idx = np.array([pool_of_row[p] if p >= 0 else -1 for p in slate.pool_index], np.int64)
            block = np.zeros((idx.size, features.shape[1]), np.float32)
            block[idx >= 0] = features[idx[idx >= 0]]
            feat_b64 = base64.b64encode(block.tobytes()).decode()
            feat_names = list(FEATURE_NAMES)
        served = ServedSlate(request_id, user_id, assignment.variant, [list(a) for a in assignment.arms],
                             rows_out, props_out, now, feat_b64, feat_names)
        if _record:
            div, nov = self._slate_diversity_novelty(served.rows) if served.arms else (None, None)
            record = served.to_record()
            record["div"], record["nov"] = div, nov
            with self._served_lock:
                self.state.remember_served(served)
                self._record_served_aggregates(served, div, nov)
                self.store.append([record], durable=False)
                self._events_since_snapshot += 1
            self._maybe_snapshot()
        t5 = time.perf_counter_ns()

        self._observe("candidates", t1 - t0)
        if features is not None:
            self._observe("ranking", t2 - t1)
        self._observe("reranking", t4 - t3)
        timings = {"candidates_us": (t1 - t0) // 1000, "ranking_us": (t2 - t1) // 1000,
                   "exploration_us": (t3 - t2) // 1000, "reranking_us": (t4 - t3) // 1000,
                   "total_us": (t5 - t_start) // 1000}
        return Recommendation(request_id, items, assignment.variant, timings, degraded)

    @staticmethod
    def _request_rules(cfg: Config, overrides: Mapping[str, Any]):
        if not overrides:
            return cfg.reranking
        from pydantic import ValidationError

        unknown = set(overrides) - _REQUEST_RULES
        if unknown:
            raise InvalidArgument(f"rerank: unknown rule(s) {sorted(unknown)}; known: {sorted(_REQUEST_RULES)}")
        try:
            return type(cfg.reranking).model_validate({**cfg.reranking.model_dump(), **overrides})
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise InvalidArgument(f"rerank.{key}: {err['msg']}") from None

    def _observe(self, stage: str, ns: int) -> None:
        old = self._stage_ewma_us[stage]
        self._stage_ewma_us[stage] = 0.9 * old + 0.1 * ns / 1000.0

    def _user_vector(self, user_id: str, given: Sequence[float] | None) -> np.ndarray | None:
        if given is not None and len(given) > 0:
            vec = np.asarray(given, np.float32).reshape(-1)
            if vec.size != self.catalog.dim:
                raise InvalidArgument(
                    f"user_embedding has {vec.size} values; the catalog's dimension is {self.catalog.dim}")
            if not np.isfinite(vec).all():
                raise InvalidArgument("user_embedding contains NaN or infinite values")
            norm = float(np.linalg.norm(vec))
            if norm == 0.0:
                raise InvalidArgument("user_embedding is all zeros")
            return vec / norm if self.catalog.normalize else vec
        history = self.state.history(user_id)
        if not history:
            return None
        rows = np.fromiter((r for r, _ in history), np.int64, len(history))
        h = self.cfg.retrieval.history_half_life
        w = 0.5 ** (np.arange(rows.size)[::-1] / h)
        vec = (w[:, None] * self.catalog.embeddings[rows]).sum(axis=0)
        norm = float(np.linalg.norm(vec))
        return (vec / norm).astype(np.float32) if norm > 0 else None

    def _recent(self, history: list[tuple[int, int]], cfg: Config) -> tuple[list[int], list[float]]:
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

    def _row_filter(self, q: RecommendQuery, history: list[tuple[int, int]], cfg: Config) -> RowFilter:
        cat = self.catalog
        n_cat = max(cat.n_categories, 1)
        allowed = None
        if q.allowed_categories:
            allowed = np.zeros(n_cat, bool)
            for name in q.allowed_categories:
                code = cat.category_code.get(name)
                if code is not None:
                    allowed[code] = True
            if not allowed.any():
                raise InvalidArgument(
                    f"filter.allowed_categories: none of {list(q.allowed_categories)[:5]} is a category of "
                    f"this catalog (it has {cat.n_categories}, e.g. {cat.category_names[:3]})")
        blocked = None
        if q.blocked_categories:
            blocked = np.zeros(n_cat, bool)
            for name in q.blocked_categories:
                code = cat.category_code.get(name)
                if code is not None:
                    blocked[code] = True
        max_mat = cfg.reranking.max_maturity
        if q.max_maturity > 0:
            max_mat = min(max_mat, q.max_maturity)
        row_of = cat.row_of
        excl = [r for r in (row_of.get(i) for i in q.exclude_item_ids) if r is not None]
        if cfg.retrieval.exclude_consumed:
            excl.extend(r for r, _ in history)
        return RowFilter(allowed, blocked, max_mat, np.unique(np.asarray(excl, np.int32)))

    def _feature_inputs(self, user_vec, cands: Candidates, user_id, history, context, now_ms):
        from recsvc.ranking import FeatureInputs

        cat = self.catalog
        affinity = np.zeros(max(cat.n_categories, 1), np.float32)
        if history:
            codes = cat.categories[np.fromiter((r for r, _ in history), np.int64, len(history))]
            affinity[: cat.n_categories] = np.bincount(codes, minlength=cat.n_categories)[: cat.n_categories]
            affinity /= affinity.sum()
        # Popularity and bandit evidence change with time and feedback, so
        # they are read for the candidate rows only; the kernel then gathers
        # over a compact view (rows 0..n-1 of per-candidate arrays).
        rows = cands.rows
        scale = self.state.popularity_scale(now_ms)
        e = self.cfg.exploration
        return FeatureInputs(
            user_vec=user_vec if user_vec is not None else np.zeros(cat.dim, np.float32),
            embeddings=cat.embeddings[rows],
            rows=np.arange(rows.size, dtype=np.int32),
            log_popularity=np.log1p(self.state.popularity_acc[rows] * scale).astype(np.float32),
            created_at_ms=cat.created_at_ms[rows],
            now_ms=now_ms,
            categories=cat.categories[rows],
            category_affinity=affinity,
            bandit_alpha=e.prior_alpha + self.state.successes[rows],
            bandit_beta=e.prior_beta + self.state.failures[rows],
            source_scores=cands.source_scores,
            context=dict(context),
            sources=cands.sources,
        )

    def _rerank(self, rows, scores, n, rules, flt: RowFilter, now_ms, cfg: Config):
        from recsvc.reranking import rerank

        cat = self.catalog
        embeddings, categories, maturity, created = cat.columns()  # one consistent set of arrays
        size = categories.shape[0]
        if rules.long_tail_boost > 0:
            pct = self._popularity_percentile(now_ms)
            if pct.size != size:
                pct = np.resize(pct, size) if pct.size > size else np.pad(pct, (0, size - pct.size))
        else:
            pct = _zeros_f32(size)

        def eligible(row: int) -> bool:
            return bool(flt.eligible(cat, np.asarray([row], np.int32))[0])

        return rerank(
            rows.astype(np.int32), scores.astype(np.float32), n, rules, embeddings=embeddings,
            categories=categories, maturity=maturity, created_at_ms=created, now_ms=now_ms,
            popularity_percentile=pct, row_of=cat.row_of.get, eligible=eligible,
            max_maturity=flt.max_maturity, freshness_half_life_days=cfg.ranking.freshness_half_life_days,
        )

    # -- Feedback ---------------------------------------------------------------------
    def feedback(self, events: Sequence[FeedbackEventIn]) -> FeedbackResult:
        if self._closed:
            raise Unavailable("the engine is shutting down")
        if len(events) > self.cfg.server.max_batch:
            raise InvalidArgument(
                f"at most {self.cfg.server.max_batch} events per call, got {len(events)}")
        now = self.clock()
        st = self.cfg.state
        oldest = now - int(st.max_event_age_days * DAY_MS)
        newest = now + 3_600_000
        rejected: list[RejectedEvent] = []
        duplicates = 0
        with self._ingest_lock:
            batch_ids: set[str] = set()
            accepted: list[dict[str, Any]] = []
            for i, ev in enumerate(events):
                reason = None
                etype = EVENT_TYPES.get(ev.type if not isinstance(ev.type, str) else ev.type.lower())
                ts = int(ev.timestamp_ms) or now
                row = self.catalog.row_of.get(ev.item_id)
                if not ev.event_id:
                    reason = "event_id is required (it is the idempotency key)"
                elif ev.event_id in self.state.seen_events or ev.event_id in batch_ids:
                    duplicates += 1
                    continue
                elif not ev.user_id:
                    reason = "user_id is required"
                elif etype is None:
                    reason = f"unknown event type {ev.type!r}; expected IMPRESSION, CLICK or CONVERSION"
                elif row is None:
                    reason = f"unknown item_id {ev.item_id!r}"
                elif ts < oldest or ts > newest:
                    reason = (f"timestamp_ms {ts} is outside the accepted range "
                              f"[now - {st.max_event_age_days:g} days, now + 1 h]")
                elif not math.isfinite(ev.value):
                    reason = "value must be finite"
                elif ev.request_id:
                    slate = self.state.served.get(ev.request_id)
                    if slate is None:
                        reason = f"request_id {ev.request_id!r} is unknown or has expired"
                    elif row not in slate.rows:
                        reason = f"item {ev.item_id!r} was not served in request {ev.request_id!r}"
                    elif slate.user_id != ev.user_id:
                        reason = f"request {ev.request_id!r} was served to another user"
                if reason is not None:
                    rejected.append(RejectedEvent(i, ev.event_id, reason))
                    continue
                batch_ids.add(ev.event_id)
                accepted.append({"id": ev.event_id, "u": ev.user_id, "row": int(row), "type": etype,
                                 "value": float(ev.value), "ts": ts, "req": ev.request_id or "",
                                 "item": ev.item_id})
            if accepted:
                # Durable before the ack and before the state changes.
                try:
                    lsn = self.store.append([{"t": "fb", "e": accepted}], durable=True)
                except OSError as exc:
                    log.error("could not write the event log: %s", exc)
                    raise Unavailable(f"the event log cannot be written ({exc.strerror or exc}); "
                                      "nothing in this batch was recorded, retry later") from None
                for ev in accepted:
                    self.state.apply_event(ev)
                    self._record_experiment_event(ev)
                self.state.refresh_popular(np.fromiter((e["row"] for e in accepted), np.int32, len(accepted)))
                self.state.applied_lsn = lsn
                self._events_since_snapshot += len(accepted)
        self._maybe_snapshot()
        return FeedbackResult(len(accepted), duplicates, rejected)

    def _maybe_snapshot(self) -> None:
        """Start a background snapshot once enough log records accumulated.

        Snapshots run off the request path (a Feedback call never waits for one,
        and a failing one is logged, not returned to a caller)."""
        if self._events_since_snapshot < self.cfg.state.snapshot_every_events or self._closed:
            return
        if isinstance(self.store, MemoryStateStore):
            self._events_since_snapshot = 0
            return
        with self._seed_lock:
            if self._snapshot_thread is not None and self._snapshot_thread.is_alive():
                return
            self._snapshot_thread = threading.Thread(target=self._background_snapshot,
                                                     name="recsvc-snapshot", daemon=True)
            self._snapshot_thread.start()

    def _background_snapshot(self) -> None:
        try:
            self.snapshot()
        except Exception:  # the log still holds everything; try again after more events
            log.exception("background snapshot failed")

    def _record_experiment_event(self, ev: dict[str, Any]) -> None:
        slate = self.state.attributed_slate(ev)
        if slate is None or not slate.arms:
            return
        self.aggregates.record_event([tuple(a) for a in slate.arms], ev["u"],
                                     EVENT_TYPE_NAMES[int(ev["type"])], float(ev["value"]), int(ev["ts"]))

    def _slate_diversity_novelty(self, rows_list: list[int]) -> tuple[float | None, float | None]:
        """Intra-list diversity (1 - mean pairwise cosine) and novelty (mean -log2 p) of a slate,
        computed once when served and logged with it, so a replay reports the same numbers."""
        rows = np.asarray(rows_list, np.int64)
        diversity = novelty = None
        if rows.size > 1:
            e = self.catalog.embeddings[rows]
            sims = e @ e.T
            k = rows.size
            diversity = float(1.0 - (sims.sum() - np.trace(sims)) / (k * (k - 1)))
        if rows.size:
            pop = self.state.popularity_acc[rows]
            total = float(self.state.popularity_acc.sum()) or 1.0
            novelty = float(np.mean(-np.log2(np.maximum(pop / total, 1e-12))))
        return diversity, novelty

    def _record_served_aggregates(self, slate: ServedSlate, diversity: float | None,
                                  novelty: float | None) -> None:
        if not slate.arms:
            return
        self.aggregates.record_served([tuple(a) for a in slate.arms], slate.user_id, slate.rows,
                                      slate.served_at_ms, diversity=diversity, novelty=novelty)

    # -- catalog changes --------------------------------------------------------------
    def upsert_items(self, items: Sequence[ItemIn]) -> tuple[int, int]:
        if self._closed:
            raise Unavailable("the engine is shutting down")
        if not items:
            raise InvalidArgument("items must not be empty")
        if len(items) > self.cfg.server.max_batch:
            raise InvalidArgument(f"at most {self.cfg.server.max_batch} items per call, got {len(items)}")
        # Everything the catalog would refuse is refused here, before the log:
        # a logged record must always apply (on replay too).
        records, seen = [], set()
        for i, it in enumerate(items):
            where = f"items[{i}] ({it.item_id!r})"
            if not it.item_id:
                raise InvalidArgument(f"items[{i}].item_id is required")
            if it.item_id.startswith("\x00"):
                raise InvalidArgument(f"{where}: item ids must not start with a NUL character")
            if it.item_id in seen:
                raise InvalidArgument(f"{where}: the id appears twice in one call")
            seen.add(it.item_id)
            emb = np.asarray(it.embedding, np.float64).reshape(-1)
            if emb.size != self.catalog.dim:
                raise InvalidArgument(
                    f"{where}: embedding has {emb.size} values; the catalog's dimension is {self.catalog.dim}")
            norm = float(np.linalg.norm(emb)) if np.isfinite(emb).all() else math.nan
            if not math.isfinite(norm) or norm == 0.0 or np.abs(emb).max() > _FLOAT32_MAX:
                raise InvalidArgument(f"{where}: embedding must be finite, non-zero and within float32 range")
            if self.catalog.normalize:
                emb = emb / norm  # in float64, so huge or tiny values keep their direction
            if not 0 <= it.maturity <= _INT32_MAX:
                raise InvalidArgument(f"{where}: maturity must be between 0 and {_INT32_MAX}")
            records.append(ItemRecord(it.item_id, emb.astype(np.float32), it.category, int(it.maturity),
                                      int(it.created_at_ms) or self.clock(), 0.0, dict(it.attributes)))
        logged = False
        try:
            with self._ingest_lock:
                try:
                    self.store.append([{"t": "upsert", "items": [_item_to_record(r) for r in records]}],
                                      durable=True)
                except OSError as exc:
                    raise Unavailable(f"the event log cannot be written ({exc.strerror or exc}); "
                                      "nothing was changed, retry later") from None
                logged = True
                result = self._apply_upsert(records)
                self._events_since_snapshot += 1
        finally:
            # Outside the ingest lock (feedback need not wait), and even after a
            # failure half-way: the derived indexes must follow the catalog.
            if logged:
                self.retriever.catalog_changed(self.clock())
        self._maybe_snapshot()
        return result

    def _apply_upsert(self, records: list[ItemRecord]) -> tuple[int, int]:
        # State arrays grow first: a request must never see a row they lack.
        self.state.ensure_capacity(self.catalog.n_rows + len(records) + 16)
        try:
            rows, inserted, updated = self.catalog.upsert(records)
        except CatalogError as exc:
            raise InvalidArgument(str(exc)) from None
        self.state.ensure_capacity(self.catalog.capacity)
        self.ann.upsert(self.catalog.embeddings[rows], rows)
        self.catalog_diverged = True
        return inserted, updated

    def delete_items(self, item_ids: Sequence[str]) -> tuple[int, list[str]]:
        if self._closed:
            raise Unavailable("the engine is shutting down")
        if not item_ids:
            raise InvalidArgument("item_ids must not be empty")
        with self._ingest_lock:
            known = [i for i in item_ids if i in self.catalog.row_of]
            if known:
                try:
                    self.store.append([{"t": "delete", "ids": known}], durable=True)
                except OSError as exc:
                    raise Unavailable(f"the event log cannot be written ({exc.strerror or exc}); "
                                      "nothing was changed, retry later") from None
            deleted = self._apply_delete(known)
            self._events_since_snapshot += bool(known)
        if deleted:
            self.retriever.catalog_changed(self.clock())
        self._maybe_snapshot()
        missing = [i for i in item_ids if i not in set(known)]
        return deleted, missing

    def _apply_delete(self, item_ids: Iterable[str]) -> int:
        rows, _ = self.catalog.delete(item_ids)
        if rows.size:
            self.ann.delete(rows)
            self.state.drop_items(rows)
            self.catalog_diverged = True
        return int(rows.size)

    # -- experiments -------------------------------------------------------------------
    def experiment_report(self, name: str = "", plot_metric: str = "") -> tuple[dict[str, Any], str, bytes]:
        """(report as JSON-safe dict, as text, PNG of ``plot_metric`` over time or b"")."""
        from recsvc.experiments import plot_report, report, report_to_dict, report_to_text

        names = [e.name for e in self.experiments]
        if name and name not in names:
            raise NotFound(f"no experiment named {name!r}; known: {', '.join(names) or '(none)'}")
        if plot_metric and not name:
            raise InvalidArgument("a plot needs one experiment: set experiment")
        rep = report(self.aggregates, self.experiments, now_ms=self.clock(), experiment=name or None,
                     n_items=self.catalog.n_alive)
        png = b""
        if plot_metric:
            import tempfile

            from recsvc.experiments import METRICS

            if plot_metric not in METRICS:
                raise InvalidArgument(f"unknown metric {plot_metric!r}; choose from {', '.join(METRICS)}")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "plot.png"
                    plot_report(self.aggregates, name, plot_metric, path, experiments=self.experiments)
                    png = path.read_bytes()
            except ImportError as exc:
                from recsvc.errors import FailedPrecondition

                raise FailedPrecondition(f"plots need matplotlib on the server: {exc}") from None
        return report_to_dict(rep), report_to_text(rep), png

    # -- snapshots and shutdown ---------------------------------------------------------
    def snapshot(self) -> int:
        with self._ingest_lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> int:
        """Write a snapshot; the caller holds the ingest lock (no feedback or catalog change runs)."""
        import json

        if isinstance(self.store, MemoryStateStore):
            self._events_since_snapshot = 0
            return self.state.applied_lsn
        # A consistent cut: no served slate is half-recorded while we read the
        # lsn, the served slates and the experiment aggregates.
        with self._served_lock:
            self.store.sync()  # served records up to lsn are on disk too
            lsn = self.store.lsn
            with self.state.lock:
                served = list(self.state.served.values())
            aggregates = self.aggregates.to_dict()
            self._events_since_snapshot = 0

        def write(directory: Path) -> None:
            self.state.applied_lsn = lsn
            self.state.write(directory, served=served)
            (directory / "experiments.json").write_text(json.dumps(aggregates))
            if self.catalog_diverged:
                self.catalog.save(directory / "catalog", compact=False)
                self.ann.save(directory / "catalog", self.catalog.version)

        self.store.write_snapshot(lsn, write)
        return lsn

    def close(self, snapshot: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if snapshot:
            try:
                self.snapshot()
            except Exception:  # never lose the log because a snapshot failed
                log.exception("snapshot on close failed; the log still holds every event")
        self.store.close()


_INT32_MAX = 2**31 - 1
_REQUEST_RULES = frozenset({"max_per_category", "mmr_lambda", "freshness_boost", "long_tail_boost", "pinned",
                            "sponsored_items", "sponsored_positions"})
_FLOAT32_MAX = float(np.finfo(np.float32).max)
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


def _item_to_record(r: ItemRecord) -> dict[str, Any]:
    return {"id": r.item_id, "emb": base64.b64encode(np.asarray(r.embedding, np.float32).tobytes()).decode(),
            "cat": r.category, "mat": r.maturity, "ts": r.created_at_ms, "attrs": r.attributes}


def _item_from_record(d: dict[str, Any]) -> ItemRecord:
    emb = np.frombuffer(base64.b64decode(d["emb"]), np.float32)
    return ItemRecord(d["id"], emb, d["cat"], int(d["mat"]), int(d["ts"]), 0.0, dict(d.get("attrs", {})))


# -- catalog + index loading ---------------------------------------------------------------
def demo_cache_dir(cfg: Config) -> Path:
    d, i = cfg.catalog.demo, cfg.index
    key = f"demo-{d.n_items}x{d.dim}-c{d.n_categories}-t{d.n_topics}-s{d.seed}-{i.space}-m{i.m}-ef{i.ef_construction}"
    return Path(cfg.catalog.cache_dir).expanduser() / key


def load_catalog_and_index(cfg: Config, progress: bool = False, rebuild: bool = False) -> tuple[Catalog, AnnIndex]:
    """The configured catalog (or the cached demo) and its persisted index.

    The index lives beside the catalog; it is built (and saved) only when
    missing, stale (built for another catalog version or other parameters) or
    ``rebuild`` is set — a restart loads it.
    """
    normalize = cfg.index.space == "cosine"
    if cfg.catalog.path is None:
        directory = demo_cache_dir(cfg)
        if (directory / "items.jsonl").exists() and (directory / "catalog.json").exists():
            catalog = Catalog.load(directory, normalize=normalize, progress=progress)
        else:
            catalog = demo_catalog(cfg.catalog.demo, progress=progress)
            catalog.normalize = normalize
            catalog.save(directory)
    else:
        directory = Path(cfg.catalog.path).expanduser()
        catalog = Catalog.load(directory, normalize=normalize, progress=progress)
    if progress and not rebuild and (directory / "index.bin").exists():
        log.info("loading the HNSW index for %d items from %s", catalog.n_alive, directory)
    ann = None if rebuild else AnnIndex.load(directory, catalog.dim, cfg.index, catalog.version,
                                             alive=catalog.alive[: catalog.n_rows])
    if ann is None:
        t = time.perf_counter()
        ann = AnnIndex.build(catalog.embeddings[: catalog.n_rows], catalog.alive_rows(), cfg.index,
                             progress=progress)
        log.info("built HNSW index over %d items in %.1f s", catalog.n_alive, time.perf_counter() - t)
        try:
            ann.save(directory, catalog.version)
        except OSError as exc:  # a read-only catalog directory still serves
            log.warning("could not save the index beside the catalog (%s); it will be rebuilt next start", exc)
        else:
            if cfg.index.reorder:
                # Serve from the saved file, laid out in cluster order on load.
                ann = AnnIndex.load(directory, catalog.dim, cfg.index, catalog.version,
                                    alive=catalog.alive[: catalog.n_rows]) or ann
    return catalog, ann
