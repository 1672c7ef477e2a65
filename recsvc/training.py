"""Offline training of the ranker from logged impressions.

Everything is array-based and plain numpy (scipy is a test-only dependency)::

    examples = examples_from_log(logged_features, clicked, propensities)
    ranker, metrics = train_ranker(examples.X, examples.y, examples.propensity, kind="logistic")
    ranker.save("ranker.json")          # then point ranking.model_path at it

* ``kind="logistic"``: L2-regularised logistic regression fitted by Newton's
  method (IRLS) with a backtracking line search; converges in a few iterations.
* ``kind="mlp"``: one or two ReLU hidden layers, sigmoid output, full numpy
  backprop with Adam on mini-batches.
* ``kind="gbdt"`` (:func:`train_gbdt`): gradient-boosted trees by LightGBM (the
  optional ``recsvc[train]`` extra) with a learning-to-rank objective
  (LambdaRank) over groups (a request's candidates, or a served slate), exported
  to complete trees that ``recsvc.ranking`` scores in compiled code, then
  calibrated (Platt scaling folded into the leaves) so scores are probabilities.

**Inverse propensity weighting.** A log only shows what the logging policy
chose to show. With ``ipw=True`` each example is weighted by ``1 / p`` (``p``
clipped below at ``min_propensity``, weights normalised to mean 1), so the fit
targets the loss over *all* candidates rather than over the ones the old policy
liked. Without it, anything the policy knew but the features do not (and that
affects clicks) leaks into the weights.

Features are standardised for fitting and the standardisation is folded back
into the first layer, so the saved weights apply to raw features.

:func:`default_ranker` builds the hand-set weights shipped as
``recsvc/data/default_ranker.json``; :func:`write_default_ranker` (or
``python -m recsvc.training``) regenerates that file.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsvc.ranking import FEATURE_NAMES, MAX_TREE_DEPTH, Forest, Ranker

__all__ = [
    "DEFAULT_COEFFICIENTS",
    "GBDT_PARAMS",
    "TrainingExamples",
    "default_ranker",
    "examples_from_log",
    "forest_from_lightgbm",
    "log_loss",
    "roc_auc",
    "train_gbdt",
    "train_ranker",
    "write_default_ranker",
]


# --------------------------------------------------------------------------
# Metrics


def roc_auc(y: Any, scores: Any, sample_weight: Any = None) -> float:
    """Area under the ROC curve via ranks (the Mann-Whitney statistic).

    Tied scores count one half. Labels >= 0.5 are positives. With
    ``sample_weight`` each example counts with its weight (the weighted
    probability that a positive outranks a negative). NaN when a class is absent.
    """
    y = np.asarray(y, np.float64).ravel() >= 0.5
    s = np.asarray(scores, np.float64).ravel()
    w = np.ones(s.shape[0]) if sample_weight is None else np.asarray(sample_weight, np.float64).ravel()
    if not (y.shape == s.shape == w.shape):
        raise ValueError(f"y, scores and sample_weight must have one entry each, got {y.shape}, {s.shape}, {w.shape}")
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[order]
    # group ties: every member of a tie group shares the group's average rank
    new_group = np.empty(s.shape[0], bool)
    new_group[:1] = True
    new_group[1:] = s[1:] != s[:-1]
    group = np.cumsum(new_group) - 1
    n_groups = int(group[-1]) + 1 if group.size else 0
    pos = np.bincount(group, weights=w * y, minlength=n_groups)
    neg = np.bincount(group, weights=w * ~y, minlength=n_groups)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (total_pos * total_neg))


def log_loss(y: Any, p: Any, sample_weight: Any = None) -> float:
    """Mean binary cross-entropy (weighted mean with ``sample_weight``); p clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(y, np.float64).ravel()
    p = np.clip(np.asarray(p, np.float64).ravel(), 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    if sample_weight is None:
        return float(loss.mean()) if loss.size else float("nan")
    w = np.asarray(sample_weight, np.float64).ravel()
    return float((w * loss).sum() / w.sum()) if w.sum() > 0 else float("nan")


# --------------------------------------------------------------------------
# Examples from the feedback log


@dataclass(frozen=True)
class TrainingExamples:
    """Arrays ready for :func:`train_ranker`: X float32[m, F], y float64[m] in [0, 1],
    propensity float64[m] in (0, 1], and the names of X's columns."""

    X: np.ndarray
    y: np.ndarray
    propensity: np.ndarray
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def examples_from_log(
    features: Any,
    labels: Any,
    propensities: Any,
    *,
    rows: Any = None,
    feature_names: Sequence[str] | None = None,
    target_features: Sequence[str] = FEATURE_NAMES,
) -> TrainingExamples:
    """Training arrays from logged impressions.

    features:     float[m, F'] the features each impression was served with (one row
                  per impression; what ``recsvc.ranking.gather_features`` produced),
                  or, with ``rows``, a per-item table float[N, F'] looked up at ``rows``.
    labels:       [m] click (or any reward in [0, 1]) per impression.
    propensities: [m] probability that the logging policy served the item there, in (0, 1].
    rows:         optional int[m] catalog rows, to use ``features`` as a per-item table.
    feature_names: names of ``features``' columns (default: ``FEATURE_NAMES``); columns
                  are mapped by name onto ``target_features``, extra columns are dropped,
                  and a missing one is an error that names it.
    """
    table = np.asarray(features, dtype=np.float32)
    if table.ndim != 2:
        raise ValueError(f"features must be 2-D, got shape {table.shape}")
    names = tuple(FEATURE_NAMES if feature_names is None else feature_names)
    if len(names) != table.shape[1]:
        raise ValueError(f"features has {table.shape[1]} columns but {len(names)} feature names")
    target = tuple(target_features)
    missing = [f for f in target if f not in names]
    if missing:
        raise ValueError(f"the log lacks features {missing}; it has {list(names)}")
    if rows is not None:
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise ValueError("rows must be a 1-D integer array")
        if rows.size and (rows.min() < 0 or rows.max() >= table.shape[0]):
            raise ValueError(f"rows must index the feature table's {table.shape[0]} rows")
        table = table[rows]
    X = table if names == target else table[:, [names.index(f) for f in target]]
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise ValueError(f"features contain NaN or infinity (first at example {bad})")
    y, p = _labels_and_propensities(labels, propensities, X.shape[0])
    return TrainingExamples(X, y, p, target)


def _labels_and_propensities(labels: Any, propensities: Any, m: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.shape[0] != m:
        raise ValueError(f"labels has {y.shape[0]} entries but there are {m} examples")
    if not ((y >= 0) & (y <= 1)).all():
        bad = int(np.flatnonzero(~((y >= 0) & (y <= 1)))[0])
        raise ValueError(f"labels must be in [0, 1]; label[{bad}] = {float(y[bad])!r}")
    if propensities is None:
        return y, np.ones(m)
    p = np.asarray(propensities, dtype=np.float64).ravel()
    if p.shape[0] != m:
        raise ValueError(f"propensity has {p.shape[0]} entries but there are {m} examples")
    ok = (p > 0) & (p <= 1)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"propensities must be in (0, 1]; propensity[{bad}] = {float(p[bad])!r} "
            f"({int((~ok).sum())} bad in total)"
        )
    return y, p


# --------------------------------------------------------------------------
# Training


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def train_ranker(
    X: Any,
    y: Any,
    propensity: Any = None,
    *,
    kind: Literal["logistic", "mlp"] = "logistic",
    ipw: bool = True,
    l2: float = 1e-4,
    epochs: int | None = None,
    seed: int = 0,
    hidden: Sequence[int] = (32,),
    learning_rate: float = 3e-3,
    batch_size: int = 256,
    holdout_fraction: float = 0.2,
    min_propensity: float = 0.01,
    feature_names: Sequence[str] = FEATURE_NAMES,
    trained_at: _dt.datetime | None = None,
    version: str | None = None,
) -> tuple[Ranker, dict[str, Any]]:
    """Fit a ranker on logged examples; returns the ranker and its metrics.

    X: float[n, F] features (columns ``feature_names``); y: [n] labels in [0, 1];
    propensity: [n] logging propensities in (0, 1] (None: all 1).
    ipw: weight examples by 1 / max(propensity, min_propensity), normalised to mean 1.
    l2: penalty on the (standardised) weights, not on biases; a fraction of the mean loss.
    epochs: Newton iterations at most (logistic, default 50) or passes over the
    data (mlp, default 40). hidden: MLP hidden sizes (one or two layers).
    A random ``holdout_fraction`` (seeded) is held out for the reported metrics.

    metrics: n_train, n_holdout, positive_rate, effective_sample_size (Kish, of the
    training weights), train_log_loss, holdout_log_loss, holdout_auc (unweighted:
    the logged distribution) and, with ipw, holdout_log_loss_ipw / holdout_auc_ipw
    (weighted: estimates for showing every candidate), plus the settings used.
    """
    if kind not in ("logistic", "mlp"):
        raise ValueError(f"kind must be 'logistic' or 'mlp', got {kind!r}")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, F), got shape {X.shape}")
    n, F = X.shape
    names = tuple(feature_names)
    if len(names) != F:
        raise ValueError(f"X has {F} columns but there are {len(names)} feature_names")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinity")
    y, p = _labels_and_propensities(y, propensity, n)
    if n < 2:
        raise ValueError(f"need at least 2 examples, got {n}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if not 0.0 < min_propensity <= 1.0:
        raise ValueError(f"min_propensity must be in (0, 1], got {min_propensity}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    hidden = tuple(int(h) for h in hidden)
    if kind == "mlp" and (len(hidden) not in (1, 2) or min(hidden) < 1):
        raise ValueError(f"hidden must be one or two positive layer sizes, got {hidden}")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_hold = int(round(n * holdout_fraction)) if n >= 10 else 0
    hold, train = perm[:n_hold], perm[n_hold:]
    w = 1.0 / np.maximum(p, min_propensity) if ipw else np.ones(n)
    w = w / w[train].mean()

    Xt, yt, wt = X[train], y[train], w[train]
    if yt.min() == yt.max():
        raise ValueError(f"the training labels are all {yt[0]:g}: nothing to learn")
    mu = Xt.mean(axis=0)
    sd = Xt.std(axis=0)
    sd[sd < 1e-8] = 1.0
    Z = (Xt - mu) / sd

    fit: dict[str, Any]
    if kind == "logistic":
        theta, fit = _fit_logistic(Z, yt, wt, l2, 50 if epochs is None else int(epochs))
        coef = theta[:F] / sd
        intercept = theta[F] - float((theta[:F] * mu / sd).sum())
        layers = [(coef.reshape(-1, 1), [intercept])]
    else:
        params, fit = _fit_mlp(Z, yt, wt, l2, 40 if epochs is None else int(epochs), hidden, learning_rate, batch_size, rng)
        (W1, b1), rest = params[0], params[1:]
        layers = [(W1 / sd[:, None], b1 - (mu / sd) @ W1)] + [(W, b) for W, b in rest]

    when = (trained_at or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    draft = Ranker(kind, layers, feature_names=names)
    pred_train = draft.score_features(Xt)
    metrics: dict[str, Any] = {
        "kind": kind,
        "n_train": int(train.size),
        "n_holdout": int(hold.size),
        "positive_rate": float(yt.mean()),
        "ipw": bool(ipw),
        "min_propensity": float(min_propensity),
        "effective_sample_size": float(wt.sum() ** 2 / (wt**2).sum()),
        "l2": float(l2),
        **fit,
        "train_log_loss": log_loss(yt, pred_train),
    }
    if hold.size:
        pred = draft.score_features(X[hold])
        metrics["holdout_log_loss"] = log_loss(y[hold], pred)
        metrics["holdout_auc"] = roc_auc(y[hold], pred)
        if ipw:
            metrics["holdout_log_loss_ipw"] = log_loss(y[hold], pred, w[hold])
            metrics["holdout_auc_ipw"] = roc_auc(y[hold], pred, w[hold])
    metrics = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
    ranker = Ranker(
        kind,
        layers,
        feature_names=names,
        version=version,
        trained_at=when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        metrics=metrics,
        description=f"trained by recsvc.training.train_ranker on {n} logged examples",
    )
    return ranker, metrics


def _fit_logistic(
    Z: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float, max_iter: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Newton/IRLS on mean weighted log loss + l2/2 |coef|^2 (intercept last, unpenalised)."""
    n, F = Z.shape
    A = np.hstack([Z, np.ones((n, 1))])
    reg = np.full(F + 1, l2)
    reg[F] = 0.0
    W = w.sum()
    theta = np.zeros(F + 1)
    ybar = float((w * y).sum() / W)
    theta[F] = np.log(ybar / (1 - ybar)) if 0 < ybar < 1 else 0.0

    def objective(t: np.ndarray) -> float:
        z = A @ t
        return float((w * (np.logaddexp(0.0, z) - y * z)).sum() / W + 0.5 * (reg * t * t).sum())

    f = objective(theta)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        prob = _sigmoid(A @ theta)
        grad = A.T @ (w * (prob - y)) / W + reg * theta
        # einsum, not a BLAS gemm: the (F, n) @ (n, F) product is tiny in flops
        # but makes multithreaded BLAS thrash on a busy machine (100x slower).
        hess = np.einsum("ni,n,nj->ij", A, w * prob * (1 - prob) / W, A) + np.diag(reg + 1e-10)
        step = np.linalg.solve(hess, grad)
        decrease = float(grad @ step)
        t = 1.0
        while True:
            cand = theta - t * step
            f_new = objective(cand)
            if f_new <= f - 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        theta, f_prev, f = cand, f, f_new
        if np.abs(t * step).max() < 1e-8 or f_prev - f < 1e-12:
            converged = True
            break
    return theta, {"iterations": it, "converged": converged, "objective": f}


def _fit_mlp(
    Z: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    l2: float,
    epochs: int,
    hidden: tuple[int, ...],
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Mini-batch Adam on weighted log loss; ReLU hidden layers, sigmoid output."""
    n, F = Z.shape
    sizes = (F, *hidden, 1)
    params: list[list[np.ndarray]] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        scale = np.sqrt((2.0 if i < len(hidden) else 1.0) / a)
        params.append([rng.normal(0.0, scale, (a, b)), np.zeros(b)])
    ybar = float((w * y).sum() / w.sum())
    params[-1][1][0] = np.log(ybar / (1 - ybar)) if 0 < ybar < 1 else 0.0
    m_ = [[np.zeros_like(t) for t in layer] for layer in params]
    v_ = [[np.zeros_like(t) for t in layer] for layer in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    batch_size = max(1, min(int(batch_size), n))
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb, wb = Z[idx], y[idx], w[idx]
            acts = [xb]
            for W_, b_ in params[:-1]:
                acts.append(np.maximum(acts[-1] @ W_ + b_, 0.0))
            z = acts[-1] @ params[-1][0] + params[-1][1]
            delta = (wb * (_sigmoid(z[:, 0]) - yb) / wb.sum())[:, None]
            grads: list[tuple[np.ndarray, np.ndarray]] = []
            for li in range(len(params) - 1, -1, -1):
                W_ = params[li][0]
                grads.append((acts[li].T @ delta + l2 * W_, delta.sum(axis=0)))
                if li:
                    delta = (delta @ W_.T) * (acts[li] > 0)
            grads.reverse()
            step += 1
            c1, c2 = 1 - b1**step, 1 - b2**step
            for li, (gW, gb) in enumerate(grads):
                for j, g in enumerate((gW, gb)):
                    m_[li][j] = b1 * m_[li][j] + (1 - b1) * g
                    v_[li][j] = b2 * v_[li][j] + (1 - b2) * g * g
                    params[li][j] -= lr * (m_[li][j] / c1) / (np.sqrt(v_[li][j] / c2) + eps)
    return [(W_, b_) for W_, b_ in params], {"epochs": epochs, "steps": step, "learning_rate": lr, "hidden": list(hidden)}


# --------------------------------------------------------------------------
# Gradient-boosted trees (LightGBM), exported for the compiled scorer

#: LightGBM settings of :func:`train_gbdt` (chosen on the validation window of ``recsvc evaluate``):
#: shallow trees, strong regularisation and few rounds, because a request's candidates are many but
#: its positives few. ``max_depth`` bounds the exported complete trees (2^depth leaves each).
GBDT_PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": 5,
    "min_data_in_leaf": 200,
    "lambda_l2": 10.0,
    "feature_fraction": 0.7,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambdarank_truncation_level": 20,
}
GBDT_ROUNDS = 60


def _lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kind='gbdt' trains with LightGBM, an optional dependency: pip install 'recsvc[train]'"
        ) from None
    return lightgbm


def forest_from_lightgbm(model: Any, *, scale: float = 1.0, shift: float = 0.0) -> Forest:
    """The trees of a LightGBM model (a ``Booster`` or its ``dump_model()`` dict) as a :class:`Forest`.

    The score ``sigmoid(bias + sum of leaves)`` of the result is ``sigmoid(shift + scale * raw)`` where
    ``raw`` is LightGBM's raw prediction. Thresholds are rounded down to float32, which keeps every
    comparison of a float32 feature exactly as LightGBM makes it in double. Only numerical splits are
    exported: a categorical split, or zero-as-missing handling, raises ValueError.
    """
    dump = model.dump_model() if hasattr(model, "dump_model") else model
    trees = [t["tree_structure"] for t in dump.get("tree_info", [])]

    def depth_of(node: Mapping[str, Any]) -> int:
        if "leaf_value" in node or "split_index" not in node:
            return 0
        return 1 + max(depth_of(node["left_child"]), depth_of(node["right_child"]))

    depth = max((depth_of(t) for t in trees), default=0)
    if depth > MAX_TREE_DEPTH:
        raise ValueError(f"a tree is {depth} levels deep; the compiled scorer takes at most {MAX_TREE_DEPTH} "
                         "(set max_depth)")
    inner = (1 << depth) - 1
    feature = np.zeros((len(trees), inner), np.int32)
    threshold = np.full((len(trees), inner), np.finfo(np.float32).max, np.float32)
    leaf = np.zeros((len(trees), inner + 1), np.float64)
    for t, root in enumerate(trees):
        stack = [(root, 0, 0)]  # node, position in the complete tree, its level
        while stack:
            node, k, level = stack.pop()
            if "split_index" not in node:  # a leaf: fill every complete-tree leaf below position k
                first = ((k + 1) << (depth - level)) - 1 - inner
                leaf[t, first : first + (1 << (depth - level))] = float(node.get("leaf_value", 0.0)) * scale
                continue
            if node.get("decision_type", "<=") != "<=":
                raise ValueError(f"tree {t}: only numerical '<=' splits can be exported, got "
                                 f"{node.get('decision_type')!r}")
            if node.get("missing_type", "None") == "Zero":
                raise ValueError(f"tree {t}: zero-as-missing splits cannot be exported (train without zero_as_missing)")
            thr = float(node["threshold"])
            t32 = np.float32(min(max(thr, -3.0e38), 3.0e38))
            if float(t32) > thr:  # the largest float32 not above thr: x32 <= thr  <=>  x32 <= t32
                t32 = np.nextafter(t32, np.float32(-np.inf))
            feature[t, k] = int(node["split_feature"])
            threshold[t, k] = t32
            stack.append((node["left_child"], 2 * k + 1, level + 1))
            stack.append((node["right_child"], 2 * k + 2, level + 1))
    return Forest(depth, feature, threshold, leaf.astype(np.float32), float(shift))


def _platt(raw: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(a, b) of the weighted logistic fit y ~ sigmoid(a * raw + b)."""
    sd = float(raw.std()) or 1.0
    mu = float(raw.mean())
    theta, _ = _fit_logistic(((raw - mu) / sd)[:, None], y, w, 1e-6, 50)
    a = float(theta[0] / sd)
    return a, float(theta[1] - a * mu)


def _groups(group: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group ids (contiguous runs) -> (run sizes, run index of each row)."""
    g = np.asarray(group).ravel()
    if g.shape[0] != n:
        raise ValueError(f"group has {g.shape[0]} entries but there are {n} examples")
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    if np.unique(g[starts]).size != starts.size:
        raise ValueError("group ids must be contiguous: sort the examples by group")
    sizes = np.diff(np.r_[starts, n])
    return sizes, np.repeat(np.arange(sizes.size), sizes)


def train_gbdt(
    X: Any,
    y: Any,
    group: Any,
    weight: Any = None,
    *,
    feature_names: Sequence[str] = FEATURE_NAMES,
    params: Mapping[str, Any] | None = None,
    rounds: int = GBDT_ROUNDS,
    holdout_fraction: float = 0.0,
    seed: int = 0,
    threads: int = 1,
    trained_at: _dt.datetime | None = None,
    version: str | None = None,
    description: str = "",
) -> tuple[Ranker, dict[str, Any]]:
    """Fit gradient-boosted trees with a learning-to-rank objective; returns a ``kind="gbdt"`` ranker.

    X: float[n, F] (columns ``feature_names``); y: [n] relevance labels (0/1, or graded for LambdaRank);
    group: [n] group id of each row, rows of a group contiguous (a request's candidates, a served slate);
    weight: [n] per-row weights (e.g. inverse propensities) or None. ``params`` update
    :data:`GBDT_PARAMS` (LightGBM names). A random ``holdout_fraction`` of the *groups* (seeded) is held
    out for the reported metrics. The exported forest is calibrated on the training rows (Platt scaling,
    weighted) so that its scores are probabilities of a label >= 0.5.

    metrics: n_train, n_groups, positive_rate, rounds, trees, depth, calibration (a, b), train and
    holdout AUC, and mean NDCG@10 over holdout groups with a positive.
    """
    lgb = _lightgbm()
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, F), got shape {X.shape}")
    n, F = X.shape
    names = tuple(feature_names)
    if len(names) != F:
        raise ValueError(f"X has {F} columns but there are {len(names)} feature_names")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinity")
    y = np.asarray(y, np.float64).ravel()
    if y.shape[0] != n or not np.isfinite(y).all() or (y < 0).any():
        raise ValueError(f"y must hold {n} finite, non-negative labels")
    w = np.ones(n) if weight is None else np.asarray(weight, np.float64).ravel()
    if w.shape[0] != n or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weight must hold {n} finite, non-negative values")
    sizes, run = _groups(group, n)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if rounds < 1:
        raise ValueError(f"rounds must be positive, got {rounds}")
    rng = np.random.default_rng(seed)
    hold_groups = rng.random(sizes.size) < holdout_fraction if sizes.size >= 10 else np.zeros(sizes.size, bool)
    train = ~hold_groups[run]
    if not (y[train] >= 0.5).any() or (y[train] >= 0.5).all():
        raise ValueError("the training labels are all of one class: nothing to learn")
    cfg = {**GBDT_PARAMS, **(params or {}), "verbose": -1, "seed": seed, "num_threads": threads,
           "deterministic": True, "force_row_wise": True}
    data = lgb.Dataset(X[train], y[train], group=sizes[~hold_groups], weight=w[train],
                       feature_name=[f"f{i}" for i in range(F)], free_raw_data=True)
    booster = lgb.train(cfg, data, num_boost_round=int(rounds))
    raw = booster.predict(X, raw_score=True)
    a, b = _platt(raw[train], (y[train] >= 0.5).astype(np.float64), w[train] / w[train].mean())
    forest = forest_from_lightgbm(booster, scale=a, shift=b)
    when = (trained_at or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    draft = Ranker("gbdt", forest, feature_names=names)
    scores = draft.score_features(X)
    binary = (y >= 0.5).astype(np.float64)
    metrics: dict[str, Any] = {
        "kind": "gbdt",
        "objective": cfg["objective"],
        "n_train": int(train.sum()),
        "n_groups": int(sizes.size),
        "n_holdout_groups": int(hold_groups.sum()),
        "positive_rate": float(binary[train].mean()),
        "rounds": int(rounds),
        "trees": forest.n_trees,
        "depth": forest.depth,
        "calibration": [a, b],
        "train_auc": roc_auc(binary[train], scores[train]),
        "params": {k: v for k, v in cfg.items() if k not in ("verbose", "num_threads")},
    }
    if hold_groups.any():
        hold = ~train
        metrics["holdout_auc"] = roc_auc(binary[hold], scores[hold])
        metrics["holdout_ndcg_at_10"] = _mean_group_ndcg(scores[hold], binary[hold], run[hold], 10)
    metrics = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
    ranker = Ranker("gbdt", forest, feature_names=names, version=version,
                    trained_at=when.isoformat(timespec="seconds").replace("+00:00", "Z"), metrics=metrics,
                    description=description or f"LightGBM {cfg['objective']}, {forest.n_trees} trees of depth "
                                               f"{forest.depth}, trained by recsvc.training.train_gbdt on {n} rows")
    return ranker, metrics


def _mean_group_ndcg(scores: np.ndarray, y: np.ndarray, run: np.ndarray, k: int) -> float:
    """Mean NDCG@k over the groups that hold a positive (binary gains)."""
    vals = []
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    for g in np.unique(run):
        m = run == g
        yy = y[m]
        if not yy.any():
            continue
        top = yy[np.argsort(-scores[m], kind="stable")[:k]]
        ideal = discount[: min(int(yy.sum()), k)].sum()
        vals.append(float((top * discount[: top.size]).sum() / ideal))
    return float(np.mean(vals)) if vals else float("nan")


# --------------------------------------------------------------------------
# The shipped default weights

#: Hand-set logistic weights of the default ranker (features not listed: 0).
#: Chosen by typical contribution (weight × typical feature range) rather than
#: fitted: similarity (cosine, ~0..0.8 among candidates) dominates with up to
#: ~3.2 logits; co-occurrence (retrieval score, ~0..1) up to ~1.6; popularity
#: (log1p counts, ~0..7) up to ~1.4; category affinity (a share, ~0..0.4) up to
#: ~0.8; freshness (0..1) up to ~0.5; the bandit posterior mean (~0.02..0.2)
#: only ~0.1..0.4. Being co-proposed by co-occurrence adds a small bonus.
DEFAULT_COEFFICIENTS: dict[str, float] = {
    "similarity": 4.0,
    "score_cooccurrence": 1.6,
    "log_popularity": 0.2,
    "category_affinity": 2.0,
    "freshness": 0.5,
    "bandit_mean": 2.0,
    "from_cooccurrence": 0.2,
}
DEFAULT_INTERCEPT = -4.0
DEFAULT_VERSION = "default-1"


def served_examples(state_dir: str | Path, attribution_window_s: float | None = None) -> TrainingExamples:
    """Training examples from a state directory's served slates and feedback.

    Every served item that got an impression is one example: label 1 when a
    click or conversion on it came back for that slate, 0 otherwise
    ("impressions without a click are negatives"), with the features logged
    when it was served and the propensity served with it
    (see :func:`recsvc.state.served_log.read_served_impressions`; pass the
    server's ``state.attribution_window_s``, default the configured default).
    """
    from recsvc.state.served_log import DEFAULT_ATTRIBUTION_WINDOW_S, read_served_impressions

    window = DEFAULT_ATTRIBUTION_WINDOW_S if attribution_window_s is None else attribution_window_s
    imp = read_served_impressions(state_dir, window)
    return examples_from_log(imp.features, imp.clicked, imp.propensity, feature_names=imp.feature_names)


def train_from_state_dir(
    state_dir: str | Path, *, kind: Literal["logistic", "mlp", "gbdt"] = "logistic", ipw: bool = True,
    seed: int = 0, attribution_window_s: float | None = None, min_propensity: float = 0.01,
) -> tuple[Ranker, dict[str, Any]]:
    """``recsvc train-ranker``: :func:`served_examples` then :func:`train_ranker`, or for ``kind="gbdt"``
    :func:`train_gbdt` with each served slate as a group and the same inverse-propensity weights
    (``1 / max(p, min_propensity)``, mean 1)."""
    if kind != "gbdt":
        ex = served_examples(state_dir, attribution_window_s)
        ranker, metrics = train_ranker(ex.X, ex.y, ex.propensity, kind=kind, ipw=ipw, seed=seed,
                                       feature_names=ex.feature_names, min_propensity=min_propensity)
        return ranker, dict(metrics, examples=len(ex), positives=int(ex.y.sum()))
    from recsvc.state.served_log import DEFAULT_ATTRIBUTION_WINDOW_S, read_served_impressions

    window = DEFAULT_ATTRIBUTION_WINDOW_S if attribution_window_s is None else attribution_window_s
    imp = read_served_impressions(state_dir, window)
    ex = examples_from_log(imp.features, imp.clicked, imp.propensity, feature_names=imp.feature_names,
                           target_features=imp.feature_names)
    w = 1.0 / np.maximum(ex.propensity, min_propensity) if ipw else np.ones(len(ex))
    ranker, metrics = train_gbdt(ex.X, ex.y, imp.slate, w / w.mean(), feature_names=ex.feature_names,
                                 holdout_fraction=0.2, seed=seed)
    return ranker, dict(metrics, ipw=bool(ipw), examples=len(ex), positives=int(ex.y.sum()))


def default_ranker() -> Ranker:
    """The hand-set logistic ranker shipped with recsvc (see :data:`DEFAULT_COEFFICIENTS`)."""
    unknown = sorted(set(DEFAULT_COEFFICIENTS) - set(FEATURE_NAMES))
    if unknown:
        raise ValueError(f"DEFAULT_COEFFICIENTS names unknown features {unknown}")
    coef = np.array([DEFAULT_COEFFICIENTS.get(f, 0.0) for f in FEATURE_NAMES], np.float32)
    return Ranker(
        "logistic",
        [(coef.reshape(-1, 1), [DEFAULT_INTERCEPT])],
        feature_names=FEATURE_NAMES,
        version=DEFAULT_VERSION,
        trained_at=None,
        metrics={},
        description=(
            "Hand-set default weights (not trained): similarity dominant, then co-occurrence, "
            "popularity, category affinity, freshness, bandit mean. Regenerate with "
            "`python -m recsvc.training`."
        ),
    )


def write_default_ranker(path: str | Path | None = None) -> Path:
    """Write :func:`default_ranker` to ``path`` (default: the package's data/default_ranker.json)."""
    target = Path(path) if path is not None else Path(__file__).resolve().parent / "data" / "default_ranker.json"
    default_ranker().save(target)
    return target


if __name__ == "__main__":  # pragma: no cover
    print(write_default_ranker())
