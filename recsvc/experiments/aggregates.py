"""Per-(experiment, variant) aggregates, fed by the engine and persisted by the state layer.

The engine calls :meth:`ExperimentAggregates.record_served` for every served
slate and :meth:`ExperimentAggregates.record_event` for every feedback event it
attributes (through the request id) to the arms of the request that served it.
Both take the request's ``arms`` (``Assignment.arms``); a request in several
layered experiments counts in each.

Kept per arm:

* distinct users — an exact ``dict`` (user id → row of per-user sums; about
  150 bytes per user, fine up to a few million users per arm);
* per-user slates, impressions, clicks, conversions and value (for Welch's
  test, the user-level variance of CTR and the per-user means);
* totals, plus running sums of squares and cross products of the per-user
  sums, so the mean and variance of per-user metrics are known at every point
  in time without keeping history per user;
* the same running sums for the users' pre-period values (CUPED, below) and their products with each
  other and with the experiment's counts, so the adjusted always-valid test can be evaluated at every
  daily look;
* exposure counts per catalog row (coverage, exposure concentration);
* sums and counts of per-slate intra-list diversity and novelty;
* a daily series: the cumulative totals as of the end of each UTC day
  (``now_ms // 86_400_000``) that saw an update, for plots and sequential tests.
  The series follows processing order: an update stamped earlier than the
  latest day seen (a late event) is counted in the latest day.

**Pre-period values (CUPED).** Every accepted feedback event of any user — in an experiment or not —
also goes into a per-user table of daily activity (impressions, clicks, conversions, value per UTC
day; :meth:`ExperimentAggregates.record_activity`), kept for the last ``pre_days`` days
(``experiments.cuped_pre_days``). When a user is first exposed to an arm (its first served slate
there), the arm copies that user's sums over the ``pre_days`` whole UTC days before the day of the
exposure into the user's row (``pre_impressions``, ``pre_clicks``, ``pre_conversions``,
``pre_value``): values fixed before the treatment could act, hence independent of the arm — what
CUPED (Deng et al. 2013) needs. The day of the exposure itself is left out, so an event stamped
after the exposure can never enter it. A user with no activity in the window gets zeros (still a
valid covariate value; the report says how many users had any). The table follows the log: feedback
and served slates are applied in log order live, on replay and on every replica of a shared log, so
each user's pre-period values are the same everywhere; it is part of the snapshot.

``value`` is summed for every event type (usually only conversions carry one).
Impressions are the impression events callers report; ``slates`` and
``items_served`` count what the engine served.

Thread-safe: one lock guards every method, and each record call takes a few
microseconds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["ArmData", "EVENT_TYPES", "ExperimentAggregates", "PER_USER_FIELDS", "PRE_FIELDS", "TOTAL_FIELDS",
           "DAY_MS"]

EVENT_TYPES = ("impression", "click", "conversion")
DAY_MS = 86_400_000
_FORMAT_VERSION = 2  # 2: per-user pre-period values and the activity table (1 is still read: zeros)

#: Cumulative fields kept per arm (totals and each day of the daily series).
TOTAL_FIELDS = (
    "users",
    "slates",
    "items_served",
    "impressions",
    "clicks",
    "conversions",
    "value",
    "value_sq",  # Σ_u value_u²
    "clicks_sq",  # Σ_u clicks_u²
    "impressions_sq",  # Σ_u impressions_u²
    "clicks_x_impressions",  # Σ_u clicks_u · impressions_u
    "conversions_sq",  # Σ_u conversions_u²
    "conversions_x_impressions",  # Σ_u conversions_u · impressions_u
    "diversity_sum",
    "diversity_n",
    "novelty_sum",
    "novelty_n",
    # CUPED, for the always-valid adjusted tests: sums over users of the pre-period values (m = pre
    # impressions, x = pre clicks, k = pre conversions, v0 = pre value) and of their products with each
    # other and with the experiment's counts
    "pre_impressions",  # Σ m
    "pre_clicks",  # Σ x
    "pre_conversions",  # Σ k
    "pre_value",  # Σ v0
    "pre_impressions_sq",  # Σ m²
    "pre_clicks_sq",  # Σ x²
    "pre_clicks_x_pre_impressions",  # Σ x m
    "pre_conversions_sq",  # Σ k²
    "pre_conversions_x_pre_impressions",  # Σ k m
    "pre_value_sq",  # Σ v0²
    "clicks_x_pre_clicks",  # Σ clicks · x
    "clicks_x_pre_impressions",  # Σ clicks · m
    "impressions_x_pre_clicks",  # Σ impressions · x
    "impressions_x_pre_impressions",  # Σ impressions · m
    "conversions_x_pre_conversions",  # Σ conversions · k
    "conversions_x_pre_impressions",  # Σ conversions · m
    "impressions_x_pre_conversions",  # Σ impressions · k
    "value_x_pre_value",  # Σ value · v0
)
(
    _USERS, _SLATES, _ITEMS, _IMPR, _CLICKS, _CONV, _VALUE, _VALUE_SQ, _CLICKS_SQ, _IMPR_SQ, _CLICKS_X_IMPR,
    _CONV_SQ, _CONV_X_IMPR, _DIV_SUM, _DIV_N, _NOV_SUM, _NOV_N,
    _PRE_M, _PRE_X, _PRE_K, _PRE_V, _PRE_MM, _PRE_XX, _PRE_XM, _PRE_KK, _PRE_KM, _PRE_VV,
    _Y_X, _Y_M, _N_X, _N_M, _C_K, _C_M, _N_K, _VAL_V0,
) = range(len(TOTAL_FIELDS))
#: Fields added in format version 2 (read as zeros from a version-1 snapshot, which had no pre-periods).
_V2_TOTAL_FIELDS = frozenset(TOTAL_FIELDS[_PRE_M:])
PER_USER_FIELDS = ("slates", "impressions", "clicks", "conversions", "value",
                   "pre_impressions", "pre_clicks", "pre_conversions", "pre_value")
_U_SLATES, _U_IMPRESSIONS, _U_CLICKS, _U_CONVERSIONS, _U_VALUE, _U_PRE_M, _U_PRE_X, _U_PRE_K, _U_PRE_V = range(9)
#: The per-user pre-period fields (CUPED covariates), in the order of the activity table's day rows.
PRE_FIELDS = PER_USER_FIELDS[5:]
_ACTIVITY_INDEX = {"impression": 0, "click": 1, "conversion": 2}


@dataclass(frozen=True)
class ArmData:
    """A consistent copy of one arm's aggregates (what the report reads)."""

    experiment: str
    variant: str
    totals: dict[str, float]
    per_user: dict[str, np.ndarray]  # PER_USER_FIELDS → float64[users]
    exposure: np.ndarray  # int64 counts of the rows served at least once
    days: np.ndarray  # int64 UTC day numbers, ascending
    daily: dict[str, np.ndarray]  # TOTAL_FIELDS → float64[len(days)], cumulative
    pre_days: int = 0  # the pre-period (days before first exposure) of the latest first exposure; 0 = none


