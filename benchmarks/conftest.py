"""Benchmark fixtures, and the gate every benchmark run passes through (stage budgets, kernel twins).

RECSVC_BENCH_QUICK=1 (CI) shrinks catalogs and skips the 1M build.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

QUICK = os.environ.get("RECSVC_BENCH_QUICK", "") not in ("", "0")
NOW_MS = 1_795_910_400_000


def demo_config(n_items: int, dim: int = 64):
    from recsvc.config import Config

    return Config().with_overrides({
        "catalog": {"demo": {"n_items": n_items, "dim": dim}},
        "exploration": {"seed": 1},
    })


def coherent_users(catalog, n: int, seed: int = 11) -> list[np.ndarray]:
    """User vectors as real users look: the mean of 8 liked items from 1-2 categories."""
    rng = np.random.default_rng(seed)
    emb = catalog.embeddings[: catalog.n_rows]
    cats = catalog.categories[: catalog.n_rows]
    out = []
    for _ in range(n):
        liked = rng.choice(catalog.n_categories, size=rng.integers(1, 3), replace=False)
        pool = np.flatnonzero(np.isin(cats, liked))
        q = emb[rng.choice(pool, size=8, replace=False)].mean(axis=0)
        out.append((q / np.linalg.norm(q)).astype(np.float32))
    return out


def timed_load(cfg):
    """Load or build (once, cached under ~/.cache/recsvc) the demo catalog and index."""
    from recsvc.engine import demo_cache_dir, load_catalog_and_index

    built = not (demo_cache_dir(cfg) / "index.bin").exists()
    t = time.perf_counter()
    catalog, ann = load_catalog_and_index(cfg, progress=True)
    elapsed = time.perf_counter() - t
    # Steady state: the graph's huge-page collapse runs in a background thread after a load (~2 s at 1M,
    # more on a busy host); measured calls should not share the cores and the GIL with it.
    deadline = time.monotonic() + 120
    while getattr(ann.huge_pages, "collapsing", False) and time.monotonic() < deadline:
        time.sleep(0.05)
    return catalog, ann, elapsed, built


# --------------------------------------------------------------------------
# The gate: what a benchmark run checks beyond "no errors" (CI runs quick mode).
#
# - Stage budgets. A benchmark of the request path puts the medians of the engine's own per-stage
#   timings (``Recommendation.timings_us`` over its rounds) in ``extra_info["stage_median_us"]`` and the
#   budgets it ran under (``BudgetConfig``) in ``extra_info["budgets_ms"]`` (see ``stage_info``). The run
#   fails when a stage's median exceeds its budget.
# - Kernel twins. A bench module declares ``KERNEL_TWINS = [(compiled_test, twin_test), ...]`` next to its
#   benchmarks (the test functions themselves, so a rename cannot silently drop a pair). When both ran with
#   the same parameters, the run fails if the compiled one's fastest round is slower than its twin's. Only
#   the direction is checked, never a margin or an absolute time. Fastest rounds, not medians: the two sides
#   run one after the other, and on a shared host a load change between them moved medians by 40% (the
#   Thompson top-k kernel, 1.4x its twin over 200 rounds, measured 0.96x in one quick run); each side's
#   fastest round is the cost with the least interference, and both come from the same run on the same host.

#: Recommendation.timings_us key -> its BudgetConfig field.
STAGE_BUDGETS = {"candidates_us": "candidates_ms", "ranking_us": "ranking_ms", "reranking_us": "reranking_ms",
                 "total_us": "total_ms"}


@dataclass(frozen=True)
class Measured:
    """One benchmark's result, as the gate reads it."""

    nodeid: str
    module: str
    function: str
    param: str | None
    median_s: float
    extra_info: dict = field(default_factory=dict)
    min_s: float | None = None  # the fastest round (None: the median stands in)

    @property
    def fastest_s(self) -> float:
        return self.median_s if self.min_s is None else self.min_s


