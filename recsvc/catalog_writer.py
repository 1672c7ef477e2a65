"""The catalog writer: UpsertItems and DeleteItems, logged before they apply, replayed the same way.

Everything the catalog would refuse is refused here, before the log: a logged change must always
apply (on replay too). After a change the retriever's derived indexes (fresh items, filter statistics,
per-category rows) are rebuilt outside the ingest lock, so feedback need not wait for them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from recsvc.catalog import Catalog, CatalogError, ItemRecord
from recsvc.errors import InvalidArgument, Unavailable, echo
from recsvc.messages import ItemIn
from recsvc.retrieval.ann import AnnIndex
from recsvc.retrieval.sources import Retriever
from recsvc.state.interface import OnlineStateWriter
from recsvc.state.journal import Journal
from recsvc.state.records import CatalogDelete, CatalogUpsert

_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


#: Magnitudes (largest |value|) whose norm each dtype computes without overflow or underflow, for up to 4096
#: dimensions; outside them the vector is scaled by its largest magnitude first, in float64.
_SAFE_NORM = {np.dtype(np.float32): (1e-18, 1e17), np.dtype(np.float64): (1e-150, 1e150)}


def validated_embedding(values: Sequence[float], dim: int, what: str, normalize: bool,
                        dtype: type = np.float64) -> np.ndarray:
    """An item's or a user's embedding as float32, unit length when ``normalize`` — one rule for both.

    Refused (``InvalidArgument`` naming ``what``) only when it has the wrong dimension, is not finite, lies
    outside float32 range or is exactly zero: any other magnitude keeps its direction. The norm is taken in
    ``dtype`` when its magnitude is ordinary (item embeddings in float64, user embeddings in float32, as each
    has always been served), and in float64 after scaling by the largest magnitude otherwise: 1e19 overflows
    a float32 norm and 1e-45 underflows it to 0.
    """
    emb = np.asarray(values, np.float64).reshape(-1)
    if emb.size != dim:
        raise InvalidArgument(f"{what} has {emb.size} values; the catalog's dimension is {dim}")
    if not np.isfinite(emb).all():
        raise InvalidArgument(f"{what} must be finite, non-zero and within float32 range: it holds NaN or infinity")
    peak = float(np.abs(emb).max()) if emb.size else 0.0
    if peak > _FLOAT32_MAX:
        raise InvalidArgument(f"{what} must be finite, non-zero and within float32 range: |value| reaches {peak:.3g}")
    if peak == 0.0:
        raise InvalidArgument(f"{what} must be finite, non-zero and within float32 range: it is all zeros")
    if not normalize:
        return emb.astype(np.float32)
    low, high = _SAFE_NORM[np.dtype(dtype)]
    if low <= peak <= high:
        vec = emb.astype(dtype)
        return (vec / vec.dtype.type(np.linalg.norm(vec))).astype(np.float32)
    emb /= peak
    return (emb / np.linalg.norm(emb)).astype(np.float32)


class CatalogWriter:
    def __init__(self, catalog: Catalog, ann: AnnIndex, state: OnlineStateWriter, retriever: Retriever,
                 journal: Journal, clock: Callable[[], int], max_batch: int, diverged: bool = False) -> None:
        self.catalog = catalog
        self.ann = ann
        self.state = state
        self.retriever = retriever
        self.journal = journal
        self.clock = clock
        self._max_batch = max_batch
        #: True once the live catalog differs from the base catalog files: every snapshot must then carry
        #: the catalog (the base would lose the changes).
        self.diverged = diverged

    def upsert_items(self, items: Sequence[ItemIn]) -> tuple[int, int]:
        """(inserted, updated)."""
        if not items:
            raise InvalidArgument("items must not be empty")
        if len(items) > self._max_batch:
            raise InvalidArgument(f"at most {self._max_batch} items per call, got {len(items)}")
        records = self._validated(items)
        if self.journal.shared:  # the consumer applies it, here and on every replica
            inserted = sum(r.item_id not in self.catalog.row_of for r in records)
            self.journal.wait_applied(self.journal.append([CatalogUpsert(records)], durable=True))
            return inserted, len(records) - inserted
        logged = False
        try:
            with self.journal.ingest:
                try:
                    self.journal.append([CatalogUpsert(records)], durable=True)
                except OSError as exc:
                    raise Unavailable(f"the event log cannot be written ({exc.strerror or exc}); "
                                      "nothing was changed, retry later") from None
                logged = True
                result = self._upsert(records)
        finally:
            # Outside the ingest lock (feedback need not wait), and even after a
            # failure half-way: the derived indexes must follow the catalog.
            if logged:
                self.retriever.catalog_changed(self.clock())
        return result

    def _validated(self, items: Sequence[ItemIn]) -> list[ItemRecord]:
        records, seen = [], set()
        for i, it in enumerate(items):
            where = f"items[{i}] ({echo(it.item_id)})"
            if not it.item_id:
                raise InvalidArgument(f"items[{i}].item_id is required")
            if it.item_id.startswith("\x00"):
                raise InvalidArgument(f"{where}: item ids must not start with a NUL character")
            if it.item_id in seen:
                raise InvalidArgument(f"{where}: the id appears twice in one call")
            seen.add(it.item_id)
            emb = validated_embedding(it.embedding, self.catalog.dim, f"{where}: embedding", self.catalog.normalize)
            if not 0 <= it.maturity <= _INT32_MAX:
                raise InvalidArgument(f"{where}: maturity must be between 0 and {_INT32_MAX}")
            if it.category.endswith("\x00"):
                # A saved catalog is read back through numpy strings, which drop trailing NULs: after a
                # restart from a snapshot the item would be in another category.
                raise InvalidArgument(f"{where}: category must not end with a NUL character (it would not "
                                      "survive a restart)")
            records.append(ItemRecord(it.item_id, emb, it.category, int(it.maturity),
                                      int(it.created_at_ms) or self.clock(), 0.0, dict(it.attributes)))
        return records

    def delete_items(self, item_ids: Sequence[str]) -> tuple[int, list[str]]:
        """(deleted, the ids that were not in the catalog)."""
        if not item_ids:
            raise InvalidArgument("item_ids must not be empty")
        if self.journal.shared:
            known = list(dict.fromkeys(i for i in item_ids if i in self.catalog.row_of))
            if known:
                self.journal.wait_applied(self.journal.append([CatalogDelete(known)], durable=True))
            known_set = set(known)
            return len(known), [i for i in item_ids if i not in known_set]
        with self.journal.ingest:
            known = [i for i in item_ids if i in self.catalog.row_of]
            if known:
                try:
                    self.journal.append([CatalogDelete(known)], durable=True)
                except OSError as exc:
                    raise Unavailable(f"the event log cannot be written ({exc.strerror or exc}); "
                                      "nothing was changed, retry later") from None
            deleted = self._delete(known)
        if deleted:
            self.retriever.catalog_changed(self.clock())
        known_set = set(known)
        return deleted, [i for i in item_ids if i not in known_set]

    # -- applying a change (live and on replay) -----------------------------------------------------------
    def apply(self, record: CatalogUpsert | CatalogDelete, rebuild: bool = False) -> None:
        """Apply a logged change (recovery: the retriever rebuilds its derived indexes on first use; a
        replica tailing a shared log passes ``rebuild`` to have them rebuilt now)."""
        if isinstance(record, CatalogUpsert):
            self._upsert(record.items)
        else:
            self._delete(record.item_ids)
        if rebuild:
            self.retriever.catalog_changed(self.clock())

    def _upsert(self, records: list[ItemRecord]) -> tuple[int, int]:
        # State arrays grow first: a request must never see a row they lack.
        self.state.ensure_capacity(self.catalog.n_rows + len(records) + 16)
        try:
            rows, inserted, updated = self.catalog.upsert(records)
        except CatalogError as exc:
            raise InvalidArgument(str(exc)) from None
        self.state.ensure_capacity(self.catalog.capacity)
        self.ann.upsert(self.catalog.embeddings[rows], rows)
        self.diverged = True
        return inserted, updated

    def _delete(self, item_ids: Iterable[str]) -> int:
        rows, _ = self.catalog.delete(item_ids)
        if rows.size:
            self.ann.delete(rows)
            self.state.drop_items(rows)
            self.diverged = True
        return int(rows.size)
