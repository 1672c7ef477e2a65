"""Every setting an experiment variant may override takes effect for that variant's users.

For each per-request key: engine A runs an experiment whose variant sets the key; engine B has the
same value in its base config and no experiment; engine C has neither. A's variant users must be served
exactly what B serves them (the variant's value took effect, and nothing of the base leaked in), and
differently from C (the chosen value matters for these requests, so the comparison can fail).
"""

import json

import numpy as np
import pytest

from recsvc.catalog import demo_catalog
from recsvc.config import Config, DemoCatalogConfig
from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
from recsvc.errors import InvalidArgument
from recsvc.experiments import ExperimentSet, bucket_of
from recsvc.experiments.assignment import PROCESS_WIDE_KEYS, per_request_keys
from recsvc.retrieval.ann import AnnIndex

from conftest import NOW_MS

SALT = "override-test"
ITEM = "<item>"  # pinned / sponsored in some cases: the catalog's row 42


def _ranker_file(tmp_path_factory) -> str:
    from importlib.resources import files

    data = json.loads(files("recsvc.data").joinpath("default_ranker.json").read_text())
    data["weights"]["coef"][1] = 3.0  # popularity weighs far more
    data["version"] = "popularity-heavy"
    path = tmp_path_factory.mktemp("ranker") / "ranker.json"
    path.write_text(json.dumps(data))
    return str(path)


# key -> (settings for all three engines, the override under test)
CASES = {
    "retrieval.n_candidates": ({}, {"retrieval": {"n_candidates": 40}}),
    "retrieval.shares": ({}, {"retrieval": {"shares": {"ann": 0, "cooccurrence": 0, "popular": 1, "fresh": 1}}}),
    "retrieval.overfetch": ({}, {"retrieval": {"overfetch": 4.0}}),
    "retrieval.fresh_window_days": ({}, {"retrieval": {"fresh_window_days": 2.0}}),
    "retrieval.exclude_consumed": ({}, {"retrieval": {"exclude_consumed": False}}),
    "retrieval.history_half_life": ({}, {"retrieval": {"history_half_life": 0.5}}),
    "ranking.model_path": ({}, {"ranking": {"model_path": "<ranker>"}}),
    "ranking.freshness_half_life_days": ({}, {"ranking": {"freshness_half_life_days": 0.5}}),
    "exploration.policy": ({}, {"exploration": {"policy": "greedy"}}),
    "exploration.epsilon": ({"exploration": {"policy": "epsilon_greedy"}}, {"exploration": {"epsilon": 0.9}}),
    "exploration.ucb_c": ({"exploration": {"policy": "ucb1"}}, {"exploration": {"ucb_c": 50.0}}),
    "exploration.top_m": ({}, {"exploration": {"top_m": 3}}),
    "exploration.propensity_draws": ({}, {"exploration": {"propensity_draws": 3}}),
    "exploration.prior_strength": ({}, {"exploration": {"prior_strength": 1.0}}),
    "exploration.prior_alpha": ({}, {"exploration": {"prior_alpha": 30.0}}),
    "exploration.prior_beta": ({}, {"exploration": {"prior_beta": 1.0}}),
    "exploration.min_propensity": ({}, {"exploration": {"min_propensity": 0.5}}),
    "exploration.random_share": ({}, {"exploration": {"random_share": 1.0}}),
    "reranking.max_per_category": ({}, {"reranking": {"max_per_category": 1}}),
    "reranking.mmr_lambda": ({}, {"reranking": {"mmr_lambda": 0.7}}),
    "reranking.freshness_boost": ({}, {"reranking": {"freshness_boost": 2.0}}),
    "reranking.long_tail_boost": ({}, {"reranking": {"long_tail_boost": 2.0}}),
    "reranking.max_maturity": ({}, {"reranking": {"max_maturity": 0}}),
    "reranking.pinned": ({}, {"reranking": {"pinned": {ITEM: 1}}}),
    "reranking.sponsored_items": ({"reranking": {"sponsored_positions": [2]}},
                                  {"reranking": {"sponsored_items": [ITEM]}}),
    "reranking.sponsored_positions": ({"reranking": {"sponsored_items": [ITEM]}},
                                      {"reranking": {"sponsored_positions": [4]}}),
    "budgets.total_ms": ({}, {"budgets": {"total_ms": 0.001}}),
    "budgets.candidates_ms": ({}, {"budgets": {"candidates_ms": 0.001}}),
    "budgets.ranking_ms": ({}, {"budgets": {"ranking_ms": 0.001}}),
    "budgets.reranking_ms": ({"reranking": {"mmr_lambda": 0.3}}, {"budgets": {"reranking_ms": 0.001}}),
    "recommend.default_n": ({}, {"recommend": {"default_n": 3}}),
    "recommend.max_n": ({"recommend": {"default_n": 5}}, {"recommend": {"max_n": 6}}),
}

BASE = {
    "retrieval": {"n_candidates": 300, "shares": {"ann": 180, "cooccurrence": 60, "popular": 30, "fresh": 30}},
    "exploration": {"seed": 99},
    # one search beam for every fetch size, so a variant's fetch searches exactly as a base config's would
    "index": {"ef_search_min": 2000, "ef_construction": 100, "build_threads": 1},
}