def stage_info(timings: list[dict[str, int]], budgets) -> dict:
    """``extra_info`` entries for the stage-budget check: per-stage medians of ``timings`` (one
    ``Recommendation.timings_us`` per request) and the ``BudgetConfig`` they ran under."""
    keys = sorted({k for t in timings for k in t})
    return {"stage_median_us": {k: float(np.median([t[k] for t in timings if k in t])) for k in keys},
            "budgets_ms": {k: float(v) for k, v in budgets.model_dump().items()}}


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def stage_budget_failures(results: list[Measured]) -> list[str]:
    """A stage whose median is over its configured budget, one message each."""
    out = []
    for r in results:
        medians, budgets = r.extra_info.get("stage_median_us"), r.extra_info.get("budgets_ms")
        if not medians or not budgets:
            continue
        for stage, key in STAGE_BUDGETS.items():
            if stage in medians and key in budgets and medians[stage] > budgets[key] * 1e3:
                out.append(f"{r.nodeid}: stage {stage.removesuffix('_us')} median {medians[stage] / 1e3:.3f} ms "
                           f"is over its budget (budgets.{key} = {budgets[key]:g} ms)")
    return out


def kernel_twin_failures(results: list[Measured], twins: dict[str, list[tuple[str, str]]]) -> list[str]:
    """A compiled benchmark slower than its twin (same module, same parameters), one message each.

    ``twins`` maps a module to its declared (compiled test, twin test) names; a pair whose sides did not
    both run (deselected, skipped, failed) is not judged."""
    by_key = {(r.module, r.function, r.param): r for r in results}
    out = []
    for r in results:
        for fast, twin in twins.get(r.module, []):
            if r.function != fast:
                continue
            other = by_key.get((r.module, twin, r.param))
            if other is not None and r.fastest_s > other.fastest_s:
                param = f"[{r.param}]" if r.param else ""
                out.append(f"{r.module}: {fast}{param} fastest round {_fmt(r.fastest_s)} is slower than its twin "
                           f"{twin}{param} fastest round {_fmt(other.fastest_s)} "
                           f"(twin / compiled = {other.fastest_s / r.fastest_s:.2f}, must be >= 1; medians "
                           f"{_fmt(r.median_s)} and {_fmt(other.median_s)})")
    return out


def gate_failures(results: list[Measured], twins: dict[str, list[tuple[str, str]]]) -> list[str]:
    return stage_budget_failures(results) + kernel_twin_failures(results, twins)


_RESULTS = pytest.StashKey[list]()
_TWINS = pytest.StashKey[dict]()
_GATE = pytest.StashKey[list]()
_SUMMARIES = pytest.StashKey[list]()


def add_summary(config, title: str, text: str) -> None:
    """A table to print at the end of the run (after pytest-benchmark's own)."""
    config.stash.setdefault(_SUMMARIES, []).append((title, text))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(bench, "stats", None)
    if call.when == "call" and report.passed and stats is not None and not bench.disabled:
        module = item.module.__name__
        twins = item.config.stash.setdefault(_TWINS, {})
        if module not in twins:
            twins[module] = [(a.__name__, b.__name__) for a, b in getattr(item.module, "KERNEL_TWINS", [])]
        item.config.stash.setdefault(_RESULTS, []).append(Measured(
            item.nodeid, module, item.originalname, item.callspec.id if hasattr(item, "callspec") else None,
            float(stats.stats.median), dict(bench.extra_info), float(stats.stats.min)))
    return report


def pytest_sessionfinish(session, exitstatus):
    results = session.config.stash.get(_RESULTS, [])
    failures = gate_failures(results, session.config.stash.get(_TWINS, {}))
    session.config.stash[_GATE] = failures
    if failures and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, text in config.stash.get(_SUMMARIES, []):
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    twins = config.stash.get(_TWINS, {})
    n_pairs = sum(1 for r in results for fast, _ in twins.get(r.module, []) if r.function == fast)
    n_budgets = sum(1 for r in results if r.extra_info.get("stage_median_us"))
    failures = config.stash.get(_GATE, [])
    terminalreporter.write_sep("=" if failures else "-", "benchmark gate: " + (
        f"{len(failures)} FAILED" if failures else "passed"), red=bool(failures), green=not failures)
    terminalreporter.write_line(f"{n_budgets} benchmark(s) with stage budgets, {n_pairs} compiled benchmark(s) "
                                "with a declared twin (compared when both ran)")
    for msg in failures:
        terminalreporter.write_line("FAILED " + msg, red=True)
