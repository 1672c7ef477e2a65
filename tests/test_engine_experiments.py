"""Experiments wired through the engine and the RPC: assignment, overrides, attribution, report."""

import json

import numpy as np

import pytest

from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
from recsvc.errors import InvalidArgument, NotFound
from recsvc.experiments import bucket_of

from conftest import small_config

EXPERIMENTS = """
[[experiment]]
name = "policy"
salt = "policy-test"

  [[experiment.variant]]
  name = "control"
  weight = 1

  [[experiment.variant]]
  name = "greedy_mmr"
  weight = 1
  overrides = { exploration = { policy = "greedy" }, reranking = { mmr_lambda = 0.5 } }
"""


@pytest.fixture
def exp_engine(tmp_path, clock):
    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS)
    cfg = small_config(tmp_path, experiments={"file": str(path)})
    eng = Engine.from_config(cfg, clock=clock)
    yield eng
    eng.close(snapshot=False)


def test_variant_is_deterministic_and_overrides_apply(exp_engine):
    seen = {}
    for u in range(60):
        user = f"user-{u}"
        rec = exp_engine.recommend(RecommendQuery(user_id=user, n=5))
        again = exp_engine.recommend(RecommendQuery(user_id=user, n=5))
        assert rec.variant == again.variant
        expected = "control" if bucket_of("policy-test", user) < 5000 else "greedy_mmr"
        assert rec.variant == f"policy:{expected}"
        seen.setdefault(rec.variant, []).append(rec)
    assert set(seen) == {"policy:control", "policy:greedy_mmr"}
    # greedy is deterministic: propensity 1 for every served item
    for rec in seen["policy:greedy_mmr"]:
        assert all(i.propensity == 1.0 for i in rec.items)
    assert any(i.propensity < 1.0 for rec in seen["policy:control"] for i in rec.items)


def test_feedback_is_attributed_to_variants_in_the_report(exp_engine):
    for u in range(40):
        rec = exp_engine.recommend(RecommendQuery(user_id=f"u{u}", n=4))
        events = [FeedbackEventIn(f"imp-{u}-{i.position}", f"u{u}", i.item_id, "impression",
                                  request_id=rec.request_id) for i in rec.items]
        if u % 3 == 0:
            events.append(FeedbackEventIn(f"clk-{u}", f"u{u}", rec.items[0].item_id, "click",
                                          request_id=rec.request_id))
        assert exp_engine.feedback(events).accepted == len(events)
    data, text, png = exp_engine.experiment_report("policy")
    arms = {a["variant"]: a for a in data["experiments"][0]["arms"]}
    assert sum(a["impressions"] for a in arms.values()) == 160
    assert sum(a["clicks"] for a in arms.values()) == 14
    assert "policy" in text and "SRM" in text.upper()
    data, text, png = exp_engine.experiment_report("policy", plot_metric="ctr")
    assert png.startswith(b"\x89PNG")
    with pytest.raises(NotFound, match="no experiment named 'nope'"):
        exp_engine.experiment_report("nope")
    with pytest.raises(InvalidArgument, match="unknown metric"):
        exp_engine.experiment_report("policy", plot_metric="likes")


def test_aggregates_survive_restart(tmp_path, clock):
    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS)
    cfg = small_config(tmp_path, experiments={"file": str(path)})
    eng = Engine.from_config(cfg, clock=clock)
    rec = eng.recommend(RecommendQuery(user_id="a", n=3))
    eng.feedback([FeedbackEventIn("i1", "a", rec.items[0].item_id, "impression", request_id=rec.request_id),
                  FeedbackEventIn("c1", "a", rec.items[0].item_id, "click", request_id=rec.request_id)])
    before = json.dumps(eng.experiment_report("policy")[0]["experiments"][0]["arms"], sort_keys=True)
    eng.close(snapshot=False)  # replayed from the log
    back = Engine.from_config(cfg, clock=clock)
    assert json.dumps(back.experiment_report("policy")[0]["experiments"][0]["arms"], sort_keys=True) == before
    back.close(snapshot=True)  # and from a snapshot
    third = Engine.from_config(cfg, clock=clock)
    assert json.dumps(third.experiment_report("policy")[0]["experiments"][0]["arms"], sort_keys=True) == before
    third.close(snapshot=False)


def _arm_totals(eng):
    arms = eng.experiment_report("policy")[0]["experiments"][0]["arms"]
    return {k: sum(a[k] for a in arms) for k in ("impressions", "clicks", "conversions")}


def test_repeated_events_on_one_served_item_count_once(tmp_path, clock):
    """Regression (issue 17): 2 impressions + 3 clicks on one served item added 2 and 3 to the arm while the
    bandit counted one success; a click without an impression added a click and no impression. Per (slate,
    item) an arm now counts at most one impression, one click and one conversion (a click implies its
    impression), also after a restart from the log and from a snapshot."""
    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS)
    cfg = small_config(tmp_path, experiments={"file": str(path)})
    eng = Engine.from_config(cfg, clock=clock)
    rec = eng.recommend(RecommendQuery(user_id="a", n=3))
    a, b = rec.items[0].item_id, rec.items[1].item_id
    ev = [FeedbackEventIn(f"i{j}", "a", a, "impression", request_id=rec.request_id) for j in range(2)]
    ev += [FeedbackEventIn(f"c{j}", "a", a, "click", request_id=rec.request_id) for j in range(3)]
    ev += [FeedbackEventIn("cb", "a", b, "click", request_id=rec.request_id)]  # no impression reported
    ev += [FeedbackEventIn(f"v{j}", "a", b, "conversion", value=2.0, request_id=rec.request_id) for j in range(2)]
    assert eng.feedback(ev).accepted == len(ev)
    want = {"impressions": 2, "clicks": 2, "conversions": 1}
    assert _arm_totals(eng) == want
    eng.close(snapshot=False)
    back = Engine.from_config(cfg, clock=clock)  # replayed from the log
    assert _arm_totals(back) == want
    back.feedback([FeedbackEventIn("c9", "a", a, "click", request_id=rec.request_id)])
    back.close(snapshot=True)
    third = Engine.from_config(cfg, clock=clock)  # from a snapshot: what was counted is remembered
    third.feedback([FeedbackEventIn("c10", "a", a, "click", request_id=rec.request_id)])
    assert _arm_totals(third) == want
    third.close(snapshot=False)


def test_feedback_stamped_before_its_slate_is_rejected(exp_engine, clock):
    """Regression (issue 17): a click stamped an hour before its slate was served still updated the bandit."""
    rec = exp_engine.recommend(RecommendQuery(user_id="early", n=3))
    item = rec.items[0].item_id
    row = exp_engine.catalog.row_of[item]
    before = exp_engine.state.bandit_evidence(np.array([row]))[0].tolist()
    with pytest.raises(Exception, match="before request .* was served"):
        exp_engine.feedback([FeedbackEventIn("e1", "early", item, "click", request_id=rec.request_id,
                                             timestamp_ms=clock() - 3_600_000)])
    assert exp_engine.state.bandit_evidence(np.array([row]))[0].tolist() == before


def test_attribution_window_is_half_open():
    from recsvc.state.records import attributed

    assert attributed(1000, 1000, 500) and attributed(1000, 1499, 500)
    assert not attributed(1000, 1500, 500) and not attributed(1000, 999, 500)
