"""Experiment definitions and deterministic, reproducible assignment of users to variants.

Definitions live in a TOML file (``experiments.file`` in the config; a documented
example is ``examples/experiments.toml``)::

    [[experiment]]
    name = "explore_policy"            # [A-Za-z0-9][A-Za-z0-9_.-]*, unique in the file
    salt = "explore-policy-2026-01"    # unique in the file; a new salt reshuffles everyone
    start = 2026-01-10T00:00:00Z       # optional, inclusive: RFC 3339 with an offset, or epoch ms
    stop = 2026-02-10T00:00:00Z        # optional, exclusive

      [[experiment.variant]]           # the first variant is the control
      name = "control"
      weight = 1                       # positive; shares are weight / total weight

      [[experiment.variant]]
      name = "greedy"
      weight = 1
      overrides = { exploration = { policy = "greedy" } }   # any per-request config setting

Overrides are validated against the base :class:`~recsvc.config.Config` on load,
so a bad value fails at startup with the key named, e.g.
``experiments.toml: experiment.explore_policy.variant.greedy.overrides: exploration.policy: ...``.

Assignment hash — reproducible by any other system:

1. ``digest = SHA-256(UTF-8(salt + ":" + user_id))``
2. ``bucket = uint64_big_endian(digest[0:8]) mod 10000``
3. with weights w_1..w_n in declared order and W = their sum,
   ``boundary_i = floor(10000 * (w_1 + ... + w_i) / W)`` in exact arithmetic
   (``boundary_0 = 0``, ``boundary_n = 10000``); variant i owns the buckets
   ``boundary_{i-1} <= bucket < boundary_i``.

Integer weights keep step 3 trivially exact everywhere; float weights are taken
as their exact binary value (Python's ``fractions.Fraction(w)``). The modulo bias
of 2^64 mod 10000 is below 1e-15. Assignment depends on nothing but the salt,
the user id and the weights: it is stable across restarts and replicas, and
experiments with different salts are independent (SHA-256 outputs for different
inputs behave as independent uniforms). Changing weights moves only the users
whose bucket crosses a boundary.

Layering: every experiment active at ``now_ms`` (``start <= now_ms < stop``)
assigns the user independently. The request's config is the base config with
each active experiment's variant overrides applied in file order (later
experiments win on a shared key), and the variant string reported to callers is
``"experiment:variant"`` joined by ``","`` in file order, ``""`` when none is active.
"""

from __future__ import annotations

import hashlib
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from hashlib import sha256 as _sha256
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

from recsvc.config import Config, ConfigError, read_toml

__all__ = [
    "N_BUCKETS",
    "PER_REQUEST_SECTIONS",
    "PROCESS_WIDE_KEYS",
    "Assignment",
    "Experiment",
    "ExperimentSet",
    "Variant",
    "bucket_of",
    "format_variant",
    "parse_variant",
    "per_request_keys",
]

#: Hash buckets per experiment; a variant's share is a whole number of buckets.
N_BUCKETS = 10_000

#: Top-level config sections a variant may override: the ones the engine reads
#: per request. Server, catalog, index, state and experiments settings are
#: process-wide, so overriding them per user would silently do nothing.
PER_REQUEST_SECTIONS = frozenset({"retrieval", "ranking", "exploration", "reranking", "budgets", "recommend"})

#: Keys of those sections that the online state or the process reads, not a request: one value serves
#: every user (e.g. how popularity decays or how many co-occurrence neighbours an item keeps), so a
#: variant may not override them.
PROCESS_WIDE_KEYS = frozenset({
    "retrieval.popularity_half_life_days", "retrieval.cooccurrence_window", "retrieval.cooccurrence_neighbors",
    "retrieval.history_size", "exploration.discount", "exploration.seed",
})


def per_request_keys() -> list[str]:
    """Every ``section.key`` a variant may override (each is read per request, from the variant's config)."""
    return sorted(f"{s}.{k}" for s in PER_REQUEST_SECTIONS
                  for k in type(getattr(Config(), s)).model_fields if f"{s}.{k}" not in PROCESS_WIDE_KEYS)

