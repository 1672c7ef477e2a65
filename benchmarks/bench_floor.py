"""The request path against its floor (issue 16): one graph search is what a request cannot avoid.

Groups ``floor-<size>`` (100k and 1M; 20k in quick mode) hold, on the same demo catalog, the same 64
coherent user vectors and the same warm state as ``bench_engine.py`` (n = 20):

- ``hnswlib_knn_query``: hnswlib's ``knn_query`` alone, on the served index, with the k and ef the ANN
  source uses for the round's user (derived from the engine: its fetch for that user, who has 20 clicks,
  and the beam it tuned the index to; k = 680 for 20 distinct consumed items and ef = 660 at the defaults,
  so hnswlib searches with a beam of max(ef, k) = k);
- ``recommend_thompson``: ``Engine.recommend`` with the default policy (Thompson, with the final slate's
  propensities);
- ``recommend_greedy``: ``Engine.recommend`` on a second engine that differs only in
  ``exploration.policy = "greedy"``;
- ``textbook_pipeline``: the lesson's pipeline: exact cosine over every item blended with popularity and
  fully sorted, a Python loop that ranks the top ~1000 with the logistic model's base features, a Python
  loop that fills the slate under the category quota (and, when the candidates hold too few categories,
  fills up with the best of the rest).

The variants are called round-robin in ONE loop (the order rotates every round; within a round each variant
serves its own user, 16 apart, so no call finds the graph region it walks warmed by another variant's walk for
the same vector), so host noise hits them alike; each call is timed on its own, after a 1 ms pause
(``PAUSE_S``, see there). Every variant's pytest-benchmark entry then replays exactly its recorded samples
(a virtual clock, ``ReplayClock``), so its median, min and quartiles are those of the interleaved run.
Each call's thread CPU time (``time.thread_time_ns``) is recorded beside its wall time: it leaves out the
time the host's other jobs held the core, which on a shared host is most of the wall-clock spread.
``extra_info`` holds the medians, the ratio recommend / bare query (ratio of medians, the median of the
per-round ratios, and the ratio of CPU medians) against the issue's target of 2x, and the engine's stage
medians (checked against the configured budgets by the conftest's gate); a summary table is printed at the
end of the run.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter

import numpy as np
import pytest

from conftest import NOW_MS, QUICK, add_summary, coherent_users, demo_config, stage_info, timed_load

SIZES = [20_000] if QUICK else [100_000, 1_000_000]
ROUNDS = 48 if QUICK else 240
N = 20
TARGET = 2.0  # issue 16: Engine.recommend <= 2x the bare query
# A pause before every timed call, every variant alike (RECSVC_FLOOR_PAUSE_MS, 0 for none). On a shared host a
# CPU-bound loop is preempted for other jobs' time slices, and a 3 ms call is cut far more often than a 0.5 ms
# one, which inflates the ratio: on this 2-core host under load, recommend's median doubled without the pause
# (7.2 ms against 3.2 ms, the bare query unchanged at 0.43 ms). After a short sleep each call starts on a fresh
# time slice.
PAUSE_S = float(os.environ.get("RECSVC_FLOOR_PAUSE_MS", "1")) / 1e3
USER_STRIDE = 16  # within a round, variant i serves user r + 16 i (of 64)
VARIANTS = ("hnswlib_knn_query", "recommend_thompson", "recommend_greedy", "textbook_pipeline")
RECOMMEND = ("recommend_thompson", "recommend_greedy")
# the textbook pipeline's settings
TEXTBOOK_CANDIDATES = 1000
POPULARITY_WEIGHT = 0.2
DAY_MS = 86_400_000
LN2 = math.log(2.0)


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


class ReplayClock:
    """A pytest-benchmark timer that replays recorded durations: ``advance`` moves it by the next sample,
    so ``benchmark.pedantic(clock.advance, rounds=len(samples))`` reports exactly ``samples``."""

    def __init__(self) -> None:
        self.now = 0.0
        self._samples: list[float] = []

    def __call__(self) -> float:
        return self.now

    def load(self, samples: list[float]) -> None:
        self._samples = list(reversed(samples))

    def advance(self) -> None:
        self.now += self._samples.pop()


REPLAY = ReplayClock()


def _warm_engine(cfg, catalog, ann, state_dir):
    """An engine on its own durable state, warmed as in bench_engine.py (6000 clicks over 300 users)."""
    from recsvc.engine import Engine, FeedbackEventIn
    from recsvc.state.store import LocalStateStore

    engine = Engine(cfg.with_overrides({"state": {"dir": str(state_dir)}}), catalog, ann,
                    store=LocalStateStore(state_dir, fsync=True), clock=lambda: NOW_MS)
    rng = np.random.default_rng(0)
    events = [FeedbackEventIn(f"w{i}", f"u{i % 300}", catalog.item_ids[int(rng.integers(5000))], "click")
              for i in range(6000)]
    for start in range(0, len(events), 1000):
        engine.feedback(events[start:start + 1000])
    return engine


def ann_fetches(engine, n_users: int = 300) -> dict[str, int]:
    """The k of each warm user's ANN fetch (``u0`` ... ``u<n-1>``, 20 clicks each from :func:`_warm_engine`):
    the ANN share of the candidates, over-fetched as the user's filter (their consumed items) requires."""
    from recsvc.engine import RecommendQuery

    path, rcfg = engine.requests, engine.cfg.retrieval
    want = int(round(rcfg.n_candidates * rcfg.shares["ann"] / sum(rcfg.shares.values())))
    k_of = {}
    for u in range(n_users):
        history = engine.state.history(f"u{u}")
        assert len(history) == 20
        flt = path.row_filter(RecommendQuery(user_id=f"u{u}"), history, engine.cfg)
        k_of[f"u{u}"] = path.retriever.ann_fetch(want, flt, rcfg.overfetch)
    return k_of


