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
