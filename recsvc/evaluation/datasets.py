"""Dataset loaders for offline evaluation, and the Open Bandit Dataset validation of the estimators.

The interactions format
-----------------------
Every interaction data set loads into :class:`Interactions`: parallel numpy arrays, one entry per event,

=============  =========  ======================================================================
field          dtype      meaning
=============  =========  ======================================================================
``user_id``    int64      the data set's own user id (not remapped)
``item_id``    int64      the data set's own item id (not remapped)
``value``      float64    rating, count or 1.0 for implicit events
``timestamp``  int64      seconds since the Unix epoch (UTC)
``items``      ItemTable  optional: ``item_id`` int64 (sorted, unique), ``title`` and ``categories``
=============  =========  ======================================================================

Any data set in this CSV layout loads with :func:`load_interactions` (column order is free, extra columns
are ignored, the header is required)::

    interactions.csv   user_id,item_id,value,timestamp      (value optional: defaults to 1.0)
    items.csv          item_id,title,categories             (categories pipe-separated: "Comedy|Drama")

Ids must be integers. Timestamps may be integer or fractional seconds, or ISO-8601 strings
(``2019-11-24 00:03:13+00:00``; naive times are read as UTC). MovieLens (:func:`load_movielens`) is read
through the same code with its own column names. Dense indices for metrics come from ``np.unique(ids,
return_inverse=True)``.

CSV files are read with the ``csv`` module (quoted fields with commas, as in MovieLens titles, work);
malformed rows raise :class:`DatasetFormatError` naming the file and line.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.evaluation.ope import (
    BanditLog,
    Estimate,
    RewardModel,
    RidgeRewardModel,
    effective_sample_size,
    estimate_all,
    weight_diagnostics,
    importance_weights,
    on_policy_estimate,
)

__all__ = [
    "DatasetFormatError",
    "ItemTable",
    "Interactions",
    "load_interactions",
    "load_movielens",
    "temporal_split_per_user",
    "temporal_split_global",
    "load_obd",
    "validate_on_obd",
    "format_obd_report",
]


class DatasetFormatError(ValueError):
    """A data file is missing, lacks a required column, or holds a malformed row."""


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Item metadata, sorted by ``item_id``."""

    item_id: np.ndarray  # int64[M], sorted, unique
    title: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    def rows_of(self, item_ids: Any) -> np.ndarray:
        """Row of each given item id in this table; raises ``KeyError`` for unknown ids."""
        ids = np.asarray(item_ids, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.item_id, ids), max(len(self) - 1, 0))
        unknown = self.item_id[rows] != ids if len(self) else np.ones(ids.shape, dtype=bool)
        if np.any(unknown):
            raise KeyError(f"item ids not in the item table: {ids[unknown][:5].tolist()}")
        return rows

    def category_indicators(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """``(float32[M, C] 0/1 matrix, category names)`` — e.g. genre vectors for intra-list diversity."""
        names = tuple(sorted({c for cats in self.categories for c in cats}))
        col = {c: j for j, c in enumerate(names)}
        rows = [i for i, cats in enumerate(self.categories) for _ in cats]
        cols = [col[c] for cats in self.categories for c in cats]
        out = np.zeros((len(self), len(names)), dtype=np.float32)
        out[rows, cols] = 1.0
        return out, names


@dataclass(frozen=True, eq=False)
class Interactions:
    """User-item events in the documented interactions format (see the module docstring)."""

    user_id: np.ndarray  # int64[N]
    item_id: np.ndarray  # int64[N]
    value: np.ndarray  # float64[N]
    timestamp: np.ndarray  # int64[N], seconds since the epoch
    items: ItemTable | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if np.ndim(self.user_id) != 1:
            raise ValueError(f"Interactions.user_id must be 1-D, got shape {np.shape(self.user_id)}")
        n = np.shape(self.user_id)[0]
        fields = (("user_id", np.int64), ("item_id", np.int64), ("value", np.float64), ("timestamp", np.int64))
        for name, dtype in fields:
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(f"Interactions.{name} must have shape ({n},) like user_id, got {arr.shape}")
            object.__setattr__(self, name, arr.astype(dtype, copy=False))

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def n_users(self) -> int:
        """Number of distinct users."""
        return int(np.unique(self.user_id).size)

    @property
    def n_items(self) -> int:
        """Number of distinct items with at least one interaction."""
        return int(np.unique(self.item_id).size)

    def take(self, rows: Any) -> Interactions:
        """The events at the given indices or boolean mask (the item table is shared)."""
        return Interactions(self.user_id[rows], self.item_id[rows], self.value[rows], self.timestamp[rows], self.items)

    def implicit(self, min_value: float) -> Interactions:
        """Only the events with ``value >= min_value`` (e.g. ratings of 4 stars and up as positives)."""
        return self.take(self.value >= min_value)


# --------------------------------------------------------------------------------------------------
# CSV reading
# --------------------------------------------------------------------------------------------------


def _read_csv(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, list[str]]:
    """Columns by name (``required`` must exist, ``optional`` may); each a list of raw strings."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetFormatError(f"{path}: empty file, expected a header line") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {missing}; header is {header}")
        rows = [row for row in reader if row]  # blank lines are skipped
    width = len(header)
    bad = next((i for i, row in enumerate(rows) if len(row) != width), None)
    if bad is not None:
        raise DatasetFormatError(
            f"{path}: line {bad + 2} has {len(rows[bad])} fields, the header has {width}"
        )  # line numbers ignore skipped blank lines
    columns = list(zip(*rows)) if rows else [()] * width
    wanted = [c for c in (*required, *optional) if c in header]
    return {c: list(columns[header.index(c)]) for c in wanted}


def _numeric(values: list[str], dtype: type, name: str, path: Path) -> np.ndarray:
    try:
        return np.array(values, dtype=dtype)
    except ValueError:
        for i, v in enumerate(values):
            try:
                dtype(v)
            except ValueError:
                raise DatasetFormatError(
                    f"{path}: line {i + 2}: column {name!r} holds {v!r}, expected {dtype.__name__}"
                ) from None
        raise


def _timestamps(values: list[str], name: str, path: Path) -> np.ndarray:
    """Seconds since the epoch from integer, fractional or ISO-8601 strings."""
    try:
        return np.array(values, dtype=np.int64)
    except ValueError:
        pass
    try:
        return np.floor(np.array(values, dtype=np.float64)).astype(np.int64)
    except ValueError:
        pass
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):  # slow path: some (or all) values are ISO-8601
        try:
            out[i] = int(np.floor(float(v)))
            continue
        except ValueError:
            pass
        try:
            t = datetime.fromisoformat(v.strip())
        except ValueError:
            raise DatasetFormatError(
                f"{path}: line {i + 2}: column {name!r} holds {v!r}, expected epoch seconds or ISO-8601"
            ) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        out[i] = int(t.timestamp() // 1)
    return out


_UNKNOWN_ITEMS = ("drop", "raise", "keep")


def _read_interactions(
    path: Path, names: Mapping[str, str], items: ItemTable | None, unknown_items: str = "drop"
) -> Interactions:
    """``names`` maps our field names (user_id, item_id, value, timestamp) to the file's column names."""
    if unknown_items not in _UNKNOWN_ITEMS:
        raise ValueError(f"unknown_items must be one of {_UNKNOWN_ITEMS}, got {unknown_items!r}")
    cols = _read_csv(path, [names["user_id"], names["item_id"], names["timestamp"]], [names["value"]])
    n = len(cols[names["user_id"]])
    value_col = cols.get(names["value"])  # optional: implicit data sets may omit it
    data = Interactions(
        user_id=_numeric(cols[names["user_id"]], np.int64, names["user_id"], path),
        item_id=_numeric(cols[names["item_id"]], np.int64, names["item_id"], path),
        value=np.ones(n) if value_col is None else _numeric(value_col, np.float64, names["value"], path),
        timestamp=_timestamps(cols[names["timestamp"]], names["timestamp"], path),
        items=items,
    )
    if items is None or unknown_items == "keep":
        return data
    pos = np.minimum(np.searchsorted(items.item_id, data.item_id), max(len(items) - 1, 0))
    known = items.item_id[pos] == data.item_id if len(items) else np.zeros(len(data), dtype=bool)
    if known.all():
        return data
    lines = (np.flatnonzero(~known)[:5] + 2).tolist()  # header is line 1 (exact when there are no blank lines)
    message = (
        f"{path}: {int((~known).sum())} interaction(s) reference item ids missing from the item table, "
        f"e.g. item {int(data.item_id[~known][0])} (lines {lines})"
    )
    if unknown_items == "raise":
        raise DatasetFormatError(message)
    warnings.warn(f"{message}; dropping them (unknown_items='keep' keeps them)", stacklevel=3)
    return data.take(known)


def _read_items(path: Path, id_col: str, title_col: str, cat_col: str, no_category: str = "") -> ItemTable:
    cols = _read_csv(path, [id_col], [title_col, cat_col])
    ids = _numeric(cols[id_col], np.int64, id_col, path)
    n = ids.shape[0]
    titles = cols.get(title_col, [""] * n)
    raw_cats = cols.get(cat_col, [""] * n)
    cats = [tuple(c for c in s.split("|") if c and c != no_category) for s in raw_cats]
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if n > 1 and (np.diff(ids) == 0).any():
        raise DatasetFormatError(f"{path}: item id {ids[1:][np.diff(ids) == 0][0]} appears more than once")
    return ItemTable(ids, tuple(titles[i] for i in order), tuple(cats[i] for i in order))


def load_interactions(
    path: str | Path, items_path: str | Path | None = None, *, unknown_items: str = "drop"
) -> Interactions:
    """Load a data set in the documented CSV layout (``user_id,item_id[,value],timestamp`` + optional items).

    With an item table, interactions whose item id is not in it are dropped with a warning
    (``unknown_items="drop"``), rejected (``"raise"``) or kept (``"keep"``).
    """
    items = None if items_path is None else _read_items(Path(items_path), "item_id", "title", "categories")
    return _read_interactions(
        Path(path),
        {"user_id": "user_id", "item_id": "item_id", "value": "value", "timestamp": "timestamp"},
        items,
        unknown_items,
    )


def load_movielens(path: str | Path, *, unknown_items: str = "drop") -> Interactions:
    """MovieLens (``ratings.csv`` + ``movies.csv``, the "latest" layout) as :class:`Interactions`.

    ``value`` is the star rating (0.5-5); ``items`` has every movie with its title and genres
    (``"(no genres listed)"`` becomes no categories). For implicit feedback use ``.implicit(4.0)``.
    Ratings of movies absent from ``movies.csv`` are handled as in :func:`load_interactions`.
    """
    root = Path(path)
    items = _read_items(root / "movies.csv", "movieId", "title", "genres", no_category="(no genres listed)")
    return _read_interactions(
        root / "ratings.csv",
        {"user_id": "userId", "item_id": "movieId", "value": "rating", "timestamp": "timestamp"},
        items,
        unknown_items,
    )


def temporal_split_per_user(
    interactions: Interactions, *, test_fraction: float | None = None, last_n: int | None = None
) -> tuple[Interactions, Interactions]:
    """Split each user's history by time: the latest events go to test, the rest to train.

    Give exactly one of ``test_fraction`` (a user with ``n`` events puts ``floor(test_fraction * n)`` in test)
    or ``last_n``. Every user with at least two events keeps at least one in train and puts at least one in
    test; users with a single event stay in train. Ties in time keep file order (stable sort). Returns
    ``(train, test)``, each in (user, time) order.
    """
    if (test_fraction is None) == (last_n is None):
        raise ValueError("give exactly one of test_fraction and last_n")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if last_n is not None and last_n < 1:
        raise ValueError(f"last_n must be a positive integer, got {last_n}")
    order = np.lexsort((interactions.timestamp, interactions.user_id))  # by user, then time; stable
    users = interactions.user_id[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, users.shape[0]])
    if test_fraction is not None:
        n_test = np.floor(test_fraction * counts).astype(np.int64)
    else:
        n_test = np.full(counts.shape, last_n, dtype=np.int64)
    n_test = np.where(counts >= 2, np.clip(n_test, 1, counts - 1), 0)
    rank = np.arange(users.shape[0]) - np.repeat(starts, counts)  # position within the user's history
    is_test = rank >= np.repeat(counts - n_test, counts)
    return interactions.take(order[~is_test]), interactions.take(order[is_test])


