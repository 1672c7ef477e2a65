"""Plain-numpy twins of ``recsvc._fastpath._ranking``: same arguments, same outputs.

Used by the parity tests and as the numpy baseline of the benchmarks. Like the
kernels they expect prepared (validated, contiguous, correctly typed) arrays and
write into caller-allocated outputs.
"""

from __future__ import annotations

import math

import numpy as np

N_BASE = 5
_MS_PER_DAY = 86_400_000.0


def gather_features(
    user_vec: np.ndarray,
    embeddings: np.ndarray,
    rows: np.ndarray,
    log_popularity: np.ndarray,
    created_at_ms: np.ndarray,
    now_ms: int,
    half_life_days: float,
    categories: np.ndarray,
    category_affinity: np.ndarray,
    bandit_alpha: np.ndarray,
    bandit_beta: np.ndarray,
    source_scores: np.ndarray,
    source_mask: np.ndarray,
    context: np.ndarray,
    by_candidate: bool,
    X: np.ndarray,
) -> None:
    n, d = rows.shape[0], embeddings.shape[1]
    N, S, Fc = embeddings.shape[0], source_scores.shape[1], context.shape[0]
    E = n if by_candidate else N  # entries of log_popularity and the bandit evidence
    if (
        X.shape != (n, N_BASE + 2 * S + Fc)
        or user_vec.shape[0] != d
        or source_scores.shape[0] != n
        or (source_mask.shape[0] not in (0, n))
        or any(a.shape[0] != N for a in (created_at_ms, categories))
        or any(a.shape[0] != E for a in (log_popularity, bandit_alpha, bandit_beta))
    ):
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    if n and (rows.min() < 0 or rows.max() >= N):
        raise IndexError("ranking kernel: a candidate row is outside the catalog")
    X[:, 0] = embeddings[rows] @ user_vec
    at = slice(None) if by_candidate else rows  # where the per-candidate reads are
    X[:, 1] = log_popularity[at]
    age_ms = np.maximum(now_ms - created_at_ms[rows], 0).astype(np.float64)
    X[:, 2] = np.exp(age_ms * (-math.log(2.0) / (half_life_days * _MS_PER_DAY)))
    cat = categories[rows]
    ok = (cat >= 0) & (cat < category_affinity.shape[0])
    X[:, 3] = np.where(ok, category_affinity[np.where(ok, cat, 0)] if category_affinity.size else 0.0, 0.0)
    a, b = bandit_alpha[at], bandit_beta[at]
    total = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        X[:, 4] = np.where(total > 0, a / np.where(total > 0, total, 1.0), 0.0)
    X[:, N_BASE : N_BASE + S] = source_scores
    if source_mask.shape[0]:
        bits = (source_mask[:, None] >> np.arange(S, dtype=np.uint8)[None, :]) & 1
        X[:, N_BASE + S : N_BASE + 2 * S] = bits
    else:
        X[:, N_BASE + S : N_BASE + 2 * S] = source_scores != 0
    X[:, N_BASE + 2 * S :] = context[None, :]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Same two-branch form as the kernel: never exp of a large positive number.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def logistic_score(X: np.ndarray, w: np.ndarray, bias: float, out: np.ndarray) -> None:
    if w.shape[0] != X.shape[1] or out.shape[0] != X.shape[0]:
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    out[:] = _sigmoid(X @ w + np.float32(bias))


def mlp_score(
    X: np.ndarray,
    W1: np.ndarray,
    b1: np.ndarray,
    W2: np.ndarray,
    b2: np.ndarray,
    w_out: np.ndarray,
    b_out: float,
    h1: np.ndarray,
    h2: np.ndarray,
    out: np.ndarray,
) -> None:
    two = W2.shape[0] != 0
    H = W2.shape[1] if two else W1.shape[1]
    if (
        W1.shape[0] != X.shape[1]
        or b1.shape[0] != W1.shape[1]
        or out.shape[0] != X.shape[0]
        or w_out.shape[0] != H
        or (two and (W2.shape[0] != W1.shape[1] or b2.shape[0] != H))
    ):
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    h = np.maximum(X @ W1 + b1, 0)
    if two:
        h = np.maximum(h @ W2 + b2, 0)
    out[:] = _sigmoid(h @ w_out + np.float32(b_out))


N_EXT_FIXED = 13


def _float_keys(v: np.ndarray) -> np.ndarray:
    """uint32 keys that sort like the float32 values (the kernel's ``recsvc_float_key``)."""
    u = np.ascontiguousarray(v, np.float32).view(np.uint32)
    return np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)


