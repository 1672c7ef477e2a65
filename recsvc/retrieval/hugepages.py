"""Back big native allocations (the HNSW graph) with transparent huge pages.

A graph walk over a 1M-item index touches a few thousand nodes spread over
~400 MB: with 4 KiB pages nearly every visit misses the TLB (and in a VM each
miss is a two-level page walk). With 2 MiB pages the whole index fits the TLB's
reach. Measured on this 2-core VM at 1M x 64, the same index loaded twice and
queried alternately: 1.23-1.27x faster with huge pages at ef = 900, 1.22x at
the default ef = 660; 1.06x once the graph is laid out in cluster order
(recsvc.retrieval.layout), which removes most of those misses by itself
(benchmarks/bench_retrieval.py reports it every run).

numpy already asks for huge pages for its own large arrays (the catalog
embeddings); hnswlib allocates its graph with ``malloc``, out of our reach. So
``new_mappings_to_huge_pages`` notes the process's anonymous mappings, runs the
allocating call, and advises the mappings that appeared (or grew) meanwhile:

- ``MADV_HUGEPAGE`` marks them: pages faulted in later are huge, and khugepaged
  may collapse the existing ones in the background;
- ``collapse=True`` also asks for ``MADV_COLLAPSE`` (Linux >= 6.1): the pages
  already there are collapsed now, synchronously (~1-2 s for a 1M-item index).
  A freshly loaded index has its pages collapsed by ``collapse_huge_page``
  from a background thread instead (``AnnIndex.load``), so a start need not wait.

Only private anonymous mappings of at least 32 MiB count (never ``[heap]``).
The kernel merges adjacent anonymous mappings of the same kind, so an older
neighbour merged with a new mapping is advised with it, as is a big mapping
another thread made meanwhile: the same advice numpy gives its own arrays over
4 MiB. Everything is best effort: off Linux (x86-64 and arm64, whose madvise
constants these are), on kernels without ``MADV_COLLAPSE``, or with THP set to
``never`` it does less or nothing; the returned ``Advice`` says what it did.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_DIR = "/sys/kernel/mm/transparent_hugepage"
MIN_BYTES = 32 << 20


def _huge_page_size() -> int:
    try:
        with open(f"{THP_DIR}/hpage_pmd_size") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _huge_page_size()


@dataclass
class Advice:
    """What ``new_mappings_to_huge_pages`` did (for the log and the tests)."""

    mappings: int = 0
    advised_bytes: int = 0
    collapsed_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) advised
    collapsing: bool = False  # a background collapse (AnnIndex.load) is still running


def thp_mode() -> str:
    """The system's transparent huge page mode: 'always', 'madvise', 'never' or '' (unknown)."""
    try:
        with open(f"{THP_DIR}/enabled") as fh:
            text = fh.read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def _libc():
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return libc


_LIBC = _libc()


def anonymous_mappings(min_bytes: int | None = None) -> set[tuple[int, int]]:
    """(start, end) of the process's private, writable, anonymous mappings of at least ``min_bytes``."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    out: set[tuple[int, int]] = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                # address perms offset dev inode [path]: anonymous = no path ([heap] is not
                # ours; named anonymous mappings, "[anon:...]", belong to whoever named them)
                if len(parts) > 5:
                    continue
                if not parts[1].startswith("rw") or parts[1][3] != "p":
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if hi - lo >= min_bytes:
                    out.add((lo, hi))
    except OSError:
        pass
    return out


def advise(lo: int, hi: int, collapse: bool, result: Advice) -> None:
    """Advise the huge-page-aligned part of [lo, hi)."""
    if _LIBC is None:
        return
    start, end = (lo + HUGE - 1) & ~(HUGE - 1), hi & ~(HUGE - 1)
    if end <= start:
        return
    result.mappings += 1
    if _LIBC.madvise(start, end - start, MADV_HUGEPAGE) != 0:
        result.errors.append(f"MADV_HUGEPAGE: errno {ctypes.get_errno()}")
        return
    result.advised_bytes += end - start
    result.ranges.append((start, end))
    if not collapse:
        return
    # One huge page at a time: a block that cannot be collapsed fails alone
    # (e.g. the never-written tail of an index's spare capacity: EINVAL).
    for at in range(start, end, HUGE):
        collapse_huge_page(at, result)


def collapse_huge_page(at: int, result: Advice) -> None:
    """``MADV_COLLAPSE`` the huge page at ``at`` (aligned), now; the outcome is added to ``result``.
    (ctypes releases the GIL for the call: other threads run meanwhile.)"""
    if _LIBC is None:
        return
    if _LIBC.madvise(at, HUGE, MADV_COLLAPSE) == 0:
        result.collapsed_bytes += HUGE
    else:
        err = f"MADV_COLLAPSE: errno {ctypes.get_errno()}"
        if err not in result.errors:
            result.errors.append(err)


@contextmanager
def new_mappings_to_huge_pages(enabled: bool = True, collapse: bool = False,
                               min_bytes: int | None = None) -> Iterator[Advice]:
    """Advise huge pages for the big anonymous mappings created inside the block.

    Nothing happens when THP is set to ``never``: MADV_COLLAPSE would ignore
    that setting, and an operator who chose it means it.
    """
    result = Advice()
    if not enabled or _LIBC is None or thp_mode() in ("never", ""):
        yield result
        return
    before = anonymous_mappings(min_bytes)
    yield result
    for lo, hi in sorted(anonymous_mappings(min_bytes) - before):
        advise(lo, hi, collapse, result)

