"""The remembered served slates as compact columns: a ring of blocks, not one Python object per slate.

The read model keeps the most recent ``state.served_log_size`` served slates (attribution, experiment counts,
training). As :class:`~recsvc.state.records.ServedSlate` objects in a dict each cost ~2.2-2.6 KB of resident
memory (lists of Python ints and floats, two dicts, a float32 feature blob); here a slate is one entry of
per-slate columns and k entries of per-item columns, in blocks of a few thousand slates::

    per slate   request_id as 16 bytes (a uuid4's hex, as the request path makes them; any other string is kept
                as it is, in a dict), user_id (a reference to the string), served_at_ms int64, meta int32
                (variant, arms and feature names, interned), diversity/novelty/random_p float64, flags uint8,
                two int32 offsets
    per item    row int32, propensity float64 (exact: Monte-Carlo shares such as 44/129 are not float32 values),
                state uint8 (outcome bits 0-1, counted bits 2-4)
    random slice  per item, only for the slates that carry them (random-slice slates): the main policy's
                propensity float64 (``target_propensities``), at the per-slate offset ``ta``
    features    per slate, in a byte column: columns constant over the slate once, 0/1 columns as bits, mostly
                zero columns as a bitmap and their non-zero values, the rest as float16 (see
                :func:`encode_features`)
    lookup      an open-addressing table (linear probing, int64 sequence numbers) keyed by the request id's
                16 bytes (Fibonacci-hashed), doubled when half full; evictions delete by backward shift

Features are the one lossy part: each logged value is rounded to float16 (relative error at most 2^-11 ≈ 4.9e-4,
absolute at most 2^-25 below 6.1e-5); a slate with a finite value beyond float16's range (|x| > 65504) or an
infinity keeps its float32 block exactly. Everything else reads back exactly as it was recorded.

Oldest slates are evicted one at a time (the lookup forgets them at once); a block's memory is released when its
last slate is evicted, so up to one block of evicted slates is still resident. Only the block being filled and
the per-item ``state`` change after a slate is recorded, so a cut (:meth:`ServedRing.cut`) copies those and
shares the rest.

Not thread-safe: the read model calls it under its lock (appending seals blocks, evicting moves the lookup's
entries and the block index), readers included.
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Iterator, Sequence

import numpy as np

from recsvc._fastpath.twins import served as _twin
from recsvc.state.records import ServedSlate

try:
    from recsvc._fastpath import _served as _native
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError("recsvc._fastpath._served is not compiled; run `python setup.py build_ext --inplace` "
                      "(or `pip install -e .`)") from exc

__all__ = ["ServedRing", "ServedCut", "encode_features", "decode_features"]

_RANDOM_SLICE, _HAS_DIV, _HAS_NOV, _HAS_RP, _RAW_FEATURES, _DEAD, _OTHER_ID, _HAS_TARGET = 1, 2, 4, 8, 16, 32, 64, 128
_OUTCOME_MASK, _COUNTED_SHIFT, _COUNTED_MASK = 0b11, 2, 0b11100
_MAX_BLOCK = 4096


def encode_features(block: np.ndarray, use_native: bool = True) -> bytes | None:
    """A float32 [k, F] feature block in its compact form, or None when float16 cannot hold it (a value with
    |x| > 65504, or an infinity: the caller then keeps the float32 bytes).

    Each value is rounded to float16 (numpy's rounding); then each column is stored in the smallest of four
    forms, chosen per slate: *constant* over the slate (context features, absent sources) — its value once;
    *0/1* (the ``from_*`` flags) — a bitmap; *sparse* (enough zeros that a bitmap and the non-zero values are
    smaller: the source scores) — both; *dense* — every value. The layout is in ``_served.pyx``'s header.
    """
    x = np.ascontiguousarray(block, np.float32)
    out = np.empty(_encoded_bound(*x.shape), np.uint8)
    n = _encode_into(x.tobytes(), *x.shape, out, 0, use_native)
    return None if n < 0 else out[:n].tobytes()


def decode_features(buf: bytes | np.ndarray, k: int, f: int, use_native: bool = True) -> np.ndarray:
    """The float32 [k, F] block :func:`encode_features` encoded (each value rounded to float16)."""
    raw = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else buf
    x = np.empty((k, f), np.float32)
    if (_native if use_native else _twin).decode_features(np.ascontiguousarray(raw, np.uint8), x) < 0:
        raise ValueError(f"encoded features ({raw.size} bytes) do not match a {k} x {f} block")
    return x


def _encoded_bound(k: int, f: int) -> int:
    return 3 * ((f + 7) // 8) + 2 * f + (k * f + 7) // 8 + 2 * k * f


def _encode_into(block: bytes, k: int, f: int, out: np.ndarray, at: int, use_native: bool = True) -> int:
    """Encode a float32 [k, F] block's bytes into ``out[at:]`` (``_encoded_bound`` bytes free); the bytes
    written, or -1 when float16 cannot hold it."""
    n = (_native if use_native else _twin).encode_features(block, k, f, out, at)
    if n < -1:
        raise RuntimeError(f"feature encoding failed with status {n}")
    return n


def _grown(arr: np.ndarray, need: int) -> np.ndarray:
    if need <= arr.size:
        return arr
    out = np.empty(max(need, 2 * arr.size, 64), arr.dtype)
    out[: arr.size] = arr
    return out


#: One record per slate: request id halves, served_at_ms, meta, diversity, novelty, random_p, and where its items
#: (first, count) and feature bytes (first, count) are in the block's per-item and byte columns, and where its
#: target propensities start in the block's ``tprops`` column (``k`` of them, when the slate has them).
_RECORD = np.dtype([("lo", "<i8"), ("hi", "<i8"), ("ts", "<i8"), ("meta", "<i4"), ("div", "<f8"), ("nov", "<f8"),
                    ("rp", "<f8"), ("a", "<i4"), ("k", "<i4"), ("fa", "<i4"), ("nf", "<i4"), ("ta", "<i4")])
_PER_ITEM = (("rows", "i", np.int32), ("props", "d", np.float64), ("state", "B", np.uint8))


class _Block:
    """Up to ``size`` consecutive slates. While it fills, a slate's record is a tuple in a list, its flags and
    user id are list entries and its items are appended to arrays (tens of nanoseconds each, where a numpy
    element write costs a hundred or more); when full it is sealed into a numpy record array and columns.
    ``record(i)`` reads one slate's record as a tuple either way (one call, not one per field)."""

    __slots__ = ("size", "n", "recs", "rec", "flags", "user", "rows", "props", "state", "tprops", "feat", "feat_end",
                 "sealed")

    def __init__(self, size: int) -> None:
        self.size = size
        self.n = 0
        self.recs: list[tuple] | None = []
        self.rec = np.empty(0, _RECORD)
        self.flags: list[int] | np.ndarray = []
        self.user: list[str] = []  # references to the user id strings
        for name, code, _ in _PER_ITEM:
            setattr(self, name, array(code))
        self.tprops = array("d")  # the random slice's slates only: the main policy's propensity per item
        self.feat = np.empty(0, np.uint8)  # grown by doubling, trimmed when sealed
        self.feat_end = 0
        self.sealed = False

    def record(self, i: int) -> tuple:
        recs = self.recs
        return recs[i] if recs is not None else self.rec[i].item()

    def seal(self) -> None:
        self.rec = np.array(self.recs, _RECORD)
        self.flags = np.array(self.flags, np.uint8)
        for name, _, dtype in _PER_ITEM:
            setattr(self, name, np.frombuffer(getattr(self, name), dtype).copy())
        self.tprops = np.frombuffer(self.tprops, np.float64).copy()
        self.feat = self.feat[: self.feat_end].copy()
        self.recs = None
        self.sealed = True

    def frozen_copy(self) -> "_Block":
        """A copy a cut can keep while this block changes: a sealed block shares everything but ``state`` and
        ``flags``; the block being filled copies its used part."""
        b = _Block.__new__(_Block)
        b.size, b.n, b.sealed, b.feat_end = self.size, self.n, True, self.feat_end
        for name in ("recs", "rec", "user", "rows", "props", "tprops", "flags", "state"):
            value = getattr(self, name)
            if value is not None and (not self.sealed or name in ("flags", "state")):
                value = value.copy() if isinstance(value, np.ndarray) else value[:]
            setattr(b, name, value)
        b.feat = self.feat if self.sealed else self.feat[: self.feat_end].copy()
        return b

    def column(self, field: str) -> np.ndarray:
        """One record field of every slate in the block."""
        if self.recs is None:
            return self.rec[field]
        return np.array([r[_RECORD.names.index(field)] for r in self.recs], _RECORD[field])

    def nbytes(self) -> int:
        total = self.rec.nbytes + self.feat.nbytes + 8 * len(self.user)
        total += np.asarray(self.flags).nbytes if self.sealed else 8 * len(self.flags)
        if self.recs is not None:
            total += sum(8 * len(r) + 24 * len(r) + 56 for r in self.recs)  # the tuples and their numbers, roughly
        for name in [name for name, _, _ in _PER_ITEM] + ["tprops"]:
            value = getattr(self, name)
            total += value.nbytes if isinstance(value, np.ndarray) else value.itemsize * len(value)
        return total


def _uuid_halves(request_id: str) -> tuple[int, int] | None:
    """A lowercase 32-digit hex request id (``uuid4().hex``) as two signed 64-bit halves, else None."""
    if len(request_id) != 32:
        return None
    try:
        raw = bytes.fromhex(request_id)
    except ValueError:
        return None
    if raw.hex() != request_id:  # upper case, or spaces: keep the string as it is
        return None
    return int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)


