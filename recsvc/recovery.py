"""Start-up and recovery: the catalog and its index, the state from snapshot + log, and snapshots.

- :func:`load_catalog_and_index` — the configured catalog (or the cached demo) and its persisted HNSW
  index, built and saved only when missing or stale.
- :func:`open_catalog` — the same, but the catalog as of the newest snapshot when live changes made it
  diverge from the base files.
- :func:`recover` — seed popularity, load the newest snapshot, replay the log after it through the
  feedback path and the catalog writer (the same code that applied it live).
- :class:`Snapshotter` — a consistent cut of the state, the aggregates and (when diverged) the catalog,
  written in the background once enough records accumulated, and on shutdown.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from recsvc.catalog import Catalog, CatalogError, demo_catalog
from recsvc.config import Config
from recsvc.errors import InvalidArgument
from recsvc.retrieval.ann import AnnIndex, checksum_ahead
from recsvc.state.journal import Journal
from recsvc.state.records import CatalogDelete, CatalogUpsert
from recsvc.state.store import SnapshotDamaged, snapshot_refusal

if TYPE_CHECKING:
    from recsvc.catalog_writer import CatalogWriter
    from recsvc.feedback import FeedbackPath
    from recsvc.state.interface import OnlineState

log = logging.getLogger("recsvc.recovery")

# -- catalog and index ---------------------------------------------------------------------------------
def demo_cache_dir(cfg: Config) -> Path:
    d, i = cfg.catalog.demo, cfg.index
    key = f"demo-{d.n_items}x{d.dim}-c{d.n_categories}-t{d.n_topics}-s{d.seed}-{i.space}-m{i.m}-ef{i.ef_construction}"
    return Path(cfg.catalog.cache_dir).expanduser() / key


def load_catalog_and_index(cfg: Config, progress: bool = False, rebuild: bool = False) -> tuple[Catalog, AnnIndex]:
    """The configured catalog (or the cached demo) and its persisted index.

    The index lives beside the catalog; it is built (and saved) only when
    missing, stale (built for another catalog version or other parameters) or
    ``rebuild`` is set — a restart loads it.
    """
    normalize = cfg.index.space == "cosine"
    catalog: Catalog | None = None
    directory = demo_cache_dir(cfg) if cfg.catalog.path is None else Path(cfg.catalog.path).expanduser()
    if not rebuild:
        checksum_ahead(directory)  # the index file's checksum on a thread while the catalog is read
    if cfg.catalog.path is None:
        if (directory / "catalog.json").exists():
            try:
                catalog = Catalog.load(directory, normalize=normalize, progress=progress)
            except CatalogError as exc:  # the demo can be generated again: derived, not data
                log.warning("%s; generating the demo catalog again", exc)
        if catalog is None:
            catalog = demo_catalog(cfg.catalog.demo, progress=progress)
            catalog.normalize = normalize
            catalog.save(directory)
    else:
        if str(cfg.catalog.path) in ("", ".") and not (directory / "embeddings.npy").exists():
            raise CatalogError(f'catalog.path is empty (or "."), so the catalog would be read from {Path.cwd()}, '
                               "which has no embeddings.npy: set catalog.path to a catalog directory, or remove "
                               "the key to serve the demo catalog")
        catalog = Catalog.load(directory, normalize=normalize, progress=progress)
    if progress and not rebuild and (directory / "index.bin").exists():
        log.info("loading the HNSW index for %d items from %s", catalog.n_alive, directory)
    ann = None if rebuild else AnnIndex.load(directory, catalog.dim, cfg.index, catalog.version,
                                             alive=catalog.alive[: catalog.n_rows])
    if ann is None:
        t = time.perf_counter()
        ann = AnnIndex.build(catalog.embeddings[: catalog.n_rows], catalog.alive_rows(), cfg.index,
                             progress=progress)
        log.info("built HNSW index over %d items in %.1f s", catalog.n_alive, time.perf_counter() - t)
        try:
            ann.save(directory, catalog.version)
        except OSError as exc:  # a read-only catalog directory still serves
            log.warning("could not save the index beside the catalog (%s); it will be rebuilt next start", exc)
        else:
            if cfg.index.reorder:
                # Serve from the saved file, laid out in cluster order on load.
                ann = AnnIndex.load(directory, catalog.dim, cfg.index, catalog.version,
                                    alive=catalog.alive[: catalog.n_rows]) or ann
    return catalog, ann


def open_catalog(cfg: Config, journal: Journal, progress: bool = False) -> tuple[Catalog, AnnIndex, bool]:
    """(catalog, index, diverged): the newest snapshot's catalog when it carries one, else the base."""
    _, snap_dir = journal.latest_snapshot()
    diverged = snap_dir is not None and (snap_dir / "catalog" / "catalog.json").exists()
    if not diverged:
        return (*load_catalog_and_index(cfg, progress=progress), False)
    # The catalog as it was at the last snapshot, live changes included.
    catalog = Catalog.load(snap_dir / "catalog", normalize=cfg.index.space == "cosine")
    ann = AnnIndex.load(snap_dir / "catalog", catalog.dim, cfg.index, catalog.version,
                        alive=catalog.alive[: catalog.n_rows])
    if ann is None:  # derived: rebuilt from the snapshot's catalog, and kept there for the next start
        ann = AnnIndex.build(catalog.embeddings[: catalog.n_rows], catalog.alive_rows(), cfg.index,
                             progress=progress)
        try:
            ann.save(snap_dir / "catalog", catalog.version)
        except OSError as exc:
            log.warning("could not save the rebuilt index in %s (%s)", snap_dir / "catalog", exc)
    return catalog, ann, True


