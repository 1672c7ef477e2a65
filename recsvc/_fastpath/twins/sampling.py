"""Plain-numpy twins of ``recsvc._fastpath._sampling``.

Same signatures and the same use of the generator's stream, so a seeded
Generator gives identical results: ``Generator.beta`` on arrays draws element by
element in row-major order with numpy's ``random_beta``, and the kernels draw
the same numbers in the same order (they redo numpy's Marsaglia-Tsang gamma
with its per-item constants hoisted, bit for bit; see ``_sampling.pyx``).
One difference: ``thompson_topk_propensities`` here breaks exact ties at the
k-th place arbitrarily (``argpartition``), the kernel to the lower index.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_F64 = npt.NDArray[np.float64]


def _check_parameters(alpha: _F64, beta: _F64) -> None:
    # Mirrors the kernels' status check (numpy's own check would raise a
    # different message and accepts inf).
    bad = ~((alpha > 0) & (beta > 0) & np.isfinite(alpha) & np.isfinite(beta))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            "Beta parameters must be positive and finite; "
            f"got alpha[{i}]={float(alpha[i])!r}, beta[{i}]={float(beta[i])!r}"
        )


def sample_beta_batch(gen: np.random.Generator, alpha: _F64, beta: _F64, out: _F64) -> None:
    _check_parameters(alpha, beta)
    out[:] = gen.beta(alpha, beta)


def thompson_scores(
    gen: np.random.Generator, alpha: _F64, beta: _F64, base_scores: _F64 | None, out: _F64
) -> None:
    _check_parameters(alpha, beta)
    theta = gen.beta(alpha, beta)
    out[:] = theta if base_scores is None else theta * base_scores


def thompson_topk_propensities(
    gen: np.random.Generator,
    alpha: _F64,
    beta: _F64,
    base_scores: _F64 | None,
    k: int,
    n_draws: int,
    out: _F64,
) -> None:
    m = alpha.shape[0]
    if n_draws <= 0:
        raise ValueError(f"n_draws must be positive, got {n_draws}")
    _check_parameters(alpha, beta)
    if k <= 0 or k >= m:
        out[:] = 0.0 if k <= 0 else 1.0
        return
    theta = gen.beta(alpha, beta, size=(n_draws, m))  # same order as the kernel
    if base_scores is not None:
        theta *= base_scores
    top = np.argpartition(-theta, k - 1, axis=1)[:, :k]
    out[:] = np.bincount(top.ravel(), minlength=m) / n_draws


def thompson_explore(
    gen: np.random.Generator,
    scores: npt.NDArray[np.float32],
    succ: _F64,
    fail: _F64,
    kappa: float,
    alpha: _F64,
    beta: _F64,
    pulls: _F64,
    top: npt.NDArray[np.intp],
    theta: _F64,
    adjusted: npt.NDArray[np.float32],
    base: _F64,
    order: npt.NDArray[np.intp],
    rest_order: npt.NDArray[np.intp],
) -> None:
    """The numpy steps the kernel fuses: the request path's Beta prior, then ``ThompsonPolicy``'s top M,
    served round and explored scores (``_rank_top_m``), ``draw_scores``' base for the rest, the request's
    ordering of the explored scores and ``slate_inclusion_counts``' order of the rest."""
    from recsvc.exploration import top_k_indices

    n, m = scores.shape[0], top.shape[0]
    if not (succ.shape[0] == fail.shape[0] == alpha.shape[0] == beta.shape[0] == pulls.shape[0]
            == adjusted.shape[0] == base.shape[0] == order.shape[0] == n) or theta.shape[0] != m \
            or rest_order.shape[0] != n - m or not 1 <= m <= n:
        raise ValueError("thompson_explore: the arrays disagree in shape (or the top m is not 1..n)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (the ranker returned NaN or an infinite score)")
    p = np.clip(scores.astype(np.float64), 1e-4, 1.0 - 1e-4)
    alpha[:] = kappa * p + succ
    beta[:] = kappa * (1.0 - p) + fail
    pulls[:] = succ + fail
    _check_parameters(alpha, beta)
    top[:] = np.sort(top_k_indices(scores, m))
    theta[:] = gen.beta(alpha[top], beta[top])
    out = np.empty(n, np.float64)
    out[top] = theta
    base[:] = 0.0
    if m < n:
        rest = np.ones(n, dtype=bool)
        rest[top] = False
        s_rest = scores[rest].astype(np.float64)
        out[rest] = s_rest - s_rest.max() + (theta.min() - 1.0)
        base[rest] = s_rest - s_rest.max() - 1.0
    adjusted[:] = out.astype(np.float32)
    order[:] = np.argsort(-adjusted, kind="stable")
    if m < n:
        rest_idx = np.flatnonzero(rest)
        rest_order[:] = rest_idx[np.argsort(-base[rest_idx], kind="stable")]
