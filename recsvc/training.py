"""Offline training of the ranker from logged impressions.

Everything is array-based and plain numpy (scipy is a test-only dependency)::

    examples = examples_from_log(logged_features, clicked, propensities)
    ranker, metrics = train_ranker(examples.X, examples.y, examples.propensity, kind="logistic")
    ranker.save("ranker.json")          # then point ranking.model_path at it

* ``kind="logistic"``: L2-regularised logistic regression fitted by Newton's
  method (IRLS) with a backtracking line search; converges in a few iterations.
* ``kind="mlp"``: one or two ReLU hidden layers, sigmoid output, full numpy
  backprop with Adam on mini-batches.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsvc.ranking import FEATURE_NAMES, Ranker

__all__ = [
    "DEFAULT_COEFFICIENTS",
    "TrainingExamples",
    "default_ranker",
    "examples_from_log",
    "log_loss",
    "roc_auc",
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
    state_dir: str | Path, *, kind: Literal["logistic", "mlp"] = "logistic", ipw: bool = True, seed: int = 0,
    attribution_window_s: float | None = None,
) -> tuple[Ranker, dict[str, Any]]:
    """``recsvc train-ranker``: :func:`served_examples` then :func:`train_ranker`."""
    ex = served_examples(state_dir, attribution_window_s)
    ranker, metrics = train_ranker(ex.X, ex.y, ex.propensity, kind=kind, ipw=ipw, seed=seed,
                                   feature_names=ex.feature_names)
    metrics = dict(metrics, examples=len(ex), positives=int(ex.y.sum()))
    return ranker, metrics


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
