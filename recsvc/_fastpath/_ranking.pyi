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
    by_candidate: bool,
    X: _F32,
) -> None:
    """Fill X (n, 5 + 2S + Fc): similarity, log_popularity, freshness,
    category_affinity, bandit_mean, S source scores, S presence flags (from
    ``source_mask`` bits, or score != 0 when ``source_mask`` is empty), then
    ``context`` copied to every row. ``by_candidate``: ``log_popularity``,
    ``bandit_alpha`` and ``bandit_beta`` hold the candidates' values (n,) in
    candidate order rather than the catalog's (N,)."""

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

def gather_extended_features(
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
    by_candidate: bool,
    item_rows: _I32,
    item_counts: _F32,
    nb_rows: _I32,
    nb_counts: _F32,
    nb_owner: _I32,
    recent_weights: _F32,
    recent_counts: _F32,
    recent_emb: _F32,
    profile: _F32,
    user_interactions: float,
    keys: npt.NDArray[np.uint64],
    slots: _I32,
    X: _F32,
) -> None:
    """Fill X (n, 5 + 2S + Fc + 14 + S): the columns of ``gather_features``, then
    item_norm, cosine, six co-occurrence columns (neighbour ``m`` of recent item
    ``nb_owner[m]`` adds to the candidate whose ``item_rows`` is ``nb_rows[m]``,
    found in a hash table over ``slots``), the max and mean cosine to
    ``recent_emb``, user_activity, log_item_count, the cosine to ``profile``,
    S per-source ranks and log_age_days. ``keys`` is scratch."""

def forest_score(
    X: _F32,
    feature: _I32,
    threshold: _F32,
    leaf: _F32,
    depth: int,
    bias: float,
    out: _F32,
) -> None:
    """out = sigmoid(bias + sum over trees of the leaf each row reaches).

    Trees are complete, of one ``depth``: inner node k tests ``X[:, feature[k]] >
    threshold[k]`` and goes to 2k+2 if so, else 2k+1; tree t's nodes are at
    ``t * (2^depth - 1)``, its leaves at ``t * 2^depth``. Leaves are added in tree
    order in float32. A column outside X or a depth outside 0..12 raises ValueError."""
