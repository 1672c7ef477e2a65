"""Stage 2: features and the learned ranker.

The engine fills one :class:`FeatureInputs` per request; :func:`gather_features`
turns it into the feature matrix ``X`` (n × F, float32) in one compiled call, and
a :class:`Ranker` (logistic regression, a small MLP, or gradient-boosted trees;
weights from a JSON file) scores ``X`` in a second compiled call::

    ranker = Ranker.default()                       # or Ranker.load(config.ranking.model_path)
    scores = ranker.score(inputs, config.ranking.freshness_half_life_days)   # float32[n]

Feature names and order are defined once, here (:data:`FEATURE_NAMES`, the base
layout every request gathers, and :data:`EXTENDED_FEATURES`, gathered only for a
ranker that uses them: :data:`ALL_FEATURES` is the two together), and are stored
in every weights file. A file whose features are a subset of the code's
(in any order) is mapped by name; a file naming a feature this code does not
compute is rejected with an error that names it.

This module applies no business rules (quotas, filters, slots): see
``recsvc.reranking``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsvc._fastpath.twins import ranking as _twin
from recsvc._files import atomic_write
from recsvc.retrieval.candidates import SOURCE_NAMES

try:
    from recsvc._fastpath import _ranking as _native
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "recsvc._fastpath._ranking is not compiled; run "
        "`python setup.py build_ext --inplace` (or `pip install -e .`)"
    ) from exc

__all__ = [
    "ALL_FEATURES",
    "BASE_FEATURES",
    "CONTEXT_FEATURES",
    "DEVICE_VOCABULARY",
    "EXTENDED_FEATURES",
    "ExtendedInputs",
    "FEATURE_NAMES",
    "Forest",
    "FORMAT_VERSION",
    "FeatureInputs",
    "Ranker",
    "RankerFileError",
    "context_features",
    "freshness",
    "gather_features",
]

# --------------------------------------------------------------------------
# Feature names: the one definition of the layout written by the kernel.

#: Per-candidate features that do not depend on the retrieval source.
BASE_FEATURES: tuple[str, ...] = (
    "similarity",  # user_vec . item embedding (cosine when both are unit-norm)
    "log_popularity",  # log1p of decayed popularity
    "freshness",  # exp(-ln2 * age_days / half_life_days), 1 for brand-new items
    "category_affinity",  # the user's share of history in the item's category
    "bandit_mean",  # posterior mean alpha / (alpha + beta)
)
#: Device values recognised in ``context["device"]`` (case-insensitive); others → all zeros.
DEVICE_VOCABULARY: tuple[str, ...] = ("mobile", "desktop", "tablet", "tv")
#: Request-level features parsed from the context map, the same for every candidate.
CONTEXT_FEATURES: tuple[str, ...] = tuple(f"device_{v}" for v in DEVICE_VOCABULARY) + ("hour_sin", "hour_cos")
#: Column names of the feature matrix, in order.
FEATURE_NAMES: tuple[str, ...] = (
    BASE_FEATURES
    + tuple(f"score_{s}" for s in SOURCE_NAMES)
    + tuple(f"from_{s}" for s in SOURCE_NAMES)
    + CONTEXT_FEATURES
)
#: Columns the extended gather adds after FEATURE_NAMES (see ``_ranking.pyx``): the item's factor
#: norm and the user-item cosine (``similarity`` is the raw dot product, the matrix-factorisation
#: score on an ``ip`` catalog), co-occurrence with the user's recent items under several
#: normalisations, similarity to the most recent items, user activity, the item's interaction
#: count, each source's rank, and the item's age against the request's clock.
EXTENDED_FEATURES: tuple[str, ...] = (
    "item_norm",
    "cosine",
    "cooc_cosine",  # sum_i w_i c_ij / sqrt(n_i n_j) over the user's recent items i
    "cooc_conditional",  # sum_i w_i c_ij / n_i
    "cooc_reverse",  # sum_i w_i c_ij / n_j
    "cooc_log_count",  # log1p(sum_i w_i c_ij)
    "cooc_max_cosine",  # max_i c_ij / sqrt(n_i n_j)
    "cooc_support",  # recent items that co-occur with the candidate
    "recent_max_cosine",  # to the user's few most recent items
    "recent_mean_cosine",
    "user_activity",  # log1p(the user's positive interactions)
    "log_item_count",  # log1p(the item's positive interactions), not decayed
    "profile_cosine",  # to the user's history profile (recency-weighted mean of the history's embeddings)
    *(f"rank_{s}" for s in SOURCE_NAMES),  # 0-based rank among that source's candidates; n if absent
    "log_age_days",  # sign(age) * log1p(|age| in days) against the request's clock
)
#: The layout of an extended gather: FEATURE_NAMES then EXTENDED_FEATURES.
ALL_FEATURES: tuple[str, ...] = FEATURE_NAMES + EXTENDED_FEATURES
_FEATURE_INDEX = {name: i for i, name in enumerate(ALL_FEATURES)}
#: How many of the user's most recent distinct items the ``recent_*_cosine`` features compare with.
RECENT_SIMILARITY_ITEMS = 5
_DEVICE_INDEX = {v: i for i, v in enumerate(DEVICE_VOCABULARY)}
_HOUR_COL = len(DEVICE_VOCABULARY)

#: Version of the weights-file layout written by :meth:`Ranker.save`.
FORMAT_VERSION = 1
_MS_PER_DAY = 86_400_000.0

Kind = Literal["logistic", "mlp", "gbdt"]
KINDS: tuple[str, ...] = ("logistic", "mlp", "gbdt")
#: Deepest tree a gbdt weights file may hold (the kernel's limit).
MAX_TREE_DEPTH = 12


class RankerFileError(ValueError):
    """A ranker weights file is missing, malformed, or does not fit this code."""


# --------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class FeatureInputs:
    """Everything the feature gather needs for one request.

    Catalog-wide arrays are indexed by catalog row (length N); per-candidate
    arrays by candidate (length n). Pass arrays already in the listed dtype and
    C order: then nothing is copied (the catalog arrays are large).

    user_vec:          float32[d]     unit-norm user embedding; zeros when unknown
    embeddings:        float32[N, d]  catalog embeddings (unit-norm rows for a cosine index)
    rows:              int32[n]       candidate rows
    log_popularity:    float32[N]     log1p(decayed popularity); float32[n] when ``by_candidate``
    created_at_ms:     int64[N]       item creation times (epoch ms)
    now_ms:            int            the request's clock (epoch ms)
    categories:        int32[N]       category of each item (negative: none)
    category_affinity: float32[C]     user's share of history per category; zeros when unknown
    bandit_alpha:      float64[N]     Beta posterior alpha; float64[n] when ``by_candidate``
    bandit_beta:       float64[N]     Beta posterior beta; float64[n] when ``by_candidate``
    source_scores:     float32[n, S]  per-source retrieval scores, S = len(SOURCE_NAMES)
    context:           Mapping[str, str]  request context (``device``, ``hour``); bad values → zeros
    sources:           uint8[n] | None    retrieval bitmask (``Candidates.sources``); when None
                                          a source counts as present where its score is non-zero
    extended:          ExtendedInputs | None  what the extended features need; when given,
                                          the gather returns ALL_FEATURES, else FEATURE_NAMES
    by_candidate:      bool           log_popularity, bandit_alpha and bandit_beta hold the candidates'
                                          values in candidate order (what the request path reads from
                                          the online state), the other arrays stay the catalog's
    """

    user_vec: np.ndarray
    embeddings: np.ndarray
    rows: np.ndarray
    log_popularity: np.ndarray
    created_at_ms: np.ndarray
    now_ms: int
    categories: np.ndarray
    category_affinity: np.ndarray
    bandit_alpha: np.ndarray
    bandit_beta: np.ndarray
    source_scores: np.ndarray
    context: Mapping[str, str] = field(default_factory=dict)
    sources: np.ndarray | None = None
    extended: "ExtendedInputs | None" = None
    by_candidate: bool = False


@dataclass(frozen=True)
class ExtendedInputs:
    """What the extended features (:data:`EXTENDED_FEATURES`) need beyond :class:`FeatureInputs`.

    item_rows:         int32[n]    catalog row of each candidate (distinct): co-occurrence is keyed by it
    item_counts:       float32[n]  positive interactions of each candidate (n_j), not decayed
    recent_weights:    float32[W]  recency weight of each of the user's recent distinct items
    recent_counts:     float32[W]  their positive interactions (n_i)
    neighbour_rows:    int32[M]    co-occurrence neighbours of the recent items (catalog rows) ...
    neighbour_counts:  float32[M]  ... their co-occurrence counts c_ij ...
    neighbour_owner:   int32[M]    ... and which recent item (index into recent_*) each belongs to
    recent_embeddings: float32[R, d]  embeddings of the user's R most recent distinct items (any norm)
    user_interactions: float       the user's positive interactions
    profile:           float32[d] | None  the user's history profile (any norm; normalised here), or None
    """

    item_rows: np.ndarray
    item_counts: np.ndarray
    recent_weights: np.ndarray
    recent_counts: np.ndarray
    neighbour_rows: np.ndarray
    neighbour_counts: np.ndarray
    neighbour_owner: np.ndarray
    recent_embeddings: np.ndarray
    user_interactions: float = 0.0
    profile: np.ndarray | None = None


def context_features(context: Mapping[str, Any] | None) -> np.ndarray:
    """float32[len(CONTEXT_FEATURES)]: ``device`` one-hot and ``hour`` as sin/cos.

    ``hour`` is the local hour of day, ``"13"``, ``"13.5"`` or ``"13:30"``, in
    [0, 24). Missing, unknown or malformed values give zeros, never an error.
    """
    out = np.zeros(len(CONTEXT_FEATURES), np.float32)
    if not isinstance(context, Mapping):
        return out
    try:
        device = context.get("device")
        hour = context.get("hour")
    except Exception:  # a hostile Mapping; context must never fail a request
        return out
    if isinstance(device, str):
        i = _DEVICE_INDEX.get(device.strip().lower())
        if i is not None:
            out[i] = 1.0
    h = _parse_hour(hour)
    if h is not None:
        angle = 2.0 * math.pi * h / 24.0
        out[_HOUR_COL] = math.sin(angle)
        out[_HOUR_COL + 1] = math.cos(angle)
    return out


def _parse_hour(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        h = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 16:
            return None
        try:
            if ":" in text:
                hh, mm = text.split(":", 1)
                minutes = float(mm)
                if not 0.0 <= minutes < 60.0:
                    return None
                h = float(int(hh)) + minutes / 60.0
            else:
                h = float(text)
        except ValueError:
            return None
    else:
        return None
    if not (math.isfinite(h) and 0.0 <= h < 24.0):
        return None
    return h


def freshness(created_at_ms: np.ndarray, now_ms: int, half_life_days: float) -> np.ndarray:
    """exp(-ln2 * age_days / half_life_days) as float32, age clamped at 0 (the
    ranking feature and the re-ranking boost use the same formula)."""
    age = np.maximum(np.int64(now_ms) - np.asarray(created_at_ms, np.int64), 0).astype(np.float64)
    age *= -math.log(2.0) / (half_life_days * _MS_PER_DAY)
    return np.exp(age, out=age).astype(np.float32)


# --------------------------------------------------------------------------
# Gather


def _array(x: Any, dtype: type, name: str, ndim: int) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=dtype)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _int_array(x: Any, dtype: type, name: str) -> np.ndarray:
    raw = np.asarray(x)
    if raw.size and raw.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {raw.dtype}")
    return _array(raw, dtype, name, 1)


def _check_half_life(half_life_days: float) -> float:
    h = float(half_life_days)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"freshness_half_life_days must be positive and finite, got {half_life_days!r}")
    return h


def _prepare_gather(inputs: FeatureInputs, freshness_half_life_days: float) -> tuple:
    """Validated, contiguous kernel arguments (without the output)."""
    half_life = _check_half_life(freshness_half_life_days)
    emb = _array(inputs.embeddings, np.float32, "embeddings", 2)
    N, d = emb.shape
    if d == 0:
        raise ValueError("embeddings must have at least one column")
    user_vec = _array(inputs.user_vec, np.float32, "user_vec", 1)
    if user_vec.shape[0] != d:
        raise ValueError(f"user_vec has {user_vec.shape[0]} dims but embeddings have {d}")
    if not np.isfinite(user_vec).all():
        raise ValueError("user_vec contains NaN or infinity")
    rows = _int_array(inputs.rows, np.int32, "rows")
    n = rows.shape[0]
    if n and (int(rows.min()) < 0 or int(rows.max()) >= N):
        bad = rows[(rows < 0) | (rows >= N)]
        raise ValueError(f"rows must be catalog rows in [0, {N}); got {bad[:5].tolist()}")
    log_pop = _array(inputs.log_popularity, np.float32, "log_popularity", 1)
    created = _int_array(inputs.created_at_ms, np.int64, "created_at_ms")
    categories = _int_array(inputs.categories, np.int32, "categories")
    alpha = _array(inputs.bandit_alpha, np.float64, "bandit_alpha", 1)
    beta = _array(inputs.bandit_beta, np.float64, "bandit_beta", 1)
    by_candidate = bool(inputs.by_candidate)
    for name, arr, per_candidate in (
        ("log_popularity", log_pop, by_candidate),
        ("created_at_ms", created, False),
        ("categories", categories, False),
        ("bandit_alpha", alpha, by_candidate),
        ("bandit_beta", beta, by_candidate),
    ):
        if per_candidate and arr.shape[0] != n:
            raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} candidates (by_candidate)")
        if not per_candidate and arr.shape[0] != N:
            raise ValueError(f"{name} has {arr.shape[0]} entries but the catalog has {N} rows")
    affinity = _array(inputs.category_affinity, np.float32, "category_affinity", 1)
    S = len(SOURCE_NAMES)
    source_scores = _array(inputs.source_scores, np.float32, "source_scores", 2)
    if source_scores.shape != (n, S):
        raise ValueError(
            f"source_scores must have shape (n, {S}) = ({n}, {S}) (columns {list(SOURCE_NAMES)}), "
            f"got {source_scores.shape}"
        )
    if not np.isfinite(source_scores).all():
        raise ValueError("source_scores contains NaN or infinity")
    if inputs.sources is None:
        mask = np.empty(0, np.uint8)
    else:
        mask = _int_array(inputs.sources, np.uint8, "sources")
        if mask.shape[0] != n:
            raise ValueError(f"sources has {mask.shape[0]} entries but there are {n} candidates")
    try:
        now_ms = int(inputs.now_ms)
    except (TypeError, ValueError):
        raise ValueError(f"now_ms must be an integer (epoch ms), got {inputs.now_ms!r}") from None
    ctx = context_features(inputs.context)
    return (
        user_vec, emb, rows, log_pop, created, now_ms, half_life, categories,
        affinity, alpha, beta, source_scores, mask, ctx, by_candidate,
    )  # fmt: skip


def _prepare_extended(ext: ExtendedInputs, n: int, d: int) -> tuple:
    """Validated, contiguous arguments of the extended gather (after the base ones, without the output)."""
    item_rows = _int_array(ext.item_rows, np.int32, "extended.item_rows")
    if item_rows.shape[0] != n:
        raise ValueError(f"extended.item_rows has {item_rows.shape[0]} entries but there are {n} candidates")
    if n and int(item_rows.min()) < 0:
        raise ValueError("extended.item_rows must be catalog rows (>= 0)")
    counts = _array(ext.item_counts, np.float32, "extended.item_counts", 1)
    if counts.shape[0] != n:
        raise ValueError(f"extended.item_counts has {counts.shape[0]} entries but there are {n} candidates")
    weights = _array(ext.recent_weights, np.float32, "extended.recent_weights", 1)
    recent_counts = _array(ext.recent_counts, np.float32, "extended.recent_counts", 1)
    if recent_counts.shape != weights.shape:
        raise ValueError(f"extended.recent_counts has {recent_counts.shape[0]} entries but recent_weights "
                         f"{weights.shape[0]}")
    nb_rows = _int_array(ext.neighbour_rows, np.int32, "extended.neighbour_rows")
    nb_counts = _array(ext.neighbour_counts, np.float32, "extended.neighbour_counts", 1)
    nb_owner = _int_array(ext.neighbour_owner, np.int32, "extended.neighbour_owner")
    M = nb_rows.shape[0]
    if nb_counts.shape[0] != M or nb_owner.shape[0] != M:
        raise ValueError("extended.neighbour_rows, neighbour_counts and neighbour_owner must have one entry each")
    if M and (int(nb_owner.min()) < 0 or int(nb_owner.max()) >= weights.shape[0]):
        raise ValueError(f"extended.neighbour_owner must index the {weights.shape[0]} recent items")
    recent = np.asarray(ext.recent_embeddings, np.float32)
    if recent.size == 0:
        recent = np.empty((0, d), np.float32)
    if recent.ndim != 2 or recent.shape[1] != d:
        raise ValueError(f"extended.recent_embeddings must have shape (R, {d}), got {recent.shape}")
    norms = np.sqrt(np.einsum("rd,rd->r", recent, recent))
    if not (norms > 0).all():
        recent, norms = recent[norms > 0], norms[norms > 0]
    recent = np.ascontiguousarray(recent / norms[:, None], np.float32)
    for name, arr in (("item_counts", counts), ("recent_weights", weights), ("recent_counts", recent_counts),
                      ("neighbour_counts", nb_counts), ("recent_embeddings", recent)):
        if not math.isfinite(float(arr.sum(dtype=np.float64))):  # NaN and infinity propagate to the sum
            raise ValueError(f"extended.{name} contains NaN or infinity")
    activity = float(ext.user_interactions)
    if not math.isfinite(activity):
        raise ValueError(f"extended.user_interactions must be finite, got {ext.user_interactions!r}")
    profile = np.zeros(d, np.float32)
    if ext.profile is not None:
        raw = _array(ext.profile, np.float32, "extended.profile", 1)
        if raw.shape[0] != d or not np.isfinite(raw).all():
            raise ValueError(f"extended.profile must be {d} finite values, got shape {raw.shape}")
        norm = float(np.linalg.norm(raw))
        if norm > 0:
            profile = (raw / norm).astype(np.float32)
    size = 16
    while size < 2 * n:
        size *= 2
    return (item_rows, counts, nb_rows, nb_counts, nb_owner, weights, recent_counts, recent, profile,
            activity, np.empty(n, np.uint64), np.empty(2 * size, np.int32))


def gather_features(
    inputs: FeatureInputs, freshness_half_life_days: float, *, use_native: bool = True
) -> np.ndarray:
    """The feature matrix of one request: float32[n, len(FEATURE_NAMES)], or
    float32[n, len(ALL_FEATURES)] when ``inputs.extended`` is given.

    Raises ValueError naming the offending input when shapes, dtypes or rows
    are wrong. ``use_native=False`` runs the numpy twin (tests, benchmarks).
    """
    args = _prepare_gather(inputs, freshness_half_life_days)
    impl = _native if use_native else _twin
    n = args[2].shape[0]
    if inputs.extended is None:
        X = np.empty((n, len(FEATURE_NAMES)), np.float32)
        impl.gather_features(*args, X)
    else:
        ext = _prepare_extended(inputs.extended, n, args[1].shape[1])
        X = np.empty((n, len(ALL_FEATURES)), np.float32)
        impl.gather_extended_features(*args, *ext, X)
    return X


# --------------------------------------------------------------------------
# The model


def _f32(values: Any, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float32, order="C")
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers") from None
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinity")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Forest:
    """Gradient-boosted trees, each stored as a complete binary tree of one depth.

    feature:   int32[T, 2^depth - 1]    the model column (index into ``feature_names``) each inner node tests
    threshold: float32[T, 2^depth - 1]  go to child 2k+2 when ``x > threshold``, else to 2k+1
    leaf:      float32[T, 2^depth]       the value of each leaf, left to right
    bias:      float                     added to the sum of the leaves; the score is ``sigmoid(bias + sum)``

    A tree shallower than ``depth`` is padded with nodes whose threshold is the largest float32 (every
    finite value goes left) and whose leaves repeat the value, so every row takes the same number of
    steps. :func:`recsvc.training.forest_from_lightgbm` builds one from a LightGBM model.
    """

    depth: int
    feature: np.ndarray
    threshold: np.ndarray
    leaf: np.ndarray
    bias: float = 0.0

    @property
    def n_trees(self) -> int:
        return int(self.leaf.shape[0])

    @classmethod
    def validated(cls, depth: Any, feature: Any, threshold: Any, leaf: Any, bias: Any, n_features: int) -> "Forest":
        """A forest with checked shapes, ranges and dtypes (read-only arrays); ValueError says what is wrong."""
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 0 <= depth <= MAX_TREE_DEPTH:
            raise ValueError(f"forest depth must be an integer in [0, {MAX_TREE_DEPTH}], got {depth!r}")
        depth = int(depth)
        inner, leaves = (1 << depth) - 1, 1 << depth
        lf = _f32(leaf, None, "forest leaf values")
        if lf.ndim != 2 or lf.shape[1] != leaves:
            raise ValueError(f"forest leaf values must have shape (trees, {leaves}), got {lf.shape}")
        T = lf.shape[0]
        thr = _f32(threshold, None, "forest thresholds")
        if thr.shape != (T, inner):
            raise ValueError(f"forest thresholds must have shape ({T}, {inner}), got {thr.shape}")
        try:
            feat_raw = np.asarray(feature)
        except (TypeError, ValueError):
            raise ValueError("forest features must be integers") from None
        if feat_raw.size and feat_raw.dtype.kind not in "iu":
            raise ValueError(f"forest features must be integers, got dtype {feat_raw.dtype}")
        feat = np.array(feat_raw, dtype=np.int32, order="C").reshape(feat_raw.shape)
        if feat.shape != (T, inner):
            raise ValueError(f"forest features must have shape ({T}, {inner}), got {feat.shape}")
        if feat.size and (int(feat.min()) < 0 or int(feat.max()) >= n_features):
            raise ValueError(f"forest features must index the model's {n_features} features")
        b = float(_f32([bias], (1,), "forest bias")[0])
        feat.setflags(write=False)
        return cls(depth, feat, thr, lf, b)


class Ranker:
    """A scoring model over the feature matrix: logistic regression, an MLP, or gradient-boosted trees.

    ``layers`` is a list of ``(W, b)`` with ``W`` of shape (inputs, outputs):
    one layer ``(F, 1)`` for ``kind="logistic"``; for ``kind="mlp"`` one or two
    ReLU hidden layers followed by an ``(H, 1)`` output layer. The output goes
    through a sigmoid, so scores are click probabilities in (0, 1). For
    ``kind="gbdt"``, ``layers`` is a :class:`Forest`, scored as ``sigmoid(bias +
    sum of its leaves)`` (a trainer calibrates it so that this is a probability).

    ``feature_names`` are the model's inputs, in the order of ``W``'s rows (the
    forest's feature indices); they may be any subset of :data:`ALL_FEATURES` in
    any order (mapped by name in :meth:`score`). A model that uses any of
    :data:`EXTENDED_FEATURES` needs the extended gather (:attr:`uses_extended`).
    Instances are immutable and safe to share across threads.
    """

    def __init__(
        self,
        kind: Kind,
        layers: "Sequence[tuple[Any, Any]] | Forest",
        *,
        feature_names: Sequence[str] = FEATURE_NAMES,
        version: str | None = None,
        trained_at: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        names = tuple(str(f) for f in feature_names)
        if not names:
            raise ValueError("a ranker needs at least one feature")
        if len(set(names)) != len(names):
            dupes = sorted({f for f in names if names.count(f) > 1})
            raise ValueError(f"feature_names repeats {dupes}")
        parsed: list[tuple[np.ndarray, np.ndarray]] = []
        forest: Forest | None = None
        if kind == "gbdt":
            if not isinstance(layers, Forest):
                raise ValueError("a gbdt ranker takes a Forest")
            forest = Forest.validated(layers.depth, layers.feature, layers.threshold, layers.leaf, layers.bias,
                                      len(names))
        else:
            if isinstance(layers, Forest):
                raise ValueError(f"a {kind} ranker takes (W, b) layers, not a Forest")
            n_layers = len(layers)
            if (kind == "logistic" and n_layers != 1) or (kind == "mlp" and n_layers not in (2, 3)):
                expected = "1 layer" if kind == "logistic" else "2 or 3 layers (1 or 2 hidden + output)"
                raise ValueError(f"a {kind} ranker has {expected}, got {n_layers}")
            n_in = len(names)
            for i, (W, b) in enumerate(layers):
                W = _f32(W, None, f"layer {i} weight")
                if W.ndim != 2 or W.shape[0] != n_in:
                    raise ValueError(f"layer {i} weight must have shape ({n_in}, outputs), got {W.shape}")
                if W.shape[1] == 0:
                    raise ValueError(f"layer {i} has no outputs")
                b = _f32(b, (W.shape[1],), f"layer {i} bias")
                parsed.append((W, b))
                n_in = W.shape[1]
            if n_in != 1:
                raise ValueError(f"the output layer must have 1 output, got {n_in}")
        self._kind: Kind = kind
        self._layers = tuple(parsed)
        self._forest = forest
        self._feature_names = names
        self._trained_at = trained_at
        self._metrics = dict(metrics or {})
        self._description = description
        self._version = version or f"{kind}-{self._fingerprint()}"
        # The model re-expressed over the gathered layout (ALL_FEATURES; its first
        # len(FEATURE_NAMES) columns are the base gather): scoring a gathered matrix needs no copy.
        unknown = [f for f in names if f not in _FEATURE_INDEX]
        self._unknown_features = unknown
        self._uses_extended = any(_FEATURE_INDEX.get(f, 0) >= len(FEATURE_NAMES) for f in names)
        self._W0_full: np.ndarray | None = None
        self._forest_full: np.ndarray | None = None
        if unknown:
            return
        columns = [_FEATURE_INDEX[f] for f in names]
        if forest is not None:
            full = np.asarray(columns, np.int32)[forest.feature.reshape(-1)] if forest.feature.size else \
                np.empty(0, np.int32)
            full.setflags(write=False)
            self._forest_full = full
            self._forest_flat = (forest.feature.reshape(-1), forest.threshold.reshape(-1), forest.leaf.reshape(-1))
        else:
            W0, _ = parsed[0]
            full = np.zeros((len(ALL_FEATURES), W0.shape[1]), np.float32)
            full[columns] = W0
            full.setflags(write=False)
            self._W0_full = full

    # -- identity ----------------------------------------------------------
    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def version(self) -> str:
        return self._version

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._feature_names

    @property
    def trained_at(self) -> str | None:
        return self._trained_at

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    @property
    def layers(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """(W, b) per layer, read-only float32 arrays (empty for a gbdt ranker)."""
        return self._layers

    @property
    def forest(self) -> Forest | None:
        """The trees of a gbdt ranker (None for the other kinds)."""
        return self._forest

    @property
    def uses_extended(self) -> bool:
        """Whether the model reads any of :data:`EXTENDED_FEATURES` (then requests gather them)."""
        return self._uses_extended

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(W.shape[1] for W, _ in self._layers[:-1])

    def __repr__(self) -> str:
        hidden = f", hidden={list(self.hidden_sizes)}" if self.hidden_sizes else ""
        if self._forest is not None:
            hidden = f", trees={self._forest.n_trees}, depth={self._forest.depth}"
        return f"Ranker(kind={self._kind!r}, version={self._version!r}, features={len(self._feature_names)}{hidden})"

    def _fingerprint(self) -> str:
        h = hashlib.sha256(self._kind.encode())
        h.update("\0".join(self._feature_names).encode())
        for W, b in self._layers:
            h.update(W.tobytes())
            h.update(b.tobytes())
        if self._forest is not None:
            f = self._forest
            for part in (np.int32(f.depth), f.feature, f.threshold, f.leaf, np.float32(f.bias)):
                h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()[:12]

    # -- scoring -----------------------------------------------------------
    def score(
        self, inputs: FeatureInputs, freshness_half_life_days: float, *, use_native: bool = True
    ) -> np.ndarray:
        """float32[n] click probabilities of the request's candidates (gather + score)."""
        if self._unknown_features:
            raise ValueError(self._unknown_message())
        if self._uses_extended and inputs.extended is None:
            raise ValueError(f"ranker {self._version} uses extended features "
                             f"{[f for f in self._feature_names if f in EXTENDED_FEATURES]}: "
                             "pass FeatureInputs.extended")
        return self._forward(gather_features(inputs, freshness_half_life_days, use_native=use_native), True,
                             use_native)

    def score_gathered(self, X: Any, *, use_native: bool = True) -> np.ndarray:
        """Score a matrix laid out as :data:`FEATURE_NAMES` or :data:`ALL_FEATURES` (what
        :func:`gather_features` returns)."""
        if self._unknown_features:
            raise ValueError(self._unknown_message())
        X = np.ascontiguousarray(X, dtype=np.float32)
        widths = (len(FEATURE_NAMES), len(ALL_FEATURES))
        if X.ndim != 2 or X.shape[1] not in widths:
            raise ValueError(f"X must have shape (n, {widths[0]}) (columns = FEATURE_NAMES) or (n, {widths[1]}) "
                             f"(columns = ALL_FEATURES), got {X.shape}")
        if self._uses_extended and X.shape[1] != len(ALL_FEATURES):
            raise ValueError(f"ranker {self._version} uses extended features: X must have the "
                             f"{len(ALL_FEATURES)} columns of ALL_FEATURES, got {X.shape[1]}")
        return self._forward(X, True, use_native)

    def score_features(self, X: Any, *, use_native: bool = True) -> np.ndarray:
        """Score a matrix whose columns are this model's :attr:`feature_names`."""
        X = self._matrix(X, len(self._feature_names), "ranker.feature_names")
        return self._forward(X, False, use_native)

    @staticmethod
    def _matrix(X: Any, F: int, what: str) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != F:
            raise ValueError(f"X must have shape (n, {F}) (columns = {what}), got {X.shape}")
        return X

    def _forward(self, X: np.ndarray, gathered: bool, use_native: bool) -> np.ndarray:
        """Score X: columns of the gathered layout (``gathered``) or of the model's own features."""
        impl = _native if use_native else _twin
        out = np.empty(X.shape[0], np.float32)
        if self._forest is not None:
            feature, threshold, leaf = self._forest_flat
            if gathered:
                feature = self._forest_full
            impl.forest_score(X, feature, threshold, leaf, self._forest.depth, self._forest.bias, out)
            return out
        W0 = self._W0_full[: X.shape[1]] if gathered else self._layers[0][0]
        layers = self._layers
        if self._kind == "logistic":
            impl.logistic_score(X, W0.reshape(-1), layers[0][1][0], out)
            return out
        b1 = layers[0][1]
        H1 = b1.shape[0]
        if len(layers) == 3:
            (W2, b2), (Wo, bo) = layers[1], layers[2]
            h2 = np.empty(W2.shape[1], np.float32)
        else:
            W2, b2, h2 = _EMPTY_2D, _EMPTY_1D, _EMPTY_1D
            Wo, bo = layers[1]
        impl.mlp_score(X, W0, b1, W2, b2, Wo.reshape(-1), bo[0], np.empty(H1, np.float32), h2, out)
        return out

    def _unknown_message(self) -> str:
        return (
            f"ranker {self._version} uses features this code does not compute: {self._unknown_features}; "
            f"known features: {list(ALL_FEATURES)}"
        )

    # -- persistence -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The weights file's JSON object (see :meth:`save`)."""
        if self._forest is not None:
            f = self._forest
            weights: dict[str, Any] = {
                "depth": f.depth,
                "bias": _floats([f.bias])[0],
                "trees": [{"feature": f.feature[t].tolist(), "threshold": _floats(f.threshold[t]),
                           "leaf": _floats(f.leaf[t])} for t in range(f.n_trees)],
            }
        elif self._kind == "logistic":
            W, b = self._layers[0]
            weights = {"coef": _floats(W[:, 0]), "intercept": _floats(b)[0]}
        else:
            weights = {
                "hidden": [{"weight": [_floats(r) for r in W], "bias": _floats(b)} for W, b in self._layers[:-1]],
                "output": {"weight": _floats(self._layers[-1][0][:, 0]), "bias": _floats(self._layers[-1][1])[0]},
            }
        return {
            "format_version": FORMAT_VERSION,
            "kind": self._kind,
            "version": self._version,
            "feature_names": list(self._feature_names),
            "weights": weights,
            "trained_at": self._trained_at,
            "metrics": self._metrics,
            "description": self._description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "ranker") -> "Ranker":
        """Build a ranker from a weights-file object; RankerFileError names what is wrong."""
        try:
            return cls._from_dict(data, source)
        except RankerFileError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RankerFileError(f"{source}: {detail}") from None

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], source: str) -> "Ranker":
        if not isinstance(data, Mapping):
            raise RankerFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format_version")
        if fmt != FORMAT_VERSION:
            raise RankerFileError(
                f"{source}: format_version {fmt!r} is not supported (this code reads {FORMAT_VERSION})"
            )
        kind = data["kind"]
        if kind not in KINDS:
            raise RankerFileError(f"{source}: kind must be one of {list(KINDS)}, got {kind!r}")
        names = data["feature_names"]
        if not isinstance(names, list) or not all(isinstance(f, str) for f in names):
            raise RankerFileError(f"{source}: feature_names must be a list of strings")
        dupes = sorted({f for f in names if names.count(f) > 1})
        if dupes:
            raise RankerFileError(f"{source}: feature_names repeats {dupes}")
        unknown = [f for f in names if f not in _FEATURE_INDEX]
        if unknown:
            raise RankerFileError(
                f"{source}: the model uses features this code does not compute: {unknown} "
                f"(known features: {list(ALL_FEATURES)})"
            )
        weights = data["weights"]
        layers: Any
        if kind == "gbdt":
            depth = weights["depth"]
            trees = weights["trees"]
            if not isinstance(trees, list):
                raise RankerFileError(f"{source}: weights.trees must be a list")
            if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_TREE_DEPTH:
                raise RankerFileError(f"{source}: weights.depth must be an integer in [0, {MAX_TREE_DEPTH}]")
            inner = (1 << depth) - 1
            feats = [t["feature"] for t in trees]
            if any(not isinstance(f, list) or len(f) != inner or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in f) for f in feats):
                raise RankerFileError(f"{source}: every tree's feature must be a list of {inner} integers")
            def table(key: str, width: int) -> Any:
                rows = [t[key] for t in trees]
                if any(not isinstance(r, list) or len(r) != width for r in rows):
                    raise RankerFileError(f"{source}: every tree's {key} must be a list of {width} numbers")
                return rows if rows else np.empty((0, width))

            layers = Forest.validated(depth, np.array(feats, np.int64).reshape(len(trees), inner),
                                      table("threshold", inner), table("leaf", inner + 1), weights["bias"],
                                      len(names))
        elif kind == "logistic":
            coef = _f32(weights["coef"], (len(names),), "weights.coef")
            intercept = _f32([weights["intercept"]], (1,), "weights.intercept")
            layers = [(coef.reshape(-1, 1), intercept)]
        else:
            layers = [(h["weight"], h["bias"]) for h in weights["hidden"]]
            out = weights["output"]
            n_out_in = len(out["weight"])
            layers.append((_f32(out["weight"], (n_out_in,), "weights.output.weight").reshape(-1, 1), [out["bias"]]))
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, Mapping):
            raise RankerFileError(f"{source}: metrics must be an object")
        return cls(
            kind,
            layers,
            feature_names=names,
            version=str(data["version"]) if data.get("version") else None,
            trained_at=data.get("trained_at"),
            metrics=metrics,
            description=str(data.get("description", "")),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights file (JSON, atomically: a reader never sees half a file)."""
        path = Path(path)
        text = _json_text(self.to_dict()) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Ranker":
        """Read a weights file; RankerFileError (a ValueError) says what is wrong and where."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RankerFileError(f"{path}: ranker weights file not found") from None
        except OSError as exc:
            raise RankerFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls._from_text(text, str(path))

    @classmethod
    def _from_text(cls, text: str, source: str) -> "Ranker":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RankerFileError(f"{source}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def default(cls) -> "Ranker":
        """The hand-set weights shipped as ``recsvc/data/default_ranker.json``."""
        return _default_ranker()


@lru_cache(maxsize=1)
def _default_ranker() -> Ranker:
    resource = importlib.resources.files("recsvc").joinpath("data/default_ranker.json")
    return Ranker._from_text(resource.read_text(encoding="utf-8"), "recsvc/data/default_ranker.json")


def _json_text(value: Any, indent: str = "") -> str:
    # Objects and lists of lists one entry per line; flat lists (a weight row,
    # the feature names) on one line, so an MLP file stays readable.
    inner = indent + "  "
    if isinstance(value, Mapping) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and all(isinstance(v, (list, Mapping)) for v in value):
        return "[\n" + ",\n".join(inner + _json_text(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)


def _floats(a: np.ndarray) -> list[float]:
    # Shortest decimal that round-trips to the same float32.
    return [float(str(v)) for v in np.asarray(a, np.float32).ravel()]


_EMPTY_2D = np.empty((0, 0), np.float32)
_EMPTY_1D = np.empty(0, np.float32)