#: Above this many arm combinations the merged configs are built lazily on first
#: use instead of all at load (each combination is validated once either way).
MAX_EAGER_COMBINATIONS = 4096

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_EXPERIMENT_KEYS = frozenset({"name", "salt", "start", "stop", "description", "variant"})
_VARIANT_KEYS = frozenset({"name", "weight", "overrides", "description"})
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)

Arm = tuple[str, str]  # (experiment name, variant name)


def bucket_of(salt: str, user_id: str) -> int:
    """The user's bucket in ``[0, N_BUCKETS)`` for an experiment with this salt (see module doc)."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % N_BUCKETS


def format_variant(arms: Sequence[Arm]) -> str:
    """``(("a", "x"), ("b", "y"))`` → ``"a:x,b:y"``; no arms → ``""``."""
    return ",".join(f"{e}:{v}" for e, v in arms)


def parse_variant(variant: str) -> tuple[Arm, ...]:
    """The inverse of :func:`format_variant` (e.g. to attribute logged responses)."""
    if not variant:
        return ()
    arms = []
    for part in variant.split(","):
        exp, sep, var = part.partition(":")
        if not sep or not exp or not var:
            raise ValueError(f"variant string {variant!r}: expected 'experiment:variant[,...]'")
        arms.append((exp, var))
    return tuple(arms)


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    overrides: Mapping[str, Any]
    buckets: tuple[int, int]  # [first, end) of the buckets this variant owns
    description: str = ""

    @property
    def share(self) -> float:
        """The exact fraction of users assigned here (buckets / N_BUCKETS)."""
        return (self.buckets[1] - self.buckets[0]) / N_BUCKETS


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    variants: tuple[Variant, ...]
    start_ms: int | None = None
    stop_ms: int | None = None
    description: str = ""
    _bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bounds", tuple(v.buckets[1] for v in self.variants))
        object.__setattr__(self, "_prefix", f"{self.salt}:".encode("utf-8"))

    @property
    def control(self) -> Variant:
        """The first declared variant; every other variant is compared against it."""
        return self.variants[0]

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(v.share for v in self.variants)

    def is_active(self, now_ms: int) -> bool:
        return (self.start_ms is None or now_ms >= self.start_ms) and (
            self.stop_ms is None or now_ms < self.stop_ms
        )

    def variant_index(self, user_id: str) -> int:
        """The index of the user's variant, regardless of the time window."""
        digest = hashlib.sha256(self._prefix + user_id.encode("utf-8")).digest()
        return bisect_right(self._bounds, int.from_bytes(digest[:8], "big") % N_BUCKETS)

    def variant_for(self, user_id: str) -> Variant:
        return self.variants[self.variant_index(user_id)]


@dataclass(frozen=True)
class Assignment:
    """The experiment arms of one request and the config they imply."""

    variant: str  # "exp:variant" joined by "," in file order; "" when no experiment is active
    arms: tuple[Arm, ...]
    config: Config


