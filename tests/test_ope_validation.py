"""recsvc ope --state-dir DIR --validate, the reverse direction (issue 17): the main policy's click rate
estimated from the random-exposure slice, on logs where the answer is known."""

from __future__ import annotations

import json

import numpy as np

from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
from recsvc.evaluation.service_log import main_ctr_from_slice

from conftest import small_config


def _log(rng, ctr_of, main_p, n_main=1500, n_slice=500, k=5, pool=40, user_types=None):
    """Synthetic impressions: main slates draw k items from main_p; slice slates draw k of a random pool
    uniformly (exact propensity k / pool). ``ctr_of(items, user_type)`` gives click probabilities."""
    n_items = main_p.size
    rows, clicked, slate, in_slice, q = [], [], [], [], []
    slice_share = n_slice / (n_main + n_slice)
    for s in range(n_main + n_slice):  # the slice's slates interleaved with the main policy's
        utype = int(rng.integers(0, 2)) if user_types else 0
        if rng.random() >= slice_share:
            p = main_p if user_types is None else user_types[utype]
            items = rng.choice(n_items, k, replace=False, p=p)
            qs, sl = np.full(k, np.nan), False
        else:
            items = rng.choice(rng.choice(n_items, pool, replace=False), k, replace=False)
            qs, sl = np.full(k, k / pool), True
        rows.append(items)
        clicked.append(rng.random(k) < ctr_of(items, utype))
        slate.append(np.full(k, s))
        in_slice.append(np.full(k, sl))
        q.append(qs)
    return (np.concatenate(rows), np.concatenate(clicked).astype(float), np.concatenate(slate),
            np.concatenate(in_slice), np.concatenate(q))


def test_reverse_estimate_covers_the_main_policys_click_rate_when_it_depends_on_the_item_only():
    rng = np.random.default_rng(17)
    n_items = 60
    ctr = np.linspace(0.01, 0.3, n_items)
    main_p = rng.dirichlet(np.full(n_items, 0.5))  # a skewed main policy
    runs, covered, covers_observed = 30, 0, 0
    for _ in range(runs):
        log = _log(rng, lambda items, _t: ctr[items], main_p)
        out = main_ctr_from_slice(*log, n_bootstrap=200, seed=1)
        est = out["main_ctr_from_slice"]
        # truth: the main policy's expected click rate per impression, by its observed item mix
        rows, clicked, _, in_slice, _ = log
        truth = float(ctr[rows[~in_slice]].mean())
        covered += est["ci_low"] <= truth <= est["ci_high"]
        covers_observed += est["covers_observed"]
        assert out["main_mass_covered"] > 0.9 and not out["warnings"]
        assert out["main_ctr_observed"]["value"] == clicked[~in_slice].mean()
    assert covered / runs >= 0.85, covered / runs
    assert covers_observed / runs >= 0.85, covers_observed / runs


def test_reverse_estimate_misses_when_the_main_policy_targets_users():
    """Two kinds of user like opposite halves of the catalog; the main policy shows each the half it likes,
    the slice shows everything to everyone: the by-item estimate cannot see the targeting and falls short."""
    rng = np.random.default_rng(18)
    n_items = 60
    likes = np.zeros((2, n_items))
    likes[0, :30] = likes[1, 30:] = 1.0

    def ctr_of(items, utype):
        return 0.02 + 0.2 * likes[utype, items]

    pref = [likes[t] / likes[t].sum() for t in (0, 1)]
    log = _log(rng, ctr_of, pref[0], user_types=pref)
    out = main_ctr_from_slice(*log, n_bootstrap=200, seed=1)
    est, obs = out["main_ctr_from_slice"], out["main_ctr_observed"]
    assert obs["value"] > 0.18  # the main policy's users click what it shows them
    assert est["ci_high"] < obs["value"] and not est["covers_observed"]  # ~0.12: the untargeted rate


def test_reverse_estimate_warns_when_the_slice_never_shows_the_main_policys_items():
    rng = np.random.default_rng(19)
    n_items = 60
    main_p = np.zeros(n_items)
    main_p[:10] = 0.1
    rows, clicked, slate, in_slice, q = _log(rng, lambda items, _t: np.full(items.size, 0.1), main_p,
                                             n_slice=30, pool=60)
    keep = ~in_slice | (rows >= 5)  # the slice never showed items 0..4
    out = main_ctr_from_slice(rows[keep], clicked[keep], slate[keep], in_slice[keep], q[keep], n_bootstrap=50)
    assert 0.35 < out["main_mass_covered"] < 0.6
    assert any("out of reach" in w for w in out["warnings"])


def test_ope_validate_reports_the_reverse_direction_on_the_service_log(tmp_path, capsys, monkeypatch):
    """On the service's own log, clicks depending on the item only (a known answer: the main policy's true
    click rate is the mean of its impressions' item click rates): the reverse estimate finds it, although the
    main policy learns from the slice's clicks. Request ids (which decide the slice) are drawn from a seeded
    generator, so the log is the same every run."""
    import random
    import uuid

    from recsvc.cli import main as cli_main

    ids = random.Random(5)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=ids.getrandbits(128), version=4))
    now = [1_795_910_400_000]
    cfg = small_config(tmp_path, exploration={"random_share": 0.3, "top_m": 10}, retrieval={"n_candidates": 60})
    eng = Engine.from_config(cfg, clock=lambda: now[0])
    rng = np.random.default_rng(0)
    item_ctr = {}
    e = 0
    for r in range(600):
        now[0] += 1000
        user = f"u{r % 40}"
        rec = eng.recommend(RecommendQuery(user_id=user, n=5))
        fb = []
        for it in rec.items:
            e += 1
            p = item_ctr.setdefault(it.item_id, float(rng.uniform(0.0, 0.4)))
            fb.append(FeedbackEventIn(f"i{e}", user, it.item_id, "impression", request_id=rec.request_id))
            if rng.random() < p:
                fb.append(FeedbackEventIn(f"c{e}", user, it.item_id, "click", request_id=rec.request_id))
        eng.feedback(fb)
    eng.close(snapshot=False)
    assert cli_main(["ope", "--state-dir", str(cfg.state.dir), "--validate"]) == 0
    out = json.loads(capsys.readouterr().out)["reverse"]
    est, obs = out["main_ctr_from_slice"], out["main_ctr_observed"]
    assert est["n"] > 100 and obs["n"] > 1000
    from recsvc.state.served_log import read_served_impressions

    imp = read_served_impressions(cfg.state.dir)
    ids = eng.catalog.item_ids
    truth = float(np.mean([item_ctr[ids[r]] for r in imp.rows[~imp.random_slice]]))
    assert est["ci_low"] <= truth <= est["ci_high"], (est, truth)
    assert est["ci_high"] - est["ci_low"] < 0.25
    assert {"covers_observed", "intervals_overlap"} <= set(est) and {"main_mass_covered", "method", "warnings"} <= set(out)
