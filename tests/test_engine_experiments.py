"""Experiments wired through the engine and the RPC: assignment, overrides, attribution, report."""

import json

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
