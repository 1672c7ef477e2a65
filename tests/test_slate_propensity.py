"""Logged propensities are the probability of being in the FINAL slate (exploration + re-ranking).

On a frozen state, one request is served many times; each item's empirical inclusion frequency must
match its mean reported propensity within Monte-Carlo error, and its mean IPS weight
(sum over serves of 1{served} / p) / N must be 1 within its standard error.

The estimator counts the served round, p = (hits + 1) / (D + 1), so E[1{served} / p] = 1 - (1 - p)^(D + 1)
exactly (E[1/(X+1)] for a binomial X): the weight check is made on items with p >= 5 / (D + 1), where
that bias is below e^-5 (< 0.7%); the frequency check on every item, allowing the 1 / (D + 1) by which a
served item's own round lifts its estimate.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from conftest import small_config
from recsvc.config import RerankingConfig
from recsvc.engine import Engine, RecommendQuery
from recsvc.reranking import selection_plan, slate_inclusion_counts

DRAWS = 128
RULES = {
    "no-rules": {"max_per_category": 0},
    "quota": {"max_per_category": 1},
    "mmr": {"mmr_lambda": 0.3},
    "boosts": {"freshness_boost": 0.3, "long_tail_boost": 0.2, "max_per_category": 0},
    "pinned": "pinned",
    "sponsored": "sponsored",
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, clock_ms=1_795_910_400_000):
    made = {}

    def get(policy: str):
        if policy not in made:
            tmp = tmp_path_factory.mktemp(policy)
            cfg = small_config(tmp, exploration={"policy": policy, "epsilon": 0.3, "propensity_draws": DRAWS},
                               retrieval={"n_candidates": 150},
                               # no deadline degradation on a loaded host: every serve is the same policy
                               budgets={"total_ms": 1e6, "candidates_ms": 1e6, "ranking_ms": 1e6,
                                        "reranking_ms": 1e6})
            eng = Engine.from_config(cfg, clock=lambda: clock_ms)
            probe = [i.item_id for i in eng.recommend(RecommendQuery(user_id="probe", n=30)).items]
            made[policy] = (eng, probe)
        return made[policy]

    yield get
    for eng, _ in made.values():
        eng.close(snapshot=False)


def _rules(name: str, probe: list[str], first: list[str]) -> dict:
    rule = RULES[name]
    if rule == "pinned":  # one pin that is a retrieved candidate (served first organically), one that is not
        return {"pinned": {first[0]: 3, probe[25]: 0}}
    if rule == "sponsored":
        return {"sponsored_items": [first[1], probe[20]], "sponsored_positions": [1, 6]}
    return rule


def _serve(eng, q, n_serves):
    count, psum, wsum, w2 = {}, {}, {}, {}
    reserved = set()
    for _ in range(n_serves):
        for it in eng.recommend(q).items:
            i = it.item_id
            assert 0 < it.propensity <= 1, it
            count[i] = count.get(i, 0) + 1
            psum[i] = psum.get(i, 0.0) + it.propensity
            wsum[i] = wsum.get(i, 0.0) + 1.0 / it.propensity
            w2[i] = w2.get(i, 0.0) + 1.0 / it.propensity**2
            if it.sponsored:
                reserved.add(i)
    return count, psum, wsum, w2, reserved


@pytest.mark.parametrize("rules", list(RULES))
@pytest.mark.parametrize("policy", ["thompson", "epsilon_greedy"])
def test_reported_propensity_matches_inclusion_frequency(engines, policy, rules):
    eng, probe = engines(policy)
    first = [i.item_id for i in eng.recommend(RecommendQuery(user_id="u1", n=10)).items]
    q = RecommendQuery(user_id="u1", n=10, rerank=_rules(rules, probe, first))
    n_serves = 1000
    count, psum, wsum, w2, _ = _serve(eng, q, n_serves)
    errors = []
    for i in count:
        freq, p = count[i] / n_serves, psum[i] / count[i]
        tol = 4.5 * np.sqrt(max(p * (1 - p), 1e-4) / n_serves) + 1.0 / (DRAWS + 1)
        assert abs(freq - p) <= tol, (i, freq, p, tol)
        errors.append(abs(freq - p))
        if p >= 5.0 / (DRAWS + 1):
            mean_w = wsum[i] / n_serves
            se = np.sqrt(max(w2[i] / n_serves - mean_w**2, 0.0) / n_serves)
            assert abs(mean_w - 1.0) <= 4.5 * se + np.exp(-5) + 1e-9, (i, mean_w, se, p)
    assert np.mean(errors) < 0.02
    if rules == "pinned":  # a pinned candidate is served every time and reports 1
        assert count[first[0]] == n_serves and psum[first[0]] == n_serves
    if rules == "sponsored":
        assert count[first[1]] == n_serves and psum[first[1]] == n_serves


@pytest.mark.parametrize("policy", ["greedy", "ucb1"])
def test_deterministic_policies_report_one(engines, policy):
    eng, probe = engines(policy)
    for rules in RULES:
        q = RecommendQuery(user_id="u1", n=10, rerank=_rules(rules, probe, probe[:2]))
        slates = {tuple((i.item_id, i.propensity) for i in eng.recommend(q).items) for _ in range(5)}
        assert len(slates) == 1 and all(p == 1.0 for _, p in next(iter(slates)))


def _plan(cat, rows, k, rules, rng=None):
    emb, cats, maturity, created = cat.columns()
    pct = (rng.random(len(cat.item_ids)).astype(np.float32) if rng is not None
           else np.zeros(len(cat.item_ids), np.float32))
    kw = dict(embeddings=emb, categories=cats, maturity=maturity, created_at_ms=created,
              now_ms=1_795_910_400_000, popularity_percentile=pct, row_of=cat.row_of.get,
              eligible=lambda r: True, max_maturity=18, freshness_half_life_days=7.0)
    return selection_plan(rows, k, rules, **kw), kw


@pytest.mark.parametrize("lam", [0.0, 0.4])
@pytest.mark.parametrize("reserved", [False, True])
def test_inclusion_kernel_matches_its_twin(small_catalog, lam, reserved):
    cat = small_catalog
    rng = np.random.default_rng(5)
    rows = rng.choice(len(cat.item_ids), 80, replace=False).astype(np.int32)
    rules = RerankingConfig(max_per_category=2, mmr_lambda=lam, freshness_boost=0.2,
                            pinned={cat.item_ids[int(rows[3])]: 1} if reserved else {})
    plan, _ = _plan(cat, rows, 8, rules)
    p = int(plan.keep.sum())
    # 30 random items (Thompson's top M) above the fixed ones, which keep their order shifted per draw
    top_pool = rng.choice(p, 30, replace=False).astype(np.int32)
    top_col = rng.permutation(30).astype(np.int32)
    top_scores = rng.random((40, 30)).astype(np.float32)
    top_scores[:, ::7] = 0.5  # ties
    base = -1.0 - rng.random(p)
    shift = rng.random(40)
    args = (top_scores, top_pool, top_col, base, shift, plan)
    native = slate_inclusion_counts(*args)
    twin = slate_inclusion_counts(*args, use_native=False)
    np.testing.assert_array_equal(native, twin)
    assert native.sum() == 40 * plan.need


def test_inclusion_kernel_reproduces_the_served_slate(small_catalog):
    """One draw through the kernel selects exactly what rerank serves for those scores."""
    from recsvc.reranking import rerank

    cat = small_catalog
    rng = np.random.default_rng(11)
    for lam, maxpc in ((0.0, 1), (0.0, 3), (0.3, 2)):
        rows = rng.choice(len(cat.item_ids), 60, replace=False).astype(np.int32)
        scores = rng.random(60).astype(np.float32)
        rules = RerankingConfig(max_per_category=maxpc, mmr_lambda=lam, long_tail_boost=0.3)
        plan, kw = _plan(cat, rows, 10, rules, rng)
        order = np.argsort(-scores, kind="stable")
        slate = rerank(rows[order], scores[order], 10, rules, **kw)
        p = int(plan.keep.sum())
        for split in (0, 20):  # all fixed; 20 random
            top_pool = np.arange(split, dtype=np.int32)
            hits = slate_inclusion_counts(scores[plan.keep][None, :split], top_pool, top_pool,
                                          scores[plan.keep].astype(np.float64), np.zeros(1), plan)
            assert set(rows[plan.keep][hits > 0].tolist()) == set(slate.rows.tolist())
            assert hits.sum() == min(10, p)


def test_random_slice_is_uniform_with_exact_propensities_and_marked(tmp_path):
    """exploration.random_share: that share of requests (by a hash of the request id) is served uniformly
    at random from the eligible candidates with exact propensities, marked in the response and the log."""
    from recsvc.state.records import decode, encode

    cfg = small_config(tmp_path, exploration={"random_share": 0.5}, retrieval={"n_candidates": 60})
    eng = Engine.from_config(cfg, clock=lambda: 1_795_910_400_000)
    try:
        q = RecommendQuery(user_id="u1", n=10)
        count, props, n_slice = {}, {}, 0
        for _ in range(1200):
            rec, served = eng.requests.recommend(q, cfg, "", [], 1_795_910_400_000)
            if not rec.random_slice:
                continue
            n_slice += 1
            assert decode(encode(served)).random_slice
            for it in rec.items:
                count[it.item_id] = count.get(it.item_id, 0) + 1
                props.setdefault(it.item_id, set()).add(it.propensity)
        assert 0.45 < n_slice / 1200 < 0.55
        p = {next(iter(v)) for v in props.values()}
        assert len(p) == 1  # one exact value: need / eligible pool
        (p,) = p
        assert abs(10 / p - round(10 / p)) < 1e-9 and len(count) <= round(10 / p)
        for i, c in count.items():
            assert abs(c / n_slice - p) <= 4.5 * np.sqrt(p * (1 - p) / n_slice), (i, c / n_slice, p)
    finally:
        eng.close(snapshot=False)


def test_ope_validate_on_the_service_log(tmp_path, capsys):
    """recsvc ope --state-dir DIR --validate: the random slice's click rate from the main policy's log, with
    coverage verdicts and a positivity warning when the main policy cannot serve what the slice serves."""
    import json

    from recsvc.cli import main as cli_main
    from recsvc.engine import FeedbackEventIn

    now = [1_795_910_400_000]
    cfg = small_config(tmp_path, exploration={"random_share": 0.3, "top_m": 10}, retrieval={"n_candidates": 60})
    eng = Engine.from_config(cfg, clock=lambda: now[0])
    rng = np.random.default_rng(0)
    e = 0
    for r in range(300):
        now[0] += 1000
        rec = eng.recommend(RecommendQuery(user_id=f"u{r % 40}", n=5))
        fb = []
        for it in rec.items:
            e += 1
            fb.append(FeedbackEventIn(f"i{e}", f"u{r % 40}", it.item_id, "impression", request_id=rec.request_id))
            if rng.random() < 0.1:
                fb.append(FeedbackEventIn(f"c{e}", f"u{r % 40}", it.item_id, "click", request_id=rec.request_id))
        eng.feedback(fb)
    eng.close(snapshot=False)
    assert cli_main(["ope", "--state-dir", str(cfg.state.dir), "--validate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slice_impressions"] > 0 and out["main_impressions"] > 0
    for est in out["slice_ctr_from_main_log"].values():
        assert {"covers_observed", "intervals_overlap", "ci_low", "ci_high"} <= set(est)
    assert out["diagnostics"]["mean_weight"] < 0.9 and any("never served" in w for w in out["warnings"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 120), n_random=st.integers(0, 40), n_cat=st.integers(1, 6), quota=st.integers(0, 4),
       need=st.integers(0, 30), uncategorised=st.floats(0.0, 0.5), seed=st.integers(0, 2**31 - 1),
       boosted=st.booleans())
def test_inclusion_kernel_matches_its_twin_under_quotas(p, n_random, n_cat, quota, need, uncategorised, seed,
                                                        boosted):
    """The compiled quota walk reads only each category's first `quota` fixed items, and walks the whole
    list again for a draw whose quotas cannot fill the slate; the twin always walks the whole pool."""
    from recsvc.reranking import SelectionPlan

    rng = np.random.default_rng(seed)
    n_random = min(n_random, p)
    cats = rng.integers(0, n_cat, p).astype(np.int32)
    cats[rng.random(p) < uncategorised] = -1  # no quota for these
    counts0 = rng.integers(0, 2, n_cat).astype(np.int32)
    boost = (rng.random(p) * 0.3 if boosted else np.zeros(p)).astype(np.float32)
    plan = SelectionPlan(np.ones(p, bool), {}, need, boost, cats, counts0, quota, 0.0,
                         np.zeros((0, 0), np.float32), np.full(p, -np.inf, np.float32))
    top_pool = rng.choice(p, n_random, replace=False).astype(np.int32)
    top_scores = np.round(rng.random((25, max(n_random, 1))), 1).astype(np.float32)[:, :n_random]  # many ties
    base = -1.0 - np.round(rng.random(p), 1)
    shift = rng.random(25)
    args = (top_scores, top_pool, np.arange(n_random, dtype=np.int32), base, shift, plan)
    native = slate_inclusion_counts(*args)
    np.testing.assert_array_equal(native, slate_inclusion_counts(*args, use_native=False))
    assert native.sum() == 25 * min(need, p)


def _slice_and_main(tmp_path, policy: str, **rules):
    """One request path on a frozen state, and the same request's config with the random slice on (every
    request) and off."""
    cfg = small_config(tmp_path, exploration={"policy": policy, "epsilon": 0.3, "propensity_draws": DRAWS,
                                              "top_m": 20},
                       retrieval={"n_candidates": 80}, reranking=rules,
                       budgets={"total_ms": 1e6, "candidates_ms": 1e6, "ranking_ms": 1e6, "reranking_ms": 1e6})
    eng = Engine.from_config(cfg, clock=lambda: 1_795_910_400_000)
    return eng, cfg.with_overrides({"exploration": {"random_share": 1.0}}), cfg


@pytest.mark.parametrize("policy", ["greedy", "ucb1"])
def test_slice_slates_log_the_deterministic_main_policys_slate(tmp_path, policy):
    """A deterministic main policy: the slice logs 1 for the items of the slate it would serve, 0 for the rest;
    a request outside the slice logs no target propensities."""
    eng, slice_cfg, main_cfg = _slice_and_main(tmp_path, policy, pinned={"item-0007": 0})
    try:
        q = RecommendQuery(user_id="u1", n=10)
        rec, served = eng.requests.recommend(q, main_cfg, "", [], 1_795_910_400_000)
        assert not rec.random_slice and served.target_propensities == []
        main_items = {it.item_id for it in rec.items}
        seen_out = False
        for _ in range(30):
            rec, served = eng.requests.recommend(q, slice_cfg, "", [], 1_795_910_400_000)
            assert rec.random_slice and len(served.target_propensities) == len(rec.items) == 10
            assert rec.items[0].item_id == "item-0007" and served.target_propensities[0] == 1.0  # pinned
            for it, t in zip(rec.items, served.target_propensities):
                assert t == (1.0 if it.item_id in main_items else 0.0), (it.item_id, t)
                seen_out |= t == 0.0
        assert seen_out
    finally:
        eng.close(snapshot=False)


@pytest.mark.parametrize("policy,rules", [("thompson", {"max_per_category": 1}),
                                          ("epsilon_greedy", {"mmr_lambda": 0.3})])
def test_slice_slates_log_the_main_policys_inclusion_probability(tmp_path, policy, rules):
    """A stochastic main policy under re-ranking rules: on a frozen state, the main policy's empirical inclusion
    frequency of every item matches the mean target propensity the slice logged for it within Monte-Carlo
    error."""
    eng, slice_cfg, main_cfg = _slice_and_main(tmp_path, policy, **rules)
    try:
        q = RecommendQuery(user_id="u1", n=10)
        n_main, n_slice = 600, 300
        freq: dict[str, int] = {}
        for _ in range(n_main):
            rec, _ = eng.requests.recommend(q, main_cfg, "", [], 1_795_910_400_000)
            for it in rec.items:
                freq[it.item_id] = freq.get(it.item_id, 0) + 1
        logged: dict[str, list[float]] = {}
        for _ in range(n_slice):
            rec, served = eng.requests.recommend(q, slice_cfg, "", [], 1_795_910_400_000)
            for it, t in zip(rec.items, served.target_propensities):
                logged.setdefault(it.item_id, []).append(t)
        checked = 0
        for item, ts in logged.items():
            f = freq.get(item, 0) / n_main
            t = float(np.mean(ts))
            # both sides are Monte-Carlo estimates: the main frequency over n_main, the logged value over
            # len(ts) requests of DRAWS + 1 rounds each
            se = np.sqrt(f * (1 - f) / n_main + t * (1 - t) / (len(ts) * (DRAWS + 1))) + 1e-3
            assert abs(f - t) <= 4.5 * se, (item, f, t, len(ts))
            checked += f > 0
        assert checked >= 5 and any(f == 0 for f in (freq.get(i, 0) for i in logged))
    finally:
        eng.close(snapshot=False)


def test_computing_the_main_policys_propensities_changes_no_served_slate(tmp_path, monkeypatch):
    """The main policy's propensities on slice requests draw from a generator of their own: two engines with the
    same seed serve the same slice and main slates whether or not the computation runs."""
    from recsvc.request_path import RequestPath

    def serve(tag: str) -> list[list[str]]:
        eng, slice_cfg, main_cfg = _slice_and_main(tmp_path / tag, "thompson", max_per_category=1)
        try:
            q = RecommendQuery(user_id="u1", n=10)
            return [[it.item_id for it in eng.requests.recommend(q, c, "", [], 1_795_910_400_000)[0].items]
                    for _ in range(20) for c in (slice_cfg, main_cfg)]
        finally:
            eng.close(snapshot=False)

    with_target = serve("a")
    monkeypatch.setattr(RequestPath, "_main_policy_propensities",
                        lambda self, policy, scores, *a, **k: np.zeros(scores.shape[0]))
    assert serve("b") == with_target


@pytest.mark.parametrize("boost", [0.0, 0.2])
def test_inclusion_counts_take_the_callers_fixed_order_as_their_own(small_catalog, boost):
    """``fixed_order`` (the round layout's rest order, as pool indices) gives the counts computed without it;
    with a boost it is not used (the boosted order is another)."""
    cat = small_catalog
    rng = np.random.default_rng(9)
    rows = rng.choice(len(cat.item_ids), 90, replace=False).astype(np.int32)
    plan, _ = _plan(cat, rows, 8, RerankingConfig(max_per_category=2, freshness_boost=boost))
    p = int(plan.keep.sum())
    top_pool = np.sort(rng.choice(p, 25, replace=False)).astype(np.int32)
    top_scores = rng.random((30, 25)).astype(np.float32)
    base = np.zeros(p)
    rest = np.setdiff1d(np.arange(p), top_pool)
    base[rest] = -1.0 - np.round(rng.random(rest.size), 1)  # ties among the others
    fixed_order = rest[np.argsort(-base[rest], kind="stable")]
    args = (top_scores, top_pool, np.arange(25, dtype=np.int32), base, rng.random(30), plan)
    np.testing.assert_array_equal(slate_inclusion_counts(*args, fixed_order=fixed_order),
                                  slate_inclusion_counts(*args))
    if not boost:
        with pytest.raises(ValueError, match=rf"fixed_order has 3 items, expected {p - 25} \(the pool items"):
            slate_inclusion_counts(*args, fixed_order=fixed_order[:3])
