"""Huge pages for the HNSW graph: the advice reaches new mappings only, and never changes results."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from recsvc.config import IndexConfig
from recsvc.retrieval import hugepages
from recsvc.retrieval.ann import AnnIndex

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages not set to 'never'",
)


def _huge_kib(lo: int, hi: int) -> int:
    """AnonHugePages of the mapping that contains [lo, hi)."""
    cur = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            a, b = (int(x, 16) for x in head[0].split("-"))
            cur = a <= lo and hi <= b
        elif cur and head[0] == "AnonHugePages:":
            return int(head[1])
    return 0


@linux_thp
def test_a_mapping_made_inside_the_block_is_advised_and_collapsed():
    size = 64 << 20
    before = hugepages.anonymous_mappings()
    with hugepages.new_mappings_to_huge_pages(collapse=True) as advice:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.write(b"\1" * size)  # fault it in with small pages first
    lo = np.frombuffer(buf, np.uint8).ctypes.data
    assert any(a <= lo < b for a, b in hugepages.anonymous_mappings() - before)
    assert advice.mappings >= 1 and advice.advised_bytes >= size - 4 * hugepages.HUGE
    if not advice.errors or advice.collapsed_bytes:
        assert advice.collapsed_bytes > 0 and _huge_kib(lo, lo + size) > 0
    del lo
    buf.close()


def test_older_mappings_and_small_ones_are_left_alone():
    buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # (a read-only guard between them: the kernel merges adjacent anonymous
    # mappings of the same kind, and a merged one counts as new: advised whole)
    guard = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
    with hugepages.new_mappings_to_huge_pages(collapse=True) as advice:
        small = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert advice.mappings == 0 and advice.advised_bytes == 0
    with hugepages.new_mappings_to_huge_pages(enabled=False) as advice:
        other = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert advice.mappings == 0
    for m in (buf, guard, small, other):
        m.close()


@pytest.mark.parametrize("huge_pages", [True, False])
def test_index_results_do_not_depend_on_huge_pages(tmp_path, huge_pages):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((2000, 16)).astype(np.float32)
    rows = np.arange(2000, dtype=np.int32)
    cfg = IndexConfig(ef_construction=50, huge_pages=huge_pages)
    plain = AnnIndex.build(emb, rows, IndexConfig(ef_construction=50, huge_pages=False))
    ann = AnnIndex.build(emb, rows, cfg)
    ann.save(tmp_path, "v1")
    loaded = AnnIndex.load(tmp_path, 16, cfg, "v1")
    for q in emb[:20]:
        want = plain.query(q, 50)
        for idx in (ann, loaded):
            got = idx.query(q, 50)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
