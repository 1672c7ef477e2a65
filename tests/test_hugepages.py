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

linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or hugepages._LIBC is None or hugepages.thp_mode() in ("never", ""),
    reason="needs Linux (x86-64 or arm64) with transparent huge pages not set to 'never'",
)


def _anonymous(size: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)


def _address(buf: mmap.mmap) -> int:
    return np.frombuffer(buf, np.uint8).ctypes.data


def _huge_kib(lo: int, hi: int) -> int:
    """AnonHugePages of the mapping that contains [lo, hi)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            a, b = (int(x, 16) for x in head[0].split("-"))
            inside = a <= lo and hi <= b
        elif inside and head[0] == "AnonHugePages:":
            return int(head[1])
    return 0


@linux_thp
def test_a_mapping_made_inside_the_block_is_advised_and_collapsed():
    size = 64 << 20
    with hugepages.new_mappings_to_huge_pages(collapse=True) as advice:
        buf = _anonymous(size)
        buf.write(b"\1" * size)  # fault it in with small pages first
    lo = _address(buf)
    assert any(a <= lo + hugepages.HUGE and lo + size - hugepages.HUGE <= b for a, b in advice.ranges)
    assert advice.advised_bytes >= size - 2 * hugepages.HUGE
    if not advice.errors or advice.collapsed_bytes:  # kernels before 6.1 lack MADV_COLLAPSE
        assert advice.collapsed_bytes >= size - 2 * hugepages.HUGE
        assert _huge_kib(lo, lo + size) >= (size - 2 * hugepages.HUGE) >> 10
    buf.close()


@linux_thp
def test_older_mappings_are_left_alone():
    old = _anonymous(64 << 20)
    lo = _address(old)
    # (marked "no huge pages", so the kernel cannot merge a new mapping into it:
    # a merged mapping is new as a whole, and advised whole)
    assert hugepages._LIBC.madvise(lo, 64 << 20, 15) == 0  # MADV_NOHUGEPAGE
    with hugepages.new_mappings_to_huge_pages(collapse=True) as advice:
        new = _anonymous(64 << 20)
    assert all(b <= lo or a >= lo + (64 << 20) for a, b in advice.ranges)
    assert advice.mappings >= 1 and _huge_kib(lo, lo + (64 << 20)) == 0
    for m in (old, new):
        m.close()


def test_nothing_is_advised_when_disabled_or_thp_is_never(monkeypatch):
    with hugepages.new_mappings_to_huge_pages(enabled=False) as advice:
        buf = _anonymous(64 << 20)
    assert advice.mappings == 0
    buf.close()
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    with hugepages.new_mappings_to_huge_pages(collapse=True) as advice:
        buf = _anonymous(64 << 20)
    assert advice.mappings == 0 and not advice.ranges
    buf.close()


@pytest.mark.parametrize("huge_pages", [True, False])
def test_index_results_do_not_depend_on_huge_pages(tmp_path, huge_pages):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((2000, 16)).astype(np.float32)
    rows = np.arange(2000, dtype=np.int32)
    # one build thread: the same graph every time, whatever the pages
    cfg = IndexConfig(ef_construction=50, build_threads=1, huge_pages=huge_pages)
    plain = AnnIndex.build(emb, rows, cfg.model_copy(update={"huge_pages": False}))
    # Room for 200k items: the graph's allocation (~40 MB) is a mapping of its
    # own, big enough to be advised, in the build and again in the load.
    ann = AnnIndex.build(emb, rows, cfg, capacity=200_000)
    ann.save(tmp_path, "v1")
    loaded = AnnIndex.load(tmp_path, 16, cfg, "v1")
    usable = hugepages._LIBC is not None and hugepages.thp_mode() not in ("never", "")
    for idx in (ann, loaded):
        assert (idx.huge_pages.advised_bytes > 0) == (huge_pages and usable), idx.huge_pages
    for q in emb[:20]:
        want = plain.query(q, 50)
        for idx in (ann, loaded):
            got = idx.query(q, 50)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_a_loaded_index_is_collapsed_in_the_background(tmp_path):
    """The load collapsed the graph into huge pages before returning (~1.7 s of a 1M-item start); now a
    thread does it page by page after the load, and queries answer the same meanwhile and after."""
    import time

    rng = np.random.default_rng(4)
    emb = rng.standard_normal((2000, 16)).astype(np.float32)
    rows = np.arange(2000, dtype=np.int32)
    cfg = IndexConfig(ef_construction=50, build_threads=1)
    ann = AnnIndex.build(emb, rows, cfg, capacity=200_000)
    ann.save(tmp_path, "v1")
    loaded = AnnIndex.load(tmp_path, 16, cfg, "v1")
    usable = hugepages._LIBC is not None and hugepages.thp_mode() not in ("never", "")
    if not usable:
        assert not loaded.huge_pages.collapsing and loaded.huge_pages.collapsed_bytes == 0
        return
    want = [ann.query(q, 20)[0] for q in emb[:10]]
    for q, w in zip(emb[:10], want):  # (while it may still run)
        np.testing.assert_array_equal(loaded.query(q, 20)[0], w)
    deadline = time.monotonic() + 60
    while loaded.huge_pages.collapsing and time.monotonic() < deadline:
        time.sleep(0.01)
    advice = loaded.huge_pages
    assert not advice.collapsing
    assert advice.collapsed_bytes > 0 or advice.errors, advice  # kernels before 6.1 lack MADV_COLLAPSE
    for q, w in zip(emb[:10], want):
        np.testing.assert_array_equal(loaded.query(q, 20)[0], w)
