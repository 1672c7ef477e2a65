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
    X: np.ndarray,
) -> None:
    n, d = rows.shape[0], embeddings.shape[1]
    N, S, Fc = embeddings.shape[0], source_scores.shape[1], context.shape[0]
    if (
        X.shape != (n, N_BASE + 2 * S + Fc)
        or user_vec.shape[0] != d
        or source_scores.shape[0] != n
        or (source_mask.shape[0] not in (0, n))
        or any(a.shape[0] != N for a in (log_popularity, created_at_ms, categories, bandit_alpha, bandit_beta))
    ):
        raise ValueError("ranking kernel: array shapes disagree (call it through recsvc.ranking)")
    if n and (rows.min() < 0 or rows.max() >= N):
        raise IndexError("ranking kernel: a candidate row is outside the catalog")
    X[:, 0] = embeddings[rows] @ user_vec
    X[:, 1] = log_popularity[rows]
    age_ms = np.maximum(now_ms - created_at_ms[rows], 0).astype(np.float64)
    X[:, 2] = np.exp(age_ms * (-math.log(2.0) / (half_life_days * _MS_PER_DAY)))
    cat = categories[rows]
    ok = (cat >= 0) & (cat < category_affinity.shape[0])
    X[:, 3] = np.where(ok, category_affinity[np.where(ok, cat, 0)] if category_affinity.size else 0.0, 0.0)
    a, b = bandit_alpha[rows], bandit_beta[rows]
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
