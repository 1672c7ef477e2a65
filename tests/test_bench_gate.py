"""The benchmark gate (benchmarks/conftest.py): a benchmark run fails when a stage's median is over its
configured budget or a compiled kernel is slower than its twin in the same run.

The check functions on synthetic results, then the real conftest driving a tiny pytest-benchmark session.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from recsvc.config import BudgetConfig

pytest_plugins = ["pytester"]

BENCH_CONFTEST = Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"


def _load_gate():
    spec = importlib.util.spec_from_file_location("recsvc_benchmarks_gate", BENCH_CONFTEST)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses resolve their module by name)
    spec.loader.exec_module(module)
    return module


gate = _load_gate()
Measured = gate.Measured
TWINS = {"bench_x": [("test_kernel", "test_twin")]}


def measured(function, median_s, param=None, extra_info=None, module="bench_x", min_s=None):
    node = f"benchmarks/{module}.py::{function}" + (f"[{param}]" if param else "")
    return Measured(node, module, function, param, median_s, extra_info or {}, min_s)


# -- kernel twins ------------------------------------------------------------------------------------------

def test_a_kernel_slower_than_its_twin_fails_naming_both():
    failures = gate.kernel_twin_failures([measured("test_kernel", 320e-6, min_s=300e-6),
                                          measured("test_twin", 130e-6, min_s=120e-6)], TWINS)
    assert failures == ["bench_x: test_kernel fastest round 300.0 µs is slower than its twin test_twin fastest round "
                        "120.0 µs (twin / compiled = 0.40, must be >= 1; medians 320.0 µs and 130.0 µs)"]


def test_twins_are_compared_by_their_fastest_rounds():
    """The sides run one after the other: a load change between them moves the medians (the kernel's median
    here is above its twin's), the fastest rounds much less."""
    kernel = measured("test_kernel", 290e-6, min_s=190e-6)
    assert gate.kernel_twin_failures([kernel, measured("test_twin", 280e-6, min_s=270e-6)], TWINS) == []
    assert len(gate.kernel_twin_failures([kernel, measured("test_twin", 150e-6, min_s=140e-6)], TWINS)) == 1


def test_a_kernel_faster_than_or_as_fast_as_its_twin_passes():
    for kernel_s in (50e-6, 120e-6):
        assert gate.kernel_twin_failures([measured("test_kernel", kernel_s), measured("test_twin", 120e-6)],
                                         TWINS) == []


def test_twins_are_compared_parameter_by_parameter():
    results = [measured("test_kernel", 1e-3, "ndcg"), measured("test_twin", 5e-3, "ndcg"),
               measured("test_kernel", 4e-3, "map"), measured("test_twin", 2e-3, "map")]
    failures = gate.kernel_twin_failures(results, TWINS)
    assert len(failures) == 1
    assert failures[0].startswith("bench_x: test_kernel[map] fastest round 4.000 ms is slower than its twin "
                                  "test_twin[map] fastest round 2.000 ms")


def test_a_pair_without_its_twin_or_in_another_module_is_not_judged():
    assert gate.kernel_twin_failures([measured("test_kernel", 1.0)], TWINS) == []
    other = [measured("test_kernel", 1.0, module="bench_y"), measured("test_twin", 1e-6, module="bench_y")]
    assert gate.kernel_twin_failures(other, TWINS) == []


# -- stage budgets -----------------------------------------------------------------------------------------

def test_stage_info_takes_each_stages_median_and_the_budgets():
    timings = [{"candidates_us": c, "total_us": 10 * c} for c in (100, 900, 300)]
    info = gate.stage_info(timings, BudgetConfig(candidates_ms=2.5))
    assert info["stage_median_us"] == {"candidates_us": 300.0, "total_us": 3000.0}
    assert info["budgets_ms"] == {"total_ms": 200.0, "candidates_ms": 2.5, "ranking_ms": 100.0,
                                  "reranking_ms": 20.0}


def test_a_stage_median_over_its_budget_fails_naming_the_stage_and_budget():
    timings = [{"candidates_us": 1200, "ranking_us": 300, "reranking_us": 90, "total_us": 2500}] * 3
    info = gate.stage_info(timings, BudgetConfig(candidates_ms=1.0, reranking_ms=0.05))
    failures = gate.stage_budget_failures([measured("test_recommend", 2.5e-3, extra_info=info)])
    assert failures == [
        "benchmarks/bench_x.py::test_recommend: stage candidates median 1.200 ms is over its budget "
        "(budgets.candidates_ms = 1 ms)",
        "benchmarks/bench_x.py::test_recommend: stage reranking median 0.090 ms is over its budget "
        "(budgets.reranking_ms = 0.05 ms)",
    ]


def test_stages_within_the_default_budgets_pass():
    timings = [{"candidates_us": 1200, "ranking_us": 300, "exploration_us": 5000, "reranking_us": 90,
                "total_us": 7000}]
    info = gate.stage_info(timings, BudgetConfig())
    assert gate.stage_budget_failures([measured("test_recommend", 7e-3, extra_info=info)]) == []


# -- the conftest in a real benchmark session ----------------------------------------------------------------

BENCH_FILE = """
import time
import pytest
from conftest import stage_info
from recsvc.config import BudgetConfig

KERNEL_SLEEP_S = {kernel_sleep}


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_kernel(benchmark):
    benchmark.pedantic(spin, args=(KERNEL_SLEEP_S,), rounds=5)


def test_twin(benchmark):
    benchmark.pedantic(spin, args=(0.001,), rounds=5)


def test_recommend(benchmark):
    benchmark.pedantic(spin, args=(0.0001,), rounds=3)
    benchmark.extra_info.update(stage_info([{{"total_us": 3000, "candidates_us": 1000}}] * 3,
                                           BudgetConfig(total_ms={total_budget_ms})))


KERNEL_TWINS = [(test_kernel, test_twin)]
"""


def run_bench_session(pytester, kernel_sleep, total_budget_ms):
    pytester.makeconftest(BENCH_CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(bench_gate_demo=BENCH_FILE.format(kernel_sleep=kernel_sleep, total_budget_ms=total_budget_ms))
    return pytester.runpytest_subprocess("bench_gate_demo.py", "-p", "no:cacheprovider",
                                         "-o", "python_files=bench_*.py", "--benchmark-columns=median")


def test_the_run_fails_on_a_slow_kernel_and_a_stage_over_budget(pytester):
    result = run_bench_session(pytester, kernel_sleep=0.004, total_budget_ms=2.0)
    result.assert_outcomes(passed=3)  # every benchmark itself passed: the gate fails the run
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.re_match_lines([
        r".*benchmark gate: 2 FAILED.*",
        r"FAILED bench_gate_demo.py::test_recommend: stage total median 3.000 ms is over its budget "
        r"\(budgets.total_ms = 2 ms\)",
        r"FAILED bench_gate_demo: test_kernel fastest round \d+\.\d+ ms is slower than its twin test_twin fastest "
        r"round \d\.\d+ ms \(twin / compiled = 0\.\d\d, must be >= 1; medians .*\)",
    ])


def test_the_run_passes_when_kernels_win_and_stages_fit(pytester):
    result = run_bench_session(pytester, kernel_sleep=0.0002, total_budget_ms=200.0)
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*benchmark gate: passed*",
                                 "1 benchmark(s) with stage budgets, 1 compiled benchmark(s) with a declared twin*"])
