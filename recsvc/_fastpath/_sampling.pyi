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
    """One request's Thompson round (unweighted) with its Beta prior: alpha = kappa * clip(s, 1e-4, 1 - 1e-4)
    + succ, beta = kappa * (1 - clip(s)) + fail, pulls = succ + fail; ``top`` the m best scores (ties: lower
    index) in index order; theta their draws (``gen.beta(alpha[top], beta[top])``'s, bit for bit);
    ``adjusted`` the explored scores (float32(theta) on the top, the rest in the ranker's order ending 1
    below min(theta)); ``base`` 0 on the top and s - max(rest) - 1 elsewhere; ``order`` =
    ``np.argsort(-adjusted, kind="stable")``; ``rest_order`` the n - m others by ``base`` descending, ties to
    the lower index (an LSD radix sort, stable). Raises ValueError (drawing
    nothing) for a non-finite score or an invalid Beta parameter."""
