"""Approximate nearest neighbours over item embeddings (hnswlib).

Labels in the index are catalog rows. hnswlib's ``knn_query`` is thread-safe
with other queries and releases the GIL, but not with ``add_items`` /
``mark_deleted``: a readers-writer lock lets any number of queries run together
and gives live catalog changes short exclusive sections (one batch at a time).

``ef`` follows the requested ``k``: hnswlib searches with ``max(ef, k)``. ``ef``
itself is set once (``tune_for(k)``) to ``max(ef_search_min, ef_search_factor *
k)`` for the usual ANN fetch size k; a request that asks for more searches with
a beam of at least its own k. (A ``set_ef`` per request would race between
threads: ef is global to the index.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hnswlib
import numpy as np

from recsvc._files import atomic_write, checksum, mismatch, replacing
from recsvc.config import IndexConfig
from recsvc.retrieval.hugepages import HUGE, Advice, collapse_huge_page, new_mappings_to_huge_pages
from recsvc.retrieval.layout import IndexFileError, check_index_file, reorder_index_file

log = logging.getLogger(__name__)

INDEX_FILE = "index.bin"
INDEX_META = "index.json"
INDEX_LOCK = "index.lock"


class ReadWriteLock:
    """Many readers or one writer; writers do not starve (new readers wait)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    def acquire_read(self) -> None:
        """``read()`` without the context manager (a generator and its frames per query): pair it with
        ``release_read`` in a ``finally``."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class AnnIndex:
    """An hnswlib index whose labels are catalog rows."""

    def __init__(self, dim: int, cfg: IndexConfig, index: hnswlib.Index | None = None) -> None:
        self.dim = dim
        self.cfg = cfg
        self._index = index
        self._lock = ReadWriteLock()
        self.catalog_version = ""
        # Which rows are live in the index; deleted slots that new rows may reuse.
        self._in_index = np.zeros(0, bool)
        self._deleted_slots = 0
        self._live_count = 0
        self.huge_pages = Advice()  # what the last allocation got (see recsvc.retrieval.hugepages)
        self.layout = "insertion"  # or "clustered" (see recsvc.retrieval.layout)
        self._clustered_nodes = 0  # nodes in the graph when it was laid out

    def _track(self, rows: np.ndarray, deleted_slots: int = 0) -> None:
        self._in_index = np.zeros(int(rows.max()) + 1 if rows.size else 0, bool)
        self._in_index[rows] = True
        self._live_count = int(self._in_index.sum())
        self._deleted_slots = deleted_slots

    # -- construction ------------------------------------------------------------
    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space=self.cfg.space, dim=self.dim)
        # Nothing is faulted in yet: marking the allocation is enough.
        with new_mappings_to_huge_pages(self.cfg.huge_pages) as self.huge_pages:
            index.init_index(
                max_elements=max(capacity, 16),
                M=self.cfg.m,
                ef_construction=self.cfg.ef_construction,
                random_seed=100,
                allow_replace_deleted=True,
            )
        index.set_ef(self.cfg.ef_search_min)
        return index

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        rows: np.ndarray,
        cfg: IndexConfig,
        progress: bool = False,
        chunk: int = 10_000,
        capacity: int | None = None,
    ) -> "AnnIndex":
        """Build an index over ``embeddings[rows]`` (labels = rows), with room for ``capacity`` items.

        The default capacity leaves 10% for live upserts before the first grow.
        """
        dim = int(embeddings.shape[1])
        ann = cls(dim, cfg)
        n = int(rows.size)
        ann._index = ann._new_index(max(capacity or 0, int(n * 1.1) + 16))
        threads = cfg.build_threads or -1
        starts = range(0, n, chunk)
        if progress and n > chunk:
            from tqdm import tqdm

            starts = tqdm(starts, desc="HNSW index", unit="chunk", total=(n + chunk - 1) // chunk)
        for start in starts:
            sel = rows[start : start + chunk]
            ann._index.add_items(embeddings[sel], sel.astype(np.int64), num_threads=threads)
        ann._track(rows.astype(np.int64))
        return ann

    def save(self, directory: str | Path, catalog_version: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with _directory_lock(d, exclusive=True), self._lock.read():
            with replacing(d / INDEX_FILE) as tmp:
                self._index.save_index(str(tmp))
                written = checksum(tmp)
            # Nodes added since the graph was laid out sit at the end: past 10%
            # more, say so, and the next load lays it out again.
            layout = self.layout
            if layout == "clustered" and self._index.element_count > 1.1 * max(self._clustered_nodes, 1):
                layout = "insertion"
            meta = {
                "space": self.cfg.space, "dim": self.dim, "m": self.cfg.m,
                "ef_construction": self.cfg.ef_construction, "catalog_version": catalog_version,
                "count": self._live_count, "layout": layout,
                "file": written,  # index.bin's size and checksum: a load checks them before hnswlib reads it
            }
            _write_meta(d, meta)
        self.catalog_version = catalog_version

    @classmethod
    def load(
        cls, directory: str | Path, dim: int, cfg: IndexConfig, catalog_version: str,
        alive: np.ndarray | None = None,
    ) -> "AnnIndex | None":
        """Load a persisted index, or None when it is missing, stale or damaged (the caller rebuilds it).

        The file is checked before hnswlib reads it (a damaged graph crashes the process inside hnswlib):
        against the size and checksum in index.json, or, for a file saved before index.json had them,
        by its structure (``recsvc.retrieval.layout.check_index_file``).

        With ``cfg.reorder``, an index not yet laid out in cluster order is
        rewritten so first (once per file; see recsvc.retrieval.layout).
        Saves and reorders hold an exclusive lock on the directory, loads a
        shared one, so a load never pairs one save's graph with another's
        metadata (a read-only directory is read without the lock).
        """
        d = Path(directory)
        wanted = {"space": cfg.space, "dim": dim, "m": cfg.m, "catalog_version": catalog_version}
        if cfg.reorder and os.access(d, os.W_OK):
            _lay_out(d, dim, wanted)
        with _directory_lock(d, exclusive=False):
            meta = _read_meta(d)
            if meta is None or not (d / INDEX_FILE).exists() or any(meta.get(k) != v for k, v in wanted.items()):
                return None
            why = _damage(d, dim, meta)
            if why is not None:
                log.warning("%s: %s; rebuilding the index from the catalog", d / INDEX_FILE, why)
                return None
            return cls._load_file(d, dim, cfg, catalog_version, meta, alive)

    @classmethod
    def _load_file(cls, d: Path, dim: int, cfg: IndexConfig, catalog_version: str, meta: dict,
                   alive: np.ndarray | None) -> "AnnIndex | None":
        path = d / INDEX_FILE
        ann = cls(dim, cfg)
        ann.layout = "clustered" if meta.get("layout") == "clustered" else "insertion"
        index = hnswlib.Index(space=cfg.space, dim=dim)
        # hnswlib reads the file into memory of its own (one copy; it cannot map a file): marked for huge
        # pages here, and collapsed into them by a background thread (~1-2 s at 1M items that a start
        # need not wait for; queries run meanwhile, a little slower until it is done).
        with new_mappings_to_huge_pages(cfg.huge_pages) as ann.huge_pages:
            try:
                index.load_index(str(path), allow_replace_deleted=True)
            except RuntimeError as exc:  # "Index seems to be corrupted or unsupported"
                log.warning("%s: hnswlib cannot read it (%s); rebuilding the index from the catalog", path, exc)
                return None
        index.set_ef(cfg.ef_search_min)
        ann._index = index
        ann._clustered_nodes = index.element_count if ann.layout == "clustered" else 0
        ann.catalog_version = catalog_version
        labels = np.asarray(index.get_ids_list(), np.int64)
        # Labels of rows the catalog holds dead are (or become) deleted slots. (A mask, not np.setdiff1d:
        # numpy 2.4's hash-based unique took 2.3-3.1 s for a million labels.)
        if alive is not None and labels.size:
            keep = (labels < alive.size) & alive[np.minimum(labels, alive.size - 1)]
            live = labels[keep]
            for row in labels[~keep].tolist():
                try:
                    index.mark_deleted(int(row))
                except RuntimeError:
                    pass  # saved already marked
        else:
            live = labels
        ann._track(live, deleted_slots=int(labels.size - live.size))
        if ann.huge_pages.ranges:
            ann._collapse_in_background(index)
        return ann

    def _collapse_in_background(self, index: hnswlib.Index) -> None:
        """Collapse the freshly loaded graph's memory into huge pages, one at a time, off the start's path.

        Each page is collapsed under the read lock (a query runs alongside, a writer waits for one page at
        most); a resize (which moves the graph) or another index in its place ends it. The thread holds the
        index, so the memory it advises stays mapped while it runs.
        """
        advice, ranges, size = self.huge_pages, list(self.huge_pages.ranges), index.get_max_elements()

        def run() -> None:
            t = time.perf_counter()
            try:
                for lo, hi in ranges:
                    for at in range(lo, hi, HUGE):
                        with self._lock.read():
                            if self._index is not index or index.get_max_elements() != size:
                                return
                            collapse_huge_page(at, advice)
            finally:
                advice.collapsing = False
            log.info("HNSW index: %d MiB collapsed into huge pages in %.1f s%s", advice.collapsed_bytes >> 20,
                     time.perf_counter() - t, f" ({', '.join(advice.errors)})" if advice.errors else "")

        advice.collapsing = True
        threading.Thread(target=run, name="recsvc-index-huge-pages", daemon=True).start()

    def tune_for(self, k: int) -> int:
        """Set the search beam for the usual fetch size ``k``; returns ef."""
        ef = max(self.cfg.ef_search_min, int(np.ceil(self.cfg.ef_search_factor * k)))
        with self._lock.write():
            self._index.set_ef(ef)
        return ef

    # -- queries ---------------------------------------------------------------
    @property
    def live_count(self) -> int:
        return self._live_count

    def query(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by similarity (descending); similarity = 1 - distance."""
        labels, dist = self.query_labels(vector, k)
        return labels.astype(np.int32), (1.0 - dist).astype(np.float32)

    def query_labels(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's answer as it gives it: labels (uint64 catalog rows) and distances (float32), nearest
        first, at most ``k`` (fewer when the index holds fewer)."""
        lock = self._lock
        lock.acquire_read()
        try:
            k = min(k, self._live_count)
            if k <= 0:
                return _NO_LABELS, _NO_DISTANCES
            while True:
                try:
                    labels, dist = self._index.knn_query(vector, k=k, num_threads=1)
                    break
                except RuntimeError:  # the graph search reached fewer than k items (a small ip index): fewer
                    if k <= 1:
                        raise
                    k = k * 3 // 4
        finally:
            lock.release_read()
        return labels[0], dist[0]

    # -- live changes --------------------------------------------------------------
    def _ensure_rows(self, max_row: int) -> None:
        if max_row >= self._in_index.size:
            grown = np.zeros(max(max_row + 1, int(self._in_index.size * 1.5) + 16), bool)
            grown[: self._in_index.size] = self._in_index
            self._in_index = grown

    def upsert(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        """Add or replace vectors (labels = rows), growing the index when full.

        A row already in the index is updated in place; a new row takes the
        slot of a deleted one when there is any (``replace_deleted``), so
        churn does not grow the index.
        """
        if rows.size == 0:
            return
        rows = rows.astype(np.int64)
        with self._lock.write():
            idx = self._index
            self._ensure_rows(int(rows.max()))
            known = self._in_index[rows]
            n_new = int((~known).sum())
            free = idx.get_max_elements() - idx.element_count + self._deleted_slots
            if free < n_new:
                with new_mappings_to_huge_pages(self.cfg.huge_pages) as self.huge_pages:
                    idx.resize_index(int(max(idx.get_max_elements() * self.cfg.grow_factor,
                                             idx.element_count + n_new + 16)))
            if known.any():
                idx.add_items(vectors[known], rows[known], num_threads=1)
            if n_new:
                idx.add_items(vectors[~known], rows[~known], num_threads=1, replace_deleted=True)
                self._deleted_slots = max(0, self._deleted_slots - n_new)
                self._in_index[rows[~known]] = True
                self._live_count += n_new

    def delete(self, rows: np.ndarray) -> None:
        with self._lock.write():
            for row in rows.astype(np.int64):
                if row < self._in_index.size and self._in_index[row]:
                    self._index.mark_deleted(int(row))
                    self._in_index[row] = False
                    self._deleted_slots += 1
                    self._live_count -= 1


_NO_LABELS = np.empty(0, np.uint64)
_NO_DISTANCES = np.empty(0, np.float32)


def _write_meta(directory: Path, meta: dict) -> None:
    atomic_write(directory / INDEX_META, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))


# Checksums of index files computed ahead (see checksum_ahead): file identity -> (thread, [result]).
_AHEAD: dict[tuple, tuple[threading.Thread, list]] = {}
_AHEAD_LOCK = threading.Lock()


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def checksum_ahead(directory: str | Path) -> None:
    """Start checksumming the directory's index file on a thread (zlib releases the GIL for each block), so
    that a load after the catalog's finds it done (~0.3 s at 1M items off the start's path). Keyed by the
    file's size, mtime and inode: a file replaced meanwhile is checksummed again by the load."""
    path = Path(directory) / INDEX_FILE
    try:
        key = _identity(path)
    except OSError:
        return
    box: list = []
    thread = threading.Thread(target=lambda: box.append(checksum(path)), name="recsvc-index-checksum",
                              daemon=True)
    with _AHEAD_LOCK:
        _AHEAD[key] = (thread, box)
    thread.start()


