"""Stage 2: features and the learned ranker.

The engine fills one :class:`FeatureInputs` per request; :func:`gather_features`
turns it into the feature matrix ``X`` (n × F, float32) in one compiled call, and
a :class:`Ranker` (logistic regression or a small MLP, weights from a JSON file)
scores ``X`` in a second compiled call::

    ranker = Ranker.default()                       # or Ranker.load(config.ranking.model_path)
    scores = ranker.score(inputs, config.ranking.freshness_half_life_days)   # float32[n]

Feature names and order are defined once, here (:data:`FEATURE_NAMES`), and are
stored in every weights file. A file whose features are a subset of the code's
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
    "BASE_FEATURES",
    "CONTEXT_FEATURES",
    "DEVICE_VOCABULARY",
    "FEATURE_NAMES",
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
_FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
_DEVICE_INDEX = {v: i for i, v in enumerate(DEVICE_VOCABULARY)}
_HOUR_COL = len(DEVICE_VOCABULARY)

#: Version of the weights-file layout written by :meth:`Ranker.save`.
FORMAT_VERSION = 1
_MS_PER_DAY = 86_400_000.0

Kind = Literal["logistic", "mlp"]


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
    log_popularity:    float32[N]     log1p(decayed popularity)
    created_at_ms:     int64[N]       item creation times (epoch ms)
    now_ms:            int            the request's clock (epoch ms)
    categories:        int32[N]       category of each item (negative: none)
    category_affinity: float32[C]     user's share of history per category; zeros when unknown
    bandit_alpha:      float64[N]     Beta posterior alpha
    bandit_beta:       float64[N]     Beta posterior beta
    source_scores:     float32[n, S]  per-source retrieval scores, S = len(SOURCE_NAMES)
    context:           Mapping[str, str]  request context (``device``, ``hour``); bad values → zeros
    sources:           uint8[n] | None    retrieval bitmask (``Candidates.sources``); when None
                                          a source counts as present where its score is non-zero
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
    for name, arr in (
        ("log_popularity", log_pop),
        ("created_at_ms", created),
        ("categories", categories),
        ("bandit_alpha", alpha),
        ("bandit_beta", beta),
    ):
        if arr.shape[0] != N:
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
        affinity, alpha, beta, source_scores, mask, ctx,
    )  # fmt: skip


def gather_features(
    inputs: FeatureInputs, freshness_half_life_days: float, *, use_native: bool = True
) -> np.ndarray:
    """The feature matrix float32[n, len(FEATURE_NAMES)] of one request.

    Raises ValueError naming the offending input when shapes, dtypes or rows
    are wrong. ``use_native=False`` runs the numpy twin (tests, benchmarks).
    """
    args = _prepare_gather(inputs, freshness_half_life_days)
    X = np.empty((args[2].shape[0], len(FEATURE_NAMES)), np.float32)
    (_native if use_native else _twin).gather_features(*args, X)
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


class Ranker:
    """A scoring model over the feature matrix: logistic regression or an MLP.

    ``layers`` is a list of ``(W, b)`` with ``W`` of shape (inputs, outputs):
    one layer ``(F, 1)`` for ``kind="logistic"``; for ``kind="mlp"`` one or two
    ReLU hidden layers followed by an ``(H, 1)`` output layer. The output goes
    through a sigmoid, so scores are click probabilities in (0, 1).

    ``feature_names`` are the model's inputs, in the order of ``W``'s rows; they
    may be any subset of :data:`FEATURE_NAMES` in any order (mapped by name in
    :meth:`score`). Instances are immutable and safe to share across threads.
    """

    def __init__(
        self,
        kind: Kind,
        layers: Sequence[tuple[Any, Any]],
        *,
        feature_names: Sequence[str] = FEATURE_NAMES,
        version: str | None = None,
        trained_at: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        if kind not in ("logistic", "mlp"):
            raise ValueError(f"kind must be 'logistic' or 'mlp', got {kind!r}")
        names = tuple(str(f) for f in feature_names)
        if not names:
            raise ValueError("a ranker needs at least one feature")
        if len(set(names)) != len(names):
            dupes = sorted({f for f in names if names.count(f) > 1})
            raise ValueError(f"feature_names repeats {dupes}")
        n_layers = len(layers)
        if (kind == "logistic" and n_layers != 1) or (kind == "mlp" and n_layers not in (2, 3)):
            expected = "1 layer" if kind == "logistic" else "2 or 3 layers (1 or 2 hidden + output)"
            raise ValueError(f"a {kind} ranker has {expected}, got {n_layers}")
        parsed: list[tuple[np.ndarray, np.ndarray]] = []
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
        self._feature_names = names
        self._trained_at = trained_at
        self._metrics = dict(metrics or {})
        self._description = description
        self._version = version or f"{kind}-{self._fingerprint()}"
        # The first layer re-expressed over FEATURE_NAMES (zero rows for the
        # features the model does not use): scoring a gathered matrix needs no copy.
        unknown = [f for f in names if f not in _FEATURE_INDEX]
        self._unknown_features = unknown
        W0, _ = parsed[0]
        if names == FEATURE_NAMES:
            self._W0_full = W0
        elif not unknown:
            full = np.zeros((len(FEATURE_NAMES), W0.shape[1]), np.float32)
            full[[_FEATURE_INDEX[f] for f in names]] = W0
            full.setflags(write=False)
            self._W0_full = full
        else:
            self._W0_full = None

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
        """(W, b) per layer, read-only float32 arrays."""
        return self._layers

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(W.shape[1] for W, _ in self._layers[:-1])

    def __repr__(self) -> str:
        hidden = f", hidden={list(self.hidden_sizes)}" if self.hidden_sizes else ""
        return f"Ranker(kind={self._kind!r}, version={self._version!r}, features={len(self._feature_names)}{hidden})"

    def _fingerprint(self) -> str:
        h = hashlib.sha256(self._kind.encode())
        h.update("\0".join(self._feature_names).encode())
        for W, b in self._layers:
            h.update(W.tobytes())
            h.update(b.tobytes())
        return h.hexdigest()[:12]

    # -- scoring -----------------------------------------------------------
    def score(
        self, inputs: FeatureInputs, freshness_half_life_days: float, *, use_native: bool = True
    ) -> np.ndarray:
        """float32[n] click probabilities of the request's candidates (gather + score)."""
        if self._W0_full is None:
            raise ValueError(self._unknown_message())
        args = _prepare_gather(inputs, freshness_half_life_days)
        X = np.empty((args[2].shape[0], len(FEATURE_NAMES)), np.float32)
        (_native if use_native else _twin).gather_features(*args, X)
        return self._forward(X, self._W0_full, use_native)

    def score_gathered(self, X: Any, *, use_native: bool = True) -> np.ndarray:
        """Score a matrix laid out as :data:`FEATURE_NAMES` (what :func:`gather_features` returns)."""
        if self._W0_full is None:
            raise ValueError(self._unknown_message())
        return self._forward(self._matrix(X, len(FEATURE_NAMES), "FEATURE_NAMES"), self._W0_full, use_native)

    def score_features(self, X: Any, *, use_native: bool = True) -> np.ndarray:
        """Score a matrix whose columns are this model's :attr:`feature_names`."""
        X = self._matrix(X, len(self._feature_names), "ranker.feature_names")
        return self._forward(X, self._layers[0][0], use_native)

    @staticmethod
    def _matrix(X: Any, F: int, what: str) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != F:
            raise ValueError(f"X must have shape (n, {F}) (columns = {what}), got {X.shape}")
        return X

    def _forward(self, X: np.ndarray, W0: np.ndarray, use_native: bool) -> np.ndarray:
        impl = _native if use_native else _twin
        out = np.empty(X.shape[0], np.float32)
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
            f"known features: {list(FEATURE_NAMES)}"
        )

    # -- persistence -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The weights file's JSON object (see :meth:`save`)."""
        if self._kind == "logistic":
            W, b = self._layers[0]
            weights: dict[str, Any] = {"coef": _floats(W[:, 0]), "intercept": _floats(b)[0]}
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
        if kind not in ("logistic", "mlp"):
            raise RankerFileError(f"{source}: kind must be 'logistic' or 'mlp', got {kind!r}")
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
                f"(known features: {list(FEATURE_NAMES)})"
            )
        weights = data["weights"]
        if kind == "logistic":
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