_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio (Fibonacci hashing)
_U64 = 0xFFFFFFFFFFFFFFFF


def _home(lo: int, hi: int, mask: int) -> int:
    """The table position an id's probe starts at: both halves mixed, so ids sharing either half spread."""
    return (((lo ^ hi) * _MIX) & _U64) >> 32 & mask


def _homes(lo: np.ndarray, hi: np.ndarray, mask: int) -> np.ndarray:
    """:func:`_home` of many ids (wrapping uint64 arithmetic: the same numbers)."""
    return ((lo ^ hi).view(np.uint64) * np.uint64(_MIX) >> np.uint64(32) & np.uint64(mask)).astype(np.int64)


def _uuid_hex(lo: int, hi: int) -> str:
    return (lo.to_bytes(8, "little", signed=True) + hi.to_bytes(8, "little", signed=True)).hex()


class _Columns:
    """Reading one slate out of a sequence of blocks (shared by the live ring and its cuts)."""

    _blocks: deque[_Block] | list[_Block]
    _first_seq: int
    _block_size: int
    _metas: list[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]]
    _other_ids: dict[int, str]  # sequence number -> a request id that is not a uuid's hex

    def _at(self, seq: int) -> tuple[_Block, int]:
        i, pos = divmod(seq - self._first_seq, self._block_size)
        return self._blocks[i], pos

    def _request_id(self, seq: int, lo: int, hi: int, flags: int) -> str:
        if flags & _OTHER_ID:
            return self._other_ids[seq]
        return _uuid_hex(lo, hi)

    def _slate(self, seq: int, features: bool = True, request_id: str | None = None) -> ServedSlate:
        b, i = self._at(seq)
        lo, hi, ts, meta, div, nov, rp, a, k, fa, nf, ta = b.record(i)
        z, fz = a + k, fa + nf
        rows = b.rows[a:z].tolist()
        state = b.state[a:z].tolist()
        outcome: dict[int, int] = {}
        counted: dict[int, int] = {}
        if any(state):
            for j, st in enumerate(state):
                if st & _OUTCOME_MASK:
                    outcome.setdefault(rows[j], st & _OUTCOME_MASK)
                if st & _COUNTED_MASK:
                    counted.setdefault(rows[j], st >> _COUNTED_SHIFT)
        variant, arms, names = self._metas[meta]
        flags = int(b.flags[i])
        props = b.props[a:z].tolist()
        feats = b""
        if features and fa < fz:
            if flags & _RAW_FEATURES:
                feats = b.feat[fa:fz].tobytes()
            else:
                feats = decode_features(b.feat[fa:fz], z - a, len(names)).tobytes()
        return ServedSlate(request_id or self._request_id(seq, lo, hi, flags), b.user[i], variant, list(arms), rows,
                           props, ts, feats, list(names), div if flags & _HAS_DIV else None,
                           nov if flags & _HAS_NOV else None, outcome, counted, bool(flags & _RANDOM_SLICE),
                           rp if flags & _HAS_RP else None,
                           b.tprops[ta:ta + k].tolist() if flags & _HAS_TARGET else [])


