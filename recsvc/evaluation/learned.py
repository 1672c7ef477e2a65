"""The learned ranker of ``recsvc evaluate``, trained the way production would train it.

1. **Log.** In the validation world (:func:`recsvc.evaluation.replay.prepare_validation`: catalog, index
   and online state from each user's train events minus the last ``validation_fraction`` of them), every
   user with a positive in that held-out window asks for a slate at its own clock; the request path's
   own candidates and extended features (:func:`recsvc.ranking.gather_features`, the compiled gather the
   server runs) are logged for every candidate: :func:`log_candidates`. Like a production job that
   trains on several days of logs, earlier windows can be logged too (each carved from the end of
   what the later one left): more requests to learn from.
2. **Label** each logged candidate 1 when the user liked it in the validation window, else 0.
3. **Fit** LambdaRank trees (:func:`recsvc.training.train_gbdt`, one group per request) and export them
   for the compiled scorer: :func:`fit_ranker`.
4. **Serve** the test period with the fitted weights file (``ranking.model_path``).

Validation numbers of a learned pipeline come from cross-fitting: the validation users are split in
``folds`` groups, and each group is served by a ranker fitted on the others (:func:`cross_fit`), so no
user is scored by a model that saw their labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CandidateLog", "cross_fit", "fit_ranker", "log_candidates"]


@dataclass(frozen=True)
class CandidateLog:
    """Logged candidates of one replay: X float32[m, len(ALL_FEATURES)], y float64[m] (liked in the held-out
    window), user int64[m] (index into ``users``; rows of a user are contiguous), rows int32[m] (catalog
    rows), users int64[U] (data set ids)."""

    X: np.ndarray
    y: np.ndarray
    user: np.ndarray
    rows: np.ndarray
    users: np.ndarray

    def take_users(self, keep: np.ndarray) -> "CandidateLog":
        """Only the rows of the users whose index is in ``keep``."""
        m = np.isin(self.user, keep)
        return CandidateLog(self.X[m], self.y[m], self.user[m], self.rows[m], self.users)

    @staticmethod
    def concat(logs: "list[CandidateLog]") -> "CandidateLog":
        """One log of several (e.g. windows): each log's users become their own groups."""
        offsets = np.cumsum([0] + [lg.users.size for lg in logs])
        return CandidateLog(np.concatenate([lg.X for lg in logs]), np.concatenate([lg.y for lg in logs]),
                            np.concatenate([lg.user + off for lg, off in zip(logs, offsets)]),
                            np.concatenate([lg.rows for lg in logs]), np.concatenate([lg.users for lg in logs]))


def log_candidates(setup: Any, cfg: Any, *, user_vector: str = "history",
                   progress: Callable[[int], None] | None = None) -> CandidateLog:
    """Replay the setup's train positives into an engine with ``cfg``, then log every evaluation user's
    candidates with their extended features at the user's request clock."""
    from recsvc.engine import RecommendQuery
    from recsvc.evaluation.replay import _engine, _relevant_sets, replay_train, request_clocks
    from recsvc.ranking import gather_features

    engine, clock = _engine(setup, cfg)
    try:
        replay_train(engine, clock, setup.train_positive)
        users = setup.eval_users
        sets = _relevant_sets(setup, users)
        row_of = setup.catalog.row_of
        order = np.argsort(setup.train.user_id, kind="stable")
        tu, ti = setup.train.user_id[order], setup.train.item_id[order]
        lo, hi = np.searchsorted(tu, users), np.searchsorted(tu, users, side="right")
        clocks = request_clocks(setup, users)
        rp = engine.requests
        parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for n in np.argsort(clocks, kind="stable").tolist():
            u, now = int(users[n]), int(clocks[n])
            clock.now_ms = now
            seen = [s for s in (str(int(i)) for i in ti[lo[n]:hi[n]]) if s in row_of]
            emb = None
            if user_vector == "factors":
                f = setup.user_factors.get(u)
                emb = f.tolist() if f is not None and np.any(f) else None
            q = RecommendQuery(user_id=str(u), n=10, exclude_item_ids=seen, user_embedding=emb)
            cands, _, user_vec = rp.candidates(q, cfg, now)
            history = engine.state.history(str(u))
            inputs = rp.feature_inputs(user_vec, cands, history, {}, now, cfg, extended=True)
            X = gather_features(inputs, cfg.ranking.freshness_half_life_days)
            liked = sets.indices[sets.indptr[n]:sets.indptr[n + 1]]
            parts[n] = (X, np.isin(cands.rows, liked).astype(np.float64), cands.rows.astype(np.int32))
            if progress:
                progress(1)
    finally:
        engine.close(snapshot=False)
    idx = sorted(parts)
    return CandidateLog(
        np.concatenate([parts[i][0] for i in idx]) if idx else np.empty((0, 0), np.float32),
        np.concatenate([parts[i][1] for i in idx]) if idx else np.empty(0),
        np.concatenate([np.full(parts[i][0].shape[0], i, np.int64) for i in idx]) if idx else np.empty(0, np.int64),
        np.concatenate([parts[i][2] for i in idx]) if idx else np.empty(0, np.int32),
        users,
    )


def fit_ranker(log: CandidateLog, path: Path, *, seed: int = 0, rounds: int | None = None,
               params: dict[str, Any] | None = None, description: str = "") -> tuple[Any, dict[str, Any]]:
    """LambdaRank trees over the logged candidates (one group per user), written to ``path``."""
    from recsvc.ranking import ALL_FEATURES
    from recsvc.training import GBDT_ROUNDS, train_gbdt

    t0 = time.perf_counter()
    ranker, metrics = train_gbdt(log.X, log.y, log.user, feature_names=ALL_FEATURES, params=params,
                                 rounds=GBDT_ROUNDS if rounds is None else rounds, seed=seed,
                                 description=description)
    ranker.save(path)
    metrics = dict(metrics, seconds=round(time.perf_counter() - t0, 2), users=int(np.unique(log.user).size),
                   positives_logged=int(log.y.sum()))
    return ranker, metrics


def cross_fit(log: CandidateLog, directory: Path, folds: int = 2, seed: int = 0,
              earlier: list[CandidateLog] | None = None) -> list[tuple[np.ndarray, Path]]:
    """``folds`` rankers, each fitted on the other folds' users of ``log`` (and every user of the
    ``earlier`` windows, whose labels precede ``log``'s window): [(user indices it serves, weights file)]."""
    n_users = log.users.size
    perm = np.random.default_rng(seed).permutation(n_users)
    out = []
    for f in range(folds):
        serve = np.sort(perm[f::folds])
        path = directory / f"ranker-fold{f}.json"
        fit_ranker(CandidateLog.concat([log.take_users(np.setdiff1d(np.arange(n_users), serve)),
                                        *(earlier or [])]), path, seed=seed)
        out.append((serve, path))
    return out