class Textbook:
    """The lesson's recommender, as usually first written: numpy for the scores, Python for the rest."""

    def __init__(self, engine) -> None:
        from recsvc.ranking import BASE_FEATURES, Ranker

        cat = engine.catalog
        n = cat.n_rows
        self.engine = engine
        self.emb = cat.embeddings[:n]
        log_pop = np.log1p(cat.base_popularity[:n].astype(np.float64))
        self.popularity = (log_pop / max(float(log_pop.max()), 1e-12)).astype(np.float32)
        self.log_pop, self.categories, self.created = log_pop, cat.categories[:n], cat.created_at_ms[:n]
        ranker = Ranker.default()
        w = ranker.layers[0][0][:, 0]
        self.weights = [float(w[ranker.feature_names.index(f)]) for f in BASE_FEATURES]
        self.bias = float(ranker.layers[0][1][0])
        cfg = engine.cfg
        self.half_life = cfg.ranking.freshness_half_life_days
        self.prior_a, self.prior_b = cfg.exploration.prior_alpha, cfg.exploration.prior_beta
        self.quota = cfg.reranking.max_per_category

    def recommend(self, user_id: str, q: np.ndarray, n: int) -> list[int]:
        history = self.engine.state.history(user_id)
        consumed = {row for row, _ in history}
        # stage 1: exact cosine over every item, blended with popularity, fully sorted
        cos = self.emb @ q
        blend = (1.0 - POPULARITY_WEIGHT) * cos + POPULARITY_WEIGHT * self.popularity
        order = np.argsort(-blend)
        cands = [r for r in order[: TEXTBOOK_CANDIDATES + len(consumed)].tolist() if r not in consumed]
        cands = cands[:TEXTBOOK_CANDIDATES]
        # stage 2: a Python loop over the candidates: base features, logistic score
        succ, fail = self.engine.state.bandit_evidence(np.asarray(cands, np.int64))
        succ, fail = succ.tolist(), fail.tolist()
        hist_cats = Counter(int(self.categories[row]) for row, _ in history)
        n_hist = max(sum(hist_cats.values()), 1)
        w_sim, w_pop, w_fresh, w_aff, w_bandit = self.weights
        scored = []
        for i, row in enumerate(cands):
            age_days = max(0, NOW_MS - int(self.created[row])) / DAY_MS
            category = int(self.categories[row])
            z = (self.bias + w_sim * float(cos[row]) + w_pop * float(self.log_pop[row])
                 + w_fresh * math.exp(-LN2 * age_days / self.half_life)
                 + w_aff * hist_cats.get(category, 0) / n_hist
                 + w_bandit * (self.prior_a + succ[i]) / (self.prior_a + self.prior_b + succ[i] + fail[i]))
            scored.append((1.0 / (1.0 + math.exp(-z)), row, category))
        scored.sort(reverse=True)
        # stage 3: a Python loop for the category quota
        per_category: dict[int, int] = {}
        slate, over_quota = [], []
        for _, row, category in scored:
            if per_category.get(category, 0) < self.quota:
                per_category[category] = per_category.get(category, 0) + 1
                slate.append(row)
                if len(slate) == n:
                    return slate
            else:
                over_quota.append(row)
        # too few categories among the candidates (a focused user): fill up, best first
        return slate + over_quota[: n - len(slate)]


