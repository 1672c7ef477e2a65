"""Where the learned ranker's ceiling is, on development data only (the test split is never read).

    python tools/ranker_ceiling.py [--data ../shared/data/movielens-small] [--seed 0] [--test-fraction 0.2]

The protocol of ``recsvc evaluate --dev``, without its rules: the validation window of the split (the
"dev window") is scored by LambdaRank trees fitted on the two windows before it, each logged the way
``recsvc evaluate`` logs them (:func:`recsvc.evaluation.learned.log_candidates`: the request path's own
candidates and extended features). Every variant below orders the same logged candidates of the dev window;
the number printed is NDCG@10 over the dev window's users (positives outside the candidates count in the
ideal DCG, as in ``recsvc evaluate``), beside EASE's on the same window. No long-tail boost is applied.

Variants: the shipped features and trees (``recsvc.training.GBDT_PARAMS``, 60 rounds); other tree
settings; and features a production ranker does not have, computed here in numpy from each window's train
positives, to see how much signal is left: the full-history item-item cosine (co-occurrence over whole
histories, not the service's recent-window counts), EASE's own score (lambda 100), and the cosine of the
user's genre profile with the item's genres; and the popularity as of each request's clock (the train positives
before it, decayed with a half-life of 90 or 365 days), which the replay's state does not give (its
popularity is the train counts, one "now" for every user). Each variant is the mean over two tree seeds.

It takes about 10-15 minutes on 2 cores. The December 2026 numbers are in the issue 15 notes, not in the
README: they guide work, they are not a claim about the product.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

def _runs(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    return starts, np.r_[starts[1:], user.size]


def ndcg_at_10(score: np.ndarray, log, n_relevant: np.ndarray) -> float:
    """Mean NDCG@10 (:func:`recsvc.evaluation.metrics.ndcg_at_k`) over every user of the window, of the
    candidates ordered by ``score``; a user with no logged candidate scores 0."""
    from recsvc.evaluation.metrics import ndcg_at_k

    hits = np.zeros((n_relevant.size, 10))
    for s, e in zip(*_runs(log.user)):
        top = log.y[s:e][np.argsort(-score[s:e], kind="stable")[:10]]
        hits[log.user[s], : top.size] = top
    return float(np.nan_to_num(ndcg_at_k(hits, n_relevant, 10)).mean())


#: half-lives (days) of the popularity as of the request's clock
CLOCK_POPULARITY_HALF_LIVES = (90.0, 365.0)


def _clock_popularity(world, log) -> np.ndarray:
    """float32[m, 2] per logged candidate: log(1 + its train positives before the request's clock, each weighted
    2^(-age / half-life)), for each of :data:`CLOCK_POPULARITY_HALF_LIVES`."""
    from recsvc.evaluation.replay import request_clocks

    pos = world.train_positive
    order = np.argsort(pos.timestamp, kind="stable")
    seconds = np.asarray(pos.timestamp, np.float64)[order]
    rows = np.searchsorted(world.item_ids, pos.item_id)[order]
    clocks = request_clocks(world, log.users) / 1000.0
    out = np.zeros((log.y.size, len(CLOCK_POPULARITY_HALF_LIVES)), np.float32)
    for s, e in zip(*_runs(log.user)):
        t = clocks[log.user[s]]
        before = int(np.searchsorted(seconds, t))
        for j, days in enumerate(CLOCK_POPULARITY_HALF_LIVES):
            weight = np.exp2(-(t - seconds[:before]) / (days * 86_400.0))
            out[s:e, j] = np.log1p(np.bincount(rows[:before], weights=weight, minlength=world.catalog.n_rows)
                                   [log.rows[s:e]])
    return out


def _extra_features(world, log) -> np.ndarray:
    """float32[m, 5] per logged candidate: full-history cosine, EASE score, genre-profile cosine, and the
    popularity as of the request's clock (:func:`_clock_popularity`)."""
    from recsvc.evaluation.baselines import ease_item_weights, train_matrix
    from recsvc.evaluation.replay import _genre_vectors

    pos = world.train_positive
    users = np.unique(pos.user_id)
    X = train_matrix(np.searchsorted(users, pos.user_id), np.searchsorted(world.item_ids, pos.item_id),
                     users.size, world.catalog.n_rows)
    C = X.T @ X
    n = np.maximum(np.diag(C).copy(), 1.0)
    np.fill_diagonal(C, 0.0)
    cosine = C / np.sqrt(np.outer(n, n))
    ease = ease_item_weights(X, 100.0)
    genres = _genre_vectors(world.item_ids, pos.items).astype(np.float32)
    genres /= np.maximum(np.linalg.norm(genres, axis=1, keepdims=True), 1e-9)
    profile = X @ genres
    profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-9)
    out = np.zeros((log.y.size, 3), np.float32)
    for s, e in zip(*_runs(log.user)):
        u = log.users[log.user[s]]
        a = int(np.searchsorted(users, u))
        if a >= users.size or users[a] != u:
            continue
        rows, liked = log.rows[s:e], X[a].astype(bool)
        out[s:e, 0] = cosine[liked][:, rows].sum(0)
        out[s:e, 1] = X[a] @ ease[:, rows]
        out[s:e, 2] = genres[rows] @ profile[a]
    return np.hstack([out, _clock_popularity(world, log)])


