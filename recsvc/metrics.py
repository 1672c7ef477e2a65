"""Prometheus metrics: what the server counts, where it counts it, and how the endpoint is exposed.

Observed at the boundaries, never inside a kernel:

- RPCs (count by method and status code, latency from arrival to answer, load shed, queue depth) in
  :class:`recsvc.server.interceptors.MetricsInterceptor`;
- the stages of Recommend (``Recommendation.timings_us``), degraded responses and why, feedback outcomes
  (accepted / duplicate / rejected by reason) in the :class:`recsvc.engine.Engine` facade;
- sizes (catalog, index, served-slate log), snapshots, stream lag and the experiments' per-variant impressions,
  clicks and exposure concentration by :class:`StateSampler`, a thread that reads them every
  ``metrics.sample_interval_s`` (nothing on the request path).

One process (``recsvc serve``): the metrics live in the process and ``metrics.port`` serves them.
``recsvc serve --workers N``: prometheus_client's multiprocess mode. The supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts the workers; each worker writes its values
there (memory-mapped files) and the supervisor alone serves ``metrics.port``, adding them up: counters and
histograms are summed over the workers, per-worker gauges (queue depth, served-log size) are summed over live
workers, and state every replica holds alike (catalog and index size, experiment totals) is the largest.

Nothing here may carry a token or an embedding; labels are bounded sets (method names, status codes, stage
and reason names, experiment and variant names from the experiments file).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("recsvc.metrics")

#: Seconds; Recommend runs in about a millisecond, overload and snapshots in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0)
STAGES = ("candidates", "ranking", "exploration", "reranking", "total")

RPCS = Counter("recsvc_rpcs", "RPCs answered, by method and status code.", ["method", "code"])
RPC_LATENCY = Histogram("recsvc_rpc_duration_seconds", "RPC latency from arrival (queue included) to answer.",
                        ["method"], buckets=LATENCY_BUCKETS)
STAGE_LATENCY = Histogram("recsvc_recommend_stage_duration_seconds", "Recommend's time per stage.", ["stage"],
                          buckets=LATENCY_BUCKETS)
DEGRADED = Counter("recsvc_recommend_degraded", "Recommend responses marked degraded, by reason.", ["reason"])
SHED = Counter("recsvc_shed", "Calls refused under overload (RESOURCE_EXHAUSTED), by reason: 'queue_full' "
               "(server.max_queued_rpcs) or 'deadline' (server.min_deadline_ms).", ["reason"])
QUEUE_DEPTH = Gauge("recsvc_queue_depth", "Calls waiting for a worker thread.", multiprocess_mode="livesum")
FEEDBACK = Counter("recsvc_feedback_events", "Feedback events by outcome: accepted, duplicate, rejected.",
                   ["outcome"])
FEEDBACK_REJECTED = Counter("recsvc_feedback_rejected", "Rejected feedback events by reason.", ["reason"])

CATALOG_ITEMS = Gauge("recsvc_catalog_items", "Live items in the catalog.", multiprocess_mode="max")
INDEX_ITEMS = Gauge("recsvc_index_items", "Live items in the ANN index.", multiprocess_mode="max")
SERVED_LOG = Gauge("recsvc_served_log_slates", "Served slates kept for attribution (per process).",
                   multiprocess_mode="livesum")
SERVED_LOG_BYTES = Gauge("recsvc_served_log_bytes", "Estimated memory of the served-slate log "
                         "(its columns, lookup and user id strings).", multiprocess_mode="livesum")
SNAPSHOT_SECONDS = Gauge("recsvc_snapshot_duration_seconds", "The last snapshot: total time and ingestion pause.",
                         ["part"], multiprocess_mode="max")
SNAPSHOT_BYTES = Gauge("recsvc_snapshot_bytes", "Size of the newest snapshot on disk (embedded backend).",
                       multiprocess_mode="max")
STREAM_LAG = Gauge("recsvc_stream_lag_seconds", "Redis backend: time since this replica last heard from the "
                   "stream.", multiprocess_mode="max")
IMPRESSIONS = Gauge("recsvc_experiment_impressions", "Impressions per experiment variant (cumulative).",
                    ["experiment", "variant"], multiprocess_mode="max")
CLICKS = Gauge("recsvc_experiment_clicks", "Clicks per experiment variant (cumulative).",
               ["experiment", "variant"], multiprocess_mode="max")
EXPOSURE_GINI = Gauge("recsvc_experiment_exposure_gini", "Gini of the served items' exposure per variant over "
                      "the live catalog (0 = even, towards 1 = concentrated).", ["experiment", "variant"],
                      multiprocess_mode="max")

# Label children looked up once: .labels() costs a dict lookup and a lock per call.
_STAGE_CHILDREN = {f"{s}_us": STAGE_LATENCY.labels(s) for s in STAGES}
_ACCEPTED, _DUPLICATE, _REJECTED = (FEEDBACK.labels(o) for o in ("accepted", "duplicate", "rejected"))

#: (prefix of the rejection message, reason label) — see recsvc.feedback.FeedbackPath._validate.
_REJECTION_KINDS = (
    ("event_id is required", "missing_event_id"),
    ("user_id is required", "missing_user_id"),
    ("unknown event type", "unknown_type"),
    ("unknown item_id", "unknown_item"),
    ("timestamp_ms", "timestamp_out_of_range"),
    ("value must be", "bad_value"),
)
_REJECTION_CONTAINS = (
    ("is unknown or has expired", "unknown_request"),
    ("was not served in request", "not_served_in_request"),
    ("was served to another user", "other_user"),
)


def rejection_kind(reason: str) -> str:
    """A short, bounded label for a rejection message (the message quotes the caller's values)."""
    for prefix, kind in _REJECTION_KINDS:
        if reason.startswith(prefix):
            return kind
    for part, kind in _REJECTION_CONTAINS:
        if part in reason:
            return kind
    return "other"


def observe_recommendation(timings_us: dict[str, int], reasons: tuple[str, ...] | list[str]) -> None:
    """Stage latencies and degraded reasons of one Recommend (the engine facade calls it)."""
    for key, us in timings_us.items():
        child = _STAGE_CHILDREN.get(key)
        if child is not None:
            child.observe(us * 1e-6)
    for reason in reasons:
        DEGRADED.labels(reason).inc()


def observe_feedback(accepted: int, duplicates: int, rejected_reasons: list[str]) -> None:
    if accepted:
        _ACCEPTED.inc(accepted)
    if duplicates:
        _DUPLICATE.inc(duplicates)
    if rejected_reasons:
        _REJECTED.inc(len(rejected_reasons))
        for reason in rejected_reasons:
            FEEDBACK_REJECTED.labels(rejection_kind(reason)).inc()


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process runs in prometheus_client's multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def start_endpoint(host: str, port: int) -> Any:
    """Serve ``/metrics`` on ``host:port`` (a thread); with ``PROMETHEUS_MULTIPROC_DIR`` set, the sum over
    every process writing there. Returns the HTTP server (``.shutdown()`` stops it) and the bound port."""
    from prometheus_client import CollectorRegistry, REGISTRY, start_http_server

    registry = REGISTRY
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


class StateSampler:
    """Reads the sizes and experiment totals of ``engine`` into gauges every ``interval_s`` seconds."""

    def __init__(self, engine: Any, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsvc-metrics", daemon=True)

    def start(self) -> "StateSampler":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a metric must never take the server down
                log.exception("sampling metrics failed")

    def sample(self) -> None:
        import numpy as np

        from recsvc.evaluation.metrics import gini

        e = self.engine
        CATALOG_ITEMS.set(e.catalog.n_alive)
        INDEX_ITEMS.set(e.requests.ann.live_count)
        state = e._state  # the read model's own sizes (not part of the reader interface the request path uses)
        SERVED_LOG.set(state.n_served())
        SERVED_LOG_BYTES.set(state.served_log_nbytes())
        snaps = e.snapshots
        SNAPSHOT_SECONDS.labels("total").set(snaps.last_total_s)
        SNAPSHOT_SECONDS.labels("ingest_pause").set(snaps.last_pause_s)
        size = _snapshot_bytes(e)
        if size is not None:
            SNAPSHOT_BYTES.set(size)
        staleness = getattr(e.journal, "staleness_s", None)
        if staleness is not None:
            STREAM_LAG.set(staleness())
        agg = e.aggregates
        n_items = max(e.catalog.n_alive, 1)
        for experiment, variant in agg.arms():
            data = agg.arm_data(experiment, variant)
            IMPRESSIONS.labels(experiment, variant).set(data.totals["impressions"])
            CLICKS.labels(experiment, variant).set(data.totals["clicks"])
            if data.exposure.size:
                counts = np.zeros(max(n_items, data.exposure.size), np.float64)
                counts[:data.exposure.size] = data.exposure
                EXPOSURE_GINI.labels(experiment, variant).set(gini(counts))


def _snapshot_bytes(engine: Any) -> int | None:
    """Bytes of the newest snapshot on disk (None when there is none, e.g. the Redis backend)."""
    store = getattr(engine.journal, "store", None)
    latest = getattr(store, "latest_snapshot", None)
    if latest is None:
        return None
    _, directory = latest()
    if directory is None:
        return None
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