class ExperimentSet:
    """A validated set of experiments over a base config; :meth:`assign` is the hot path.

    Immutable after construction and safe to share across threads. Merged configs are
    cached per combination of arms (all combinations are built and validated at load
    when there are at most ``MAX_EAGER_COMBINATIONS``), so assignment costs a SHA-256
    per active experiment and a dict lookup.
    """

    def __init__(self, experiments: Sequence[Experiment], base_config: Config, source: str = "<experiments>"):
        self._experiments = tuple(experiments)
        self._by_name = {e.name: e for e in self._experiments}
        self._base = base_config
        self._source = source
        self._plan = tuple(
            (i, e._prefix, e._bounds, e.start_ms, e.stop_ms) for i, e in enumerate(self._experiments)
        )
        self._cache: dict[tuple[tuple[int, int], ...], Assignment] = {(): Assignment("", (), base_config)}
        n_combinations = math.prod(len(e.variants) + 1 for e in self._experiments)
        if n_combinations <= MAX_EAGER_COMBINATIONS:
            self._build_all((), base_config, 0)

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, base_config: Config | None = None) -> "ExperimentSet":
        """No experiments: every request gets the base config and variant ``""``."""
        return cls((), base_config if base_config is not None else Config(), "<no experiments>")

    @classmethod
    def load(cls, path: str | Path, base_config: Config) -> "ExperimentSet":
        """Read and validate an experiment file; raises :class:`ConfigError` naming the bad key."""
        data = read_toml(path, what="experiment file")
        return cls.from_dict(data, base_config, source=str(Path(path)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_config: Config, source: str = "<experiments>") -> "ExperimentSet":
        """Validate parsed TOML (``{"experiment": [...]}``) like :meth:`load` does."""
        return cls(_parse(data, base_config, source), base_config, source)

    # ------------------------------------------------------------------ access

    @property
    def experiments(self) -> tuple[Experiment, ...]:
        return self._experiments

    @property
    def base_config(self) -> Config:
        return self._base

    @property
    def source(self) -> str:
        return self._source

    def __len__(self) -> int:
        return len(self._experiments)

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._experiments)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Experiment:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name) or "none"
            raise KeyError(f"unknown experiment {name!r} (defined: {known})") from None

    def active(self, now_ms: int) -> tuple[Experiment, ...]:
        return tuple(e for e in self._experiments if e.is_active(now_ms))

    # ------------------------------------------------------------------ assignment

    def assign(self, user_id: str, now_ms: int) -> Assignment:
        """The user's arms in every experiment active at ``now_ms``, and the merged config."""
        uid = user_id.encode("utf-8")
        arms = []
        for i, prefix, bounds, start, stop in self._plan:
            if (start is None or now_ms >= start) and (stop is None or now_ms < stop):
                bucket = int.from_bytes(_sha256(prefix + uid).digest()[:8], "big") % N_BUCKETS
                arms.append((i, bisect_right(bounds, bucket)))
        key = tuple(arms)
        hit = self._cache.get(key)
        return hit if hit is not None else self._build(key)

    def config_for(self, arms: Sequence[Arm]) -> Config:
        """The merged config of explicit arms (in any order; applied in file order)."""
        index = {e.name: i for i, e in enumerate(self._experiments)}
        key = []
        for exp_name, var_name in arms:
            exp = self.get(exp_name)
            names = [v.name for v in exp.variants]
            if var_name not in names:
                raise KeyError(f"experiment {exp_name!r} has no variant {var_name!r} (variants: {', '.join(names)})")
            key.append((index[exp_name], names.index(var_name)))
        key_t = tuple(sorted(key))
        hit = self._cache.get(key_t)
        return (hit if hit is not None else self._build(key_t)).config

    def _build(self, key: tuple[tuple[int, int], ...]) -> Assignment:
        config = self._base
        for i, j in key:
            config = self._apply(config, key, i, j)
        arms = tuple((self._experiments[i].name, self._experiments[i].variants[j].name) for i, j in key)
        assignment = Assignment(format_variant(arms), arms, config)
        self._cache[key] = assignment  # a racing thread builds an equal value; either is fine
        return assignment

    def _build_all(self, key: tuple[tuple[int, int], ...], config: Config, start: int) -> None:
        # Depth-first over "not in / variant j" of every experiment, reusing the parent's config.
        for i in range(start, len(self._experiments)):
            for j in range(len(self._experiments[i].variants)):
                child_key = key + ((i, j),)
                child = self._apply(config, child_key, i, j)
                arms = tuple(
                    (self._experiments[a].name, self._experiments[a].variants[b].name) for a, b in child_key
                )
                self._cache[child_key] = Assignment(format_variant(arms), arms, child)
                self._build_all(child_key, child, i + 1)

    def _apply(self, config: Config, key: tuple[tuple[int, int], ...], i: int, j: int) -> Config:
        variant = self._experiments[i].variants[j]
        if not variant.overrides:
            return config
        where = " + ".join(
            f"experiment.{self._experiments[a].name}.variant.{self._experiments[a].variants[b].name}" for a, b in key
        )
        return config.with_overrides(_thaw(variant.overrides), source=f"{self._source}: {where} (combined overrides)")


