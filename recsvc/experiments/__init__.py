"""A/B experiments: assignment, per-variant aggregates, statistics.

* :mod:`~recsvc.experiments.assignment` — the experiment file, the documented
  assignment hash, layered assignment with cached merged configs
  (:class:`ExperimentSet`, :class:`Assignment`).
* :mod:`~recsvc.experiments.aggregates` — per-(experiment, variant) counters fed
  by the engine, snapshot-able (:class:`ExperimentAggregates`).
* :mod:`~recsvc.experiments.stats` — z-test, Welch, chi-square, Holm, CUPED, mSPRT,
  with the distribution tails implemented on numpy + math.
* :mod:`~recsvc.experiments.report` — :func:`report`, :func:`report_to_text`,
  :func:`report_to_dict`, :func:`plot_report`.

Wiring, in short::

    experiments = ExperimentSet.load(cfg.experiments.file, cfg) if cfg.experiments.file else ExperimentSet.empty(cfg)
    a = experiments.assign(user_id, now_ms)            # a.config, a.variant ("exp:var,..."), a.arms
    aggregates.record_served(a.arms, user_id, rows, now_ms, diversity=..., novelty=...)
    aggregates.record_event(arms_of_request, user_id, "click", 0.0, now_ms)
    print(report_to_text(report(aggregates, experiments, now_ms=now_ms)))
"""

from recsvc.experiments.aggregates import EVENT_TYPES, ArmData, ExperimentAggregates
from recsvc.experiments.assignment import (
    N_BUCKETS,
    PER_REQUEST_SECTIONS,
    Assignment,
    Experiment,
    ExperimentSet,
    Variant,
    bucket_of,
    format_variant,
    parse_variant,
)
from recsvc.experiments.report import (
    METRICS,
    ArmSummary,
    Comparison,
    ExperimentReport,
    Report,
    SRMSummary,
    plot_report,
    report,
    report_to_dict,
    report_to_text,
)

__all__ = [
    "EVENT_TYPES",
    "METRICS",
    "N_BUCKETS",
    "PER_REQUEST_SECTIONS",
    "ArmData",
    "ArmSummary",
    "Assignment",
    "Comparison",
    "Experiment",
    "ExperimentAggregates",
    "ExperimentReport",
    "ExperimentSet",
    "Report",
    "SRMSummary",
    "Variant",
    "bucket_of",
    "format_variant",
    "parse_variant",
    "plot_report",
    "report",
    "report_to_dict",
    "report_to_text",
]