@pytest.fixture(scope="module", params=SIZES, ids=_label)
def floor(request, tmp_path_factory):
    """Runs the four variants round-robin once per catalog size; returns their samples and facts."""
    from recsvc.engine import RecommendQuery

    n_items = request.param
    cfg = demo_config(n_items)
    catalog, ann, _, _ = timed_load(cfg)
    thompson = _warm_engine(cfg, catalog, ann, tmp_path_factory.mktemp("thompson"))
    greedy = _warm_engine(cfg.with_overrides({"exploration": {"policy": "greedy"}}), catalog, ann,
                          tmp_path_factory.mktemp("greedy"))
    assert thompson.cfg.exploration.policy == "thompson" and greedy.cfg.exploration.policy == "greedy"
    users = coherent_users(catalog, 64)

    # k and ef as the ANN source sets them for each request: the fetch follows the user's filter (20 clicks
    # each, so up to 20 consumed items excluded), the beam is the one the engine tuned the index to
    k_of = ann_fetches(thompson)
    k = max(k_of.values())
    ef = thompson.requests.retriever.ann_ef
    index = ann._index  # the hnswlib.Index itself: no lock, no conversions
    assert index.ef == ef
    textbook = Textbook(thompson)

    def query_for(r):  # r: a user number (any int)
        return f"u{r % 300}", users[r % len(users)]

    timings = {v: [] for v in RECOMMEND}

    def call(variant, r):
        user, q = query_for(r)
        if variant == "hnswlib_knn_query":
            labels, _ = index.knn_query(q, k=k_of[user], num_threads=1)
            return labels.shape[1] == k_of[user]
        if variant == "textbook_pipeline":
            return len(textbook.recommend(user, q, N)) == N
        engine = thompson if variant == "recommend_thompson" else greedy
        rec = engine.recommend(RecommendQuery(user_id=user, n=N, user_embedding=q))
        timings[variant].append(rec.timings_us)
        return len(rec.items) == N and not rec.degraded

    # warm-up: one pass over the 64 users per variant (caches, first calls), not recorded
    for r in range(len(users)):
        for v in VARIANTS:
            assert call(v, r), v
    for v in RECOMMEND:
        timings[v].clear()
    samples = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for r in range(ROUNDS):
        shift = r % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            if PAUSE_S:
                time.sleep(PAUSE_S)
            # each variant its own user in a round (16 apart): no call finds the graph region it walks warmed
            # by another variant's walk for the same vector; over 64 rounds each variant serves every user
            u = r + USER_STRIDE * VARIANTS.index(v)
            c, t = cpu_clock(), clock()
            ok = call(v, u)
            t, c = clock() - t, cpu_clock() - c
            samples[v].append(t / 1e9)
            cpu[v].append(c / 1e9)
            assert ok, v
    thompson.close(snapshot=False)
    greedy.close(snapshot=False)

    result = {"n": n_items, "k": k, "k_min": min(k_of.values()), "ef": ef, "samples": samples, "cpu": cpu,
              "timings": timings,
              "budgets": thompson.cfg.budgets}
    add_summary(request.config, f"floor-{_label(n_items)}: the request path against one graph search (issue 16)",
                summary_table(result))
    return result


