"""Offline metrics for ranked recommendation lists, vectorised over a batch of users.

Conventions shared by every function here
-----------------------------------------
- ``recommended: int[U, K]`` holds one ranked list per user, best first, as item ids; ``-1`` pads lists
  shorter than ``K``. Any other negative id is an error.
- ``hits: bool[U, K]`` marks which recommended items are relevant (build it with :func:`relevance_matrix`);
  padding is never a hit. ``n_relevant: int[U]`` is the size of each user's whole relevant set (not only the
  part that was recommended), so ``hits.sum(1) <= n_relevant`` must hold.
- ``k`` is the cut-off. ``None`` means the list length ``K``. A ``k`` larger than ``K`` is allowed and means
  the lists are shorter than the cut-off: the missing positions count as misses (precision divides by ``k``
  and the ideal DCG still has ``min(n_relevant, k)`` terms).
- Accuracy metrics return ``float64[U]`` and are **undefined (NaN) for users with no relevant items** — there is
  nothing to find, so such users say nothing about the ranking. :func:`mean_metric` averages over the users
  for whom a metric is defined; :func:`split_by_group` does the same per group.
- Relevance is binary. A repeated item in a list is counted once, at its first position
  (:func:`relevance_matrix` does this), so duplicates cannot inflate a score.

Everything is array arithmetic on padded 2-D arrays; the only Python loop is over chunks of users in
:func:`intra_list_diversity`, to bound the ``U x K x K`` similarity tensor's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "RelevantSets",
    "relevance_matrix",
    "ndcg_at_k",
    "map_at_k",
    "precision_at_k",
    "recall_at_k",
    "hit_rate_at_k",
    "mrr",
    "mean_metric",
    "intra_list_diversity",
    "catalog_coverage",
    "novelty",
    "serendipity",
    "item_exposure",
    "gini",
    "gini_of_exposure",
    "split_by_group",
]


# --------------------------------------------------------------------------------------------------
# Relevant sets and the hit matrix
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RelevantSets:
    """Each user's set of relevant item ids, in CSR form.

    ``indices[indptr[u]:indptr[u + 1]]`` are user ``u``'s relevant items, sorted ascending and unique
    (checked on construction). :meth:`from_lists` and :meth:`from_pairs` sort and deduplicate for you.
    """

    indptr: np.ndarray  # int64[U + 1]
    indices: np.ndarray  # int64[nnz]

    def __post_init__(self) -> None:
        indptr = np.asarray(self.indptr, dtype=np.int64)
        indices = np.asarray(self.indices, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0 or indptr[-1] != indices.size:
            raise ValueError("indptr must be 1-D, start at 0 and end at len(indices)")
        if (np.diff(indptr) < 0).any():
            raise ValueError("indptr must be non-decreasing")
        if indices.size and indices.min() < 0:
            raise ValueError(f"item ids must be non-negative, got {indices.min()}")
        # within each row, items strictly increasing (sorted, unique): relevance_matrix relies on it
        step = np.diff(indices)
        row_start = np.zeros(indices.size, dtype=bool)
        row_start[indptr[:-1][indptr[:-1] < indices.size]] = True
        if (step <= 0)[~row_start[1:]].any():
            raise ValueError("each row's item ids must be sorted and unique; build with from_lists or from_pairs")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)

    @property
    def n_users(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def n_relevant(self) -> np.ndarray:
        """``int64[U]``: size of each user's relevant set."""
        return np.diff(self.indptr)

    @classmethod
    def from_lists(cls, lists: Sequence[Any]) -> RelevantSets:
        """From one array-like of item ids per user (duplicates are dropped)."""
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        items = (
            np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in lists])
            if lengths.sum() > 0
            else np.zeros(0, dtype=np.int64)
        )
        rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
        return cls.from_pairs(rows, items, n_users=len(lists))

    @classmethod
    def from_pairs(cls, user_index: Any, item_id: Any, n_users: int) -> RelevantSets:
        """From parallel arrays of (user row in ``0..n_users-1``, relevant item id); order does not matter.

        Typical use: the test interactions of a split, with users mapped to the rows of ``recommended``.
        """
        rows = np.asarray(user_index, dtype=np.int64).ravel()
        items = np.asarray(item_id, dtype=np.int64).ravel()
        if rows.shape != items.shape:
            raise ValueError(
                f"user_index and item_id must have the same length, got {rows.shape[0]} and {items.shape[0]}"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= n_users):
            raise ValueError(f"user_index must lie in [0, {n_users}), got values in [{rows.min()}, {rows.max()}]")
        if items.size and items.min() < 0:
            raise ValueError(f"item ids must be non-negative, got {items.min()}")
        span = int(items.max()) + 1 if items.size else 1
        _check_no_overflow(n_users, span)
        keys = np.unique(rows * span + items)  # sorted by (row, item), duplicates removed
        rows, items = np.divmod(keys, span)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
        return cls(indptr=indptr, indices=items)


