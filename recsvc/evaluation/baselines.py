"""Single-model baselines for ``recsvc evaluate``: most popular, EASE and implicit ALS.

Each scores every catalog item for every evaluation user from the same train positives the pipelines
learn from, drops every item the user rated in train (the pipelines' exclusion), and keeps the top k,
so its row in the report is computed with the same split, users and metric code as the pipelines'.

- **EASE** (Steck 2019): ``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1`` over the binarised
  train matrix ``X``; a user's scores are ``x_u B``.
- **ALS**: the dot products of the user and item factors of :func:`recsvc.evaluation.replay.implicit_als`
  (the catalog's own embedding model).
- **Popularity**: train positives per item.

Hyperparameters are chosen on the validation window (see :func:`choose_ease_lambda`), never on test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ease_item_weights", "choose_ease_lambda", "top_k_excluding", "train_matrix", "seen_rows"]


def train_matrix(user_index: np.ndarray, item_index: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    """float32[U, I]: 1 where the user has a train positive on the item."""
    X = np.zeros((n_users, n_items), np.float32)
    X[user_index, item_index] = 1.0
    return X


def ease_item_weights(X: np.ndarray, lam: float) -> np.ndarray:
    """float32[I, I]: EASE's item-item weights for the binary matrix X (zero diagonal)."""
    if lam <= 0:
        raise ValueError(f"EASE lambda must be positive, got {lam}")
    G = X.T.astype(np.float64) @ X
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    B[np.diag_indices_from(B)] = 0.0
    return B.astype(np.float32)


def top_k_excluding(scores: np.ndarray, seen: Sequence[np.ndarray], k: int) -> np.ndarray:
    """int64[U, k]: each row's k best columns, best first, leaving out ``seen[u]`` (-1 pads short rows)."""
    s = np.array(scores, np.float64, copy=True)
    for u, cols in enumerate(seen):
        if len(cols):
            s[u, cols] = -np.inf
    k_eff = min(k, s.shape[1])
    out = np.full((s.shape[0], k), -1, np.int64)
    if k_eff == 0:
        return out
    part = np.argpartition(-s, k_eff - 1, axis=1)[:, :k_eff]
    vals = np.take_along_axis(s, part, 1)
    order = np.lexsort((part, -vals), axis=1)  # best first; ties: lowest column
    best = np.take_along_axis(part, order, 1)
    ok = np.isfinite(np.take_along_axis(vals, order, 1))
    out[:, :k_eff] = np.where(ok, best, -1)
    return out


def seen_rows(train: Any, users: np.ndarray, row_of: dict[str, int]) -> list[np.ndarray]:
    """Each user's train items (any rating) as catalog rows (the pipelines' exclusion list)."""
    order = np.argsort(train.user_id, kind="stable")
    tu, ti = train.user_id[order], train.item_id[order]
    lo, hi = np.searchsorted(tu, users), np.searchsorted(tu, users, side="right")
    out = []
    for a, b in zip(lo.tolist(), hi.tolist()):
        rows = [row_of.get(str(int(i))) for i in ti[a:b]]
        out.append(np.asarray([r for r in rows if r is not None], np.int64))
    return out


def choose_ease_lambda(X: np.ndarray, users: np.ndarray, seen: Sequence[np.ndarray], score: Any,
                       grid: Sequence[float], k: int) -> tuple[float, dict[float, float]]:
    """The lambda of ``grid`` whose top-k lists score best by ``score(rec) -> float`` (on validation)."""
    results = {}
    for lam in grid:
        B = ease_item_weights(X, lam)
        results[float(lam)] = float(score(top_k_excluding(X[users] @ B, seen, k)))
    best = max(results, key=lambda v: (results[v], -v))
    return best, results
