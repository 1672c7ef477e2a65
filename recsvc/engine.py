"""The in-process API: a thin facade over the request path, the feedback path and the catalog writer.

``Engine`` has the same operations as the gRPC service (recommend, feedback, upsert_items,
delete_items, experiment_report) on plain Python types; the gRPC servicer is a thin adapter over it,
and teams that embed recsvc call it directly. It knows nothing about protobuf. What each operation
does lives in the module that owns it:

- :mod:`recsvc.request_path` — one Recommend, with the experiment variant's config (pure reads);
- :mod:`recsvc.feedback` — Feedback, and recording served slates;
- :mod:`recsvc.catalog_writer` — UpsertItems and DeleteItems;
- :mod:`recsvc.recovery` — start-up, recovery from snapshot + log, snapshots;
- :mod:`recsvc.state` — the online-state interface, its read model and the log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from recsvc import metrics
from recsvc.catalog import Catalog
from recsvc.catalog_writer import CatalogWriter
from recsvc.config import Config
from recsvc.errors import InvalidArgument, NotFound, Unavailable, echo
from recsvc.feedback import FeedbackPath, FeedbackRejected
from recsvc.messages import (
    FeedbackEventIn,
    FeedbackResult,
    ItemIn,
    RecommendQuery,
    Recommendation,
    RejectedEvent,
    SlateItem,
)
from recsvc.recovery import (
    Snapshotter,
    apply_record,
    demo_cache_dir,
    load_catalog_and_index,
    open_catalog,
    recover,
)
from recsvc.request_path import RequestPath
from recsvc.retrieval.ann import AnnIndex
from recsvc.retrieval.candidates import Candidates
from recsvc.retrieval.sources import Retriever, usual_ann_fetch
from recsvc.state.interface import OnlineStateReader
from recsvc.state.journal import Journal
from recsvc.state.online import ReadModel
from recsvc.state.store import LocalStateStore, MemoryStateStore, StateStore

__all__ = [
    "Engine", "RecommendQuery", "Recommendation", "SlateItem", "FeedbackEventIn", "FeedbackResult",
    "FeedbackRejected", "RejectedEvent", "ItemIn", "load_catalog_and_index", "demo_cache_dir", "wall_clock_ms",
]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Engine:
    """The whole service over one catalog, one online state and one log."""

    def __init__(
        self,
        cfg: Config,
        catalog: Catalog,
        ann: AnnIndex,
        store: StateStore | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        experiments: Any = None,
        catalog_diverged: bool = False,
        journal: Any = None,
    ) -> None:
        """``store`` (a local log; default: in memory) or ``journal`` (e.g. a shared ``RedisJournal``)."""
        from recsvc.experiments import ExperimentAggregates, ExperimentSet

        self.cfg = cfg  # the base config; each request runs with its experiment variant's
        self.catalog = catalog
        self.clock = clock
        self.experiments = experiments if experiments is not None else ExperimentSet.empty(cfg)
        self._state = ReadModel(cfg, catalog.capacity, now_ms=clock())
        self.journal = journal if journal is not None else Journal(store if store is not None else MemoryStateStore())
        retriever = Retriever(catalog, ann, self._state, usual_ann_fetch(cfg.retrieval),
                              cfg.retrieval.fresh_window_days)
        self.requests = RequestPath(catalog, ann, self._state, retriever, seed=cfg.exploration.seed)
        self.feedback_path = FeedbackPath(cfg, catalog, self._state, self.journal, ExperimentAggregates(), clock)
        self.catalog_writer = CatalogWriter(catalog, ann, self._state, retriever, self.journal, clock,
                                            cfg.server.max_batch, diverged=catalog_diverged)
        self.snapshots = Snapshotter(self.journal, self._state, self.feedback_path, catalog, ann,
                                     self.catalog_writer, cfg.state.snapshot_every_events)
        self._closed = False
        #: the config file :meth:`reload` re-reads (set by ``recsvc serve``), and who else applies it
        self.config_path: Path | None = None
        self.on_reload: list[Callable[[Config], None]] = []
        recover(catalog, self._state, self.journal, self.feedback_path, self.catalog_writer, clock())
        if self.journal.shared:  # tail the shared log from where recovery stopped
            self.journal.start(lambda rec: apply_record(rec, self.feedback_path, self.catalog_writer, rebuild=True),
                               on_batch=self.snapshots.maybe_snapshot)

    @classmethod
    def from_config(cls, cfg: Config, progress: bool = False,
                    clock: Callable[[], int] = wall_clock_ms) -> "Engine":
        """Open the state (the state directory, or the shared Redis log), load (or build once and cache) the
        catalog and index, recover."""
        from recsvc.experiments import ExperimentSet

        if cfg.state.backend == "redis":
            from recsvc.state.redis_journal import RedisJournal, TrimmedAway

            journal: Any = RedisJournal(cfg)
        else:
            TrimmedAway = ()  # noqa: N806 (nothing to retry with a local log)
            journal = Journal(LocalStateStore(Path(cfg.state.dir).expanduser(), fsync=cfg.state.fsync == "batch"))
        try:
            experiments = (ExperimentSet.load(cfg.experiments.file, cfg)
                           if cfg.experiments.file is not None else None)
            for attempt in range(3):
                catalog, ann, diverged = open_catalog(cfg, journal, progress=progress)
                try:
                    return cls(cfg, catalog, ann, clock=clock, experiments=experiments, catalog_diverged=diverged,
                               journal=journal)
                except TrimmedAway:  # another replica snapshotted (twice) while this one started: again
                    if attempt == 2:
                        raise
                    journal.forget_snapshot()
            raise AssertionError("unreachable")
        except BaseException:
            journal.close()
            raise

    # -- what callers may read ----------------------------------------------------------------------
    @property
    def state(self) -> OnlineStateReader:
        """The online state, read-only (history, bandit evidence, popularity, served slates)."""
        return self._state

    @property
    def aggregates(self):
        """The experiments' per-arm aggregates."""
        return self.feedback_path.aggregates

    @property
    def store(self) -> StateStore:
        return self.journal.store

    # -- Recommend ------------------------------------------------------------------------------------
    def recommend(self, q: RecommendQuery, _record: bool = True) -> Recommendation:
        self._check_open()
        now = self.clock()
        assignment = self.experiments.assign(q.user_id or "", now)
        rec, served = self.requests.recommend(q, assignment.config, assignment.variant, assignment.arms, now)
        if self.journal.stale():  # the shared log has not been heard from within the staleness bound
            rec.degraded = True
            rec.degraded_reasons.append("stale_state")
        if _record:
            metrics.observe_recommendation(rec.timings_us, rec.degraded_reasons)
            self.feedback_path.record_served(served)
            self.snapshots.maybe_snapshot()
        return rec

    def candidates(self, q: RecommendQuery) -> Candidates:
        """Stage 1 alone for a query, with its experiment variant's config (inspection and tests)."""
        self._check_open()
        now = self.clock()
        return self.requests.candidates(q, self.experiments.assign(q.user_id or "", now).config, now)[0]

    def warm_up(self) -> None:
        """Run the pipeline once (unlogged) so the first real request pays no set-up
        (lazy indexes, imports, kernel first calls)."""
        user = "\x00warm-up"
        rec = self.recommend(RecommendQuery(user_id=user, n=self.cfg.recommend.default_n), _record=False)
        if rec.items:
            vec = self.catalog.embeddings[self.catalog.row_of[rec.items[0].item_id]]
            self.recommend(RecommendQuery(user_id=user, user_embedding=vec.tolist()), _record=False)

    def reload_ranker(self) -> list[str]:
        """Reload every ranker weights file from disk; all or nothing."""
        return self.requests.rankers.reload()

    def reload(self) -> tuple[list[str], list[str]]:
        """SIGHUP and ReloadRanker: re-read :attr:`config_path` (its reloadable keys, see
        :data:`recsvc.config.RELOADABLE`), then every ranker weights file. All or nothing: a bad file leaves the
        running settings in place. Returns (the weights files reloaded, "" = the default; what happened, one
        line per item, also logged)."""
        from recsvc.config import load_config, reloaded
        from recsvc.experiments import ExperimentSet

        done: list[str] = []
        cfg, applied, restart = self.cfg, [], []
        if self.config_path is not None:
            cfg, applied, restart = reloaded(self.cfg, load_config(self.config_path))
        experiments = self.experiments
        if applied:
            experiments = (ExperimentSet.load(cfg.experiments.file, cfg)
                           if cfg.experiments.file is not None else ExperimentSet.empty(cfg))
            self.requests.rankers.get(cfg.ranking.model_path)  # loads (or refuses) the new weights first
        for hook in self.on_reload:  # e.g. the server re-reads its token files, changed or not
            hook(cfg)
        self.cfg, self.experiments = cfg, experiments
        if self.config_path is not None:
            done.append(f"config {self.config_path}: " + (f"applied {', '.join(applied)}" if applied
                                                           else "no reloadable key changed"))
        if restart:
            done.append(f"needs a restart (running values kept): {', '.join(restart)}")
        files = self.requests.rankers.reload()
        done.append("ranker weights " + ", ".join(f or "(default)" for f in files))
        import logging

        logging.getLogger("recsvc.engine").info("reloaded: %s", "; ".join(done))
        return files, done

    # -- writes ---------------------------------------------------------------------------------------
    def feedback(self, events: Sequence[FeedbackEventIn]) -> FeedbackResult:
        """Ingest a batch; raises :class:`FeedbackRejected` (an ``InvalidArgument``) when nothing was usable."""
        self._check_open()
        try:
            result = self.feedback_path.ingest(events)
        except FeedbackRejected as exc:
            r = exc.result
            metrics.observe_feedback(r.accepted, r.duplicates, [e.reason for e in r.rejected])
            raise
        else:
            metrics.observe_feedback(result.accepted, result.duplicates, [e.reason for e in result.rejected])
            return result
        finally:
            self.snapshots.maybe_snapshot()

    def upsert_items(self, items: Sequence[ItemIn]) -> tuple[int, int]:
        """(inserted, updated)."""
        self._check_open()
        result = self.catalog_writer.upsert_items(items)
        self.snapshots.maybe_snapshot()
        return result

    def delete_items(self, item_ids: Sequence[str]) -> tuple[int, list[str]]:
        """(deleted, ids not in the catalog)."""
        self._check_open()
        result = self.catalog_writer.delete_items(item_ids)
        self.snapshots.maybe_snapshot()
        return result

    # -- experiments ----------------------------------------------------------------------------------
    def experiment_report(self, name: str = "", plot_metric: str = "") -> tuple[dict[str, Any], str, bytes]:
        """(report as JSON-safe dict, as text, PNG of ``plot_metric`` over time or b"")."""
        from recsvc.experiments import METRICS
        from recsvc.experiments.render import render_report

        # The caller's strings are quoted cut to size here (render_report would quote them whole).
        names = [e.name for e in self.experiments]
        if name and name not in names:
            raise NotFound(f"no experiment named {echo(name)}; known: {', '.join(names) or '(none)'}")
        if plot_metric and name and plot_metric not in METRICS:
            raise InvalidArgument(f"unknown metric {echo(plot_metric)}; choose from {', '.join(METRICS)}")
        return render_report(self.aggregates, self.experiments, name, plot_metric, self.clock(),
                             self.catalog.n_alive)

    # -- snapshots and shutdown -----------------------------------------------------------------------
    def snapshot(self) -> int:
        return self.snapshots.snapshot()

    def close(self, snapshot: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self.snapshots.closed = True
        if snapshot:
            try:
                self.snapshot()
            except Exception:  # never lose the log because a snapshot failed
                import logging

                logging.getLogger("recsvc.engine").exception(
                    "snapshot on close failed; the log still holds every event")
        self.journal.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the engine is shutting down")
