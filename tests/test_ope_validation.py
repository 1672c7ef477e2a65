"""recsvc ope --state-dir DIR --validate, the reverse direction (issue 17): the main policy's click rate
estimated from the random-exposure slice, on logs where the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    assert {"covers_observed", "intervals_overlap"} <= set(est) and {"diagnostics", "method", "warnings"} <= set(out)
    assert out["exact"] and est["covers_observed"]


# -- the exact reverse estimate: the main policy's propensities logged on the slice's slates -------------------
def test_exact_reverse_estimate_covers_a_main_policy_that_targets_users():
    """Two kinds of user like opposite halves of the catalog; the main policy serves each k of the half it
    likes. The by-item estimate cannot see the targeting (test above); weighting each slice impression by the
    main policy's probability of serving its item in that request recovers the main policy's rate."""
    from recsvc.evaluation.service_log import main_ctr_from_slice_exact

    rng = np.random.default_rng(18)
    n_items, k, runs, covered = 60, 5, 30, 0
    likes = np.zeros((2, n_items))
    likes[0, :30] = likes[1, 30:] = 1.0
    for _ in range(runs):
        main_clicked, clicked, slate, target, q = [], [], [], [], []
        for s in range(2000):
            utype = int(rng.integers(0, 2))
            ctr = 0.02 + 0.2 * likes[utype]
            if rng.random() < 0.7:  # the main policy: k of the user's liked half, uniformly
                items = rng.choice(np.flatnonzero(likes[utype]), k, replace=False)
                main_clicked.append(rng.random(k) < ctr[items])
            else:  # the slice: k of the whole catalog; the main policy's inclusion probability logged
                items = rng.choice(n_items, k, replace=False)
                clicked.append(rng.random(k) < ctr[items])
                slate.append(np.full(k, s))
                target.append(likes[utype, items] * k / 30)
                q.append(np.full(k, k / n_items))
        out = main_ctr_from_slice_exact(np.concatenate(main_clicked), np.concatenate(clicked),
                                        np.concatenate(slate), np.concatenate(target), np.concatenate(q),
                                        n_bootstrap=300, seed=1)
        est, ips = out["main_ctr_from_slice"], out["ips"]
        covered += est["ci_low"] <= 0.22 <= est["ci_high"]  # the truth: 0.02 + 0.2 on every main impression
        assert out["exact"] and abs(out["diagnostics"]["mean_weight"] - 1) < 0.1 and not out["warnings"]
        assert abs(ips["value"] - est["value"]) < 0.03
    assert covered / runs >= 0.85, covered / runs


def test_exact_reverse_estimate_refuses_impossible_propensities():
    from recsvc.evaluation.service_log import main_ctr_from_slice_exact

    ones = np.ones(3)
    with pytest.raises(ValueError, match="slice_p must be in"):
        main_ctr_from_slice_exact(ones, ones, np.arange(3), ones, np.array([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="target_p in"):
        main_ctr_from_slice_exact(ones, ones, np.arange(3), np.array([0.5, np.nan, 0.5]), ones)
    with pytest.raises(ValueError, match="one length"):
        main_ctr_from_slice_exact(ones, ones, np.arange(2), ones, ones)


def _simulated_state_dir(path, monkeypatch, users=300, rounds=12, eta=0.0):
    """The simulator's users (personal tastes: clustered latent tastes, ctr = sigmoid(a taste . item + b)) and
    its default A/B test (greedy, Thompson, epsilon-greedy, long-tail boost), served by an engine on a state
    directory with a random slice of 0.3; request ids from a seeded generator, so the log is the same every
    run. ``eta`` 0: every position is examined (no position effect)."""
    import random
    import uuid

    from recsvc.evaluation import simulator as sim
    from recsvc.state.store import LocalStateStore

    ids = random.Random(0)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=ids.getrandbits(128), version=4))
    settings = sim.SimulationSettings(users=users, rounds=rounds, seed=0, eta=eta)
    cfg = sim.base_config(settings).with_overrides({"exploration": {"random_share": 0.3},
                                                    "state": {"dir": str(path)}})
    catalog = sim.build_world(settings)
    target = sim.EngineTarget.__new__(sim.EngineTarget)
    from recsvc.retrieval.ann import AnnIndex

    target.clock = sim._Clock(sim.START_MS)
    target.engine = Engine(cfg, catalog, AnnIndex.build(catalog.embeddings[: catalog.n_rows], catalog.alive_rows(),
                                                        cfg.index),
                           store=LocalStateStore(path, fsync=False), clock=target.clock,
                           experiments=sim.load_experiments(None, cfg, None))
    try:
        sim.simulate(target, catalog, settings)
    finally:
        target.close()
    return path


def test_ope_validate_reverse_is_exact_with_personal_tastes(tmp_path, capsys, monkeypatch):
    """Regression (issue 17): with personal tastes the main policy targets users, and the item-level reverse
    estimate fell short of the main policy's observed click rate (.070 [.058, .083] against .112 on this log).
    The slice's slates now log the main policy's propensities, and the exact estimate covers it."""
    from recsvc.cli import main as cli_main
    from recsvc.evaluation.service_log import main_ctr_from_slice
    from recsvc.state.served_log import read_served_impressions

    state = _simulated_state_dir(tmp_path / "state", monkeypatch)
    assert cli_main(["ope", "--state-dir", str(state), "--validate"]) == 0
    out = json.loads(capsys.readouterr().out)["reverse"]
    est, obs = out["main_ctr_from_slice"], out["main_ctr_observed"]
    assert out["exact"] and est["n"] > 1000 and obs["n"] > 1000
    assert est["covers_observed"] and out["ips"]["covers_observed"], (est, obs)
    assert abs(est["value"] - obs["value"]) < 0.02 and est["ci_high"] - est["ci_low"] < 0.08
    assert 0.9 < out["diagnostics"]["mean_weight"] < 1.1
    # the log: the main policy's propensity on every slice row (0 allowed), none on the main policy's own
    imp = read_served_impressions(state)
    sl = imp.random_slice
    assert np.isfinite(imp.target_p[sl]).all() and np.isnan(imp.target_p[~sl]).all()
    assert ((imp.target_p[sl] >= 0) & (imp.target_p[sl] <= 1)).all() and (imp.target_p[sl] == 0).any()
    # the fallback on the same log misses: the targeting is what it cannot see
    old = main_ctr_from_slice(imp.rows, imp.clicked, imp.slate, imp.random_slice, imp.random_p, n_bootstrap=200)
    assert not old["main_ctr_from_slice"]["covers_observed"]


def test_ope_validate_falls_back_to_the_item_level_estimate_on_an_old_log(tmp_path, capsys, monkeypatch):
    """A log written before the slice's slates carried the main policy's propensities (its records without
    the ``tp`` key): the item-level estimate, marked and warned."""
    from recsvc.cli import main as cli_main

    state = _simulated_state_dir(tmp_path / "state", monkeypatch, users=120, rounds=8)
    for seg in sorted(state.glob("**/*")):
        if seg.is_file() and seg.suffix in (".log", ".jsonl"):
            lines = seg.read_bytes().splitlines(keepends=True)
            seg.write_bytes(b"".join(_without_tp(line) for line in lines))
    assert cli_main(["ope", "--state-dir", str(state), "--validate"]) == 0
    out = json.loads(capsys.readouterr().out)["reverse"]
    assert out["exact"] is False and "by item" in out["method"]
    assert "carry no main-policy propensities" in out["warnings"][0]


def _without_tp(line: bytes) -> bytes:
    """A log line as the code before the field wrote it: the served record without ``tp``."""
    from recsvc.state.store import decode_line, encode_record

    rec = decode_line(line)
    if rec is None or rec.get("t") != "served" or "tp" not in rec:
        return line
    rec.pop("tp")
    return encode_record(rec)
