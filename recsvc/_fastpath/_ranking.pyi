"""Type stubs for the compiled ranking kernels (``_ranking.pyx``).

Call them through ``recsvc.ranking``: the kernels do not coerce dtypes or check
contiguity. Arrays are C-contiguous; outputs are caller-allocated. A shape
mismatch raises ValueError, a candidate row outside the catalog IndexError.
"""

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]
_I32 = npt.NDArray[np.int32]
_I64 = npt.NDArray[np.int64]
_U8 = npt.NDArray[np.uint8]

def gather_features(
    user_vec: _F32,
    embeddings: _F32,
    rows: _I32,
    log_popularity: _F32,
    created_at_ms: _I64,
    now_ms: int,
    half_life_days: float,
    categories: _I32,
    category_affinity: _F32,
    bandit_alpha: _F64,
    bandit_beta: _F64,
    source_scores: _F32,
    source_mask: _U8,
    context: _F32,
    X: _F32,
) -> None:
    """Fill X (n, 5 + 2S + Fc): similarity, log_popularity, freshness,
    category_affinity, bandit_mean, S source scores, S presence flags (from
    ``source_mask`` bits, or score != 0 when ``source_mask`` is empty), then
    ``context`` copied to every row."""

def logistic_score(X: _F32, w: _F32, bias: float, out: _F32) -> None:
    """out = sigmoid(X @ w + bias)."""

def mlp_score(
    X: _F32,
    W1: _F32,
    b1: _F32,
    W2: _F32,
    b2: _F32,
    w_out: _F32,
    b_out: float,
    h1: _F32,
    h2: _F32,
    out: _F32,
) -> None:
    """out = sigmoid(relu(relu(X @ W1 + b1) @ W2 + b2) @ w_out + b_out).

    W* are (inputs, outputs) row-major; h1 (H1,) and h2 (H2,) are scratch.
    Pass W2 of shape (0, 0) with empty b2 and h2 for one hidden layer."""