def temporal_split_global(interactions: Interactions, *, test_fraction: float) -> tuple[Interactions, Interactions]:
    """Split everyone's events at one moment: the latest ``test_fraction`` of all events (by time) go to
    test, the rest to train. Every event at the cut time goes to the same side (train when the cut falls
    inside a tie), so no second is split. Users may be in test only (new after the cut) or train only.
    Returns ``(train, test)``, each in (user, time) order, like :func:`temporal_split_per_user`.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.lexsort((interactions.timestamp, interactions.user_id))
    ts = interactions.timestamp[order]
    n = ts.shape[0]
    n_train = n - int(np.floor(test_fraction * n))
    if n == 0 or n_train >= n:
        return interactions.take(order), interactions.take(order[:0])
    cut = np.sort(ts, kind="stable")[n_train - 1] if n_train > 0 else ts.min() - 1
    is_test = ts > cut
    return interactions.take(order[~is_test]), interactions.take(order[is_test])


# --------------------------------------------------------------------------------------------------
# Open Bandit Dataset
# --------------------------------------------------------------------------------------------------


def load_obd(path: str | Path, *, campaign: str = "men", include_affinity: bool = False) -> BanditLog:
    """An Open Bandit Dataset log (``<policy>/<campaign>.csv``) as a :class:`BanditLog`.

    ``path`` is the policy directory (e.g. ``.../obd-men/bts``) or the CSV itself. One row per (impression,
    position): ``action`` = item_id, ``position`` = slot (1-3), ``reward`` = click, ``propensity`` =
    propensity_score (the logging policy's probability of that item *at that position*). ``context`` is a
    one-hot encoding of the hashed ``user_feature_*`` columns (levels sorted, so the layout depends on the
    file's levels; ``feature_names`` records it), plus the ``user-item_affinity_*`` columns if
    ``include_affinity``. ``n_actions`` is the number of rows of ``item_context.csv`` when present.
    """
    p = Path(path)
    csv_path = p / f"{campaign}.csv" if p.is_dir() else p
    if not csv_path.is_file():
        raise DatasetFormatError(f"{csv_path}: file not found")
    with csv_path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    user_cols = sorted((h for h in header if h.startswith("user_feature_")), key=lambda h: int(h.rsplit("_", 1)[1]))
    aff_cols = sorted(
        (h for h in header if h.startswith("user-item_affinity_")), key=lambda h: int(h.rsplit("_", 1)[1])
    )
    cols = _read_csv(csv_path, ["item_id", "position", "click", "propensity_score"], [*user_cols, *aff_cols])
    parts: list[np.ndarray] = []
    names: list[str] = []
    for c in user_cols:
        levels, codes = np.unique(np.asarray(cols[c]), return_inverse=True)
        parts.append((codes[:, None] == np.arange(levels.size)[None, :]).astype(np.float64))
        names += [f"{c}={v}" for v in levels]
    if include_affinity and aff_cols:
        parts.append(np.column_stack([_numeric(cols[c], np.float64, c, csv_path) for c in aff_cols]))
        names += aff_cols
    action = _numeric(cols["item_id"], np.int64, "item_id", csv_path)
    item_context = csv_path.parent / "item_context.csv"
    n_actions = len(_read_csv(item_context, ["item_id"])["item_id"]) if item_context.is_file() else 0
    return BanditLog(
        action=action,
        position=_numeric(cols["position"], np.int64, "position", csv_path),
        reward=_numeric(cols["click"], np.float64, "click", csv_path),
        propensity=_numeric(cols["propensity_score"], np.float64, "propensity_score", csv_path),
        context=np.concatenate(parts, axis=1) if parts else None,
        n_actions=n_actions,
        feature_names=tuple(names) if parts else None,
    )


def validate_on_obd(
    data_dir: str | Path,
    *,
    campaign: str = "men",
    reward_model: RewardModel | None = None,
    n_folds: int = 5,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Estimate the uniform-random policy's click rate from the Thompson-sampling log, check it against
    the click rate the random policy actually achieved in its own log.

    ``data_dir`` holds ``random/`` and ``bts/``. OBD logs one row per (impression, position), and the
    propensities are per position, so the evaluation is position-wise: the target policy puts ``1/34`` on
    every item at every position (``pi[i, a] = 1 / n_actions``), the estimand is the click rate per
    (impression, position) row, and its ground truth is the random log's mean click. The positions are
    equally represented in both logs, so the two are comparable without reweighting.

    Returns a dict: ``random_ctr`` (:class:`Estimate`), ``estimates`` (``{"IPS", "SNIPS", "DM", "DR"}`` ->
    Estimate), ``relative_error`` and ``z`` (difference over the combined standard error) per estimator,
    ``by_position`` (the same comparison within each position, noisier), and diagnostics: row and click
    counts, the importance weights' mean (should be close to 1), maximum and effective sample size.
    """
    root = Path(data_dir)
    bts = load_obd(root / "bts", campaign=campaign)
    rnd = load_obd(root / "random", campaign=campaign)

    def compare(log: BanditLog, truth_rewards: np.ndarray) -> dict[str, Any]:
        pi = np.full((log.n, log.n_actions), 1.0 / log.n_actions)
        truth = on_policy_estimate(truth_rewards, confidence=confidence)
        ests = estimate_all(
            log,
            pi,
            reward_model=reward_model or RidgeRewardModel(alpha=1.0),
            n_folds=n_folds,
            confidence=confidence,
            seed=seed,
            clipped=True,
        )
        rel = {k: (e.value - truth.value) / truth.value if truth.value else float("nan") for k, e in ests.items()}
        z = {k: (e.value - truth.value) / float(np.hypot(e.stderr, truth.stderr)) for k, e in ests.items()}
        return {"random_ctr": truth, "estimates": ests, "relative_error": rel, "z": z}

    report = compare(bts, rnd.reward)
    w = importance_weights(bts, pi_logged=np.full(bts.n, 1.0 / bts.n_actions))
    report.update(
        n_bts=bts.n,
        n_random=rnd.n,
        clicks_bts=int(bts.reward.sum()),
        clicks_random=int(rnd.reward.sum()),
        bts_ctr=on_policy_estimate(bts.reward, confidence=confidence),
        weight_mean=on_policy_estimate(w, confidence=confidence),
        weight_max=float(w.max()),
        effective_sample_size=effective_sample_size(w),
        diagnostics=weight_diagnostics(w),
    )
    if bts.position is not None and rnd.position is not None:
        report["by_position"] = {
            int(pos): compare(bts.take(bts.position == pos), rnd.reward[rnd.position == pos])
            for pos in np.unique(bts.position)
        }
    return report


def format_obd_report(report: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`validate_on_obd`'s report."""

    def fmt(e: Estimate) -> str:
        return f"{e.value:.5f}  [{e.ci_low:.5f}, {e.ci_high:.5f}]  se {e.stderr:.5f}"

    lines = [
        f"random-log CTR (truth): {fmt(report['random_ctr'])}  "
        f"({report['clicks_random']} clicks / {report['n_random']} rows)",
        f"bts-log CTR (logging policy, on-policy): {fmt(report['bts_ctr'])}  "
        f"({report['clicks_bts']} clicks / {report['n_bts']} rows)",
        f"weights: mean {fmt(report['weight_mean'])}, max {report['weight_max']:.1f}, "
        f"ESS {report['effective_sample_size']:.0f}",
    ]
    diag = report.get("diagnostics")
    if diag is not None:
        lines.append(f"largest weights {', '.join(f'{x:.3g}' for x in diag.largest_weights)} "
                     f"({diag.largest_share:.1%} of the total weight)")
        lines += [f"WARNING: {w}" for w in diag.warnings]
    for name, e in report["estimates"].items():
        lines.append(
            f"{name:>5}: {fmt(e)}  rel.err {report['relative_error'][name]:+.1%}  z {report['z'][name]:+.2f}"
        )
    for pos, sub in report.get("by_position", {}).items():
        lines.append(f"position {pos}: random CTR {fmt(sub['random_ctr'])}")
        for name, e in sub["estimates"].items():
            lines.append(f"   {name:>5}: {fmt(e)}  rel.err {sub['relative_error'][name]:+.1%}  z {sub['z'][name]:+.2f}")
    return "\n".join(lines)
