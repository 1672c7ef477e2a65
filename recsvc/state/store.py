"""Durable storage of the online state: an append-only event log plus snapshots.

``StateStore`` is the interface the engine writes through; ``LocalStateStore``
keeps files under a directory (the embedded default) and ``MemoryStateStore``
keeps nothing (tests, throw-away runs). A shared store for many replicas
(e.g. a log in Kafka and snapshots in object storage) is another implementation
of the same four methods.

Log format: segments ``log-<first lsn>.jsonl``; one record per line::

    <crc32 of the JSON, 8 hex digits> <JSON object with "lsn" and "t">\n

A record is durable once ``append(..., durable=True)`` returns (write + fsync
when ``fsync = "batch"``). Replay stops at the first torn or corrupt line
(a crash mid-write) and truncates it, so what was acknowledged is what replays.

Snapshots: ``snapshots/snap-<lsn>/`` holds whatever the state serialises plus a
``DONE`` marker written last; the newest complete one wins, older ones and log
segments it covers are deleted after it is durable.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from recsvc._files import fsync_dir

Record = dict[str, Any]

log = logging.getLogger("recsvc.state")


class StateDirectoryInUse(RuntimeError):
    """Another engine holds the state directory."""


class LogCorrupted(RuntimeError):
    """The event log is damaged somewhere other than a torn last record."""


class StateStore(Protocol):
    def append(self, records: list[Record], durable: bool) -> int:
        """Append records (assigning lsns); return the last lsn. Durable when asked."""

    def replay(self, after_lsn: int) -> Iterator[Record]:
        """Records with lsn > after_lsn, in order."""

    def write_snapshot(self, lsn: int, write: Callable[[Path], None]) -> None:
        """Persist a snapshot covering every record up to ``lsn``."""

    def latest_snapshot(self) -> tuple[int, Path | None]:
        """(lsn, directory) of the newest complete snapshot, or (0, None)."""

    def close(self) -> None: ...


class MemoryStateStore:
    """No durability: records are counted and dropped."""

    def __init__(self) -> None:
        self.lsn = 0
        self._lock = threading.Lock()

    def append(self, records: list[Record], durable: bool) -> int:
        with self._lock:
            for rec in records:
                self.lsn += 1
                rec["lsn"] = self.lsn
            return self.lsn

    def replay(self, after_lsn: int) -> Iterator[Record]:
        return iter(())

    def write_snapshot(self, lsn: int, write: Callable[[Path], None]) -> None:
        return None

    def latest_snapshot(self) -> tuple[int, Path | None]:
        return 0, None

    def close(self) -> None:
        return None


def encode_record(rec: Record) -> bytes:
    body = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_line(line: bytes) -> Record | None:
    """The record on a line, or None when the line is torn or corrupt."""
    if not line.endswith(b"\n") or len(line) < 11 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


def _latest_snapshot(directory: Path) -> tuple[int, Path | None]:
    """(lsn, directory) of the newest complete snapshot (one with its DONE marker), or (0, None)."""
    best: tuple[int, Path | None] = (0, None)
    for p in (directory / "snapshots").glob("snap-*"):
        if not (p / "DONE").exists():
            continue
        try:
            lsn = int(p.name.split("-", 1)[1])
        except ValueError:
            continue
        if lsn >= best[0]:
            best = (lsn, p)
    return best


def _segments(directory: Path) -> list[tuple[int, Path]]:
    """Log segments as (first lsn, path), oldest first."""
    segs = []
    for p in directory.glob("log-*.jsonl"):
        try:
            segs.append((int(p.stem.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(segs)


def _records_after(directory: Path, after_lsn: int) -> Iterator[Record]:
    """Records with lsn > after_lsn, in order; a torn line ends a segment."""
    for _, path in _segments(directory):
        with path.open("rb") as fh:
            for line in fh:
                rec = decode_line(line)
                if rec is None:
                    break
                if int(rec["lsn"]) > after_lsn:
                    yield rec


def read_state_dir(directory: str | Path) -> tuple[int, Path | None, Iterator[Record]]:
    """Read-only view of a state directory (safe while a server writes to it).

    Returns (snapshot lsn, snapshot directory or None, records after it). Unlike
    opening a ``LocalStateStore`` it creates and truncates nothing; a torn last
    line simply ends the iteration.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no state directory at {d}")
    snap_lsn, snap_dir = _latest_snapshot(d)
    return snap_lsn, snap_dir, _records_after(d, snap_lsn)


