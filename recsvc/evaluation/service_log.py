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
    slice's observed rate. The reverse direction (the main policy's rate from the slice's log) needs the
    main policy's propensities for the slice's slates, which are not logged: not reported.
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
        "reverse": "not reported: the main policy's propensities for the slice's slates are not logged",
    }