# ---------------------------------------------------------------------- parsing


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _parse_time(value: Any) -> int:
    """Epoch milliseconds from an int (epoch ms), an offset datetime or an RFC 3339 string."""
    if isinstance(value, bool):
        raise ValueError("expected an RFC 3339 datetime or epoch milliseconds, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"epoch milliseconds must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an RFC 3339 datetime: {value!r}") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("datetime needs a UTC offset (RFC 3339), e.g. 2026-01-10T00:00:00Z")
        return (value - _EPOCH) // _MS
    if isinstance(value, date):
        raise ValueError("a date alone is ambiguous; give a datetime with an offset, e.g. 2026-01-10T00:00:00Z")
    raise ValueError(f"expected an RFC 3339 datetime or epoch milliseconds, got {type(value).__name__}")


def _boundaries(weights: Sequence[float]) -> list[int]:
    exact = [Fraction(w) for w in weights]
    total = sum(exact)
    out, cum = [], Fraction(0)
    for w in exact:
        cum += w
        out.append(math.floor(N_BUCKETS * cum / total))
    out[-1] = N_BUCKETS
    return out


class _Errors:
    """Collects every problem in a file, so one run reports them all."""

    def __init__(self, source: str):
        self.source = source
        self.lines: list[str] = []

    def __call__(self, key: str, msg: str) -> None:
        self.lines.append(f"{self.source}: {key}: {msg}")

    def __len__(self) -> int:
        return len(self.lines)


def _parse(data: Mapping[str, Any], base: Config, source: str) -> list[Experiment]:
    err = errors = _Errors(source)

    for key in data:
        if key != "experiment":
            err(key, "unknown key (expected [[experiment]] tables)")
    raw = data.get("experiment", [])
    if not isinstance(raw, list):
        err("experiment", "must be an array of tables ([[experiment]])")
        raw = []

    experiments: list[Experiment] = []
    seen_names: dict[str, int] = {}
    seen_salts: dict[str, str] = {}
    for i, entry in enumerate(raw):
        key = f"experiment[{i}]"
        if not isinstance(entry, dict):
            err(key, "must be a table")
            continue
        name = entry.get("name")
        if name is None:
            err(f"{key}.name", "required")
        elif not isinstance(name, str) or not _NAME_RE.match(name):
            err(f"{key}.name", f"must match [A-Za-z0-9][A-Za-z0-9_.-]* (got {name!r})")
        else:
            key = f"experiment.{name}"
            if name in seen_names:
                err(f"{key}.name", f"duplicate experiment name (also experiment[{seen_names[name]}])")
            seen_names.setdefault(name, i)
        n_errors = len(errors)
        for k in entry:
            if k not in _EXPERIMENT_KEYS:
                err(f"{key}.{k}", f"unknown key (allowed: {', '.join(sorted(_EXPERIMENT_KEYS))})")
        salt = entry.get("salt")
        if salt is None:
            err(f"{key}.salt", "required (any string, unique in the file)")
        elif not isinstance(salt, str) or not salt:
            err(f"{key}.salt", f"must be a non-empty string (got {salt!r})")
        elif salt in seen_salts:
            err(
                f"{key}.salt",
                f"same salt as experiment {seen_salts[salt]!r}; layered experiments need distinct salts "
                "to assign users independently",
            )
        else:
            seen_salts[salt] = key.removeprefix("experiment.")
        times: dict[str, int | None] = {"start": None, "stop": None}
        for t in times:
            if t in entry:
                try:
                    times[t] = _parse_time(entry[t])
                except ValueError as exc:
                    err(f"{key}.{t}", str(exc))
        if times["start"] is not None and times["stop"] is not None and times["stop"] <= times["start"]:
            err(f"{key}.stop", "must be after start")
        description = entry.get("description", "")
        if not isinstance(description, str):
            err(f"{key}.description", "must be a string")
        variants = _parse_variants(entry.get("variant"), key, base, source, err)
        if len(errors) == n_errors and isinstance(name, str) and _NAME_RE.match(name) and variants:
            experiments.append(
                Experiment(name, salt, tuple(variants), times["start"], times["stop"], description)
            )
    if errors:
        raise ConfigError("\n".join(errors.lines))
    return experiments


def _parse_variants(raw: Any, key: str, base: Config, source: str, err: _Errors) -> list[Variant]:
    if raw is None or (isinstance(raw, list) and not raw):
        err(f"{key}.variant", "at least one [[experiment.variant]] is required (the first is the control)")
        return []
    if not isinstance(raw, list):
        err(f"{key}.variant", "must be an array of tables ([[experiment.variant]])")
        return []
    parsed: list[tuple[str, float, dict[str, Any], str]] = []
    seen: set[str] = set()
    ok = True
    for j, entry in enumerate(raw):
        vkey = f"{key}.variant[{j}]"
        if not isinstance(entry, dict):
            err(vkey, "must be a table")
            ok = False
            continue
        name = entry.get("name")
        if name is None:
            err(f"{vkey}.name", "required")
            ok = False
        elif not isinstance(name, str) or not _NAME_RE.match(name):
            err(f"{vkey}.name", f"must match [A-Za-z0-9][A-Za-z0-9_.-]* (got {name!r})")
            ok = False
        else:
            vkey = f"{key}.variant.{name}"
            if name in seen:
                err(f"{vkey}.name", "duplicate variant name")
                ok = False
            seen.add(name)
        for k in entry:
            if k not in _VARIANT_KEYS:
                err(f"{vkey}.{k}", f"unknown key (allowed: {', '.join(sorted(_VARIANT_KEYS))})")
                ok = False
        weight = entry.get("weight")
        if weight is None:
            err(f"{vkey}.weight", "required (a positive number)")
            ok = False
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            math.isfinite(weight) and weight > 0
        ):
            err(f"{vkey}.weight", f"must be a positive number (got {weight!r})")
            ok = False
        overrides = entry.get("overrides", {})
        if not isinstance(overrides, dict):
            err(f"{vkey}.overrides", "must be a table, e.g. { exploration = { policy = \"greedy\" } }")
            ok = False
        else:
            bad = [s for s in overrides if s not in PER_REQUEST_SECTIONS]
            for s in bad:
                err(
                    f"{vkey}.overrides.{s}",
                    "not a per-request config section; variants may override "
                    + ", ".join(sorted(PER_REQUEST_SECTIONS)),
                )
                ok = False
            for s, keys in overrides.items():
                for k in (keys if s in PER_REQUEST_SECTIONS and isinstance(keys, dict) else ()):
                    if f"{s}.{k}" in PROCESS_WIDE_KEYS:
                        err(f"{vkey}.overrides.{s}.{k}",
                            "process-wide (the online state keeps one value for every user); set it in the "
                            "base config instead")
                        bad.append(s)
                        ok = False
            if not bad and overrides:
                try:
                    base.with_overrides(overrides, source=f"{source}: {vkey}.overrides")
                except ConfigError as exc:  # its lines already name the source and the key
                    err.lines.extend(str(exc).splitlines())
                    ok = False
        description = entry.get("description", "")
        if not isinstance(description, str):
            err(f"{vkey}.description", "must be a string")
            ok = False
        if ok:
            parsed.append((name, float(weight), overrides, description))
    if not ok:
        return []
    bounds = _boundaries([w for _, w, _, _ in parsed])
    variants, lo = [], 0
    for (name, weight, overrides, description), hi in zip(parsed, bounds):
        if hi == lo:
            err(f"{key}.variant.{name}.weight", f"too small: gets none of the {N_BUCKETS} buckets")
            return []
        variants.append(Variant(name, weight, _freeze(overrides), (lo, hi), description))
        lo = hi
    return variants