# -- the state -----------------------------------------------------------------------------------------------
def recover(catalog: Catalog, state: "OnlineState", journal: Journal, feedback: "FeedbackPath",
            writer: "CatalogWriter", now_ms: int) -> int:
    """Seed popularity; load the newest snapshot; replay the log after it. Returns the records replayed."""
    rows = catalog.alive_rows()
    state.seed_popularity(rows, catalog.base_popularity[rows], now_ms)
    snap_lsn, snap_dir = journal.latest_snapshot()
    if snap_dir is not None:
        state.read_snapshot(snap_dir)
        agg_path = snap_dir / "experiments.json"
        if agg_path.exists():
            try:
                feedback.aggregates = type(feedback.aggregates).from_dict(json.loads(agg_path.read_text()))
            except Exception as exc:  # any way the file can be unreadable
                raise SnapshotDamaged(snapshot_refusal(f"{agg_path}: unreadable ({exc})", snap_dir)) from None
    replayed = 0
    for lsn, rec in journal.replay(snap_lsn):
        try:
            if isinstance(rec, Exception):
                raise rec
            apply_record(rec, feedback, writer)
        except (InvalidArgument, CatalogError, KeyError, ValueError, TypeError) as exc:
            # A record that cannot apply must not keep the service down; it
            # was validated before it was logged, so this is worth a loud log.
            log.error("skipping log record lsn %s (%s): %s", lsn, type(rec).__name__, exc)
        state.applied_lsn = lsn
        replayed += 1
    if replayed:
        log.info("replayed %d log records after snapshot lsn %s", replayed, snap_lsn)
    journal.since_snapshot = replayed
    highest = state.max_referenced_row()
    if highest >= catalog.n_rows:
        raise RuntimeError(
            f"the online state refers to catalog row {highest} but the catalog has {catalog.n_rows} "
            "rows: the state directory belongs to another catalog; point state.dir elsewhere")
    return replayed


def apply_record(rec, feedback: "FeedbackPath", writer: "CatalogWriter", rebuild: bool = False) -> None:
    """Apply one logged record through the path that owns it (replay; a replica tailing a shared log)."""
    if isinstance(rec, (CatalogUpsert, CatalogDelete)):
        writer.apply(rec, rebuild=rebuild)
    else:
        feedback.apply(rec)


