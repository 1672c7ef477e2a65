"""Read the served-slate log back as one row per impressed item (training, off-policy evaluation).

Reads the newest snapshot and the log after it without writing anything, so it
is safe while a server owns the directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from recsvc.config import StateConfig
from recsvc.state.interface import OnlineStateReader
from recsvc.state.records import FeedbackBatch, Outcome, ServedSlate, attributed, decode, settle
from recsvc.state.store import read_state_dir

DEFAULT_ATTRIBUTION_WINDOW_S = StateConfig.model_fields["attribution_window_s"].default


@dataclass(frozen=True)
class ServedImpressions:
    """Every served item that got an impression, in log order.

    features:     float32[m, F] features logged when the item was served
    clicked:      float64[m] 1 when a click or conversion on it came back for that slate
    propensity:   float64[m] the propensity served with it
    rows:         int64[m] catalog rows
    slate:        int64[m] index of the slate (0..n_slates-1) each row came from
    position:     int64[m] position in that slate
    feature_names: names of the feature columns
    """

    features: np.ndarray
    clicked: np.ndarray
    propensity: np.ndarray
    rows: np.ndarray
    slate: np.ndarray
    position: np.ndarray
    feature_names: tuple[str, ...]
    #: per row: served in the random-exposure slice; the slice's probability for it (nan: not logged)
    random_slice: np.ndarray | None = None
    random_p: np.ndarray | None = None
    #: per row of a random-slice slate: the main policy's probability of serving the item in that request
    #: (``ServedSlate.target_propensities``); nan elsewhere and for slates logged before it existed
    target_p: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.clicked.shape[0])


def read_served_impressions(state_dir: str | Path,
                            attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S) -> ServedImpressions:
    """The served log of a state directory (newest snapshot + the log after it), outcomes rebuilt from its
    feedback with the live state's rules (:func:`recsvc.state.records.settle`, within the attribution window:
    pass the server's ``state.attribution_window_s``)."""
    _, snap_dir, records = read_state_dir(state_dir)
    window_ms = attribution_window_s * 1000.0
    served: dict[str, ServedSlate] = {}
    if snap_dir is not None and (snap_dir / "online.json").exists():
        with (snap_dir / "online.json").open(encoding="utf-8") as fh:
            for d in json.load(fh).get("served", []):
                slate = decode(dict(d, t="served"))
                served[slate.request_id] = slate  # type: ignore[union-attr]
    for raw in records:
        if raw.get("t") not in ("served", "fb"):
            continue
        rec = decode(raw)
        if isinstance(rec, ServedSlate):
            served[rec.request_id] = rec
        elif isinstance(rec, FeedbackBatch):
            for ev in rec.events:
                slate = served.get(ev.request_id) if ev.request_id else None
                if slate is None or not attributed(slate.served_at_ms, ev.ts_ms, window_ms):
                    continue
                slate.outcome[ev.row] = int(settle(slate.outcome.get(ev.row, 0), ev.type)[0])
    return impressions_from_slates(served.values(), source=str(state_dir))


def impressions_from_state(state: OnlineStateReader) -> ServedImpressions:
    """The same rows from a live engine's served slates (in-process users: ``engine.state``)."""
    return impressions_from_slates(state.served_slates(), source="the engine's served slates")


def impressions_from_slates(served: Iterable[ServedSlate], source: str = "the log") -> ServedImpressions:
    """One row per impressed item of served slates (those with logged features and some feedback)."""
    feats, clicked, props, rows, slates, positions, in_slice, rand_p, target_p = [], [], [], [], [], [], [], [], []
    names: list[str] | None = None
    n_slates = 0
    for slate in served:
        outcome = slate.outcome
        block = slate.feature_block()
        if not outcome or block is None:
            continue
        fn = list(slate.feature_names)
        if names is None:
            names = fn
        elif fn != names:
            continue  # served by a build with other features: skip rather than misalign
        took = False
        target = slate.target_propensities if len(slate.target_propensities) == len(slate.rows) else None
        for i, row in enumerate(slate.rows):
            state = int(outcome.get(row, 0))
            if state:
                feats.append(block[i])
                clicked.append(1.0 if state == Outcome.CLICKED else 0.0)
                props.append(float(slate.propensities[i]))
                rows.append(int(row))
                slates.append(n_slates)
                positions.append(i)
                in_slice.append(bool(slate.random_slice))
                rand_p.append(float("nan") if slate.random_p is None else float(slate.random_p))
                target_p.append(float("nan") if target is None else float(target[i]))
                took = True
        n_slates += took
    if not feats:
        raise ValueError(
            f"{source}: no served item with feedback; serve traffic and send impressions and "
            "clicks with their request_id first")
    return ServedImpressions(np.stack(feats), np.asarray(clicked), np.asarray(props),
                             np.asarray(rows, np.int64), np.asarray(slates, np.int64),
                             np.asarray(positions, np.int64), tuple(names or ()),
                             np.asarray(in_slice, bool), np.asarray(rand_p, np.float64),
                             np.asarray(target_p, np.float64))
