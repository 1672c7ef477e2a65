"""Durable storage of the online state: an append-only event log plus snapshots.

``StateStore`` is the interface the engine writes through; ``LocalStateStore``
keeps files under a directory (the embedded default) and ``MemoryStateStore``
keeps nothing (tests, throw-away runs). A shared store for many replicas
(e.g. a log in Kafka and snapshots in object storage) is another implementation
of the same four methods.

Log format: segments ``log-<first lsn>.jsonl``; one record per line::

    <crc32 of the JSON, 8 hex digits> <JSON object with "lsn" and "t">\n

A record is durable once ``append(..., durable=True)`` returns (write + fsync
when ``fsync = "batch"``). At start the whole log is checked: a torn last
record of the newest segment (a crash mid-write) is truncated; damaged bytes
anywhere else, or records missing between the snapshot and the end of the log,
refuse the start with the file, the byte offset and what would be lost, unless
the loss is accepted (``RECSVC_ACCEPT_LOSS=1``, ``recsvc serve --accept-loss``).

Snapshots: ``snapshots/snap-<lsn>/`` holds whatever the state serialises plus a
``DONE`` marker written last, which is also its manifest (every file's size and
CRC-32, checked before the snapshot is used); the newest complete one wins,
older ones and log segments it covers are deleted after it is durable.
Unfinished ``.tmp-snap-*`` directories are removed at start and by the snapshot
that fails.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from recsvc._files import atomic_write, checksum, fsync_dir, mismatch, replacing

Record = dict[str, Any]

log = logging.getLogger("recsvc.state")


#: Set to 1 to start over damage or gaps in the log knowingly (``recsvc serve --accept-loss`` sets it).
ACCEPT_LOSS_ENV = "RECSVC_ACCEPT_LOSS"
#: Losses accepted once (lsn gaps), so later starts need no switch.
ACCEPTED_LOSS_FILE = "accepted-loss.json"


class StateUnusable(RuntimeError):
    """The state directory cannot be used as it is; the message names the file and the way forward."""


class StateDirectoryInUse(StateUnusable):
    """Another engine holds the state directory."""


class LogCorrupted(StateUnusable):
    """The event log is damaged, or records are missing from it: starting would lose acknowledged events."""


class SnapshotDamaged(StateUnusable):
    """A file of the newest snapshot is not what its manifest says (or cannot be read)."""


def accept_loss_from_environment() -> bool:
    return os.environ.get(ACCEPT_LOSS_ENV, "").strip().lower() in ("1", "true", "yes")


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


#: ``json.dumps(rec, separators=(",", ":"), ensure_ascii=False)``'s encoder, made once (it holds no state
#: between calls): the same bytes without building an encoder per record.
_RECORD_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_record(rec: Record) -> bytes:
    body = _RECORD_JSON.encode(rec).encode()
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


#: Files a snapshot may hold that have their own manifest and can be rebuilt (the catalog's HNSW index,
#: which a load may also rewrite in cluster order): the snapshot's manifest leaves them out.
_DERIVED = frozenset({"index.bin", "index.json", "index.lock"})


def verify_snapshot(snap: Path) -> str | None:
    """Why a complete snapshot cannot be used — its first damaged file, named — or None.

    ``DONE``, written last, is the manifest: the lsn and every file's size and CRC-32. A snapshot
    written before manifests existed (``DONE`` holds the lsn only) is used as it is.
    """
    done = snap / "DONE"
    try:
        doc = json.loads(done.read_text())
        lsn = int(doc["lsn"])
        files = doc.get("files", {})
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{done}: unreadable manifest ({exc})"
    if snap.name != f"snap-{lsn:012d}":
        return f"{done}: its lsn {lsn} is not the directory's"
    for rel, entry in sorted(files.items()):
        why = mismatch(snap / rel, entry) if isinstance(entry, dict) else "a malformed manifest entry"
        if why is not None:
            return f"{snap / rel}: {why}"
    return None


def snapshot_refusal(why: str, snap: Path) -> str:
    return (f"{why}; snapshot {snap.name} is damaged, so starting from it would be wrong. Refusing to start: "
            f"restore {snap} from a backup, or start once with `recsvc serve --accept-loss` "
            f"(or {ACCEPT_LOSS_ENV}=1) to set it aside and start from an older snapshot and the log "
            "(what only this snapshot held is lost)")


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
    """Records with lsn > after_lsn, in order; a torn line ends a segment, a repeated lsn is skipped."""
    last = after_lsn
    for _, path in _segments(directory):
        with path.open("rb") as fh:
            for line in fh:
                rec = decode_line(line)
                if rec is None:
                    break
                lsn = _lsn_of(rec)
                if lsn is not None and lsn > last:
                    last = lsn
                    yield rec


def _lsn_of(rec: Any) -> int | None:
    lsn = rec.get("lsn") if isinstance(rec, dict) else None
    return lsn if isinstance(lsn, int) and not isinstance(lsn, bool) and lsn > 0 else None


# -- checking the log at start ----------------------------------------------------------------------
@dataclass
class _Segment:
    """One segment as read at start: where its valid records are and which bytes are damaged."""

    path: Path
    size: int = 0
    lsns: array = field(default_factory=lambda: array("q"))  # valid records, in file order
    offsets: array = field(default_factory=lambda: array("q"))  # ... and where each starts
    after_damage: set[int] = field(default_factory=set)  # indexes of records right after damaged bytes
    damaged: list[tuple[int, int]] = field(default_factory=list)  # [start, end) byte ranges

    @classmethod
    def read(cls, path: Path) -> "_Segment":
        seg = cls(path)
        pos = 0
        bad_start = -1
        with path.open("rb") as fh:
            for line in fh:
                rec = decode_line(line)
                lsn = _lsn_of(rec) if rec is not None else None
                if lsn is None:
                    if bad_start < 0:
                        bad_start = pos
                else:
                    if bad_start >= 0:
                        seg.damaged.append((bad_start, pos))
                        seg.after_damage.add(len(seg.lsns))
                        bad_start = -1
                    seg.lsns.append(lsn)
                    seg.offsets.append(pos)
                pos += len(line)
        if bad_start >= 0:
            seg.damaged.append((bad_start, pos))
        seg.size = pos
        return seg

    def valid_after(self, offset: int) -> int:
        return sum(1 for o in self.offsets if o > offset)

    @property
    def torn_tail(self) -> bool:
        """Damaged bytes only at the end, nothing valid after them: what a crash mid-write leaves."""
        return len(self.damaged) == 1 and self.damaged[0][1] == self.size and (
            not self.offsets or self.offsets[-1] < self.damaged[0][0])


@dataclass
class _Problem:
    """Something in the log that would lose acknowledged records if the store started over it."""

    kind: str  # "damage" (bytes), "gap" (missing lsns) or "order" (lsns out of order)
    position: tuple[int, int]  # (segment index, byte offset): problems are reported in log order
    message: str  # "" when another problem (the damage that caused a gap) says it
    gap: tuple[int, int] | None = None  # (last lsn before, first lsn after) the records it loses


def _how_to_proceed(restore: str) -> str:
    return (f"refusing to start rather than lose acknowledged events silently. Restore {restore} from a "
            f"backup, or accept the loss knowingly by starting once with `recsvc serve --accept-loss` "
            f"(or {ACCEPT_LOSS_ENV}=1)")


def _damage_problems(segs: list[_Segment], base: int) -> list[_Problem]:
    problems = []
    for i, seg in enumerate(segs):
        newest = i == len(segs) - 1
        if not seg.damaged or (newest and seg.torn_tail):
            continue
        start, _ = seg.damaged[-1]
        later = [lsn for o, lsn in zip(seg.offsets, seg.lsns) if o > start] or \
            [s.lsns[0] for s in segs[i + 1:] if s.lsns][:1]
        if later and later[0] <= base + 1:
            # It held records the snapshot covers: nothing to lose (replay never reads them).
            log.warning("%s: damaged bytes at %d hold only records the snapshot at lsn %d covers",
                        seg.path, start, base)
            continue
        start, _ = seg.damaged[0]
        n = seg.valid_after(start)
        follow = [lsn for o, lsn in zip(seg.offsets, seg.lsns) if o > start]
        span = f" (lsn {follow[0]}..{follow[-1]})" if follow else ""
        if newest:
            what = (f"{seg.path}: damaged record at byte {start}; {n} valid records follow it{span}, so it is "
                    "not a write torn by a crash")
        else:
            what = (f"{seg.path}: damaged record at byte {start} of a segment that is not the newest (a crash "
                    f"tears only the newest); {n} valid records follow it in this segment{span}")
        more = f" ({len(seg.damaged) - 1} more damaged ranges in this file)" if len(seg.damaged) > 1 else ""
        problems.append(_Problem("damage", (i, start), f"{what}{more}; {_how_to_proceed('the file')}"))
    return problems


def _continuity_problems(segs: list[_Segment], base: int, base_desc: str,
                         accepted: set[tuple[int, int]]) -> list[_Problem]:
    """Every record after the snapshot (lsn ``base``) must be there: lsns base+1, base+2, ... in order."""
    problems = []
    prev = 0
    for i, seg in enumerate(segs):
        for k, (lsn, off) in enumerate(zip(seg.lsns, seg.offsets)):
            where = f"{seg.path}: starts at lsn {lsn}" if k == 0 else \
                f"{seg.path}: lsn {lsn} at byte {off}"
            explained = k in seg.after_damage or (k == 0 and i > 0 and segs[i - 1].damaged
                                                   and segs[i - 1].damaged[-1][1] == segs[i - 1].size)
            if lsn <= prev:
                problems.append(_Problem("order", (i, off), f"{where} after lsn {prev}: records out of order "
                                                            f"(a segment copied twice?); {_how_to_proceed('the log')}"))
                continue
            expected = max(prev, base) + 1
            if lsn > base and lsn != expected and (expected - 1, lsn) not in accepted:
                before = (f"but the log before it ends at lsn {prev}" if prev > base else
                          f"but {base_desc}")
                message = "" if explained else (  # (the damage before it is the problem to report)
                    f"{where} {before}: records {expected}..{lsn - 1} are missing; "
                    f"{_how_to_proceed('the missing snapshot or log segment')}")
                problems.append(_Problem("gap", (i, off), message, gap=(expected - 1, lsn)))
            prev = lsn
    return problems


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
    if snap_dir is not None and (why := verify_snapshot(snap_dir)) is not None:
        raise SnapshotDamaged(snapshot_refusal(why, snap_dir))
    return snap_lsn, snap_dir, _records_after(d, snap_lsn)


class LocalStateStore:
    """Files under one directory: ``log-*.jsonl`` segments and ``snapshots/``."""

    def __init__(self, directory: str | Path, fsync: bool = True, accept_loss: bool | None = None) -> None:
        """Open (creating) the directory and check its log; ``accept_loss`` (default: the environment's
        ``RECSVC_ACCEPT_LOSS``) starts over damage or missing records instead of refusing."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "snapshots").mkdir(exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._dirty = False
        self._unrolled: OSError | None = None  # a failed write that could not be undone
        self._lock_fd = self._take_directory_lock()
        try:
            self._remove_unfinished_snapshots()
            self.lsn = self._recover(accept_loss_from_environment() if accept_loss is None else accept_loss)
            self._open_segment(self.lsn + 1)
        except BaseException:
            os.close(self._lock_fd)  # a refused start must not keep the directory locked
            raise

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

    def _recover(self, accept_loss: bool) -> int:
        """Check the log from the newest snapshot on; return the last lsn.

        Only the newest segment can end in a torn record (a crash mid-write): that tail is truncated.
        Damaged bytes anywhere else, or records missing between the snapshot and the end of the log
        (a removed snapshot or DONE marker, a deleted segment), would silently drop acknowledged events:
        the store refuses to start, naming the file and the byte offset, unless ``accept_loss``. Then
        damaged segments keep their valid records (the original is kept beside them as ``*.damaged``)
        and the gaps are recorded in ``accepted-loss.json`` so later starts need no switch.
        """
        base, snap = self._verified_snapshot(accept_loss)
        base_desc = (f"the newest complete snapshot ({snap.relative_to(self.dir)}) covers only up to lsn {base}"
                     if snap is not None else "there is no complete snapshot")
        unfinished = [p.name for lsn, p in self._snapshot_dirs() if lsn > base and not (p / "DONE").exists()]
        if unfinished:
            base_desc += f" (snapshots/{unfinished[-1]} has no DONE marker)"
            log.warning("ignoring %s: no DONE marker (an unfinished or damaged snapshot)",
                        ", ".join(f"snapshots/{n}" for n in unfinished))
        accepted = self._accepted_gaps()
        segs = [_Segment.read(path) for _, path in self._segments()]
        problems = sorted(_damage_problems(segs, base) + _continuity_problems(segs, base, base_desc, accepted),
                          key=lambda p: p.position)
        reported = [p for p in problems if p.message]
        if reported and not accept_loss:
            for p in reported[1:]:
                log.error("%s", p.message)
            more = f" ({len(reported) - 1} more problems are logged above)" if len(reported) > 1 else ""
            raise LogCorrupted(reported[0].message + more)
        for p in reported:
            if p.kind == "order":  # (replay skips a repeated lsn)
                log.error("accepted: %s", p.message.split("; ")[0])
        damaged = {p.position[0] for p in problems if p.kind == "damage"}
        for i, seg in enumerate(segs):
            if i in damaged:
                self._keep_valid_records(seg)
            elif i == len(segs) - 1 and seg.torn_tail:
                start = seg.damaged[0][0]
                log.warning("%s: truncating a torn last record (%d bytes at byte %d, written by a crash)",
                            seg.path, seg.size - start, start)
                with seg.path.open("r+b") as fh:
                    fh.truncate(start)
                    fh.flush()
                    os.fsync(fh.fileno())
        gaps = [p.gap for p in problems if p.gap is not None]
        if gaps:
            self._accept_gaps(gaps, base)
        return max(base, max((max(seg.lsns) for seg in segs if seg.lsns), default=0))

    def _verified_snapshot(self, accept_loss: bool) -> tuple[int, Path | None]:
        """The newest complete snapshot whose files match its manifest; a damaged one refuses the start
        (or, accepted, is set aside as ``damaged-snap-*`` and the next older one is tried)."""
        while True:
            base, snap = self.latest_snapshot()
            if snap is None or (why := verify_snapshot(snap)) is None:
                return base, snap
            if not accept_loss:
                raise SnapshotDamaged(snapshot_refusal(why, snap))
            aside = snap.with_name(f"damaged-{snap.name}")
            n = 1
            while aside.exists():
                aside = snap.with_name(f"damaged-{snap.name}.{n}")
                n += 1
            os.replace(snap, aside)
            fsync_dir(snap.parent)
            log.error("accepted the loss of snapshot %s (%s); it is set aside as %s", snap.name, why, aside)

    def _keep_valid_records(self, seg: _Segment) -> None:
        """Accepted damage: the segment keeps its valid records; the original stays beside it."""
        copy = seg.path.with_name(seg.path.name + ".damaged")
        n = 1
        while copy.exists():
            copy = seg.path.with_name(f"{seg.path.name}.damaged.{n}")
            n += 1
        shutil.copy2(seg.path, copy)
        with replacing(seg.path) as tmp, seg.path.open("rb") as src, tmp.open("wb") as dst:
            for line in src:
                rec = decode_line(line)
                if rec is not None and _lsn_of(rec) is not None:
                    dst.write(line)
        lost = sum(end - start for start, end in seg.damaged)
        log.error("accepted the loss of %d damaged bytes in %s (at byte %d%s); its %d valid records are kept; "
                  "the damaged original is %s", lost, seg.path, seg.damaged[0][0],
                  f" and {len(seg.damaged) - 1} more places" if len(seg.damaged) > 1 else "",
                  len(seg.lsns), copy)

    def _accepted_gaps(self) -> set[tuple[int, int]]:
        path = self.dir / ACCEPTED_LOSS_FILE
        try:
            doc = json.loads(path.read_text())
            return {(int(g["after"]), int(g["next"])) for g in doc["gaps"]}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LogCorrupted(f"{path}: unreadable ({exc}); it lists log gaps accepted with --accept-loss: "
                               "restore it, or remove it and accept them again") from None

    def _accept_gaps(self, gaps: list[tuple[int, int]], base: int) -> None:
        path = self.dir / ACCEPTED_LOSS_FILE
        known = {g for g in self._accepted_gaps() if g[1] > base}  # those a snapshot covers are moot
        for after, nxt in gaps:
            if (after, nxt) not in known:
                log.error("accepted the loss of log records %d..%d (%d records)", after + 1, nxt - 1,
                          nxt - after - 1)
        known.update(gaps)
        doc = {"gaps": [{"after": a, "next": b} for a, b in sorted(known)],
               "accepted_at_ms": time.time_ns() // 1_000_000}
        atomic_write(path, lambda fh: fh.write(json.dumps(doc, indent=1).encode()))

    def _snapshot_dirs(self) -> list[tuple[int, Path]]:
        found = []
        for p in (self.dir / "snapshots").glob("snap-*"):
            try:
                found.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
        return sorted(found)

    def _open_segment(self, first_lsn: int) -> None:
        path = self.dir / f"log-{first_lsn:012d}.jsonl"
        self._fh = open(path, "ab", buffering=0)
        self._segment_first = first_lsn
        fsync_dir(self.dir)

    def append(self, records: list[Record], durable: bool) -> int:
        with self._lock:
            if self._unrolled is not None:
                raise OSError(self._unrolled.errno, f"the log could not be rolled back after a failed write "
                                                    f"({self._unrolled}); restart to recover it")
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
                except OSError as exc:
                    # Part of the batch may stay in the file: one more record after it would turn a torn
                    # tail (truncated at start) into damage mid-segment (a refused start). No more appends.
                    self._unrolled = exc
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

        ``write`` fills a directory with the state as of ``lsn`` (the caller took that cut under its
        ingest lock; the writing itself may run while later records are appended). One snapshot at a
        time; one no newer than the newest complete snapshot is not written.
        """
        with self._snapshot_lock:
            self._write_snapshot(lsn, write)

    def _write_snapshot(self, lsn: int, write: Callable[[Path], None]) -> None:
        snaps = self.dir / "snapshots"
        final = snaps / f"snap-{lsn:012d}"
        if self.latest_snapshot()[0] >= lsn:
            return  # nothing new since the last snapshot (never replace a good one in place)
        tmp = snaps / f".tmp-snap-{lsn:012d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write(tmp)
            files = {}
            for p in sorted(tmp.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                if p.is_dir():
                    fsync_dir(p)
                else:
                    with p.open("rb") as fh:
                        os.fsync(fh.fileno())
                    if p.name not in _DERIVED:
                        files[p.relative_to(tmp).as_posix()] = checksum(p)
            # The manifest, written last: a start checks every file against it before reading any.
            done = tmp / "DONE"
            done.write_text(json.dumps({"lsn": lsn, "files": dict(sorted(files.items()))}, indent=1))
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
        for older_lsn, p in self._snapshot_dirs():
            if older_lsn < lsn:
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
