"""The candidate set handed from retrieval to ranking: numpy arrays, one row each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Retrieval sources, in bit order of ``Candidates.sources`` and column order of
#: ``Candidates.source_scores``.
SOURCE_NAMES: tuple[str, ...] = ("ann", "cooccurrence", "popular", "fresh")
SOURCE_BIT: dict[str, int] = {name: 1 << i for i, name in enumerate(SOURCE_NAMES)}


@dataclass(frozen=True)
class Candidates:
    """Merged, de-duplicated, filtered candidates.

    rows:          int32[n]      catalog rows
    sources:       uint8[n]      bitmask of the sources that proposed each row
    source_scores: float32[n, S] each source's score (0 where it did not propose)
    """

    rows: np.ndarray
    sources: np.ndarray
    source_scores: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(
            np.empty(0, np.int32),
            np.empty(0, np.uint8),
            np.empty((0, len(SOURCE_NAMES)), np.float32),
        )

    def source_names(self, i: int) -> list[str]:
        return list(_NAMES_OF_MASK[int(self.sources[i])])

    def source_names_at(self, idx: np.ndarray) -> list[list[str]]:
        """``[source_names(i) for i in idx]`` in one gather."""
        return [list(_NAMES_OF_MASK[mask]) for mask in self.sources[idx].tolist()]


#: source bit mask -> the names of its sources, in SOURCE_NAMES order (one lookup per served item)
_NAMES_OF_MASK = tuple(tuple(name for b, name in enumerate(SOURCE_NAMES) if mask >> b & 1)
                       for mask in range(1 << len(SOURCE_NAMES)))
