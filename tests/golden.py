"""Golden slates: a fixed state built by a fixed event sequence, then every policy and rule set.

Recorded once on the engine before it was split into request, feedback and catalog paths
(``python tests/golden.py`` rewrites ``tests/data/golden_slates.json``); ``test_golden_slates.py``
asserts the current engine still serves the same slates item for item and propensity for
propensity. Only the public in-process API is used, so the recording means the same thing on
any implementation behind it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden_slates.json"
NOW_MS = 1_795_910_400_000

EXPERIMENTS = """
[[experiment]]
name = "policy"
salt = "golden-policy"
  [[experiment.variant]]
  name = "control"
  weight = 1
  [[experiment.variant]]
  name = "greedy_mmr"
  weight = 1
  overrides = { exploration = { policy = "greedy" }, reranking = { mmr_lambda = 0.4 } }
  [[experiment.variant]]
  name = "ucb_boost"
  weight = 1
  overrides = { exploration = { policy = "ucb1", ucb_c = 2.0 }, reranking = { long_tail_boost = 0.2 } }

[[experiment]]
name = "quota"
salt = "golden-quota"
  [[experiment.variant]]
  name = "three"
  weight = 1
  [[experiment.variant]]
  name = "one"
  weight = 1
  overrides = { reranking = { max_per_category = 1 } }
"""

POLICIES = ("greedy", "thompson", "ucb1", "epsilon_greedy")


def _config(tmp: Path, policy: str, experiments: bool):
    from recsvc.config import Config

    over = {
        "catalog": {"cache_dir": str(tmp / "cache"),
                    "demo": {"n_items": 3000, "dim": 16, "n_categories": 20, "n_topics": 6, "seed": 7}},
        "state": {"dir": str(tmp / f"state-{policy}-{experiments}")},
        "retrieval": {"n_candidates": 300, "shares": {"ann": 180, "cooccurrence": 60, "popular": 30, "fresh": 30}},
        "exploration": {"seed": 4321, "policy": policy},
        "index": {"ef_construction": 100, "build_threads": 1},
    }
    if experiments:
        path = tmp / "experiments.toml"
        path.write_text(EXPERIMENTS)
        over["experiments"] = {"file": str(path)}
    return Config().with_overrides(over)


def _slate(rec) -> dict:
    return {
        "variant": rec.variant,
        "degraded": rec.degraded,
        "items": [[i.item_id, round(i.score, 6), i.propensity, sorted(i.sources), i.sponsored, i.category]
                  for i in rec.items],
    }


def scenario(tmp: Path, policy: str, experiments: bool) -> dict:
    """Build the fixed state, then serve every request of the matrix; returns {case: slate}."""
    from recsvc.engine import Engine, FeedbackEventIn, RecommendQuery

    now = [NOW_MS]
    eng = Engine.from_config(_config(tmp, policy, experiments), clock=lambda: now[0])
    try:
        ids = eng.recommend(RecommendQuery(user_id="probe", n=50, debug=True))  # any 50 items
        pool = [i.item_id for i in ids.items]
        events = []
        # organic clicks: users with overlapping tastes teach popularity, history and co-occurrence
        for u in range(40):
            for j in range(6):
                item = pool[(u * 3 + j * 7) % len(pool)]
                events.append(FeedbackEventIn(f"org-{u}-{j}", f"user-{u}", item, "click",
                                              timestamp_ms=NOW_MS - 3_600_000 + u * 1000 + j))
        assert eng.feedback(events).accepted == len(events)
        # served slates with impressions and some clicks: bandit evidence
        for u in range(40):
            now[0] += 1000
            rec = eng.recommend(RecommendQuery(user_id=f"user-{u}", n=8))
            fb = [FeedbackEventIn(f"imp-{u}-{i.position}", f"user-{u}", i.item_id, "impression",
                                  request_id=rec.request_id) for i in rec.items]
            for i in rec.items[: u % 4]:
                fb.append(FeedbackEventIn(f"clk-{u}-{i.position}", f"user-{u}", i.item_id, "click",
                                          request_id=rec.request_id))
            assert eng.feedback(fb).accepted == len(fb)
        now[0] += 60_000
        cat_names = sorted({i.category for i in ids.items})
        emb = [float((k % 5) - 2) for k in range(16)]
        requests = {
            "cold": RecommendQuery(user_id="cold-user", n=10),
            "warm": RecommendQuery(user_id="user-3", n=10),
            "warm-large": RecommendQuery(user_id="user-7", n=40),
            "embedding": RecommendQuery(user_id="emb-user", n=10, user_embedding=emb),
            "filters": RecommendQuery(user_id="user-5", n=12, allowed_categories=cat_names[:3],
                                      max_maturity=12, exclude_item_ids=pool[:5]),
            "blocked": RecommendQuery(user_id="user-9", n=10, blocked_categories=cat_names[:4]),
            "no-quota": RecommendQuery(user_id="user-11", n=10, rerank={"max_per_category": 0}),
            "mmr": RecommendQuery(user_id="user-12", n=10, rerank={"mmr_lambda": 0.3}),
            "boosts": RecommendQuery(user_id="user-13", n=10,
                                     rerank={"freshness_boost": 0.3, "long_tail_boost": 0.2}),
            "pinned": RecommendQuery(user_id="user-14", n=10, rerank={"pinned": {pool[20]: 0, pool[1]: 4}}),
            "sponsored": RecommendQuery(user_id="user-15", n=10,
                                        rerank={"sponsored_items": [pool[30], pool[31]],
                                                "sponsored_positions": [1, 6]}),
            "context": RecommendQuery(user_id="user-16", n=10, context={"device": "tv"}),
        }
        out = {}
        for name, q in requests.items():
            now[0] += 1000
            out[name] = _slate(eng.recommend(q))
        for u in range(20, 32):  # several users per arm when experiments run
            now[0] += 1000
            out[f"user-{u}"] = _slate(eng.recommend(RecommendQuery(user_id=f"user-{u}", n=6)))
        return out
    finally:
        eng.close(snapshot=False)


def record_all(tmp: Path) -> dict:
    return {f"{p}/{'experiments' if e else 'base'}": scenario(tmp, p, e)
            for p in POLICIES for e in (False, True)}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = record_all(Path(d))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN} ({sum(len(v) for v in data.values())} slates)", file=sys.stderr)