class _Arm:
    __slots__ = ("users", "totals", "exposure", "daily", "last_day", "pre_days")

    def __init__(self) -> None:
        # user id -> [slates, impressions, clicks, conversions, value]; plain lists because
        # scalar updates on them cost a tenth of numpy's, at similar memory per user.
        self.users: dict[str, list] = {}
        self.totals = [0.0] * len(TOTAL_FIELDS)  # a list: scalar updates are 10x cheaper than numpy's
        self.exposure: dict[int, int] = {}  # catalog row -> times served
        self.daily: dict[int, list[float]] = {}
        self.last_day: int | None = None
        self.pre_days = 0

    def roll(self, now_ms: int) -> None:
        day = now_ms // DAY_MS
        if self.last_day is None:
            self.last_day = day
        elif day > self.last_day:
            self.daily[self.last_day] = list(self.totals)
            self.last_day = day

    def user(self, user_id: str, pre: Sequence[float] = (0, 0, 0, 0.0)) -> list:
        row = self.users.get(user_id)
        if row is None:
            row = self.users[user_id] = [0, 0, 0, 0, 0.0, *pre]
            t = self.totals
            t[_USERS] += 1
            m, x, k, v0 = pre
            if m or x or k or v0:
                t[_PRE_M] += m
                t[_PRE_X] += x
                t[_PRE_K] += k
                t[_PRE_V] += v0
                t[_PRE_MM] += m * m
                t[_PRE_XX] += x * x
                t[_PRE_XM] += x * m
                t[_PRE_KK] += k * k
                t[_PRE_KM] += k * m
                t[_PRE_VV] += v0 * v0
        return row

    def series(self) -> tuple[np.ndarray, np.ndarray]:
        days = sorted(self.daily)
        rows = [self.daily[d] for d in days]
        if self.last_day is not None:
            days.append(self.last_day)
            rows.append(self.totals)
        matrix = np.array(rows, dtype=np.float64).reshape(len(days), len(TOTAL_FIELDS))
        return np.array(days, dtype=np.int64), matrix