def gather_extended_features(
    user_vec: np.ndarray,
    embeddings: np.ndarray,
    rows: np.ndarray,
    log_popularity: np.ndarray,
    created_at_ms: np.ndarray,
    now_ms: int,
    half_life_days: float,
    categories: np.ndarray,
    category_affinity: np.ndarray,
    bandit_alpha: np.ndarray,
    bandit_beta: np.ndarray,
    source_scores: np.ndarray,
    source_mask: np.ndarray,
    context: np.ndarray,
    by_candidate: bool,
    item_rows: np.ndarray,
    item_counts: np.ndarray,
    nb_rows: np.ndarray,
    nb_counts: np.ndarray,
    nb_owner: np.ndarray,
    recent_weights: np.ndarray,
    recent_counts: np.ndarray,
    recent_emb: np.ndarray,
    profile: np.ndarray,
    user_interactions: float,
    keys: np.ndarray,
    slots: np.ndarray,
    X: np.ndarray,
) -> None:
    n, d, S = rows.shape[0], embeddings.shape[1], source_scores.shape[1]
    B = N_BASE + 2 * S + context.shape[0]
    W, R, M = recent_weights.shape[0], recent_emb.shape[0], nb_rows.shape[0]
    if (
        X.shape != (n, B + N_EXT_FIXED + S + 1)
        or any(a.shape[0] != n for a in (item_rows, item_counts, keys))
        or slots.shape[0] < 4 * n
        or nb_counts.shape[0] != M or nb_owner.shape[0] != M or recent_counts.shape[0] != W
        or (R > 0 and recent_emb.shape[1] != d)
        or profile.shape[0] != d
        or (M and (nb_owner.min() < 0 or nb_owner.max() >= W))
    ):
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    by_item_row = np.argsort(item_rows, kind="stable")
    if n > 1 and (np.diff(item_rows[by_item_row]) == 0).any():
        raise ValueError("ranking kernel: extended.item_rows must be distinct (one entry per candidate)")
    gather_features(user_vec, embeddings, rows, log_popularity, created_at_ms, now_ms, half_life_days, categories,
                    category_affinity, bandit_alpha, bandit_beta, source_scores, source_mask, context, by_candidate,
                    X[:, :B])
    E = X[:, B:]
    emb = embeddings[rows].astype(np.float64)
    norm = np.sqrt((emb * emb).sum(axis=1))
    user_norm = float(np.sqrt(np.dot(user_vec.astype(np.float64), user_vec)))
    E[:, 0] = norm
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (norm > 0) & (user_norm > 0)
        E[:, 1] = np.where(ok, X[:, 0].astype(np.float64) / np.where(ok, user_norm * norm, 1.0), 0.0)
        if R:
            sims = (emb @ recent_emb.T.astype(np.float64)) / np.where(norm > 0, norm, 1.0)[:, None]
            E[:, 8] = np.where(norm > 0, sims.max(axis=1), 0.0)
            E[:, 9] = np.where(norm > 0, sims.sum(axis=1) / R, 0.0)
        else:
            E[:, 8:10] = 0.0
    E[:, 2:8] = 0.0
    E[:, 10] = math.log1p(max(user_interactions, 0.0))
    E[:, 11] = np.log1p(np.maximum(item_counts.astype(np.float64), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        E[:, 12] = np.where(norm > 0, (emb @ profile.astype(np.float64)) / np.where(norm > 0, norm, 1.0), 0.0)
    age = (np.int64(now_ms) - created_at_ms[rows]).astype(np.float64) / _MS_PER_DAY
    E[:, N_EXT_FIXED + S] = np.sign(age) * np.log1p(np.abs(age))
    # co-occurrence: one neighbour entry at a time, in order (as the kernel adds them)
    sorted_rows = item_rows[by_item_row]
    pos = np.searchsorted(sorted_rows, nb_rows)
    found = (pos < n) & (sorted_rows[np.minimum(pos, max(n - 1, 0))] == nb_rows) if n else np.zeros(M, bool)
    found &= nb_counts > 0
    k = by_item_row[pos[found]] if n else np.empty(0, np.int64)
    owner = nb_owner[found]
    c = nb_counts[found].astype(np.float64)
    n_i = np.maximum(recent_counts[owner].astype(np.float64), 1.0)
    n_j = np.maximum(item_counts[k].astype(np.float64), 1.0)
    cos = c / np.sqrt(n_i * n_j)
    w = recent_weights[owner].astype(np.float64)
    cols = np.arange(B + 2, B + 6)
    for col, val in zip(cols, (w * cos, w * c / n_i, w * c / n_j, w * c)):
        np.add.at(X[:, col], k, val.astype(np.float32))
    np.maximum.at(X[:, B + 6], k, cos.astype(np.float32))
    np.add.at(X[:, B + 7], k, np.float32(1.0))
    X[:, B + 5] = np.log1p(np.maximum(X[:, B + 5].astype(np.float64), 0.0))
    # ranks within each source: descending score, ties by candidate index
    for s in range(S):
        proposed = ((source_mask >> s) & 1).astype(bool) if source_mask.shape[0] else source_scores[:, s] != 0
        idx = np.flatnonzero(proposed)
        ordered = idx[np.lexsort((idx, ~_float_keys(source_scores[idx, s])))]
        col = np.full(n, float(n), np.float32)
        col[ordered] = np.arange(ordered.size, dtype=np.float32)
        X[:, B + N_EXT_FIXED + s] = col


def forest_score(
    X: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    leaf: np.ndarray,
    depth: int,
    bias: float,
    out: np.ndarray,
) -> None:
    n, F = X.shape
    if not 0 <= depth <= 12:
        raise ValueError("ranking kernel: a tree tests a column outside X or its depth is out of range")
    inner = (1 << depth) - 1
    T = leaf.shape[0] >> depth
    if out.shape[0] != n or feature.shape[0] != T * inner or threshold.shape[0] != T * inner \
            or leaf.shape[0] != T * (inner + 1):
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    if feature.size and (feature.min() < 0 or feature.max() >= F):
        raise ValueError("ranking kernel: a tree tests a column outside X or its depth is out of range")
    f = feature.reshape(T, inner)
    h = threshold.reshape(T, inner)
    node = np.zeros((n, T), np.intp)
    trees = np.arange(T)[None, :]
    rows = np.arange(n)[:, None]
    for _ in range(depth):  # every row walks every tree one level at a time
        node = 2 * node + 1 + (X[rows, f[trees, node]] > h[trees, node])
    values = leaf.reshape(T, inner + 1)[trees, node - inner]
    acc = np.full(n, bias, np.float32)
    for t in range(T):  # in tree order, in float32: the kernel's sum
        acc += values[:, t]
    out[:] = _sigmoid(acc)
