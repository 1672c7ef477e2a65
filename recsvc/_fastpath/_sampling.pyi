"""Type stubs for the compiled Beta / Thompson-sampling kernels (``_sampling.pyx``).

Kernels do not check shapes or dtypes; call them through ``recsvc.exploration``.
All arrays are 1-D, C-contiguous float64; outputs are caller-allocated.
Every kernel draws exactly what ``gen.beta(alpha, beta)`` would draw, in the
same order, and leaves ``gen`` where that call would.
"""

import numpy as np
import numpy.typing as npt

_F64 = npt.NDArray[np.float64]

def sample_beta_batch(
    gen: np.random.Generator,
    alpha: _F64,
    beta: _F64,
    out: _F64,
) -> None:
    """out[i] ~ Beta(alpha[i], beta[i]); same stream as ``gen.beta(alpha, beta)``.

    Raises ValueError if some alpha/beta is <= 0 or not finite."""

def thompson_scores(
    gen: np.random.Generator,
    alpha: _F64,
    beta: _F64,
    base_scores: _F64 | None,
    out: _F64,
) -> None:
    """out[i] = base_scores[i] * theta_i (theta_i if base_scores is None),
    theta_i ~ Beta(alpha[i], beta[i])."""

def thompson_topk_propensities(
    gen: np.random.Generator,
    alpha: _F64,
    beta: _F64,
    base_scores: _F64 | None,
    k: int,
    n_draws: int,
    out: _F64,
) -> None:
    """out[i] = fraction of ``n_draws`` Thompson rounds in which candidate i is in
    the top k of ``base_scores * theta`` (ties: lower index first)."""

def thompson_score_draws(
    gen: np.random.Generator,
    alpha: _F64,
    beta: _F64,
    base_scores: _F64 | None,
    out: npt.NDArray[np.float32],
    row_min: _F64,
) -> None:
    """out[d, i] = float32(base_scores[i] * theta_di), row_min[d] = the round's lowest (float64); the
    draws are ``gen.beta(np.tile(alpha, D), np.tile(beta, D))``'s, bit for bit."""
