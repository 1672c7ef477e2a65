"""recsvc train-ranker: learn from the service's own served slates and feedback, then serve the model."""

import json

import numpy as np
import pytest

from recsvc.cli import main
from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
from recsvc.ranking import Ranker

from conftest import small_config


def _traffic(engine, users=60, tag="a"):
    """Impressions for every served item; clicks on the items closest to the user's taste."""
    rng = np.random.default_rng(len(tag) + users)
    cat = engine.catalog
    for u in range(users):
        taste = cat.embeddings[int(rng.integers(cat.n_rows))]
        rec = engine.recommend(RecommendQuery(user_id=f"u{u}", n=8, user_embedding=taste.tolist()))
        events = []
        for it in rec.items:
            events.append(FeedbackEventIn(f"{tag}i{u}-{it.position}", f"u{u}", it.item_id, "impression",
                                          request_id=rec.request_id))
            sim = float(cat.embeddings[cat.row_of[it.item_id]] @ taste)
            if sim > 0.8 or it.position == 0:
                events.append(FeedbackEventIn(f"{tag}c{u}-{it.position}", f"u{u}", it.item_id, "click",
                                              request_id=rec.request_id))
        assert engine.feedback(events).accepted == len(events)


def test_train_ranker_from_the_live_state_dir(tmp_path, clock, capsys):
    cfg = small_config(tmp_path)
    engine = Engine.from_config(cfg, clock=clock)
    _traffic(engine)
    engine.snapshot()  # half from the snapshot ...
    _traffic(engine, users=20, tag="b")  # ... half from the log after it
    out = tmp_path / "ranker.json"
    # read-only: runs while the engine still owns the directory
    code = main(["train-ranker", "--state-dir", str(cfg.state.dir), "-o", str(out)])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert metrics["examples"] == 80 * 8 and metrics["positives"] > 80
    ranker = Ranker.load(out)
    assert ranker.kind == "logistic"
    # the learned model puts weight on similarity, which drove the clicks
    sim = ranker.feature_names.index("similarity")
    assert ranker.layers[0][0][sim, 0] > 0
    engine.close(snapshot=False)
    # serve with it
    served = Engine.from_config(cfg.with_overrides({"ranking": {"model_path": str(out)}}), clock=clock)
    assert len(served.recommend(RecommendQuery(user_id="new", n=5)).items) == 5
    assert served.reload_ranker() == [str(out)]
    served.close(snapshot=False)


def test_train_ranker_without_feedback_explains_what_is_missing(tmp_path, clock):
    cfg = small_config(tmp_path)
    Engine.from_config(cfg, clock=clock).close(snapshot=False)
    from recsvc.training import train_from_state_dir

    with pytest.raises(ValueError, match="no served item with feedback"):
        train_from_state_dir(cfg.state.dir)


def test_ope_on_the_service_log(tmp_path, clock, capsys):
    """The logging policy evaluated off-policy gives back its own CTR; a target ranker gets an estimate."""
    from recsvc.evaluation.service_log import evaluate_service_log, soft_topk_policy

    cfg = small_config(tmp_path)
    engine = Engine.from_config(cfg, clock=clock)
    _traffic(engine)
    engine.close(snapshot=False)
    report = evaluate_service_log(cfg.state.dir)
    assert report["impressions"] == 60 * 8
    assert report["logging_policy_ips"]["value"] == pytest.approx(report["logged_ctr"]["value"])
    out = tmp_path / "r.json"
    assert main(["train-ranker", "--state-dir", str(cfg.state.dir), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["ope", "--state-dir", str(cfg.state.dir), "--target-ranker", str(out)]) == 0
    target = json.loads(capsys.readouterr().out)["target"]
    assert 0.0 <= target["snips"]["value"] <= 1.0
    assert target["ips"]["ci_low"] <= target["ips"]["value"] <= target["ips"]["ci_high"]
    # soft top-k: probabilities in (0, 1], summing to at most k per slate
    pi = soft_topk_policy(np.array([3.0, 1.0, 0.0, 5.0]), np.array([0, 0, 1, 1]), 1.0)
    assert ((pi > 0) & (pi <= 1)).all()
    assert pi[0] > pi[1] and pi[3] > pi[2]
