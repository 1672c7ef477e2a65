"""Type stubs for the compiled re-ranking kernels (``_reranking.pyx``).

Call them through ``recsvc.reranking``. Candidates are indices 0..m-1; a
negative category is never limited; ``max_per_category <= 0`` disables the
quota; ``counts`` (C,) holds items per category already in the slate and is
updated in place. Both return the number of indices written to ``out``.
"""

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_I32 = npt.NDArray[np.int32]
_U8 = npt.NDArray[np.uint8]

def select_with_quotas(
    order: _I32,
    categories: _I32,
    max_per_category: int,
    k: int,
    counts: _I32,
    out: _I32,
) -> int:
    """Walk ``order`` (best first), keeping candidates whose category is under quota, until k."""

def mmr_select(
    scores: _F32,
    emb: _F32,
    emb_rows: _I32,
    lam: float,
    k: int,
    categories: _I32,
    max_per_category: int,
    counts: _I32,
    max_sim: _F32,
    emb_t: _F32,
    vec: _F32,
    taken: _U8,
    out: _I32,
) -> int:
    """Greedy MMR under quotas: argmax (1 - lam) * scores[i] - lam * max_sim[i], ties to the
    lowest index. Candidate i's embedding is ``emb[emb_rows[i]]``, normalised inside.
    ``max_sim`` (m,) is the cosine similarity to the slate so far (-inf: nothing yet),
    updated in place; emb_t (d, m), vec (d,), taken (m,) are scratch."""

def slate_inclusion_counts(
    top_scores: _F32,
    top_pool: _I32,
    top_col: _I32,
    base: npt.NDArray[np.float64],
    shift: npt.NDArray[np.float64],
    fixed_order: _I32,
    boost: _F32,
    categories: _I32,
    max_per_category: int,
    need: int,
    lam: float,
    sim: _F32,
    max_sim0: _F32,
    counts0: _I32,
    adj: _F32,
    expl: _F32,
    heap: _I32,
    skipped: _I32,
    picked: _I32,
    taken: _U8,
    max_sim: _F32,
    counts: _I32,
    walk: _I32,
    kept: _I32,
    qbuf: _I32,
    qlen: _I32,
    hits: npt.NDArray[np.float64],
) -> int:
    """Re-run rerank's selection (boosts, quotas or MMR, the quota-ignoring fill) on each of D draws
    and add 1 to ``hits[i]`` per draw whose slate holds pool item i. Draw d's explored scores:
    ``top_scores[d, top_col[j]]`` for pool item ``top_pool[j]``, ``(float32)(base[i] + shift[d])`` for
    the others, which ``fixed_order`` lists best first. ``sim`` (p, p) is read only when lam > 0."""