def _merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in (
            "shares", "pinned") else v
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = Config().with_overrides(BASE)
    cat = demo_catalog(DemoCatalogConfig(n_items=3000, dim=16, n_categories=20, n_topics=6, seed=7))
    cat.normalize = True
    ann = AnnIndex.build(cat.embeddings[: cat.n_rows], cat.alive_rows(), cfg.index)
    users = [u for u in (f"user-{i}" for i in range(400)) if bucket_of(SALT, u) >= 5000][:6]
    return {"catalog": cat, "ann": ann, "users": users, "ranker": _ranker_file(tmp_path_factory)}


def _fill(value, world):
    if isinstance(value, dict):
        return {_fill(k, world): _fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    return {"<ranker>": world["ranker"], ITEM: world["catalog"].item_ids[42]}.get(value, value) if isinstance(
        value, str) else value


def _serve(world, settings, experiment_override=None):
    """What the world's users are served by an engine with ``settings`` as its base config."""
    cfg = Config().with_overrides(_merge(BASE, settings))
    experiments = None
    if experiment_override is not None:
        experiments = ExperimentSet.from_dict({"experiment": [{
            "name": "e", "salt": SALT,
            "variant": [{"name": "control", "weight": 1}, {"name": "v", "weight": 1, "overrides": experiment_override}],
        }]}, cfg)
    cat, ann = world["catalog"], world["ann"]
    fetches = []
    query = ann.query

    def spy(vector, k):
        fetches.append(k)
        return query(vector, k)

    ann.query = spy
    eng = Engine(cfg, cat, ann, clock=lambda: NOW_MS, experiments=experiments)
    try:
        events = [FeedbackEventIn(f"org-{u}-{j}", u, cat.item_ids[(i * 37 + j * 11) % 3000], "click",
                                  timestamp_ms=NOW_MS - 100_000 + j)
                  for i, u in enumerate(world["users"] + [f"other-{k}" for k in range(20)]) for j in range(5)]
        assert eng.feedback(events).accepted == len(events)
        for u in world["users"]:  # attributed impressions and a click: bandit evidence
            rec = eng.recommend(RecommendQuery(user_id=u, n=5))
            fb = [FeedbackEventIn(f"imp-{u}-{i.position}", u, i.item_id, "impression", request_id=rec.request_id)
                  for i in rec.items]
            fb.append(FeedbackEventIn(f"clk-{u}", u, rec.items[-1].item_id, "click", request_id=rec.request_id))
            assert eng.feedback(fb).accepted == len(fb)
        out = []
        emb = cat.embeddings[5].tolist()
        for u in world["users"]:
            for q in (RecommendQuery(user_id=u, n=8, debug=True), RecommendQuery(user_id=u, debug=True),
                      RecommendQuery(user_id=u, n=8, user_embedding=emb, allowed_categories=cat.category_names[:2])):
                try:
                    rec = eng.recommend(q)
                except InvalidArgument as exc:
                    out.append(str(exc))
                    continue
                assert rec.variant in ("", "e:v")
                # (repr: a pinned item that was not a candidate has score NaN, which equals nothing)
                out.append((rec.degraded, [(i.item_id, repr(round(i.score, 6)), i.propensity, i.sponsored,
                                            sorted(i.debug.items())) for i in rec.items]))
            c = eng.candidates(RecommendQuery(user_id=u))
            out.append((c.rows.tolist(), c.sources.tolist()))
        return out, fetches
    finally:
        ann.query = query
        eng.close(snapshot=False)


def test_every_per_request_key_has_a_case():
    assert set(CASES) == set(per_request_keys())


@pytest.mark.parametrize("key", sorted(CASES))
def test_variant_override_takes_effect(world, key):
    settings, override = (_fill(x, world) for x in CASES[key])
    variant = _serve(world, settings, experiment_override=override)
    as_base = _serve(world, _merge(settings, override))
    neither = _serve(world, settings)
    assert variant == as_base, f"the variant's {key} did not take effect exactly as a base setting does"
    assert as_base != neither, f"{key}: the test's value changes nothing; pick one that matters"


@pytest.mark.parametrize("key", sorted(PROCESS_WIDE_KEYS))
def test_process_wide_keys_are_refused_in_variants(key):
    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    override = {section: {name: (value or 1) if not isinstance(value, bool) else not value}}
    with pytest.raises(Exception, match=f"{section}.{name}.*process-wide"):
        ExperimentSet.from_dict({"experiment": [{
            "name": "e", "salt": "s",
            "variant": [{"name": "control", "weight": 1}, {"name": "v", "weight": 1, "overrides": override}],
        }]}, Config())


def test_variant_default_n_sets_the_slate_size(world):
    """Regression: n was resolved from the base config before assignment, so default_n did nothing."""
    variant, _ = _serve(world, {}, experiment_override={"recommend": {"default_n": 3}})
    sizes = [len(r[1]) for r in variant[1::4]]  # each user's n = 0 request
    assert sizes == [3] * len(world["users"])
    assert np.all(np.array(sizes) == 3)