def medians(result, kind: str = "samples") -> dict[str, float]:
    """Median per variant of the wall-clock times (``samples``) or the thread's CPU times (``cpu``)."""
    return {v: float(np.median(s)) for v, s in result[kind].items()}


def paired_ratio(result, variant) -> float:
    """Median over rounds of (variant / bare query) in the same round, wall clock."""
    s = result["samples"]
    return float(np.median(np.asarray(s[variant]) / np.asarray(s["hnswlib_knn_query"])))


def summary_table(result) -> str:
    med, cpu = medians(result), medians(result, "cpu")
    bare, bare_cpu = med["hnswlib_knn_query"], cpu["hnswlib_knn_query"]
    lines = [f"{_label(result['n'])} items, n = {N}, 64 coherent users, {ROUNDS} rounds interleaved "
             f"({PAUSE_S * 1e3:g} ms pause before each call); "
             f"knn_query k = {result['k_min']}-{result['k']} (the user's fetch), ef = {result['ef']}; "
             f"target: recommend <= {TARGET:g}x the query",
             "wall clock: median, quartiles, ratio of medians to the query's, median of the per-round ratios; "
             "CPU: the thread's CPU time (no preemption), median and ratio",
             f"{'variant':<22}{'median':>11}{'p25':>11}{'p75':>11}{'x query':>9}{'x paired':>10}"
             f"{'CPU med':>11}{'x query':>9}"]
    for v in VARIANTS:
        p25, p75 = np.percentile(result["samples"][v], [25, 75])
        lines.append(f"{v:<22}{med[v] * 1e3:>8.3f} ms{p25 * 1e3:>8.3f} ms{p75 * 1e3:>8.3f} ms"
                     f"{med[v] / bare:>8.2f}x{paired_ratio(result, v):>9.2f}x"
                     f"{cpu[v] * 1e3:>8.3f} ms{cpu[v] / bare_cpu:>8.2f}x")
    for v in RECOMMEND:
        st = stage_info(result["timings"][v], result["budgets"])["stage_median_us"]
        lines.append(f"{v} stage medians (ms): " + ", ".join(
            f"{k.removesuffix('_us')} {val / 1e3:.3f}" for k, val in st.items()))
    return "\n".join(lines)


@pytest.mark.benchmark(timer=REPLAY)
@pytest.mark.parametrize("variant", VARIANTS)
def test_floor(benchmark, floor, variant):
    benchmark.group = f"floor-{_label(floor['n'])}"
    samples = floor["samples"][variant]
    REPLAY.load(samples)
    benchmark.pedantic(REPLAY.advance, rounds=len(samples), iterations=1, warmup_rounds=0)
    med = medians(floor)
    info = {"items": floor["n"], "k": floor["k"], "k_min": floor["k_min"], "ef": floor["ef"], "rounds": ROUNDS,
            "interleaved": True,
            "pause_ms": PAUSE_S * 1e3,
            "median_ms": round(med[variant] * 1e3, 4),
            "median_ms_by_variant": {v: round(m * 1e3, 4) for v, m in med.items()},
            "ratio_to_query": round(med[variant] / med["hnswlib_knn_query"], 3),
            "paired_ratio_to_query": round(paired_ratio(floor, variant), 3)}
    cpu = medians(floor, "cpu")
    info.update({"cpu_median_ms": round(cpu[variant] * 1e3, 4),
                 "cpu_ratio_to_query": round(cpu[variant] / cpu["hnswlib_knn_query"], 3)})
    if variant in RECOMMEND:
        info["target_ratio"] = TARGET
        info["target_met"] = info["ratio_to_query"] <= TARGET
        # the engine's stage medians over the recorded rounds: checked against the budgets by the gate
        info.update(stage_info(floor["timings"][variant], floor["budgets"]))
    benchmark.extra_info.update(info)