def main(argv: list[str] | None = None) -> int:
    import lightgbm as lgb

    from recsvc.evaluation.learned import log_candidates
    from recsvc.evaluation.replay import (_baseline_lists, _relevant_sets, _World, load_dataset, prepare,
                                          prepare_validation)
    from recsvc.training import GBDT_PARAMS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/movielens-small"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)

    setup = prepare(load_dataset(args.data), seed=args.seed, test_fraction=args.test_fraction)
    dev = prepare_validation(setup)  # its held-out window is the dev window; test is never read
    windows = [dev, prepare_validation(dev)]
    windows.append(prepare_validation(windows[-1]))
    logs, extra = [], []
    for world in windows:
        log = log_candidates(world, world.base_config.with_overrides({"exploration": {"policy": "greedy"}}),
                             user_vector="factors")
        logs.append(log)
        extra.append(_extra_features(world, log))
        print(f"logged {log.y.size} candidates of {log.users.size} users ({int(log.y.sum())} liked)", flush=True)
    n_relevant = np.diff(_relevant_sets(dev, dev.eval_users).indptr)
    world = _World.of(dev)
    ease_rec = _baseline_lists(world, 10, 100.0, ("ease",))["ease"]
    ease_ndcg = float(np.nanmean(world.metrics(ease_rec, 10)[2]))
    print(f"EASE (lambda 100) on the dev window: NDCG@10 {ease_ndcg:.4f}")
    shipped = logs[0].X.shape[1]

    def score(columns: list[int], params: dict | None = None, rounds: int = 60) -> float:
        train = logs[1:]
        X = np.concatenate([np.hstack([lg.X, ex])[:, columns] for lg, ex in zip(train, extra[1:])])
        y = np.concatenate([lg.y for lg in train])
        sizes = np.concatenate([np.diff(np.r_[_runs(lg.user)[0], lg.user.size]) for lg in train])
        Xdev = np.hstack([logs[0].X, extra[0]])[:, columns]
        values = []
        for seed in (0, 1):
            cfg = {**GBDT_PARAMS, **(params or {}), "verbose": -1, "seed": seed, "num_threads": 1,
                   "deterministic": True, "force_row_wise": True}
            booster = lgb.train(cfg, lgb.Dataset(X, y, group=sizes), num_boost_round=rounds)
            values.append(ndcg_at_10(booster.predict(Xdev), logs[0], n_relevant))
        return float(np.mean(values))

    base = list(range(shipped))
    variants = [
        ("shipped features, 60 trees", base, None, 60),
        ("150 trees", base, None, 150),
        ("300 trees", base, None, 300),
        ("31 leaves, depth 6, 100 trees", base, {"num_leaves": 31, "max_depth": 6}, 100),
        ("binary objective, 100 trees", base, {"objective": "binary"}, 100),
        ("+ full-history item-item cosine", base + [shipped], None, 60),
        ("+ EASE's own score", base + [shipped + 1], None, 60),
        ("+ genre-profile cosine", base + [shipped + 2], None, 60),
        ("+ all three", base + [shipped, shipped + 1, shipped + 2], None, 60),
        ("+ popularity at the clock, 90 d", base + [shipped + 3], None, 60),
        ("+ popularity at the clock, 365 d", base + [shipped + 4], None, 60),
        ("+ both half-lives", base + [shipped + 3, shipped + 4], None, 60),
    ]
    for label, columns, params, rounds in variants:
        value = score(columns, params, rounds)
        print(f"{label:<34} NDCG@10 {value:.4f}  ({value / ease_ndcg:.3f}x EASE)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