class ExperimentAggregates:
    """Per-(experiment, variant) counters; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arms: dict[tuple[str, str], _Arm] = {}
        # user id -> UTC day -> [impressions, clicks, conversions, value] (CUPED pre-periods)
        self._activity: dict[str, dict[int, list[float]]] = {}
        self._activity_day: int | None = None  # the latest day seen by record_activity

    # ------------------------------------------------------------------ recording

    def record_served(
        self,
        arms: Sequence[tuple[str, str]],
        user_id: str,
        item_rows,
        now_ms: int,
        diversity: float | None = None,
        novelty: float | None = None,
        pre_days: int = 0,
    ) -> None:
        """Count one served slate: catalog ``item_rows`` (int array), its intra-list
        ``diversity`` and mean self-information ``novelty`` (both optional, precomputed).

        A user new to an arm gets, as pre-period values, their activity over the ``pre_days`` UTC days
        before ``now_ms``'s day (see the module docstring; 0: none)."""
        if not arms:
            return
        rows = np.asarray(item_rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(f"item_rows must be a 1-D integer array, got shape {rows.shape} dtype {rows.dtype}")
        row_list = rows.tolist()
        if row_list and min(row_list) < 0:
            raise ValueError("item_rows must be non-negative catalog rows")
        diversity = _optional_finite(diversity, "diversity")
        novelty = _optional_finite(novelty, "novelty")
        arm_keys = _check_arms(arms)
        with self._lock:
            for key in arm_keys:
                arm = self._arm(key)
                arm.roll(now_ms)
                row = arm.users.get(user_id)
                if row is None:
                    row = arm.user(user_id, self._pre_values(user_id, now_ms // DAY_MS, pre_days))
                    arm.pre_days = pre_days
                row[_U_SLATES] += 1
                t = arm.totals
                t[_SLATES] += 1
                t[_ITEMS] += len(row_list)
                exposure = arm.exposure
                for r in row_list:
                    exposure[r] = exposure.get(r, 0) + 1
                if diversity is not None:
                    t[_DIV_SUM] += diversity
                    t[_DIV_N] += 1
                if novelty is not None:
                    t[_NOV_SUM] += novelty
                    t[_NOV_N] += 1

    def record_event(
        self,
        arms: Sequence[tuple[str, str]],
        user_id: str,
        event_type: str,
        value: float,
        now_ms: int,
    ) -> None:
        """Count one attributed feedback event: ``"impression"``, ``"click"`` or ``"conversion"``."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"event_type must be one of {', '.join(EVENT_TYPES)}; got {event_type!r}")
        value = _optional_finite(value, "value") or 0.0
        if not arms:
            return
        arm_keys = _check_arms(arms)
        with self._lock:
            for key in arm_keys:
                arm = self._arm(key)
                arm.roll(now_ms)
                pu, t = arm.user(user_id), arm.totals
                n, c, k, v = pu[_U_IMPRESSIONS], pu[_U_CLICKS], pu[_U_CONVERSIONS], pu[_U_VALUE]
                pm, px, pk, pv = pu[_U_PRE_M], pu[_U_PRE_X], pu[_U_PRE_K], pu[_U_PRE_V]
                if event_type == "impression":
                    pu[_U_IMPRESSIONS] = n + 1
                    t[_IMPR] += 1
                    t[_IMPR_SQ] += 2 * n + 1
                    t[_CLICKS_X_IMPR] += c
                    t[_CONV_X_IMPR] += k
                    t[_N_X] += px
                    t[_N_M] += pm
                    t[_N_K] += pk
                elif event_type == "click":
                    pu[_U_CLICKS] = c + 1
                    t[_CLICKS] += 1
                    t[_CLICKS_SQ] += 2 * c + 1
                    t[_CLICKS_X_IMPR] += n
                    t[_Y_X] += px
                    t[_Y_M] += pm
                else:
                    pu[_U_CONVERSIONS] = k + 1
                    t[_CONV] += 1
                    t[_CONV_SQ] += 2 * k + 1
                    t[_CONV_X_IMPR] += n
                    t[_C_K] += pk
                    t[_C_M] += pm
                if value:
                    pu[_U_VALUE] = v + value
                    t[_VALUE] += value
                    t[_VALUE_SQ] += value * (2 * v + value)
                    t[_VAL_V0] += value * pv

    def record_activity(
        self, user_id: str, labels: Sequence[str], value: float, ts_ms: int, pre_days: int
    ) -> None:
        """Count one accepted feedback event of any user in the activity table (CUPED pre-periods):
        ``labels`` are what it counts as (``"impression"``, ``"click"``, ``"conversion"``; see
        :func:`recsvc.state.records.count_for_experiment`), ``value`` goes with it, on the UTC day of
        ``ts_ms``. Days older than ``pre_days`` before the latest day seen are dropped (an event stamped
        that far back is ignored); ``pre_days`` = 0 keeps nothing."""
        if pre_days <= 0 or not labels:
            return
        value = _optional_finite(value, "value") or 0.0
        day = int(ts_ms) // DAY_MS
        with self._lock:
            latest = self._activity_day
            if latest is None or day > latest:
                self._activity_day = latest = day
                self._prune_activity(day - pre_days)
            if day < latest - pre_days:
                return
            days = self._activity.get(user_id)
            if days is None:
                days = self._activity[user_id] = {}
            row = days.get(day)
            if row is None:
                row = days[day] = [0, 0, 0, 0.0]
            for label in labels:
                row[_ACTIVITY_INDEX[label]] += 1
            if value:
                row[3] += value

    def activity_users(self) -> int:
        """Users in the activity table (memory: about 250 bytes per user-day)."""
        with self._lock:
            return len(self._activity)

    def _prune_activity(self, oldest_day: int) -> None:
        """Drop days before ``oldest_day`` (once per new day: O(users in the table))."""
        empty = []
        for user, days in self._activity.items():
            for d in [d for d in days if d < oldest_day]:
                del days[d]
            if not days:
                empty.append(user)
        for user in empty:
            del self._activity[user]

    def _pre_values(self, user_id: str, day0: int, pre_days: int) -> list:
        """A user's activity summed over the days [day0 - pre_days, day0)."""
        out = [0, 0, 0, 0.0]
        days = self._activity.get(user_id) if pre_days > 0 else None
        if days:
            for d, row in days.items():
                if day0 - pre_days <= d < day0:
                    for i in range(4):
                        out[i] += row[i]
        return out

    # ------------------------------------------------------------------ reading

    def arms(self) -> list[tuple[str, str]]:
        """Every (experiment, variant) with data, in first-seen order."""
        with self._lock:
            return list(self._arms)

    def variants(self, experiment: str) -> list[str]:
        with self._lock:
            return [v for e, v in self._arms if e == experiment]

    def arm_data(self, experiment: str, variant: str) -> ArmData:
        """A copy of one arm (all zeros when it has no data yet)."""
        with self._lock:
            arm = self._arms.get((experiment, variant)) or _Arm()
            matrix_u = np.array(list(arm.users.values()), dtype=np.float64).reshape(-1, len(PER_USER_FIELDS))
            exposure = np.fromiter(arm.exposure.values(), dtype=np.int64, count=len(arm.exposure))
            days, matrix = arm.series()
            totals = dict(zip(TOTAL_FIELDS, arm.totals))
            pre_days = arm.pre_days
        per_user = {name: matrix_u[:, i].copy() for i, name in enumerate(PER_USER_FIELDS)}
        daily = {name: matrix[:, i] for i, name in enumerate(TOTAL_FIELDS)}
        return ArmData(experiment, variant, totals, per_user, exposure, days, daily, pre_days)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe snapshot (lists of numbers and strings only)."""
        with self._lock:
            arms = []
            for (exp, var), arm in self._arms.items():
                rows_u = list(arm.users.values())
                exposed = sorted(arm.exposure)
                days, matrix = arm.series()
                arms.append(
                    {
                        "experiment": exp,
                        "variant": var,
                        "users": list(arm.users),  # dict order = row order
                        "pre_days": arm.pre_days,
                        "per_user": {name: [r[i] for r in rows_u] for i, name in enumerate(PER_USER_FIELDS)},
                        "totals": dict(zip(TOTAL_FIELDS, arm.totals)),
                        "exposure": {"rows": exposed, "counts": [arm.exposure[r] for r in exposed]},
                        "daily": {
                            "days": days.tolist(),
                            **{name: matrix[:, i].tolist() for i, name in enumerate(TOTAL_FIELDS)},
                        },
                    }
                )
            users = list(self._activity)
            activity = {
                "latest_day": self._activity_day,
                "users": users,
                "days": [list(self._activity[u]) for u in users],
                "values": [[list(r) for r in self._activity[u].values()] for u in users],
            }
        return {"version": _FORMAT_VERSION, "arms": arms, "activity": activity}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentAggregates":
        """Restore a :meth:`to_dict` snapshot."""
        version = data.get("version")
        if version not in (1, _FORMAT_VERSION):
            raise ValueError(
                f"experiment aggregates snapshot: unsupported version {data.get('version')!r} "
                f"(expected {_FORMAT_VERSION})"
            )
        out = cls()
        for i, a in enumerate(data.get("arms", [])):
            where = f"experiment aggregates snapshot: arms[{i}]"
            try:
                arm = _Arm()
                users = [str(u) for u in a["users"]]
                columns_u = []
                for name in PER_USER_FIELDS:
                    if version == 1 and name in PRE_FIELDS:
                        col = [0] * len(users)  # written before pre-periods were collected
                    else:
                        col = a["per_user"][name]
                    if len(col) != len(users):
                        raise ValueError(f"per_user.{name} has {len(col)} values for {len(users)} users")
                    columns_u.append([float(x) for x in col] if name in ("value", "pre_value")
                                     else [int(x) for x in col])
                arm.users = {u: list(r) for u, r in zip(users, zip(*columns_u))}
                if len(arm.users) != len(users):
                    raise ValueError("duplicate user ids")
                arm.totals = [float(a["totals"][name]) if version > 1 or name not in _V2_TOTAL_FIELDS else 0.0
                              for name in TOTAL_FIELDS]
                arm.pre_days = int(a.get("pre_days", 0))
                rows, counts = a["exposure"]["rows"], a["exposure"]["counts"]
                if len(rows) != len(counts):
                    raise ValueError("exposure rows and counts differ in length")
                arm.exposure = {int(r): int(k) for r, k in zip(rows, counts)}
                days = [int(d) for d in a["daily"]["days"]]
                columns = np.array([a["daily"][name] if version > 1 or name not in _V2_TOTAL_FIELDS
                                    else [0.0] * len(days) for name in TOTAL_FIELDS], dtype=np.float64)
                if columns.shape != (len(TOTAL_FIELDS), len(days)):
                    raise ValueError("daily series columns differ in length from days")
                if days:
                    arm.last_day = days[-1]
                    arm.daily = {d: columns[:, k].tolist() for k, d in enumerate(days[:-1])}
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"{where}: malformed ({exc})") from None
            out._arms[(str(a["experiment"]), str(a["variant"]))] = arm
        act = data.get("activity")
        if act:
            try:
                latest = act["latest_day"]
                out._activity_day = None if latest is None else int(latest)
                if not len(act["users"]) == len(act["days"]) == len(act["values"]):
                    raise ValueError("users, days and values differ in length")
                for user, days, values in zip(act["users"], act["days"], act["values"]):
                    if len(days) != len(values):
                        raise ValueError(f"user {user!r}: days and values differ in length")
                    out._activity[str(user)] = {
                        int(d): [int(v[0]), int(v[1]), int(v[2]), float(v[3])] for d, v in zip(days, values)}
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"experiment aggregates snapshot: activity: malformed ({exc})") from None
        return out

    # ------------------------------------------------------------------ internals

    def _arm(self, key: tuple[str, str]) -> _Arm:
        arm = self._arms.get(key)
        if arm is None:
            arm = self._arms[key] = _Arm()
        return arm


def _check_arms(arms: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    out = []
    for arm in arms:
        if type(arm) is tuple and len(arm) == 2 and type(arm[0]) is str and type(arm[1]) is str:
            out.append(arm)  # the common case, checked cheaply
            continue
        if not (isinstance(arm, (tuple, list)) and len(arm) == 2 and all(isinstance(x, str) for x in arm)):
            raise ValueError(f"arms must be (experiment, variant) string pairs, got {arm!r}")
        out.append((arm[0], arm[1]))
    return out


def _optional_finite(x: float | None, name: str) -> float | None:
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x