class ServedCut(_Columns, Sequence[ServedSlate]):
    """The remembered slates as of one moment, oldest first: a sequence that decodes a slate when it is read
    (``served_slates()[-100:]`` decodes 100, not all)."""

    def __init__(self, blocks: list[_Block], first_seq: int, block_size: int, metas: list, other_ids: dict[int, str],
                 live: np.ndarray) -> None:
        self._blocks, self._first_seq, self._block_size, self._metas = blocks, first_seq, block_size, metas
        self._other_ids = other_ids
        self._live = live  # int64 sequence numbers of the live slates, oldest first

    def __len__(self) -> int:
        return int(self._live.size)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._slate(s) for s in self._live[index].tolist()]
        return self._slate(int(self._live[index]))

    def __iter__(self) -> Iterator[ServedSlate]:
        for s in self._live.tolist():
            yield self._slate(s)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, ServedCut)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"ServedCut({len(self)} slates)"


class ServedRing(_Columns):
    """The most recent ``capacity`` served slates, by request id (see the module docstring)."""

    def __init__(self, capacity: int, block_size: int | None = None) -> None:
        self.capacity = capacity
        self._block_size = block_size or min(_MAX_BLOCK, max(64, capacity // 16))
        self._blocks: deque[_Block] = deque([_Block(self._block_size)])
        self._first_seq = 0  # sequence number of self._blocks[0]'s first slate
        self._next_seq = 0
        self._oldest = 0  # every slate before it was evicted
        self._n_live = 0
        self._table = np.full(1024, -1, np.int64)  # uuid request ids: sequence numbers, -1 = empty
        self._n_table = 0
        self._other: dict[str, int] = {}  # any other request id -> sequence number
        self._other_ids: dict[int, str] = {}
        self._metas: list[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]] = []
        self._meta_ids: dict[tuple, int] = {}

    # -- the request-id lookup -------------------------------------------------------------------------
    def _find(self, request_id: str) -> int | None:
        """The live sequence number of ``request_id``, or None."""
        halves = _uuid_halves(request_id)
        if halves is None:
            return self._other.get(request_id)
        return self._probe(*halves)[1]

    def _probe(self, lo: int, hi: int) -> tuple[int, int | None]:
        """(table position, sequence number) of the id, or (the empty position where it would go, None)."""
        table = self._table
        mask = table.size - 1
        pos = _home(lo, hi, mask)
        while True:
            seq = int(table[pos])
            if seq < 0:
                return pos, None
            b, i = self._at(seq)
            key = b.record(i)
            if key[0] == lo and key[1] == hi:
                return pos, seq
            pos = (pos + 1) & mask

    def _table_delete(self, pos: int) -> None:
        """Empty ``pos`` and shift later entries of its probe run back (no tombstones: lookups stay short)."""
        table = self._table
        mask = table.size - 1
        hole, j = pos, pos
        while True:
            j = (j + 1) & mask
            seq = int(table[j])
            if seq < 0:
                break
            b, i = self._at(seq)
            key = b.record(i)
            home = _home(key[0], key[1], mask)
            # the entry at j may move into the hole unless its home lies cyclically in (hole, j]
            if (hole < home <= j) if hole <= j else (home > hole or home <= j):
                continue
            table[hole] = seq
            hole = j
        table[hole] = -1
        self._n_table -= 1

    def _grow_table(self) -> None:
        """Double the table and insert every live uuid id again (vectorised linear probing)."""
        size = self._table.size * 2
        table = np.full(size, -1, np.int64)
        seqs, lo, hi = self._live_uuid_keys()
        pos = _homes(lo, hi, size - 1)
        while seqs.size:
            free = table[pos] == -1
            cand = np.flatnonzero(free)
            _, first = np.unique(pos[cand], return_index=True)
            won = cand[first]
            table[pos[won]] = seqs[won]
            lost = np.ones(seqs.size, bool)
            lost[won] = False
            seqs, pos = seqs[lost], (pos[lost] + 1) & (size - 1)
        self._table = table

    def _live_uuid_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, end = self._oldest - self._first_seq, self._next_seq - self._first_seq
        flags = np.concatenate([np.asarray(b.flags, np.uint8) for b in self._blocks])[start:end]
        lo = np.concatenate([b.column("lo") for b in self._blocks])[start:end]
        hi = np.concatenate([b.column("hi") for b in self._blocks])[start:end]
        keep = (flags & (_DEAD | _OTHER_ID)) == 0
        return np.arange(self._oldest, self._next_seq, dtype=np.int64)[keep], lo[keep], hi[keep]

    # -- reads ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n_live

    def __contains__(self, request_id: str) -> bool:
        return self._find(request_id) is not None

    def get(self, request_id: str, features: bool = True) -> ServedSlate | None:
        """The slate served with ``request_id`` (a new object each call), or None. ``features=False`` leaves its
        ``features`` empty (decoding them is most of the cost; validation and attribution do not need them)."""
        seq = self._find(request_id)
        return None if seq is None else self._slate(seq, features, request_id)

    def locate(self, request_id: str) -> int | None:
        """The position of a remembered slate (valid until the next ``append``), or None: for several reads
        and updates of one slate with one lookup."""
        return self._find(request_id)

    def slate_at(self, seq: int, features: bool = True, request_id: str | None = None) -> ServedSlate:
        return self._slate(seq, features, request_id)

    def served_at(self, seq: int) -> int:
        b, i = self._at(seq)
        return b.record(i)[2]

    def served_at_and_arms(self, seq: int) -> tuple[int, tuple[tuple[str, str], ...]]:
        """(served_at_ms, experiment arms) of the slate at ``seq``, without decoding the rest."""
        b, i = self._at(seq)
        r = b.record(i)
        return r[2], self._metas[r[3]][1]

    def values(self) -> ServedCut:
        """Every remembered slate, oldest first (decoded as read)."""
        return self.cut()

    def cut(self) -> ServedCut:
        """A consistent copy (milliseconds: copies the block being filled and each block's ``state``/``flags``)."""
        blocks = [b.frozen_copy() for b in self._blocks]
        start, end = self._oldest - self._first_seq, self._next_seq - self._first_seq
        flags = np.concatenate([np.asarray(b.flags, np.uint8) for b in blocks])[start:end] if blocks \
            else np.empty(0, np.uint8)
        seqs = np.arange(self._oldest, self._next_seq, dtype=np.int64)[(flags & _DEAD) == 0]
        return ServedCut(blocks, self._first_seq, self._block_size, list(self._metas), dict(self._other_ids), seqs)

    def outcome_at(self, seq: int, row: int) -> tuple[int, int]:
        """(outcome, counted flags) of ``row`` in the slate at ``seq`` ((0, 0): nothing yet, or not served)."""
        b, i = self._at(seq)
        r = b.record(i)
        a, z = r[7], r[7] + r[8]
        try:
            j = b.rows[a:z].tolist().index(row)
        except ValueError:
            return 0, 0
        st = int(b.state[a + j])
        return st & _OUTCOME_MASK, st >> _COUNTED_SHIFT

    def nbytes(self) -> int:
        """Resident bytes: the columns, the lookup, and the user id strings (counted here though other structures
        may share them), estimated from the newest slates."""
        import sys

        total = sum(b.nbytes() for b in self._blocks) + self._table.nbytes
        total += sys.getsizeof(self._other) + sum(sys.getsizeof(r) for r in self._other)
        b = self._blocks[-1]
        if b.n:
            sample = b.user[max(0, b.n - 64):b.n]
            total += int(sum(sys.getsizeof(u) for u in sample) / len(sample) * self._n_live)
        return total

    # -- writes -----------------------------------------------------------------------------------------
    def append(self, slate: ServedSlate) -> None:
        """Remember a slate (its outcome and counted flags included); the oldest leave beyond the capacity."""
        b = self._blocks[-1] if self._blocks else None
        if b is None or b.n == b.size:
            if b is not None:
                b.seal()
            b = _Block(self._block_size)
            self._blocks.append(b)
        seq = self._next_seq
        rows = slate.rows
        k = len(rows)
        names = tuple(slate.feature_names)
        key = (slate.variant, tuple(map(tuple, slate.arms)), names)
        meta = self._meta_ids.get(key)
        if meta is None:
            meta = self._meta_ids[key] = len(self._metas)
            self._metas.append((slate.variant, tuple((str(a), str(c)) for a, c in key[1]), names))
        flags = _RANDOM_SLICE if slate.random_slice else 0
        div, nov, rp = slate.diversity, slate.novelty, slate.random_p
        if div is not None:
            flags |= _HAS_DIV
        if nov is not None:
            flags |= _HAS_NOV
        if rp is not None:
            flags |= _HAS_RP
        target = slate.target_propensities
        ta = len(b.tprops)
        if target:
            if len(target) != k:
                raise ValueError(f"slate {slate.request_id}: {len(target)} target propensities for {k} items")
            flags |= _HAS_TARGET
            b.tprops.extend(target)
        a = len(b.rows)
        b.rows.extend(rows)
        b.props.extend(slate.propensities)
        b.state.frombytes(bytes(k))
        if slate.outcome or slate.counted:
            for row, o in slate.outcome.items():
                for j, r in enumerate(rows):
                    if r == row:
                        b.state[a + j] |= _state_bits(int(o), 0)
            for row, c in slate.counted.items():
                for j, r in enumerate(rows):
                    if r == row:
                        b.state[a + j] |= _state_bits(0, int(c))
        feats = slate.features
        f = len(names)
        fa = b.feat_end
        n = -1
        if feats and f and k and len(feats) == 4 * k * f:
            need = fa + _encoded_bound(k, f)
            if need > b.feat.size:
                b.feat = _grown(b.feat, need)
            n = _encode_into(feats, k, f, b.feat, fa)
        if n < 0:  # not a [k, F] float32 block, or beyond float16: kept as it came
            flags |= _RAW_FEATURES
            n = len(feats)
            if fa + n > b.feat.size:
                b.feat = _grown(b.feat, fa + n)
            b.feat[fa:fa + n] = np.frombuffer(feats, np.uint8)
        # the lookup: a uuid hex id in the table, any other in the dict; the same id again replaces the older
        halves = _uuid_halves(slate.request_id)
        old: int | None
        if halves is None:
            flags |= _OTHER_ID
            old = self._other.get(slate.request_id)
        else:
            pos, old = self._probe(*halves)
        b.recs.append((halves[0] if halves else 0, halves[1] if halves else 0, int(slate.served_at_ms), meta,
                       0.0 if div is None else float(div), 0.0 if nov is None else float(nov),
                       0.0 if rp is None else float(rp), a, k, fa, n, ta))
        b.user.append(slate.user_id)
        b.flags.append(flags)
        b.feat_end = fa + n
        b.n += 1
        if halves is None:  # found only once every column holds it
            self._other_ids[seq] = slate.request_id
            self._other[slate.request_id] = seq
        else:
            self._table[pos] = seq
            if old is None:
                self._n_table += 1
        if old is not None:
            ob, oi = self._at(old)
            ob.flags[oi] |= _DEAD
        else:
            self._n_live += 1
        self._next_seq = seq + 1
        self._evict()
        if 2 * self._n_table > self._table.size:
            self._grow_table()

    def set_outcome(self, seq: int, row: int, outcome: int | None = None, counted: int | None = None) -> None:
        """Set the outcome and/or counted flags of ``row`` (every position it holds) in the slate at ``seq``."""
        b, i = self._at(seq)
        rec = b.record(i)
        a, z = rec[7], rec[7] + rec[8]
        for j, r in enumerate(b.rows[a:z].tolist()):
            if r != row:
                continue
            st = int(b.state[a + j])
            o = st & _OUTCOME_MASK if outcome is None else outcome
            c = st >> _COUNTED_SHIFT if counted is None else counted
            b.state[a + j] = _state_bits(o, c)

    def _evict(self) -> None:
        while self._n_live > self.capacity:
            seq = self._oldest
            b, i = self._at(seq)
            flags = int(b.flags[i])
            if not flags & _DEAD:
                if flags & _OTHER_ID:
                    del self._other[self._other_ids.pop(seq)]
                else:
                    key = b.record(i)
                    pos, found = self._probe(key[0], key[1])
                    assert found == seq
                    self._table_delete(pos)
                self._n_live -= 1
            elif flags & _OTHER_ID:
                del self._other_ids[seq]
            self._oldest += 1
            if self._oldest - self._first_seq >= self._block_size:  # its block holds no live slate any more
                self._blocks.popleft()
                self._first_seq += self._block_size


def _state_bits(outcome: int, counted: int) -> int:
    if not 0 <= outcome <= 2 or not 0 <= counted <= 7:
        raise ValueError(f"outcome {outcome} / counted flags {counted} out of range")
    return outcome | counted << _COUNTED_SHIFT
