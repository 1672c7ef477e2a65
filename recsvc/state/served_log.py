"""Read the served-slate log back as one row per impressed item (training, off-policy evaluation).

Reads the newest snapshot and the log after it without writing anything, so it
is safe while a server owns the directory.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from recsvc.state.store import read_state_dir


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

    def __len__(self) -> int:
        return int(self.clicked.shape[0])


def read_served_impressions(state_dir: str | Path) -> ServedImpressions:
    _, snap_dir, records = read_state_dir(state_dir)
    served: dict[str, dict[str, Any]] = {}
    if snap_dir is not None and (snap_dir / "online.json").exists():
        with (snap_dir / "online.json").open(encoding="utf-8") as fh:
            for rec in json.load(fh).get("served", []):
                served[rec["r"]] = rec
    for rec in records:
        if rec["t"] == "served":
            served[rec["r"]] = dict(rec, o={})
        elif rec["t"] == "fb":
            for ev in rec["e"]:
                slate = served.get(ev.get("req") or "")
                if slate is None:
                    continue
                outcome = slate.setdefault("o", {})
                key = str(ev["row"])
                outcome[key] = max(int(outcome.get(key, 0)), 1 if int(ev["type"]) == 1 else 2)
    return impressions_from_records(served.values(), source=str(state_dir))


def impressions_from_state(state: Any) -> ServedImpressions:
    """The same rows from a live ``OnlineState``'s served slates (in-process users)."""
    with state.lock:
        slates = list(state.served.values())
    records = [dict(s.to_record(), o={str(k): v for k, v in s.outcome.items()}) for s in slates]
    return impressions_from_records(records, source="the engine's served slates")


def impressions_from_records(served: Iterable[dict[str, Any]], source: str = "the log") -> ServedImpressions:
    """One row per impressed item of served-slate records (keys r, rows, p, f, fn, o)."""
    feats, clicked, props, rows, slates, positions = [], [], [], [], [], []
    names: list[str] | None = None
    n_slates = 0
    for slate in served:
        outcome = slate.get("o") or {}
        if not outcome or not slate.get("f"):
            continue
        fn = list(slate.get("fn") or [])
        if names is None:
            names = fn
        elif fn != names:
            continue  # served by a build with other features: skip rather than misalign
        block = np.frombuffer(base64.b64decode(slate["f"]), np.float32).reshape(len(slate["rows"]), len(fn))
        took = False
        for i, row in enumerate(slate["rows"]):
            state = int(outcome.get(str(row), 0))
            if state:
                feats.append(block[i])
                clicked.append(1.0 if state == 2 else 0.0)
                props.append(float(slate["p"][i]))
                rows.append(int(row))
                slates.append(n_slates)
                positions.append(i)
                took = True
        n_slates += took
    if not feats:
        raise ValueError(
            f"{source}: no served item with feedback; serve traffic and send impressions and "
            "clicks with their request_id first")
    return ServedImpressions(np.stack(feats), np.asarray(clicked), np.asarray(props),
                             np.asarray(rows, np.int64), np.asarray(slates, np.int64),
                             np.asarray(positions, np.int64), tuple(names or ()))