def _check_no_overflow(n_rows: int, span: int) -> None:
    if n_rows * span >= 2**62:
        raise ValueError(
            f"{n_rows} users x item ids up to {span - 1} do not fit the int64 row-offset encoding; "
            "map item ids to a dense range 0..n_items-1 first"
        )


def _as_recommended(recommended: Any) -> np.ndarray:
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be a 2-D array [n_users, list_length], got shape {rec.shape}")
    if rec.size and not np.issubdtype(rec.dtype, np.integer):
        raise TypeError(f"recommended must hold integer item ids (-1 for padding), got dtype {rec.dtype}")
    rec = rec.astype(np.int64, copy=False)
    if rec.size and rec.min() < -1:
        raise ValueError(f"recommended holds item id {rec.min()}; only -1 is allowed as padding")
    return rec


def _rowwise_isin(rec: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``bool[U, K]``: ``rec[u, j] in other[u]`` for padded ``other: int[U, L]`` (``-1`` = padding)."""
    n = rec.shape[0]
    span = int(max(rec.max(initial=0), other.max(initial=0))) + 1
    _check_no_overflow(n, span)
    row = np.arange(n, dtype=np.int64)[:, None] * span
    keys = np.sort((row + other)[other >= 0])
    probe = row + rec
    if keys.size == 0:
        return np.zeros(rec.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(keys, probe), keys.size - 1)
    return (keys[pos] == probe) & (rec >= 0)


def relevance_matrix(recommended: Any, relevant: RelevantSets | Sequence[Any]) -> np.ndarray:
    """``bool[U, K]``: ``hits[u, j]`` is True when ``recommended[u, j]`` is in user ``u``'s relevant set.

    ``relevant`` is a :class:`RelevantSets` or one array-like of item ids per user. Padding (``-1``) is never
    a hit; a repeated item counts only at its first position. Pair it with ``RelevantSets.n_relevant``.

    How: every (user, item) pair becomes one int64 key ``u * span + item + 1`` (``+1`` keeps padding inside
    its own row's range). The relevant keys are already sorted (CSR rows sorted by item). Each list cell's
    key is shifted left and tagged with its column, and the rows are sorted; since rows occupy disjoint key
    ranges, the flattened result is globally sorted, so one ``np.searchsorted`` of sorted queries answers
    every membership test, a repeated item is an equal neighbour, and the column tag scatters the answers
    back. No Python loop over users or items.
    """
    rec = _as_recommended(recommended)
    sets = relevant if isinstance(relevant, RelevantSets) else RelevantSets.from_lists(relevant)
    n_users, length = rec.shape
    if sets.n_users != n_users:
        raise ValueError(f"recommended has {n_users} rows but relevant sets are given for {sets.n_users} users")
    if sets.indices.size == 0 or rec.size == 0:
        return np.zeros(rec.shape, dtype=bool)
    span = int(max(rec.max(), sets.indices.max())) + 2
    shift = max(1, int(length - 1).bit_length())  # bits for the column tag
    _check_no_overflow(n_users, span << shift)
    base = np.arange(n_users, dtype=np.int64) * span
    keys = np.repeat(base, sets.n_relevant) + (sets.indices + 1)
    cells = np.sort(((base[:, None] + (rec + 1)) << shift) | np.arange(length), axis=1).ravel()
    item_key, column = cells >> shift, cells & ((1 << shift) - 1)
    pos = np.searchsorted(keys, item_key)
    pos[pos == keys.size] = 0
    hit = keys[pos] == item_key  # padding keys (item + 1 == 0) never match a relevant key
    hit[1:] &= item_key[1:] != item_key[:-1]  # a repeat sorts right after its first occurrence
    out = np.zeros(n_users * length, dtype=bool)
    out[np.repeat(np.arange(n_users, dtype=np.int64) * length, length) + column] = hit
    return out.reshape(n_users, length)


# --------------------------------------------------------------------------------------------------
# Accuracy metrics
# --------------------------------------------------------------------------------------------------


def _prepare(hits: Any, n_relevant: Any, k: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate; return hits cut or padded to exactly ``k`` columns, n_relevant as int64, and k."""
    h = np.asarray(hits)
    if h.ndim != 2:
        raise ValueError(f"hits must be a 2-D boolean array [n_users, list_length], got shape {h.shape}")
    if h.dtype != np.bool_:
        if h.size and not np.isin(h, (0, 1)).all():
            raise ValueError("hits must be boolean (or 0/1); build it with relevance_matrix()")
        h = h.astype(bool)
    n_rel = np.asarray(n_relevant)
    if n_rel.shape != (h.shape[0],):
        raise ValueError(f"n_relevant must have shape ({h.shape[0]},) to match hits, got {n_rel.shape}")
    if n_rel.size and not np.issubdtype(n_rel.dtype, np.integer):
        if not np.array_equal(n_rel, np.round(n_rel)):
            raise TypeError(f"n_relevant must hold integer counts, got dtype {n_rel.dtype}")
    n_rel = n_rel.astype(np.int64)
    if n_rel.size and n_rel.min() < 0:
        raise ValueError("n_relevant must be non-negative")
    too_many = np.count_nonzero(h, axis=1) > n_rel
    if too_many.any():
        u = int(np.flatnonzero(too_many)[0])
        raise ValueError(
            f"user row {u} has {int(h[u].sum())} hits but n_relevant={n_rel[u]}; n_relevant must count the "
            "whole relevant set (RelevantSets.n_relevant), and hits must not count duplicates"
        )
    k = h.shape[1] if k is None else k
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k <= h.shape[1]:
        h = h[:, :k]
    else:  # lists shorter than the cut-off: the missing positions are misses
        h = np.concatenate([h, np.zeros((h.shape[0], k - h.shape[1]), dtype=bool)], axis=1)
    return h, n_rel, k


def _undefined_where_nothing_relevant(values: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    values[n_rel == 0] = np.nan
    return values


def ndcg_at_k(hits: Any, n_relevant: Any, k: int | None = None) -> np.ndarray:
    """Normalised discounted cumulative gain with binary gains, per user.

    ``DCG@k = sum_{r=1..k} hit_r / log2(r + 1)``; ``IDCG@k = sum_{r=1..min(n_relevant, k)} 1 / log2(r + 1)``
    (all relevant items ranked first); ``NDCG@k = DCG@k / IDCG@k`` in [0, 1]. NaN when ``n_relevant == 0``.
    """
    h, n_rel, k = _prepare(hits, n_relevant, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = h @ discount
    ideal_cum = np.concatenate([[0.0], np.cumsum(discount)])
    idcg = ideal_cum[np.minimum(n_rel, k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dcg / idcg
    return _undefined_where_nothing_relevant(out, n_rel)


def map_at_k(hits: Any, n_relevant: Any, k: int | None = None) -> np.ndarray:
    """Average precision at k per user (its mean over users is MAP@k).

    ``AP@k = (1 / min(n_relevant, k)) * sum_{r=1..k} hit_r * precision@r``, so a list that puts
    ``min(n_relevant, k)`` relevant items first scores 1. NaN when ``n_relevant == 0``.
    """
    h, n_rel, k = _prepare(hits, n_relevant, k)
    # int32 running count: several times faster than cumsum over bool's default int64 accumulator
    precision_at_r = np.cumsum(h, axis=1, dtype=np.int32) / np.arange(1, k + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.einsum("uk,uk->u", precision_at_r, h) / np.minimum(n_rel, k)  # einsum: no [U, K] temporary
    return _undefined_where_nothing_relevant(out, n_rel)


def precision_at_k(hits: Any, n_relevant: Any, k: int | None = None) -> np.ndarray:
    """``(relevant items in the top k) / k`` per user; padding and positions past the list are misses.

    NaN when ``n_relevant == 0`` (kept undefined for the same users as the other accuracy metrics).
    """
    h, n_rel, k = _prepare(hits, n_relevant, k)
    return _undefined_where_nothing_relevant(np.count_nonzero(h, axis=1) / float(k), n_rel)


def recall_at_k(hits: Any, n_relevant: Any, k: int | None = None) -> np.ndarray:
    """``(relevant items in the top k) / n_relevant`` per user (not capped at k). NaN when ``n_relevant == 0``."""
    h, n_rel, _ = _prepare(hits, n_relevant, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.count_nonzero(h, axis=1) / n_rel
    return _undefined_where_nothing_relevant(out, n_rel)


def hit_rate_at_k(hits: Any, n_relevant: Any, k: int | None = None) -> np.ndarray:
    """1.0 if any relevant item is in the top k, else 0.0, per user. NaN when ``n_relevant == 0``."""
    h, n_rel, _ = _prepare(hits, n_relevant, k)
    return _undefined_where_nothing_relevant(h.any(axis=1).astype(np.float64), n_rel)


def mrr(hits: Any, n_relevant: Any, k: int | None = None) -> np.ndarray:
    """Reciprocal rank of the first relevant item in the top k (0.0 if none), per user.

    Its mean over users is the mean reciprocal rank. NaN when ``n_relevant == 0``.
    """
    h, n_rel, _ = _prepare(hits, n_relevant, k)
    first = h.argmax(axis=1)
    out = np.where(h.any(axis=1), 1.0 / (first + 1.0), 0.0)
    return _undefined_where_nothing_relevant(out, n_rel)


def mean_metric(values: Any) -> float:
    """Mean over the entries where the metric is defined (not NaN); NaN if it is defined nowhere."""
    v = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(v)
    return float(v[defined].mean()) if defined.any() else float("nan")


# --------------------------------------------------------------------------------------------------
# Beyond accuracy
# --------------------------------------------------------------------------------------------------


def _check_ids_below(rec: np.ndarray, n_items: int, what: str) -> None:
    if rec.size and rec.max() >= n_items:
        raise ValueError(f"recommended holds item id {rec.max()} but {what} covers only ids 0..{n_items - 1}")


def intra_list_diversity(recommended: Any, item_embeddings: Any, *, chunk_size: int = 4096) -> np.ndarray:
    """Mean pairwise cosine distance ``1 - cos(e_i, e_j)`` over the distinct pairs of each list, per user.

    ``item_embeddings: float[n_items, D]`` is indexed by item id. Padding is skipped; lists with fewer than
    two items give NaN. Values lie in [0, 2] (in [0, 1] for non-negative embeddings such as genre
    indicators). Users are processed ``chunk_size`` at a time so the ``chunk x K x K`` similarity tensor
    stays small; within a chunk everything is one batched matrix product.
    """
    rec = _as_recommended(recommended)
    emb = np.asarray(item_embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"item_embeddings must be 2-D [n_items, dim], got shape {emb.shape}")
    _check_ids_below(rec, emb.shape[0], "item_embeddings")
    norms = np.linalg.norm(emb, axis=1)
    used = np.unique(rec[rec >= 0])
    if used.size and (norms[used] == 0).any():
        bad = used[norms[used] == 0][:5].tolist()
        raise ValueError(f"items {bad} have all-zero embeddings; cosine distance is undefined for them")
    unit = emb / np.where(norms > 0, norms, 1.0)[:, None]
    n_users, length = rec.shape
    out = np.full(n_users, np.nan)
    upper = np.triu(np.ones((length, length), dtype=bool), k=1)
    for start in range(0, n_users, chunk_size):
        r = rec[start : start + chunk_size]
        valid = r >= 0
        vecs = unit[np.where(valid, r, 0)] * valid[..., None]  # padding -> zero vector
        sims = vecs @ vecs.transpose(0, 2, 1)
        m = valid.sum(axis=1)
        n_pairs = m * (m - 1) / 2.0
        sum_sim = sims[:, upper].sum(axis=1)  # zero vectors contribute nothing
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + chunk_size] = np.where(n_pairs > 0, 1.0 - sum_sim / n_pairs, np.nan)
    return out


def catalog_coverage(recommended: Any, n_items: int) -> float:
    """Fraction of the catalogue (ids ``0..n_items-1``) that appears in at least one list."""
    rec = _as_recommended(recommended)
    if n_items < 1:
        raise ValueError(f"n_items must be positive, got {n_items}")
    _check_ids_below(rec, n_items, "the catalogue")
    return float(np.unique(rec[rec >= 0]).size / n_items)


def novelty(recommended: Any, item_popularity: Any) -> np.ndarray:
    """Mean self-information ``-log2 p(i)`` of the items in each list, per user (bits; NaN for empty lists).

    ``item_popularity: float[n_items]`` is ``p(i)``, the probability that a user has interacted with item
    ``i`` — e.g. ``users_who_interacted[i] / n_users`` on the training data (Zhou et al., 2010). Every
    recommended item needs ``0 < p(i) <= 1``: smooth it (e.g. ``(count + 1) / (n_users + 1)``) if the lists
    may contain items unseen in training.
    """
    rec = _as_recommended(recommended)
    p = np.asarray(item_popularity, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"item_popularity must be 1-D [n_items], got shape {p.shape}")
    _check_ids_below(rec, p.shape[0], "item_popularity")
    valid = rec >= 0
    p_rec = p[np.where(valid, rec, 0)]
    bad = valid & ~((p_rec > 0) & (p_rec <= 1))
    if bad.any():
        item = int(rec[bad][0])
        raise ValueError(
            f"item {item} has popularity p={float(p[item])!r}; novelty needs probabilities in (0, 1] — divide counts "
            "by the number of users and smooth items never seen, e.g. (count + 1) / (n_users + 1)"
        )
    info = np.where(valid, -np.log2(np.where(valid, p_rec, 1.0)), 0.0)
    m = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m > 0, info.sum(axis=1) / m, np.nan)


def serendipity(
    recommended: Any,
    hits: Any,
    baseline: Any,
    *,
    n_relevant: Any = None,
    k: int | None = None,
) -> np.ndarray:
    """Share of the top k that is both relevant and unexpected, per user.

    Definition (Ge et al., 2010; Kaminskas & Bridge, 2016): an item is *unexpected* for a user when a
    primitive baseline — typically the most-popular recommender — does not recommend it to that user.
    ``serendipity@k = |{i in top k : i relevant and i not in baseline(u)}| / k``.

    ``baseline`` is ``int[L]`` (one list for everybody, e.g. the global top-L) or ``int[U, L]`` (a list per
    user, ``-1`` padded). If ``n_relevant`` is given, users without relevant items get NaN, as in the
    accuracy metrics; otherwise they score 0.
    """
    rec = _as_recommended(recommended)
    n_users = rec.shape[0]
    if np.shape(hits) != rec.shape:
        raise ValueError(f"hits shape {np.shape(hits)} does not match recommended shape {rec.shape}")
    h, n_rel, k = _prepare(hits, np.sum(hits, axis=1) if n_relevant is None else n_relevant, k)
    base = np.asarray(baseline)
    if base.ndim == 1:
        base = np.broadcast_to(base, (n_users, base.shape[0]))
    if base.ndim != 2 or base.shape[0] != n_users:
        raise ValueError(f"baseline must be int[L] or int[{n_users}, L], got shape {np.asarray(baseline).shape}")
    expected = _rowwise_isin(rec, base.astype(np.int64))
    width = min(k, rec.shape[1])
    lucky = h[:, :width] & ~expected[:, :width]
    out = np.count_nonzero(lucky, axis=1) / float(k)
    return out if n_relevant is None else _undefined_where_nothing_relevant(out, n_rel)


def item_exposure(recommended: Any, n_items: int, *, position_weighted: bool = False) -> np.ndarray:
    """``float64[n_items]``: how often each item is shown across all lists.

    Unweighted, each appearance counts 1. Position-weighted, an appearance at rank ``r`` (1-based) counts
    ``1 / log2(r + 1)`` — the NDCG discount, a simple model of the attention a slot receives.
    """
    rec = _as_recommended(recommended)
    if n_items < 1:
        raise ValueError(f"n_items must be positive, got {n_items}")
    _check_ids_below(rec, n_items, "the catalogue")
    valid = rec >= 0
    if position_weighted:
        w = np.broadcast_to(1.0 / np.log2(np.arange(2, rec.shape[1] + 2, dtype=np.float64)), rec.shape)
    else:
        w = np.ones(rec.shape)
    return np.bincount(rec[valid], weights=w[valid], minlength=n_items).astype(np.float64)


def gini(values: Any) -> float:
    """Gini coefficient of a non-negative vector: 0 when all entries are equal, ``(n - 1) / n`` when one
    entry holds everything.

    With the values sorted ascending ``x_1 <= ... <= x_n``: ``G = sum_i (2i - n - 1) x_i / (n * sum_i x_i)``.
    Zeros count as entries (an item never shown is part of the catalogue). NaN when the values sum to 0
    (an empty vector included): there is nothing whose concentration could be measured.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"gini needs a 1-D vector, got shape {x.shape}")
    bad = ~(np.isfinite(x) & (x >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"gini needs finite non-negative values, got {float(x[i])!r} at index {i}")
    x = np.sort(x)
    total = x.sum()
    if total == 0:
        return float("nan")
    n = x.shape[0]
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def gini_of_exposure(recommended: Any, n_items: int, *, position_weighted: bool = False) -> float:
    """:func:`gini` of :func:`item_exposure` over the whole catalogue, unexposed items included
    (0 = equal exposure, ->1 = concentrated). NaN when nothing is exposed.
    """
    return gini(item_exposure(recommended, n_items, position_weighted=position_weighted))


def split_by_group(metric_values: Any, groups: Any) -> dict[Any, float]:
    """Mean of a per-user (or per-item) metric within each group, ignoring NaN entries.

    ``groups`` gives each entry's group label (ints or strings), e.g. a user segment, or an item's provider
    when ``metric_values`` is :func:`item_exposure`. Returns ``{group: mean}`` with plain Python keys,
    sorted by group; a group whose entries are all NaN maps to NaN.
    """
    v = np.asarray(metric_values, dtype=np.float64)
    g = np.asarray(groups)
    if v.ndim != 1 or g.shape != v.shape:
        raise ValueError(f"metric_values and groups must be 1-D with the same length, got {v.shape} and {g.shape}")
    labels, inverse = np.unique(g, return_inverse=True)
    defined = ~np.isnan(v)
    sums = np.bincount(inverse[defined], weights=v[defined], minlength=labels.size)
    counts = np.bincount(inverse[defined], minlength=labels.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return {label.item() if hasattr(label, "item") else label: float(m) for label, m in zip(labels, means)}


def paired_bootstrap(a: Any, b: Any, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
                     ) -> dict[str, float]:
    """Mean of ``a - b`` over users with a percentile bootstrap interval, resampling users (paired).

    ``a`` and ``b`` are per-user values of one metric for two systems on the same users (NaN where the
    metric is undefined for a user: such users are dropped from both). Returns ``{"mean", "low",
    "high", "users"}``.
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one value per user each, got {a.shape} and {b.shape}")
    if not 0.0 < confidence < 1.0 or n_boot < 1:
        raise ValueError("confidence must be in (0, 1) and n_boot positive")
    ok = np.isfinite(a) & np.isfinite(b)
    diff = a[ok] - b[ok]
    if diff.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "users": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # 256 resamples at a time: bounded memory
        stop = min(n_boot, start + 256)
        means[start:stop] = diff[rng.integers(0, diff.size, (stop - start, diff.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "users": int(diff.size)}