class Snapshotter:
    """Writes snapshots: a consistent cut taken in milliseconds under the journal's locks, files written
    after they are released (feedback and catalog changes keep flowing meanwhile)."""

    def __init__(self, journal: Journal, state: "OnlineState", feedback: "FeedbackPath", catalog: Catalog,
                 ann: AnnIndex, writer: "CatalogWriter", every_events: int) -> None:
        self.journal = journal
        self.state = state
        self.feedback = feedback  # its experiment aggregates
        self.catalog = catalog
        self.ann = ann
        self.writer = writer
        self.every_events = every_events
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._one_at_a_time = threading.Lock()  # (two would prune each other's files)
        self.closed = False
        #: how long the last snapshot held the ingest lock, and how long it took in all (seconds)
        self.last_pause_s = self.last_total_s = 0.0

    def maybe_snapshot(self) -> None:
        """Start a background snapshot once enough log records accumulated.

        Snapshots run off the request path (a Feedback call never waits for one,
        and a failing one is logged, not returned to a caller)."""
        if self.journal.since_snapshot < self.every_events or self.closed:
            return
        if not self.journal.durable:
            self.journal.since_snapshot = 0
            return
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._background, name="recsvc-snapshot", daemon=True)
            self._thread.start()

    def _background(self) -> None:
        try:
            with self._one_at_a_time:
                if not self.closed:  # the shutdown snapshot ran (or runs) instead
                    self._snapshot_once_or_twice()
        except Exception:  # the log still holds everything; try again after more events
            log.exception("background snapshot failed")

    def snapshot(self) -> int:
        """Write a snapshot covering every record logged so far; returns its lsn."""
        with self._one_at_a_time:
            return self._snapshot_once_or_twice()

    def _snapshot_once_or_twice(self) -> int:
        try:
            return self._snapshot(pause_ingest=False)
        except _CatalogMovedOn:
            # A catalog change landed while the index was saved (rare): hold ingestion this time.
            log.info("the catalog changed while the snapshot saved its index; snapshotting again "
                     "with ingestion paused")
            return self._snapshot(pause_ingest=True)

    def _snapshot(self, pause_ingest: bool) -> int:
        t0 = time.perf_counter()
        ingest = self.journal.ingest
        ingest.acquire()  # no feedback or catalog change runs meanwhile
        t_paused = time.perf_counter()
        paused = True
        try:
            if not self.journal.durable:
                self.journal.since_snapshot = 0
                return self.state.applied_lsn
            # A consistent cut: no served slate is half-recorded while we read the
            # lsn, the served slates and the experiment aggregates.
            with self.journal.served, _collector_paused():
                lsn = self.journal.lsn
                state = self.state.snapshot_cut(lsn)
                aggregates = self.feedback.aggregates.to_dict()
                self.journal.since_snapshot = 0
                catalog = self.catalog.cut(compact=False) if self.writer.diverged else None
            if not pause_ingest:
                ingest.release()
                paused = False
                self.last_pause_s = time.perf_counter() - t_paused
            self.journal.sync()  # the log up to lsn (served slates too) is on disk before the snapshot is

            def write(directory: Path) -> None:
                state.write(directory)
                (directory / "experiments.json").write_text(json.dumps(aggregates))
                if catalog is not None:
                    catalog.save(directory / "catalog")
                    # The live index: right for the cut unless the catalog (and so the index) changed since.
                    self.ann.save(directory / "catalog", catalog.version)
                    if self.catalog.changes != catalog.changes:
                        raise _CatalogMovedOn()

            try:
                self.journal.write_snapshot(lsn, write)
            finally:
                if catalog is not None:
                    catalog.release()
            self.last_total_s = time.perf_counter() - t0
            if paused:
                self.last_pause_s = time.perf_counter() - t_paused
            log.info("snapshot at lsn %s in %.2f s (ingestion paused %.1f ms)", lsn, self.last_total_s,
                     self.last_pause_s * 1000)
            return lsn
        finally:
            if paused:
                ingest.release()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while every writer waits: the cut allocates many small objects, and a
    full collection it would trigger costs far more than the copies themselves. (It runs afterwards.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _CatalogMovedOn(Exception):
    """The index changed after the snapshot's cut: it cannot go into that snapshot."""