def _index_mismatch(path: Path, entry: dict) -> str | None:
    """``mismatch(path, entry)``, with the checksum computed ahead when there is one for this very file."""
    try:
        key = _identity(path)
    except FileNotFoundError:
        return "missing"
    with _AHEAD_LOCK:
        ahead = _AHEAD.pop(key, None)
    if ahead is None or key[1] != entry.get("size"):
        return mismatch(path, entry)
    ahead[0].join()
    if ahead[1] and ahead[1][0] == {"size": entry.get("size"), "crc32": entry.get("crc32")}:
        return None
    return mismatch(path, entry)  # (read again: the message, or a failed thread)


def _damage(d: Path, dim: int, meta: dict) -> str | None:
    """Why the directory's index file must not reach hnswlib (None: it may)."""
    entry = meta.get("file")
    if isinstance(entry, dict):
        return _index_mismatch(d / INDEX_FILE, entry)
    try:  # saved before index.json carried a checksum
        check_index_file(d / INDEX_FILE, dim)
    except IndexFileError as exc:
        return f"not a graph hnswlib can read safely ({exc})"
    except OSError as exc:
        return f"unreadable ({exc})"
    return None


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / INDEX_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


@contextmanager
def _directory_lock(directory: Path, exclusive: bool) -> Iterator[bool]:
    """flock on ``index.lock`` in the directory; yields False (no lock) where it cannot be created."""
    try:
        fd = os.open(directory / INDEX_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield True
    finally:
        os.close(fd)  # (releases the lock)


def _lay_out(d: Path, dim: int, wanted: dict) -> None:
    """Rewrite the directory's index in cluster order unless it is already (or cannot be)."""
    # Looked at without the lock first: the exclusive lock waits for every load holding the shared one
    # (the workers of one server starting together would load one after another).
    meta = _read_meta(d)
    if meta is None or meta.get("layout") in ("clustered", "unrecognised") or any(
            meta.get(k) != v for k, v in wanted.items()):
        return
    with _directory_lock(d, exclusive=True) as locked:
        meta = _read_meta(d)
        if not locked or meta is None or any(meta.get(k) != v for k, v in wanted.items()):
            return
        layout = meta.get("layout")
        if layout in ("clustered", "unrecognised"):
            return
        if _damage(d, dim, meta) is not None:
            return  # the load says why and has it rebuilt: never rewrite a damaged file
        if layout == "reordering":
            log.warning("a reorder of the HNSW index in %s did not finish (out of memory?); serving it as "
                        "it is. Set \"layout\" to \"insertion\" in %s to try again.", d, INDEX_META)
            return
        t = time.perf_counter()
        try:
            _write_meta(d, {**meta, "layout": "reordering"})  # a crash from here on is not retried
            reorder_index_file(d / INDEX_FILE, dim)
        except IndexFileError as exc:
            log.warning("HNSW index in %s kept in insertion order: %s", d, exc)
            _write_meta(d, {**meta, "layout": "unrecognised"})
        except OSError as exc:
            log.warning("HNSW index in %s kept in insertion order: %s", d, exc)
            try:
                _write_meta(d, meta)
            except OSError:
                pass
        else:
            _write_meta(d, {**meta, "layout": "clustered", "file": checksum(d / INDEX_FILE)})
            log.info("HNSW index laid out in cluster order in %.1f s", time.perf_counter() - t)
