"""The item catalog: item ids <-> rows, embeddings, categories, maturity, timestamps.

A catalog directory holds binary columns, one ``.npy`` file each, row i of every file describing item i::

    embeddings.npy     float32[N, d] (unit length when catalog.json says "normalized")
    categories.npy     int32[N], codes into items.json's category_names
    maturity.npy       int32[N]
    created_at_ms.npy  int64[N]
    popularity.npy     float32[N]
    alive.npy          bool[N] (False: a deleted item's row, kept so that an index saved beside stays valid)
    items.json         {"item_ids": [N str], "category_names": [str], "attributes": {"row": {str: str}}}
    id_index.npy       uint32[2, live]: the live items' id hashes, sorted, and their rows (see RowIndex)
    catalog.json       {"format_version": 2, "dim": d, "count": N, "version": str, "normalized": bool,
                        "files": {name: {"size": bytes, "crc32": hex}}}  (save writes it last)
    index.bin          the persisted HNSW index (labels = rows), optional
    index.json         the index's parameters and the catalog version it was built for

A start reads them without parsing anything per item: the embeddings are memory-mapped copy-on-write (pages
stay in the page cache, shared by every process that maps them, until a change writes one), the small
columns are read whole, the ids are one JSON array, and id -> row is a binary search in id_index.npy
(no dict of a million entries to build). ``save`` writes this format.

What a user hands in is the JSON-lines format (format 1)::

    embeddings.npy   float32[N, d], row i is the embedding of line i of items.jsonl
    items.jsonl      one JSON object per line: {"item_id": str, "category": str,
                     "maturity": int, "created_at_ms": int, "popularity": float,
                     "attributes": {str: str}}  (all but item_id optional)
    catalog.json     {"format_version": 1, "dim": d, "count": N, "version": str}  (optional)

Its first load converts it once into ``converted/`` (the binary format above, plus the size, mtime and inode
of the files it was converted from); later loads read ``converted/`` while those files are unchanged, and
convert again when they change. The source files are never written.

Rows are stable for the life of a process: a deleted item's row stays dead (its
index slot is reused by hnswlib's ``replace_deleted``), and a new item always gets
a new row. ``save`` compacts dead rows away.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from recsvc._files import atomic_write, checksum, fsync_dir, mismatch
from recsvc.config import DemoCatalogConfig

log = logging.getLogger("recsvc.catalog")

#: The binary columns (``save``); format 1 is the JSON-lines source format (``save_jsonl``).
FORMAT_VERSION = 2
JSONL_FORMAT_VERSION = 1
#: Where a JSON-lines catalog's binary conversion lives, inside the catalog directory.
CONVERTED = "converted"
#: column attribute -> (file, dtype); embeddings.npy and items.json besides.
COLUMN_FILES = {
    "categories": ("categories.npy", np.dtype(np.int32)),
    "maturity": ("maturity.npy", np.dtype(np.int32)),
    "created_at_ms": ("created_at_ms.npy", np.dtype(np.int64)),
    "base_popularity": ("popularity.npy", np.dtype(np.float32)),
    "alive": ("alive.npy", np.dtype(bool)),
}
ITEMS_FILE = "items.json"
ID_INDEX_FILE = "id_index.npy"
DAY_MS = 86_400_000
#: The demo catalog's creation times end here (fixed so the demo is deterministic).
DEMO_ANCHOR_MS = 1_795_910_400_000  # 2026-11-29T00:00:00Z


class CatalogError(ValueError):
    """A catalog file or item is invalid."""


@dataclass
class ItemRecord:
    """One item as it arrives from a file or an UpsertItems call."""

    item_id: str
    embedding: np.ndarray
    category: str = ""
    maturity: int = 0
    created_at_ms: int = 0
    popularity: float = 0.0
    attributes: dict[str, str] = field(default_factory=dict)


def id_hash(item_id: str) -> int:
    """A stable 32-bit hash of an item id (CRC-32 of its UTF-8 bytes): what ``id_index.npy`` is sorted by."""
    return zlib.crc32(item_id.encode("utf-8", "surrogatepass"))


class RowIndex(MutableMapping):
    """Item id -> row, like the dict it replaces, without a Python object per item.

    The saved catalog's live ids are found through ``id_index.npy``: their ``id_hash`` sorted, beside
    their rows (a binary search, then the id itself compared). Ids added or removed since the load live
    in a small dict and set in front of it. At 1M items this is ~8 MB read with the columns, where the
    dict took 60 MiB and 0.8-0.9 s to build at every start; a lookup costs 0.74 us instead of 0.03 us (a
    request makes a few, a feedback event one).
    """

    __slots__ = ("_ids", "_hashes", "_rows", "_added", "_removed", "_len")

    def __init__(self, item_ids: list[str], table: np.ndarray) -> None:
        self._ids = item_ids  # the catalog's list: row -> id
        self._hashes = memoryview(np.ascontiguousarray(table[0], np.uint32))
        self._rows = memoryview(np.ascontiguousarray(table[1], np.uint32))
        self._added: dict[str, int] = {}  # set since the load (new ids, and ids removed then added again)
        self._removed: set[str] = set()  # ids of the table removed since the load
        self._len = len(self._hashes)

    def _base(self, key: str) -> int | None:
        hashes, h = self._hashes, id_hash(key)
        i = bisect.bisect_left(hashes, h)
        while i < len(hashes) and hashes[i] == h:
            row = self._rows[i]
            if self._ids[row] == key:
                return row
            i += 1
        return None

    def get(self, key, default=None):
        row = self._added.get(key)
        if row is not None:
            return row
        if type(key) is not str or key in self._removed:
            return default
        row = self._base(key)
        return default if row is None else row

    def __getitem__(self, key) -> int:
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: str, row: int) -> None:
        if self.get(key) is None:
            self._len += 1
        self._added[key] = int(row)

    def __delitem__(self, key) -> None:
        if self.get(key) is None:
            raise KeyError(key)
        self._added.pop(key, None)
        if type(key) is str and self._base(key) is not None:
            self._removed.add(key)
        self._len -= 1

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        for row in self._rows:
            key = self._ids[row]
            if key not in self._removed and key not in self._added:
                yield key
        yield from list(self._added)


def _id_index(item_ids: list[str], alive: np.ndarray) -> np.ndarray:
    """uint32[2, live]: the live rows' ``id_hash`` sorted, and their rows (``RowIndex``'s table)."""
    rows = np.flatnonzero(alive).astype(np.uint32)
    hashes = np.fromiter((id_hash(item_ids[r]) for r in rows.tolist()), np.uint32, rows.size)
    order = np.argsort(hashes, kind="stable")
    return np.stack([hashes[order], rows[order]])


class Catalog:
    """Column arrays over rows; thread-safe for one writer and many readers.

    Readers take the arrays as they are (numpy arrays are replaced, never
    resized in place, when the catalog grows), so a request never sees a
    half-grown array.
    """

    def __init__(self, dim: int, normalize: bool = True, capacity: int = 1024) -> None:
        if dim <= 0:
            raise CatalogError(f"embedding dimension must be positive, got {dim}")
        self.dim = dim
        self.normalize = normalize
        self.version = uuid.uuid4().hex
        self._lock = threading.Lock()
        self.item_ids: list[str] = []
        self.row_of: MutableMapping[str, int] = {}  # a dict, or a RowIndex when loaded
        self.category_names: list[str] = []
        self.category_code: dict[str, int] = {}
        # sparse: row -> attributes, only for items that have any
        self.attributes: dict[int, dict[str, str]] = {}
        self._allocate(max(capacity, 16))
        self.n_rows = 0
        self.n_alive = 0
        #: upserts and deletes so far (a snapshot checks that none came between its cut and its index save)
        self.changes = 0
        # Copy-on-write for cuts (see ``cut``): the arrays of generation ``_generation`` are shared with
        # ``_open_cuts`` unfinished cuts, so the next change copies them first.
        self._generation = 0
        self._open_cuts = 0

    # -- storage --------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        self.embeddings = np.zeros((capacity, self.dim), np.float32)
        self.categories = np.zeros(capacity, np.int32)
        self.maturity = np.zeros(capacity, np.int32)
        self.created_at_ms = np.zeros(capacity, np.int64)
        self.base_popularity = np.zeros(capacity, np.float32)
        self.alive = np.zeros(capacity, bool)

    @property
    def capacity(self) -> int:
        return int(self.embeddings.shape[0])

    _COLUMNS = ("embeddings", "categories", "maturity", "created_at_ms", "base_popularity", "alive")

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` rows and own the arrays (a cut may share them): before any change."""
        if needed <= self.capacity and not self._open_cuts:
            return
        new_cap = max(needed, int(self.capacity * 1.5) + 16) if needed > self.capacity else self.capacity
        for name in self._COLUMNS:
            old = getattr(self, name)
            new = np.zeros((new_cap,) + old.shape[1:], old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)
        self._generation += 1  # new arrays: no cut shares them
        self._open_cuts = 0

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, categories, maturity, created_at_ms) of one generation of
        the arrays: never a mix of before and after a concurrent growth."""
        with self._lock:
            return self.embeddings, self.categories, self.maturity, self.created_at_ms

    def category_of(self, name: str) -> int:
        code = self.category_code.get(name)
        if code is None:
            code = len(self.category_names)
            self.category_names.append(name)
            self.category_code[name] = code
        return code

    @property
    def n_categories(self) -> int:
        return len(self.category_names)

    # -- mutation ---------------------------------------------------------------
    def prepare_embeddings(self, emb: np.ndarray) -> np.ndarray:
        """float32, C-contiguous, checked, unit-norm when the catalog normalises."""
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise CatalogError(
                f"embeddings must have shape (n, {self.dim}), got {tuple(emb.shape)}"
            )
        if not np.isfinite(emb).all():
            raise CatalogError("embeddings contain NaN or infinite values")
        if self.normalize:
            # float64 norms: float32 would overflow to inf (or underflow to 0)
            # for very large (small) values and silently zero the vector
            wide = emb.astype(np.float64)
            norms = np.linalg.norm(wide, axis=1, keepdims=True)
            if (norms == 0).any() or not np.isfinite(norms).all():
                raise CatalogError("an embedding is all zeros (or its norm is not finite); "
                                   "cosine similarity needs a direction")
            emb = np.ascontiguousarray(wide / norms, dtype=np.float32)
        return emb

    def upsert(self, items: list[ItemRecord]) -> tuple[np.ndarray, int, int]:
        """Insert or replace items. Returns (rows, inserted, updated)."""
        if not items:
            return np.empty(0, np.int32), 0, 0
        seen: set[str] = set()
        for it in items:
            if not it.item_id:
                raise CatalogError("item_id must not be empty")
            if it.item_id in seen:
                raise CatalogError(f"item_id {it.item_id!r} appears twice in one batch")
            seen.add(it.item_id)
            if it.maturity < 0:
                raise CatalogError(f"item {it.item_id!r}: maturity must be >= 0, got {it.maturity}")
            size = np.asarray(it.embedding).size
            if size != self.dim:
                raise CatalogError(
                    f"item {it.item_id!r}: embedding has {size} values, "
                    f"the catalog's dimension is {self.dim}"
                )
        emb = self.prepare_embeddings(
            np.stack([np.asarray(it.embedding, np.float32).reshape(-1) for it in items])
        )
        with self._lock:
            rows = np.empty(len(items), np.int32)
            inserted = updated = 0
            n_new = sum(1 for it in items if it.item_id not in self.row_of)
            self._grow(self.n_rows + n_new)
            self.changes += 1
            for i, it in enumerate(items):
                row = self.row_of.get(it.item_id)
                if row is None:
                    row = self.n_rows
                    self.n_rows += 1
                    self.item_ids.append(it.item_id)
                    self.row_of[it.item_id] = row
                    self.n_alive += 1
                    inserted += 1
                else:
                    updated += 1
                if it.attributes:
                    self.attributes[row] = dict(it.attributes)
                else:
                    self.attributes.pop(row, None)
                rows[i] = row
                self.categories[row] = self.category_of(it.category)
                self.maturity[row] = it.maturity
                self.created_at_ms[row] = it.created_at_ms
                self.base_popularity[row] = it.popularity
            self.embeddings[rows] = emb
            self.alive[rows] = True
            return rows, inserted, updated

    def delete(self, item_ids: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Mark items dead. Returns (rows deleted, ids not found)."""
        rows, missing = [], []
        with self._lock:
            for item_id in item_ids:
                row = self.row_of.pop(item_id, None)
                if row is None:
                    missing.append(item_id)
                    continue
                rows.append(row)
            if rows:
                self._grow(self.n_rows)  # (copies the arrays first when a cut shares them)
                self.changes += 1
                self.alive[rows] = False
                self.n_alive -= len(rows)
        return np.asarray(rows, np.int32), missing

    # -- bulk construction ----------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        item_ids: list[str],
        embeddings: np.ndarray,
        categories: list[str],
        maturity: np.ndarray,
        created_at_ms: np.ndarray,
        popularity: np.ndarray | None = None,
        attributes: list[dict[str, str] | None] | None = None,
        normalize: bool = True,
    ) -> "Catalog":
        n = len(item_ids)
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] != n:
            raise CatalogError(
                f"embeddings must have one row per item: {n} items, shape {embeddings.shape}"
            )
        if len(set(item_ids)) != n:
            raise CatalogError("item ids must be unique")
        if any(not i for i in item_ids):
            raise CatalogError("item ids must not be empty")
        cat = cls(embeddings.shape[1], normalize=normalize, capacity=n)
        cat.embeddings[:n] = cat.prepare_embeddings(embeddings)
        cat.item_ids = list(item_ids)
        cat.row_of = {item_id: i for i, item_id in enumerate(item_ids)}
        names, codes = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
        cat.category_names = [str(x) for x in names]
        cat.category_code = {name: i for i, name in enumerate(cat.category_names)}
        cat.categories[:n] = codes.astype(np.int32)
        cat.maturity[:n] = np.asarray(maturity, np.int32)
        cat.created_at_ms[:n] = np.asarray(created_at_ms, np.int64)
        if popularity is not None:
            cat.base_popularity[:n] = np.asarray(popularity, np.float32)
        cat.attributes = ({i: dict(a) for i, a in enumerate(attributes) if a}
                          if attributes is not None else {})
        cat.alive[:n] = True
        cat.n_rows = cat.n_alive = n
        return cat

    # -- persistence ------------------------------------------------------------
    def alive_rows(self) -> np.ndarray:
        return np.flatnonzero(self.alive[: self.n_rows]).astype(np.int32)

    def save(self, directory: str | Path, compact: bool = True) -> np.ndarray:
        """Write the catalog to ``directory`` in the binary format (atomically per file, catalog.json last).

        ``compact=True`` writes live items only (rows renumbered: new row i is
        old row ``out[i]``; an index beside it must be rebuilt).
        ``compact=False`` keeps every row, dead ones as tombstones
        (``alive`` False), so rows and a saved index stay valid.
        """
        cut = self.cut(compact)
        try:
            return cut.save(directory)
        finally:
            cut.release()

    def save_jsonl(self, directory: str | Path, compact: bool = True) -> np.ndarray:
        """Write the catalog in the JSON-lines source format (an export; what a user hands in)."""
        cut = self.cut(compact)
        try:
            return cut.save_jsonl(directory)
        finally:
            cut.release()

    def cut(self, compact: bool = False) -> "CatalogCut":
        """The catalog as it is now, to save later while it keeps changing (a snapshot's cut).

        Takes microseconds: the cut shares the arrays, and the next upsert or delete copies them before
        changing anything (copy-on-write) unless the cut was released by then. Item ids and category
        names are only ever appended to, so sharing those lists is safe; attributes are copied.
        """
        with self._lock:
            rows = self.alive_rows() if compact else np.arange(self.n_rows, dtype=np.int32)
            self._open_cuts += 1
            return CatalogCut(self, self._generation, rows, self.dim, self.normalize, self.version,
                              self.changes, self.item_ids, self.category_names,
                              {name: getattr(self, name) for name in self._COLUMNS}, dict(self.attributes))

    def _release(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation and self._open_cuts:
                self._open_cuts -= 1

    @classmethod
    def load(cls, directory: str | Path, normalize: bool = True, progress: bool = False) -> "Catalog":
        """Read a catalog directory; every problem is a ``CatalogError`` naming the file (and line).

        The binary format (``save``) is read as it is. A JSON-lines catalog is read from its conversion
        (``converted/``) while its files are unchanged; otherwise it is parsed, and converted for the next
        start (a read-only directory is parsed at every start, with a warning).

        When ``catalog.json`` lists the files' sizes and checksums (``save`` writes them), each file is
        checked against them: a changed byte is refused rather than served.
        """
        d = Path(directory)
        if not d.is_dir():
            raise CatalogError(f"{d}: no such catalog directory (no embeddings.npy, no items.jsonl): point "
                               "catalog.path (or --catalog) at the directory that holds them")
        meta = _read_meta(d / "catalog.json")
        if meta.get("format_version") == FORMAT_VERSION:
            return cls._load_columns(d, meta, normalize)
        for p in (d / "embeddings.npy", d / "items.jsonl"):
            if not p.exists():
                raise CatalogError(f"catalog directory {d} has no {p.name} (see the README's Catalog format)")
        source = _source_stamp(d)
        conv = d / CONVERTED
        try:
            cmeta = _read_meta(conv / "catalog.json")
        except CatalogError:
            cmeta = {}
        if (cmeta.get("format_version") == FORMAT_VERSION and cmeta.get("source") == source
                and cmeta.get("normalized") == normalize):
            try:
                return cls._load_columns(conv, cmeta, normalize)
            except CatalogError as exc:  # derived: convert it again
                log.warning("%s; converting %s again", exc, d / "items.jsonl")
        t = time.perf_counter()
        cat = cls._load_jsonl(d, meta, normalize, progress)
        parsed = time.perf_counter() - t
        cut = cat.cut(compact=False)
        try:
            cut.save(conv, source=source)
        except OSError as exc:
            log.warning("could not convert the catalog in %s to binary columns in %s (%s): it is parsed at "
                        "every start (%.1f s this time)", d, conv, exc, parsed)
        else:
            log.info("catalog %s parsed in %.1f s and converted to binary columns in %s (read from there "
                     "while items.jsonl and embeddings.npy stay unchanged)", d, parsed, conv)
        finally:
            cut.release()
        return cat

    @classmethod
    def _load_columns(cls, d: Path, meta: dict, normalize: bool) -> "Catalog":
        """The binary format: checked against catalog.json's manifest, embeddings memory-mapped."""
        names = ["embeddings.npy", *(f for f, _ in COLUMN_FILES.values()), ITEMS_FILE, ID_INDEX_FILE]
        for name in names:
            if not (d / name).exists():
                raise CatalogError(f"catalog directory {d} has no {name} (its catalog.json is format "
                                   f"{FORMAT_VERSION}, binary columns; see the README's Catalog format)")
        files = meta.get("files")
        verified = isinstance(files, dict) and all(isinstance(files.get(n), dict) for n in names)
        for name in names if isinstance(files, dict) else ():
            entry = files.get(name)
            why = mismatch(d / name, entry) if isinstance(entry, dict) else None
            if why is not None:
                raise CatalogError(
                    f"{d / name}: {why} (catalog.json, saved with it, lists its size and checksum): the file "
                    "was changed or damaged since; restore it, or if it was edited on purpose delete the "
                    '"files" entry of catalog.json')
        emb_path = d / "embeddings.npy"
        try:  # copy-on-write: untouched pages stay file-backed; a change copies only the page it writes
            emb = np.load(emb_path, mmap_mode="c")
        except Exception as exc:  # a damaged header: ValueError, EOFError, OSError ...
            raise CatalogError(f"{emb_path}: not a readable .npy file ({exc})") from None
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[1] == 0:
            raise CatalogError(f"{emb_path}: embeddings must be a float32 array [items, dim], got "
                               f"{emb.dtype} {emb.shape}")
        n, dim = (int(x) for x in emb.shape)
        for key, want in (("count", n), ("dim", dim)):
            if key in meta and meta[key] != want:
                raise CatalogError(f"{d / 'catalog.json'}: {key} is {meta[key]} but embeddings.npy has {want}")
        cols = {}
        for attr, (name, dtype) in COLUMN_FILES.items():
            try:
                col = np.load(d / name, allow_pickle=False)
            except Exception as exc:
                raise CatalogError(f"{d / name}: not a readable .npy file ({exc})") from None
            if col.dtype != dtype or col.shape != (n,):
                raise CatalogError(f"{d / name}: must be {dtype}[{n}] (one value per row of embeddings.npy), "
                                   f"got {col.dtype}{list(col.shape)}")
            cols[attr] = col
        try:
            items = json.loads((d / ITEMS_FILE).read_bytes())
            ids, names_, attrs = items["item_ids"], items["category_names"], items.get("attributes", {})
            if not (isinstance(ids, list) and isinstance(names_, list) and isinstance(attrs, dict)):
                raise TypeError("item_ids and category_names must be lists, attributes an object")
            attributes = {int(r): {str(k): str(v) for k, v in a.items()} for r, a in attrs.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CatalogError(f"{d / ITEMS_FILE}: unreadable ({exc})") from None
        if len(ids) != n:
            raise CatalogError(f"{d / ITEMS_FILE}: {len(ids)} item ids but embeddings.npy has {n} rows")
        codes, mats = cols["categories"], cols["maturity"]
        if n and (int(codes.min()) < 0 or int(codes.max()) >= len(names_)):
            raise CatalogError(f"{d / 'categories.npy'}: a code outside the {len(names_)} category names")
        if n and int(mats.min()) < 0:
            raise CatalogError(f"{d / 'maturity.npy'}: maturity must be >= 0")
        if any(not 0 <= r < n for r in attributes):
            raise CatalogError(f"{d / ITEMS_FILE}: attributes of a row outside 0..{n - 1}")
        alive = cols["alive"]
        dead = np.flatnonzero(~alive).tolist()
        # A deleted row's id may have been reused by a later row: it gets a private id no caller can send.
        for row in dead:
            ids[row] = f"\x00deleted:{row}"
        row_of: MutableMapping[str, int]
        if verified:  # ids unique, non-empty strings and id_index.npy built from them: as save wrote them
            try:
                table = np.load(d / ID_INDEX_FILE, allow_pickle=False)
            except Exception as exc:
                raise CatalogError(f"{d / ID_INDEX_FILE}: not a readable .npy file ({exc})") from None
            if table.dtype != np.uint32 or table.shape != (2, n - len(dead)):
                raise CatalogError(f"{d / ID_INDEX_FILE}: must be uint32[2, {n - len(dead)}] (the live rows' id "
                                   f"hashes and rows), got {table.dtype}{list(table.shape)}")
            row_of = RowIndex(ids, table)
        else:
            try:
                row_of = dict(zip(ids, range(n)))
            except TypeError:  # an unhashable id
                row_of = {}
            if len(row_of) != n or "" in row_of or not all(type(i) is str for i in row_of):
                seen: set = set()
                bad = next(i for i in ids if not isinstance(i, str) or not i or i in seen or seen.add(i))
                raise CatalogError(f"{d / ITEMS_FILE}: item ids must be unique, non-empty strings ({bad!r})")
            for row in dead:
                del row_of[ids[row]]
        cat = cls(dim, normalize=normalize, capacity=16)
        if verified and (meta.get("normalized") is True or not normalize):
            cat.embeddings = emb.view(np.ndarray)  # checked: written by save, already prepared
        else:
            cat.embeddings = cat.prepare_embeddings(emb)
        for attr, col in cols.items():
            setattr(cat, attr, col)
        cat.item_ids = ids
        cat.row_of = row_of
        cat.category_names = [str(x) for x in names_]
        cat.category_code = {name: i for i, name in enumerate(cat.category_names)}
        cat.attributes = attributes
        cat.n_rows = n
        cat.n_alive = n - len(dead)
        if "version" in meta:
            cat.version = str(meta["version"])
        return cat

    @classmethod
    def _load_jsonl(cls, d: Path, meta: dict, normalize: bool, progress: bool) -> "Catalog":
        """The JSON-lines source format, parsed and checked line by line."""
        emb_path, items_path, meta_path = d / "embeddings.npy", d / "items.jsonl", d / "catalog.json"
        try:
            emb = np.load(emb_path, mmap_mode="r")
        except Exception as exc:  # a damaged header: ValueError, EOFError, OSError ...
            raise CatalogError(f"{emb_path}: not a readable .npy file ({exc})") from None
        if emb.dtype != np.float32:
            raise CatalogError(f"{emb_path}: embeddings must be float32, got {emb.dtype} "
                               "(save them with np.save(path, embeddings.astype(np.float32)))")
        if emb.ndim != 2 or emb.shape[1] == 0:
            raise CatalogError(f"{emb_path}: embeddings must be a 2-d array [items, dim], got shape {emb.shape}")
        if progress and items_path.stat().st_size > 8 << 20:
            log.info("reading %s (%.0f MB)", items_path, items_path.stat().st_size / 2**20)
        recs = _read_jsonl(items_path)
        ids, cats, mats, created, pops, attrs = _item_columns(recs, items_path)
        dead = [i for i, r in enumerate(recs) if r.get("deleted")]
        if len(ids) != emb.shape[0]:
            raise CatalogError(
                f"{d}: items.jsonl has {len(ids)} items but embeddings.npy has {emb.shape[0]} rows "
                "(line i of items.jsonl describes row i of embeddings.npy: write both from the same items)"
            )
        if "count" in meta and meta["count"] != len(ids):
            raise CatalogError(f"{meta_path}: count is {meta['count']} but items.jsonl has {len(ids)} items")
        if "dim" in meta and meta["dim"] != emb.shape[1]:
            raise CatalogError(f"{meta_path}: dim is {meta['dim']} but embeddings.npy has {emb.shape[1]} columns")
        files = meta.get("files")
        for p in (emb_path, items_path) if isinstance(files, dict) else ():
            entry = files.get(p.name)
            why = mismatch(p, entry) if isinstance(entry, dict) else None
            if why is not None:
                raise CatalogError(
                    f"{p}: {why} (catalog.json, saved with it, lists its size and checksum): the file was "
                    "changed or damaged since; restore it, or if it was edited on purpose delete the "
                    '"files" entry of catalog.json')
        # Tombstoned rows keep their place; their ids may have been reused by
        # a later row, so they get a private id that no caller can send.
        for row in dead:
            ids[row] = f"\x00deleted:{row}"
        try:
            cat = cls.from_arrays(ids, np.asarray(emb), cats, np.asarray(mats), np.asarray(created),
                                  np.asarray(pops), attrs, normalize=normalize)
        except CatalogError as exc:
            raise CatalogError(f"{d}: {exc}") from None
        for row in dead:
            cat.alive[row] = False
            del cat.row_of[ids[row]]
        cat.n_alive -= len(dead)
        if "version" in meta:
            cat.version = str(meta["version"])
        else:
            # No catalog.json: a version from the content, so that an index
            # saved beside the catalog is recognised on the next start.
            h = hashlib.blake2b(digest_size=12)
            for p in (emb_path, items_path):
                with p.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            cat.version = "content-" + h.hexdigest()
        return cat


@dataclass
class CatalogCut:
    """The catalog at one moment (:meth:`Catalog.cut`), saved while the catalog itself goes on changing.

    ``release`` when done (the catalog then changes its arrays in place again instead of copying them).
    """

    catalog: Catalog
    generation: int
    rows: np.ndarray  # which rows to write (all, or the live ones for a compact save)
    dim: int
    normalize: bool
    version: str
    changes: int
    item_ids: list[str]  # shared, append-only: rows < n_rows never change
    category_names: list[str]  # shared, append-only
    columns: dict[str, np.ndarray]  # shared until the catalog's next change copies them
    attributes: dict[int, dict[str, str]]

    def save(self, directory: str | Path, source: dict | None = None) -> np.ndarray:
        """Write the binary columns and, last, catalog.json with their sizes and checksums.

        ``source``: the stamp of the JSON-lines files this is a conversion of (see ``Catalog.load``).
        A JSON-lines file left in the directory from an earlier save is removed (it would be stale).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        rows, col = self.rows, self.columns
        atomic_write(d / "embeddings.npy", lambda fh: np.save(fh, col["embeddings"][rows]))
        for attr, (name, dtype) in COLUMN_FILES.items():
            atomic_write(d / name, lambda fh, a=attr, t=dtype: np.save(fh, col[a][rows].astype(t, copy=False)))
        row_list = rows.tolist()
        items = {"item_ids": [self.item_ids[r] for r in row_list],
                 "category_names": list(self.category_names),
                 "attributes": {str(i): self.attributes[r] for i, r in enumerate(row_list) if r in self.attributes}}
        atomic_write(d / ITEMS_FILE, lambda fh: fh.write(json.dumps(items, separators=(",", ":")).encode()))
        table = _id_index(items["item_ids"], col["alive"][rows])
        atomic_write(d / ID_INDEX_FILE, lambda fh: np.save(fh, table))
        names = ["embeddings.npy", *(f for f, _ in COLUMN_FILES.values()), ITEMS_FILE, ID_INDEX_FILE]
        meta = {"format_version": FORMAT_VERSION, "dim": self.dim, "count": int(rows.size),
                "version": self.version, "normalized": self.normalize,
                "files": {name: checksum(d / name) for name in names}}
        if source is not None:
            meta["source"] = source
        atomic_write(d / "catalog.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
        if source is None and (d / "items.jsonl").exists():
            (d / "items.jsonl").unlink()
            fsync_dir(d)
        return rows

    def save_jsonl(self, directory: str | Path) -> np.ndarray:
        """Write embeddings.npy, items.jsonl and, last, catalog.json (format 1) with their sizes and checksums."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        rows, col = self.rows, self.columns
        atomic_write(d / "embeddings.npy", lambda fh: np.save(fh, col["embeddings"][rows]))

        def write_items(fh):
            for r in rows.tolist():
                rec = {
                    "item_id": self.item_ids[r],
                    "category": self.category_names[col["categories"][r]],
                    "maturity": int(col["maturity"][r]),
                    "created_at_ms": int(col["created_at_ms"][r]),
                    "popularity": float(col["base_popularity"][r]),
                }
                if r in self.attributes:
                    rec["attributes"] = self.attributes[r]
                if not col["alive"][r]:
                    rec["deleted"] = True
                fh.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())

        atomic_write(d / "items.jsonl", write_items)
        meta = {"format_version": JSONL_FORMAT_VERSION, "dim": self.dim, "count": int(rows.size),
                "version": self.version, "normalized": self.normalize,
                "files": {name: checksum(d / name) for name in ("embeddings.npy", "items.jsonl")}}
        atomic_write(d / "catalog.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
        return rows

    def release(self) -> None:
        self.catalog._release(self.generation)


def _source_stamp(d: Path) -> dict:
    """What identifies a JSON-lines catalog's files without reading them (as git's index does): size,
    modification time and inode of each (a replaced or rewritten file changes at least one)."""
    out = {}
    for name in ("embeddings.npy", "items.jsonl", "catalog.json"):
        try:
            st = os.stat(d / name)
        except FileNotFoundError:
            continue
        out[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    return out


#: The keys of an items.jsonl record (anything else belongs in ``attributes``).
ITEM_KEYS = ("item_id", "category", "maturity", "created_at_ms", "popularity", "attributes", "deleted")


def _read_meta(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CatalogError(f"{path}: must be a JSON object")
    return meta


def _item_columns(recs: list, path: Path) -> tuple[list[str], list[str], list[int], list[int], list[float],
                                                   list[dict[str, str] | None]]:
    """The columns of the item records; a record with an unknown key or a bad value is refused, naming its
    line (a misspelt key would silently become the default)."""
    try:
        if not (set().union(*map(dict.keys, recs)) - set(ITEM_KEYS)):
            ids = [str(r["item_id"]) for r in recs]
            cats = [str(r.get("category", "")) for r in recs]
            mats = [int(r.get("maturity", 0)) for r in recs]
            created = [int(r.get("created_at_ms", 0)) for r in recs]
            pops = [float(r.get("popularity", 0.0)) for r in recs]
            attrs = [{str(k): str(v) for k, v in a.items()} if (a := r.get("attributes")) else None for r in recs]
            if min(mats, default=0) >= 0:
                return ids, cats, mats, created, pops, attrs
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        pass
    for i, r in enumerate(recs):  # the slow pass, only to name the first bad record
        where = f"{path}:{_line_number(path, i)}"
        if not isinstance(r, dict):
            raise CatalogError(f"{where}: an item must be a JSON object")
        if "item_id" not in r:
            raise CatalogError(f"{where}: record {i + 1} has no item_id")
        unknown = sorted(set(r) - set(ITEM_KEYS))
        if unknown:
            raise CatalogError(f"{where}: unknown key {unknown[0]!r}; an item has {', '.join(ITEM_KEYS)} "
                               "(anything else belongs in attributes)")
        for key, kind in (("maturity", int), ("created_at_ms", int), ("popularity", float)):
            try:
                value = kind(r.get(key, 0))
            except (TypeError, ValueError, OverflowError):
                raise CatalogError(f"{where}: {key} must be a number, got {r[key]!r}") from None
            if key == "maturity" and value < 0:
                raise CatalogError(f"{where}: maturity must be >= 0, got {value}")
        if r.get("attributes") and not isinstance(r["attributes"], dict):
            raise CatalogError(f"{where}: attributes must be an object of strings")
    raise CatalogError(f"{path}: invalid item records")  # (not reached: the pass above names one)


def _line_number(path: Path, index: int) -> int:
    """The line of the ``index``-th record (blank lines are skipped when reading)."""
    seen = -1
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno
    return index + 1


def _read_jsonl(path: Path) -> list[dict]:
    """All records of a JSON-lines file: one bulk parse (C speed), and on a
    syntax error a line-by-line pass that names the bad line."""
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CatalogError(f"{path}:{lineno}: bad item record ({exc})") from None
        raise CatalogError(f"{path}: not valid JSON lines") from None


# -- the demo catalog -----------------------------------------------------------
def demo_catalog(cfg: DemoCatalogConfig, progress: bool = False) -> Catalog:
    """A deterministic synthetic catalog shaped like real item embeddings.

    Each category has a centre; each item also belongs to one or two latent
    topics shared across categories (a thriller that is also a comedy), plus
    item-specific noise, so neighbours cluster by category *and* topic rather
    than being uniform noise. Popularity is Zipf-like (exponent 1.1) over a
    random permutation; category sizes are skewed; creation times are spread
    over the year before ``DEMO_ANCHOR_MS`` (denser recently); ~10% of items are
    rated 13 and ~4% rated 18.
    """
    rng = np.random.default_rng(cfg.seed)
    n, d, c, t = cfg.n_items, cfg.dim, cfg.n_categories, cfg.n_topics
    centres = rng.standard_normal((c, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topics = rng.standard_normal((t, d)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    # Skewed category sizes (some categories are much larger than others).
    cat_p = 1.0 / np.arange(1, c + 1) ** 0.7
    cat_p /= cat_p.sum()
    category = rng.choice(c, size=n, p=cat_p).astype(np.int32)
    # Per-category topic preferences: each category leans on a few topics.
    topic_pref = rng.dirichlet(np.full(t, 0.3), size=c)
    emb = np.empty((n, d), np.float32)
    chunk = 20_000
    it: Iterator[int] = iter(range(0, n, chunk))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=(n + chunk - 1) // chunk, desc="demo catalog", unit="chunk")
    for start in it:
        stop = min(n, start + chunk)
        cats = category[start:stop]
        m = stop - start
        u = rng.random(m)[:, None]
        cdf = np.cumsum(topic_pref[cats], axis=1)
        t1 = np.minimum((u > cdf).sum(axis=1), t - 1)
        t2 = rng.integers(0, t, size=m)
        w2 = (rng.random(m) < 0.35).astype(np.float32) * 0.5
        # Sub-clusters: a second, finer level of structure inside each category.
        noise = rng.standard_normal((m, d)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        block = centres[cats] + 0.8 * topics[t1] + w2[:, None] * topics[t2] + 0.55 * noise
        emb[start:stop] = block
    ranks = rng.permutation(n) + 1
    popularity = (1e5 / ranks ** 1.1).astype(np.float32)
    # Creation times: one year, denser towards the anchor (a growing catalog).
    age_days = 365.0 * rng.random(n) ** 1.5
    created = (DEMO_ANCHOR_MS - age_days * DAY_MS).astype(np.int64)
    u = rng.random(n)
    maturity = np.where(u < 0.04, 18, np.where(u < 0.14, 13, 0)).astype(np.int32)
    width = len(str(n - 1))
    ids = [f"item-{i:0{width}d}" for i in range(n)]
    names = [f"cat-{k:02d}" for k in range(c)]
    cats_str = [names[k] for k in category]
    cat = Catalog.from_arrays(ids, emb, cats_str, maturity, created, popularity)
    cat.version = f"demo-{n}x{d}-c{c}-t{t}-s{cfg.seed}"
    return cat
