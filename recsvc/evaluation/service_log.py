"""Off-policy estimates from the service's own served-slate log (``recsvc ope --state-dir``).

Each impressed item of a served slate is one logged decision: action = catalog
row, reward = click (or conversion) on it, propensity = the propensity served
with it (the probability that the serving policy put the item in the slate),
context = the features it was served with.

A **target ranker** (a weights file) is evaluated as a stochastic policy over
the same slates: within each slate of k impressed items it includes item i
with probability ``min(1, k * softmax(score_i / temperature))`` — a
Plackett-Luce-style soft top-k over what was shown. That restricts the target
to items the logger showed, so it estimates how the target would re-order and
re-select *within* logged slates (the standard item-level slate estimator);
items the logger never showed are out of its reach, which a replay or an A/B
test covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recsvc.evaluation.ope import (BanditLog, clipped_ips, ips, on_policy_estimate, snips, weight_diagnostics)
from recsvc.state.served_log import ServedImpressions, read_served_impressions


def service_bandit_log(state_dir: str | Path) -> tuple[BanditLog, ServedImpressions]:
    imp = read_served_impressions(state_dir)
    log = BanditLog(action=imp.rows, reward=imp.clicked, propensity=np.clip(imp.propensity, 1e-9, 1.0),
                    context=imp.features.astype(np.float64), position=imp.position,
                    feature_names=imp.feature_names)
    return log, imp


def soft_topk_policy(scores: np.ndarray, slate: np.ndarray, temperature: float) -> np.ndarray:
    """P(item in the target's slate) = min(1, k_s * softmax_s(score / T)), per logged slate s."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = scores.astype(np.float64) / temperature
    n_slates = int(slate.max()) + 1
    peak = np.full(n_slates, -np.inf)
    np.maximum.at(peak, slate, z)
    e = np.exp(z - peak[slate])
    total = np.bincount(slate, weights=e, minlength=n_slates)
    k = np.bincount(slate, minlength=n_slates).astype(np.float64)
    return np.minimum(1.0, k[slate] * e / total[slate])


def evaluate_service_log(state_dir: str | Path, target_ranker: str | Path | None = None,
                         temperature: float = 0.1) -> dict[str, Any]:
    """Report: the logged CTR, a sanity IPS of the logging policy itself, and the target's estimates."""
    log, imp = service_bandit_log(state_dir)
    report: dict[str, Any] = {
        "impressions": len(imp),
        "slates": int(imp.slate.max()) + 1,
        "logged_ctr": _est(on_policy_estimate(log.reward)),
        # the logging policy evaluated off-policy must give back its own CTR
        "logging_policy_ips": _est(ips(log, pi_logged=log.propensity)),
        # logged propensities: their spread, and how many sit at the floor (exploration.min_propensity)
        "propensity": {"min": float(imp.propensity.min()), "median": float(np.median(imp.propensity)),
                       "share_at_or_below_1e-4": float((imp.propensity <= 1e-4).mean())},
    }
    if target_ranker is not None:
        from recsvc.ranking import Ranker

        ranker = Ranker.load(target_ranker)
        scores = ranker.score_gathered(imp.features) if tuple(ranker.feature_names) != imp.feature_names \
            else ranker.score_features(imp.features)
        pi = soft_topk_policy(np.asarray(scores), imp.slate, temperature)
        clipped, c = clipped_ips(log, pi_logged=pi)
        d = weight_diagnostics(pi / log.propensity)
        report["target"] = {"ranker": str(target_ranker), "temperature": temperature,
                            "ips": _est(ips(log, pi_logged=pi)), "snips": _est(snips(log, pi_logged=pi)),
                            "clipped_ips": {**_est(clipped), "clip": c},
                            "diagnostics": {"ess": d.ess, "ess_share": d.ess_share,
                                            "largest_weights": list(d.largest_weights),
                                            "largest_share": d.largest_share, "mean_weight": d.mean_weight},
                            "warnings": list(d.warnings)}
    return report


def _est(e) -> dict[str, float]:
    return {"value": e.value, "stderr": e.stderr, "ci_low": e.ci_low, "ci_high": e.ci_high, "n": e.n}


def validate_random_slice(state_dir: str | Path, confidence: float = 0.95) -> dict[str, Any]:
    """``recsvc ope --state-dir DIR --validate``: estimate the random-exposure slice's click rate per
    impression from the main policy's log and check it against what the slice observed.

    Each main-policy impression is weighted by ``w = q / p``: q is the probability the slice would have
    served that item in that request (need / eligible pool, logged with every slate), p its logged
    propensity. SNIPS, ``sum w r / sum w``, estimates the slice's click rate per impression; IPS divides
    by the number of main-policy impressions instead. The report says whether each interval covers the
    slice's observed rate.

    ``reverse``: the main policy's click rate per impression from the slice's log. Exact
    (:func:`main_ctr_from_slice_exact`) on the slice slates that carry the main policy's propensities
    (``ServedSlate.target_propensities``); a log written before they were logged falls back to the
    item-level approximation :func:`main_ctr_from_slice`, and says so (``exact`` false, a warning).
    """
    log, imp = service_bandit_log(state_dir)
    if imp.random_slice is None or not imp.random_slice.any():
        raise ValueError(f"{state_dir}: no impression from the random-exposure slice; set "
                         "exploration.random_share > 0, serve and send impressions first")
    main = ~imp.random_slice & np.isfinite(imp.random_p)
    if not main.any():
        raise ValueError(f"{state_dir}: no main-policy impression with the slice's probability logged")
    observed = on_policy_estimate(imp.clicked[imp.random_slice], confidence=confidence)
    sub = log.take(np.flatnonzero(main))
    q = imp.random_p[main]
    ests = {"ips": ips(sub, pi_logged=q, confidence=confidence),
            "snips": snips(sub, pi_logged=q, confidence=confidence)}
    d = weight_diagnostics(q / sub.propensity)
    warnings = list(d.warnings)
    if d.mean_weight < 0.9:
        # E[q / p] over logged impressions is the share of the slice's exposure on items the main policy
        # can serve at all (positivity): the rest is invisible to any estimate from the main log
        warnings.append(f"mean weight {d.mean_weight:.3f}: about {1 - d.mean_weight:.0%} of what the random slice "
                        "serves is never served by the main policy (outside its top_m, or ruled out), so no "
                        "estimate from the main log can recover the slice's click rate; IPS is biased low and "
                        "SNIPS estimates the rate on the main policy's support only")
    return {
        "slice_impressions": int(imp.random_slice.sum()),
        "main_impressions": int(main.sum()),
        "slice_ctr_observed": _est(observed),
        "slice_ctr_from_main_log": {k: {**_est(e), "covers_observed": e.covers(observed.value),
                                        "intervals_overlap": bool(e.ci_low <= observed.ci_high
                                                                  and observed.ci_low <= e.ci_high)}
                                    for k, e in ests.items()},
        "diagnostics": {"ess": d.ess, "ess_share": d.ess_share, "largest_weights": list(d.largest_weights),
                        "mean_weight": d.mean_weight},
        "warnings": warnings,
        "reverse": _reverse(imp, confidence),
    }


def _reverse(imp: ServedImpressions, confidence: float) -> dict[str, Any]:
    """The exact reverse estimate where the slice's slates carry the main policy's propensities, else (a log
    written before they were logged) the item-level approximation."""
    in_slice = np.asarray(imp.random_slice, bool)
    target = imp.target_p if imp.target_p is not None else np.full(len(imp), np.nan)
    logged = in_slice & np.isfinite(target)
    if not logged.any():
        out = main_ctr_from_slice(imp.rows, imp.clicked, imp.slate, imp.random_slice, imp.random_p,
                                  confidence=confidence)
        out["exact"] = False
        out["warnings"].insert(0, "this log's random-slice slates carry no main-policy propensities (served before "
                                  "they were logged): the item-level approximation below, not the exact estimate")
        return out
    out = main_ctr_from_slice_exact(imp.clicked[~in_slice], imp.clicked[logged], imp.slate[logged],
                                    target[logged], imp.propensity[logged], confidence=confidence)
    unpriced = int(in_slice.sum() - logged.sum())
    if unpriced:
        out["warnings"].append(f"{unpriced} slice impressions were logged without the main policy's propensities "
                               "(served before they were logged) and are left out")
    return out


def main_ctr_from_slice_exact(main_clicked: np.ndarray, clicked: np.ndarray, slate: np.ndarray,
                              target_p: np.ndarray, slice_p: np.ndarray, *, confidence: float = 0.95,
                              n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The reverse validation, exact: the main policy's click rate per impression from the random slice's log.

    Each slice impression i carries ``slice_p`` (the slice's exact propensity, need / eligible pool; 1 for
    pinned and sponsored slots) and ``target_p`` (the probability that the main policy — the variant's
    exploration and re-ranking — would have served the same item in the same request, logged by the request
    path; 0 allowed). With ``w = target_p / slice_p`` and ``r`` the click:

    * ``sum w r`` over a slice request estimates, without bias, the clicks the main policy would have got on
      that request (every item the main policy can serve is in the slice's pool, so nothing is out of reach);
      ``sum w`` the impressions it would have got;
    * **SNIPS** (the reported ``main_ctr_from_slice``) = ``sum w r / sum w``: the main policy's clicks per
      impression; **IPS** = ``sum w r / (slice impressions)``: its clicks per request divided by its impressions
      per request, taken to be the slice's (the same slate size, and impressions that depend on the position
      only). The mean weight estimates that ratio of impressions and should be about 1.

    Both are compared with the main policy's observed click rate (``main_clicked``), with percentile bootstrap
    intervals clustered by slate (a request's items are resampled together). A click is credited to its item
    wherever the slice placed it, so a position effect that the main policy exploits (its best items on top)
    is what the estimate cannot see.
    """
    main_clicked = np.asarray(main_clicked, np.float64)
    r, slate = np.asarray(clicked, np.float64), np.asarray(slate, np.int64)
    t, q = np.asarray(target_p, np.float64), np.asarray(slice_p, np.float64)
    if main_clicked.size == 0 or r.size == 0:
        raise ValueError("need impressions of both the main policy and the random slice")
    if not (r.shape == slate.shape == t.shape == q.shape):
        raise ValueError(f"clicked, slate, target_p and slice_p must have one length, got "
                         f"{r.shape}, {slate.shape}, {t.shape}, {q.shape}")
    if not np.all(np.isfinite(q) & (q > 0) & (q <= 1)) or not np.all(np.isfinite(t) & (t >= 0) & (t <= 1)):
        raise ValueError("slice_p must be in (0, 1] and target_p in [0, 1] for every slice impression")
    observed = on_policy_estimate(main_clicked, confidence=confidence)
    w = t / q
    _, cluster = np.unique(slate, return_inverse=True)
    n_slates = int(cluster.max()) + 1
    per_slate = np.stack([np.bincount(cluster, weights=w * r, minlength=n_slates),
                          np.bincount(cluster, weights=w, minlength=n_slates),
                          np.bincount(cluster, minlength=n_slates).astype(np.float64)])  # [3, S]
    rng = np.random.default_rng(seed)
    # [B, 3]: the sums of w r, w and impressions over B resamples of the slates
    boot = rng.multinomial(n_slates, np.full(n_slates, 1.0 / n_slates), size=n_bootstrap) @ per_slate.T
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]

    def interval(value: float, draws: np.ndarray) -> dict[str, Any]:
        draws = draws[np.isfinite(draws)]
        lo, hi = np.quantile(draws, tails) if draws.size else (float("nan"), float("nan"))
        return {"value": value, "stderr": float(draws.std(ddof=1)) if draws.size > 1 else float("nan"),
                "ci_low": float(lo), "ci_high": float(hi), "n": int(r.size),
                "covers_observed": bool(lo <= observed.value <= hi),
                "intervals_overlap": bool(lo <= observed.ci_high and observed.ci_low <= hi)}

    num, den, cnt = per_slate.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        snips_est = interval(float(num / den) if den > 0 else float("nan"), boot[:, 0] / boot[:, 1])
    ips_est = interval(float(num / cnt), boot[:, 0] / boot[:, 2])
    d = weight_diagnostics(w)
    warnings = list(d.warnings)
    if not den > 0:
        warnings.append("the main policy would have served none of the items the slice served: no estimate")
    elif not 0.8 <= d.mean_weight <= 1.25:
        warnings.append(f"mean weight {d.mean_weight:.3f} (about 1 expected): the main policy's slates would "
                        "get another number of impressions than the slice's, and IPS is off by that ratio; "
                        "SNIPS normalises it away")
    return {
        "main_ctr_observed": _est(observed),
        "main_ctr_from_slice": snips_est,
        "ips": ips_est,
        "exact": True,
        "slice_slates": n_slates,
        "diagnostics": {"mean_weight": d.mean_weight, "ess": d.ess, "ess_share": d.ess_share,
                        "largest_weights": list(d.largest_weights), "zero_weight_share": float((w == 0).mean())},
        "method": "exact: each slice impression weighted by the main policy's probability of serving its item in "
                  "that request over the slice's exact propensity; SNIPS = sum w r / sum w (clicks per "
                  "impression), IPS = sum w r / slice impressions; percentile bootstrap over slates",
        "warnings": warnings,
    }


def main_ctr_from_slice(rows: np.ndarray, clicked: np.ndarray, slate: np.ndarray, in_slice: np.ndarray,
                        random_p: np.ndarray, *, confidence: float = 0.95, n_bootstrap: int = 400,
                        seed: int = 0) -> dict[str, Any]:
    """The reverse validation by item: the fallback for logs whose slice slates carry no main-policy
    propensities (served before the request path logged them; :func:`main_ctr_from_slice_exact` otherwise).

    Without the main policy's probability of serving an item in a *slice* request, the estimate reweights
    **by item**: each main-policy
    impression (the main policy's target distribution over the items it served, as it served them)
    gets the slice's click rate of its item, ``c(a) = sum r / q / sum 1 / q`` over the slice's impressions
    of a with the slice's exact propensities q (= need / eligible pool of the request; each request whose
    pool held a counts equally, whatever its pool size). The estimate is the mean of those rates over the
    main policy's impressions.

    Only slice impressions logged **after** a main impression (later slates; ``slate`` is log order)
    price it: the main policy learns from the slice's clicks (shared bandit evidence), so an item whose
    slice clicks came up lucky is served more, and pricing it with those same clicks biases the estimate
    upwards (0.40 against a true 0.26 on a 3,000-impression test log); a decision cannot depend on later
    clicks. Main
    impressions with no later slice impression of their item are out of reach (``main_mass_covered``,
    warned below 0.8).

    The interval is a percentile bootstrap over slates. The estimate is unbiased when an item's click
    rate does not depend on which of the users eligible for it sees it; a main policy that targets (shows
    an item to the users likeliest to click it) beats it, so an interval below the observed value
    measures that targeting.
    """
    rows, clicked, slate = np.asarray(rows, np.int64), np.asarray(clicked, np.float64), np.asarray(slate, np.int64)
    in_slice = np.asarray(in_slice, bool)
    q = np.asarray(random_p, np.float64)
    main = ~in_slice
    if not main.any() or not in_slice.any():
        raise ValueError("need impressions of both the main policy and the random slice")
    if not np.all(np.isfinite(q[in_slice]) & (q[in_slice] > 0)):
        raise ValueError("every slice impression needs its exact propensity (random_p)")
    observed = on_policy_estimate(clicked[main], confidence=confidence)
    # group by item, in log order within an item; suffix sums of the slice's weighted clicks
    order = np.lexsort((slate, rows))
    r_item, r_slate, r_main = rows[order], slate[order], main[order]
    w = np.where(in_slice, 1.0 / np.where(in_slice, q, 1.0), 0.0)[order]
    wr = w * clicked[order]
    last = np.r_[np.flatnonzero(r_item[1:] != r_item[:-1]), r_item.size - 1]  # last index of each item's group
    group_last = np.repeat(last, np.diff(np.r_[-1, last]))
    _, slate_idx = np.unique(r_slate, return_inverse=True)
    n_slates = int(slate_idx.max()) + 1
    main_rows = np.flatnonzero(r_main)

    def estimate(k: np.ndarray) -> tuple[float, float]:
        """(estimate, share of main impressions priced) with slate multiplicities ``k``."""
        kw = k[slate_idx]
        cw, cwr = np.cumsum(kw * w), np.cumsum(kw * wr)
        den = cw[group_last[main_rows]] - cw[main_rows]  # later slice impressions of the same item
        num = cwr[group_last[main_rows]] - cwr[main_rows]
        km = kw[main_rows]
        priced = den > 0
        mass = float(km[priced].sum())
        if mass <= 0:
            return float("nan"), 0.0
        return float((km[priced] * num[priced] / den[priced]).sum() / mass), mass / float(km.sum())

    value, covered = estimate(np.ones(n_slates))
    rng = np.random.default_rng(seed)
    boot = np.array([estimate(np.bincount(rng.integers(0, n_slates, n_slates), minlength=n_slates)
                              .astype(np.float64))[0] for _ in range(n_bootstrap)])
    boot = boot[np.isfinite(boot)]
    lo, hi = (np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2]) if boot.size
              else (float("nan"), float("nan")))
    est = {"value": value, "stderr": float(boot.std(ddof=1)) if boot.size > 1 else float("nan"),
           "ci_low": float(lo), "ci_high": float(hi), "n": int(in_slice.sum())}
    warnings = []
    if not covered >= 0.8:
        warnings.append(f"only {covered:.0%} of the main policy's impressions have an item the slice showed later: "
                        "the rest is out of reach, and the estimate is the main policy's rate on those only")
    return {
        "main_ctr_observed": _est(observed),
        "main_ctr_from_slice": {**est, "covers_observed": bool(lo <= observed.value <= hi),
                                "intervals_overlap": bool(lo <= observed.ci_high and observed.ci_low <= hi)},
        "main_mass_covered": covered,
        "method": "by item: each main-policy impression priced at its item's click rate in the slice (exact "
                  "propensities, later slates only); assumes an item's click rate does not depend on which "
                  "eligible user sees it (targeting makes the main policy's observed rate higher)",
        "warnings": warnings,
    }