class LocalStateStore:
    """Files under one directory: ``log-*.jsonl`` segments and ``snapshots/``."""

    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "snapshots").mkdir(exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._dirty = False
        self._lock_fd = self._take_directory_lock()
        self._remove_unfinished_snapshots()
        self.lsn = self._recover()
        self._open_segment(self.lsn + 1)

    def _take_directory_lock(self) -> int:
        """One writer per state directory: two would interleave lsns and prune
        each other's segments. (Readers, e.g. ``train-ranker``, take no lock.)"""
        fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateDirectoryInUse(
                f"state directory {self.dir} is in use by another process or engine; give each "
                "engine its own state.dir") from None
        return fd

    def _remove_unfinished_snapshots(self) -> None:
        """Snapshots a killed process left half-written: nobody else writes here (we hold the lock)."""
        for tmp in (self.dir / "snapshots").glob(".tmp-snap-*"):
            log.info("removing the unfinished snapshot %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)

    # -- log ---------------------------------------------------------------------
    def _segments(self) -> list[tuple[int, Path]]:
        return _segments(self.dir)

    def _recover(self) -> int:
        """Find the last good lsn, truncating a torn tail of the last segment.

        Only the newest segment can end in a torn record (a crash mid-write); a
        bad record anywhere else means the log is damaged, and starting would
        silently drop acknowledged events, so it refuses.
        """
        snap_lsn, _ = self.latest_snapshot()
        last = snap_lsn
        segments = self._segments()
        for i, (_, path) in enumerate(segments):
            good_bytes = 0
            with path.open("rb") as fh:
                for line in fh:
                    rec = decode_line(line)
                    if rec is None:
                        break
                    good_bytes += len(line)
                    last = max(last, int(rec["lsn"]))
            if good_bytes < path.stat().st_size:
                if i != len(segments) - 1:
                    raise LogCorrupted(
                        f"{path}: damaged record at byte {good_bytes} in a segment that is not the newest; "
                        "refusing to start (restore the file or move it aside knowingly)")
                with path.open("r+b") as fh:
                    fh.truncate(good_bytes)
                    fh.flush()
                    os.fsync(fh.fileno())
        return last

    def _open_segment(self, first_lsn: int) -> None:
        path = self.dir / f"log-{first_lsn:012d}.jsonl"
        self._fh = open(path, "ab", buffering=0)
        self._segment_first = first_lsn
        fsync_dir(self.dir)

    def append(self, records: list[Record], durable: bool) -> int:
        with self._lock:
            chunks = []
            for rec in records:
                self.lsn += 1
                rec["lsn"] = self.lsn
                chunks.append(encode_record(rec))
            data = b"".join(chunks)
            start = self._fh.tell()
            try:
                # The kernel has the bytes once write() returns, so they survive a
                # killed process even before fsync; write() may be partial (disk full).
                view = memoryview(data)
                while view:
                    view = view[self._fh.write(view):]
                if durable and self.fsync:
                    os.fdatasync(self._fh.fileno())
                    self._dirty = False
                else:
                    self._dirty = True
            except OSError:
                # Roll back: nothing of this batch stays in the log, and the lsns
                # are handed out again.
                self.lsn -= len(records)
                try:
                    self._fh.truncate(start)
                    self._fh.seek(start)
                except OSError:
                    pass
                raise
            return self.lsn

    def sync(self) -> None:
        with self._lock:
            if self._dirty:
                os.fdatasync(self._fh.fileno())
                self._dirty = False

    def replay(self, after_lsn: int) -> Iterator[Record]:
        return _records_after(self.dir, after_lsn)

    # -- snapshots -----------------------------------------------------------------
    def latest_snapshot(self) -> tuple[int, Path | None]:
        return _latest_snapshot(self.dir)

    def write_snapshot(self, lsn: int, write: Callable[[Path], None]) -> None:
        """Write a snapshot for ``lsn``; then drop what it makes redundant.

        The caller guarantees that no record with lsn <= ``lsn`` is still being
        applied (it holds the ingest lock while serialising).
        """
        snaps = self.dir / "snapshots"
        final = snaps / f"snap-{lsn:012d}"
        if (final / "DONE").exists():
            return  # nothing new since the last snapshot; never replace a good one in place
        tmp = snaps / f".tmp-snap-{lsn:012d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            for p in sorted(tmp.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                if p.is_dir():
                    fsync_dir(p)
                else:
                    with p.open("rb") as fh:
                        os.fsync(fh.fileno())
            done = tmp / "DONE"
            done.write_text(json.dumps({"lsn": lsn}))
            with done.open("rb") as fh:
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            # A failed snapshot (a full disk) must not keep the space it took.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(snaps)
        # Rotate the log so whole segments become redundant, then prune.
        with self._lock:
            self._fh.close()
            self._open_segment(self.lsn + 1)
        for first, path in self._segments():
            if path.name == self._fh.name.rsplit("/", 1)[-1]:
                continue
            last_in_segment = self._last_lsn_of(path)
            if last_in_segment is not None and last_in_segment <= lsn:
                path.unlink()
            elif last_in_segment is None and first <= lsn:
                path.unlink()
        for p in snaps.glob("snap-*"):
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(self.dir)

    @staticmethod
    def _last_lsn_of(path: Path) -> int | None:
        last = None
        with path.open("rb") as fh:
            for line in fh:
                rec = decode_line(line)
                if rec is None:
                    break
                last = int(rec["lsn"])
        return last

    def close(self) -> None:
        with self._lock:
            if self._fh.closed:
                return
            if self._dirty:
                os.fdatasync(self._fh.fileno())
            self._fh.close()
            os.close(self._lock_fd)  # releases the directory lock
