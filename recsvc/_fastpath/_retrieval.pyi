"""Type stubs for the compiled candidate-generation kernels (``_retrieval.pyx``).

Call them through ``recsvc.retrieval.kernels``, which takes the same arguments,
coerces dtypes and contiguity and names what is wrong: these wrappers take
C-contiguous arrays of exactly the listed dtypes, and outputs the caller
allocated. Filter arguments: ``alive`` (uint8 view of the catalog's bool
column), ``maturity`` and ``categories`` (int32 columns, at least as long as
``alive``), ``allowed`` / ``blocked`` (uint8 per category code; empty for none),
``exclude`` (sorted int32 rows). De-duplication keeps first-seen order.

The kernels run without the GIL and report bad input as a status, raised once
the GIL is back: ValueError when lengths disagree, an output is too small,
``exclude`` is unsorted or a merged row is negative; IndexError for a source
index outside ``[0, out_scores.shape[1])``; MemoryError when the hash table
cannot be allocated.
"""

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]
_I8 = npt.NDArray[np.int8]
_I32 = npt.NDArray[np.int32]
_U8 = npt.NDArray[np.uint8]

def eligible_mask(
    rows: _I32, alive: _U8, maturity: _I32, categories: _I32, max_maturity: int,
    allowed: _U8, has_allowed: bool, blocked: _U8, exclude: _I32, out: _U8,
) -> int:
    """out[i] = whether rows[i] may be served; returns the count."""

def aggregate_neighbours(
    neighbour_rows: list[_I32], neighbour_scores: list[_F64], weights: _F64,
    alive: _U8, maturity: _I32, categories: _I32, max_maturity: int,
    allowed: _U8, has_allowed: bool, blocked: _U8, exclude: _I32,
    out_rows: _I32, out_scores: _F32,
) -> int:
    """Sum weights[j] * neighbour_scores[j] per distinct eligible row; returns how many were written."""

def merge_sources(rows: _I32, src: _I8, scores: _F32, out_rows: _I32, out_sources: _U8, out_scores: _F32) -> int:
    """De-duplicate the concatenated sources: per row, the source bitmask and each source's score
    (``out_scores`` comes in zeroed, shape (>= n, n_sources <= 8))."""

#: assemble_candidates' answers that ask for more input (not errors): fetch twice as many ANN neighbours,
#: score the whole top-popular list, or rank the co-occurrence rows with numpy and pass them ranked.
ANN_SHORT_STATUS: int
POPULAR_SHORT_STATUS: int
COOC_TIES_STATUS: int

def assemble_candidates(
    ann_labels: npt.NDArray[np.uint64], ann_values: _F32, ann_exact: bool, ann_want: int, ann_k: int,
    neighbour_rows: list[_I32], neighbour_scores: list[_F64], neighbour_weights: _F64, cooc_want: int,
    cooc_ranked: bool, cooc_rows: _I32, cooc_scores: _F32,
    popular: _I32, popular_scores: _F32, popular_want: int,
    fresh_rows: _I32, fresh_neg_created: npt.NDArray[np.int64], now_ms: int, fresh_window_ms: int,
    fresh_window_days: float, fresh_want: int,
    want_ann: int, want_cooccurrence: int, want_popular: int, want_fresh: int, total: int,
    alive: _U8, maturity: _I32, categories: _I32, max_maturity: int,
    allowed: _U8, has_allowed: bool, blocked: _U8, exclude: _I32,
    out_rows: _I32, out_sources: _U8, out_scores: _F32,
) -> int:
    """A request's candidates after the graph search (see recsvc.retrieval.kernels.assemble_candidates,
    which takes the shares as one sequence and ranked co-occurrence rows as ``cooc_rows`` or None instead
    of ``cooc_ranked``): the number written, or one of the *_STATUS values above (call again with more
    input)."""
