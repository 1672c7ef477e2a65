"""Offline evaluation: ranking metrics, off-policy estimators and dataset loaders.

- :mod:`recsvc.evaluation.metrics` — accuracy and beyond-accuracy metrics over padded ``int[U, K]`` lists.
- :mod:`recsvc.evaluation.ope` — IPS, SNIPS, DM and DR estimates of a target policy from a bandit log.
- :mod:`recsvc.evaluation.datasets` — the interactions format, MovieLens and Open Bandit Dataset loaders,
  temporal splits, and the OBD validation of the estimators.
- :mod:`recsvc.evaluation.service_log` — off-policy estimates from the service's own served-slate log.
- :mod:`recsvc.evaluation.replay` — ``recsvc evaluate``: replay a dataset's test users through the Engine.
- :mod:`recsvc.evaluation.simulator` — ``recsvc simulate``: synthetic users in a closed loop with the Engine.
"""

from recsvc.evaluation.datasets import (
    DatasetFormatError,
    Interactions,
    ItemTable,
    format_obd_report,
    load_interactions,
    load_movielens,
    load_obd,
    temporal_split_per_user,
    validate_on_obd,
)
from recsvc.evaluation.metrics import (
    RelevantSets,
    catalog_coverage,
    gini_of_exposure,
    hit_rate_at_k,
    intra_list_diversity,
    item_exposure,
    map_at_k,
    mean_metric,
    mrr,
    ndcg_at_k,
    novelty,
    precision_at_k,
    recall_at_k,
    relevance_matrix,
    serendipity,
    split_by_group,
)
from recsvc.evaluation.ope import (
    ActionMeanRewardModel,
    BanditLog,
    Estimate,
    RewardModel,
    RidgeRewardModel,
    cross_fit_predict,
    direct_method,
    doubly_robust,
    effective_sample_size,
    estimate_all,
    importance_weights,
    ips,
    on_policy_estimate,
    snips,
)

__all__ = [
    "DatasetFormatError",
    "Interactions",
    "ItemTable",
    "format_obd_report",
    "load_interactions",
    "load_movielens",
    "load_obd",
    "temporal_split_per_user",
    "validate_on_obd",
    "RelevantSets",
    "catalog_coverage",
    "gini_of_exposure",
    "hit_rate_at_k",
    "intra_list_diversity",
    "item_exposure",
    "map_at_k",
    "mean_metric",
    "mrr",
    "ndcg_at_k",
    "novelty",
    "precision_at_k",
    "recall_at_k",
    "relevance_matrix",
    "serendipity",
    "split_by_group",
    "ActionMeanRewardModel",
    "BanditLog",
    "Estimate",
    "RewardModel",
    "RidgeRewardModel",
    "cross_fit_predict",
    "direct_method",
    "doubly_robust",
    "effective_sample_size",
    "estimate_all",
    "importance_weights",
    "ips",
    "on_policy_estimate",
    "snips",
]
