"""CUPED pre-periods on replicas sharing a Redis log: every replica derives the same values."""

import time
import uuid

import pytest

from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery
from recsvc.experiments.aggregates import DAY_MS

from conftest import NOW_MS, FakeClock, small_config
from test_experiment_cuped import EXPERIMENTS_TOML as EXPERIMENTS

pytest.importorskip("redis")


def _pre(engine):
    out = {}
    for a in engine.aggregates.to_dict()["arms"]:
        for i, u in enumerate(a["users"]):
            out[u] = (a["variant"], a["per_user"]["pre_impressions"][i], a["per_user"]["pre_clicks"][i])
    return out


def test_replicas_agree_on_pre_periods_collected_at_either(tmp_path, redis_server):
    t0 = NOW_MS // DAY_MS * DAY_MS
    path = tmp_path / "experiments.toml"
    path.write_text(EXPERIMENTS.format(start=t0 + 2 * DAY_MS))
    cfg = small_config(tmp_path, experiments={"file": str(path), "cuped_pre_days": 7},
                       state={"backend": "redis", "redis_url": redis_server.url,
                              "redis_prefix": f"t{uuid.uuid4().hex[:8]}", "max_staleness_ms": 300},
                       exploration={"policy": "greedy"})
    clock = FakeClock(t0)
    a, b = (Engine.from_config(cfg, clock=clock) for _ in range(2))
    try:
        def visit(serve, send, user, day, clicks):
            clock.now_ms = t0 + day * DAY_MS + 3600_000
            rec = serve.recommend(RecommendQuery(user_id=user, n=3))
            ev = [FeedbackEventIn(f"{user}-{day}-i{i.position}", user, i.item_id, "impression",
                                  request_id=rec.request_id) for i in rec.items]
            ev += [FeedbackEventIn(f"{user}-{day}-c{k}", user, rec.items[k].item_id, "click",
                                   request_id=rec.request_id) for k in range(clicks)]
            assert send.feedback(ev).accepted == len(ev)

        for d in range(2):  # before the start: served by A, feedback through B
            visit(a, b, "keen", d, 2)
            visit(a, b, "casual", d, 0)
        visit(b, a, "keen", 2, 1)  # first exposures at B (feedback through A)
        visit(b, a, "casual", 2, 0)
        expected = {"keen": (6, 4), "casual": (6, 0)}

        deadline = time.monotonic() + 3.0
        while True:
            pa, pb = _pre(a), _pre(b)
            if len(pa) == len(pb) == 2 and pa == pb:
                break
            assert time.monotonic() < deadline, (pa, pb)
            time.sleep(0.01)
        assert {u: v[1:] for u, v in pa.items()} == expected
    finally:
        a.close(snapshot=False)
        b.close(snapshot=False)
